"""Per-example gradient clipping for PyTorch models: ``PerSample(model, clipper, mode)``.

``ps.backward(per_example_losses)`` leaves ``p.grad = Σ_i c_i ∇_i`` — every example's gradient
scaled by its own coefficient, summed (not averaged: :class:`~gradclip.torch.DPOptimizer` or the
caller normalises) — and returns a :class:`~gradclip.ClipInfo` with one entry per example. The
clipper decides the coefficients exactly as it decides one for a whole batch (the
measure → decide → apply contract, ``docs/architecture.md``), on per-example measurements:
``GlobalNorm(C)`` bounds each example's whole gradient (Abadi et al. 2016, "Deep learning with
differential privacy"), ``Norm(C)`` each example's gradient of each parameter (per-layer clipping,
McMahan et al. 2018), ``QuantileNorm`` adapts ``C`` to a quantile of the per-example norms
(Andrew et al. 2021).

Modes (how the per-example norms and the clipped sum are computed):

* ``"bk"`` — book-keeping (Bu et al. 2023, ICML): one backward pass to the layers' outputs; per
  layer the per-example norm by ghost norm or instantiation (``per_sample_rules.ghost_cheaper``:
  the faster unless instantiating holds more); then the clipped sum from the instantiated
  gradients, or one weight-gradient matmul per ghost-normed layer on the rescaled output
  gradients.
* ``"ghost"`` — ghost clipping (Li et al. 2022): a first backward pass measures norms only, each
  layer's as its output gradient arrives (ghost norm, or an instantiated gradient dropped at once
  where that is faster and smaller), a second ordinary backward of ``Σ_i c_i ℓ_i`` writes the
  clipped sum. Least memory. Above a cut (``cut=``), the first pass frees the graph as it goes
  and those layers' clipped sums are taken book-keeping style.
* ``"instantiate"`` — per-example gradients kept in ``p.grad_sample`` (``(B, *p.shape)``, as
  Opacus' hooks mode), then summed with the coefficients.
* ``"vmap"`` — every module through ``torch.func`` (``vmap`` of ``vjp``, in chunks): any module
  whose examples are independent.
* ``"auto"`` — ``"bk"``, with the ``torch.func`` rule for modules without a dedicated one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradclip._core.contract import NO_SIGNALS, Measured, Signals
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.ops import get_ops
from gradclip._core.types import ClipInfo
from gradclip.clippers import AdaGC, AutoClip, GlobalNorm, Norm, QuantileNorm, ZClip
from gradclip.torch.per_sample_func import (
    batch_dim_of,
    func_contributions,
    owned_parameters,
)
from gradclip.torch.per_sample_ghost import auto_cut, find_cut, ghost_norms
from gradclip.torch.per_sample_hooks import Recorder, check_graph, output_grads
from gradclip.torch.per_sample_rules import Direct, contributions, refusal, rule_for

__all__ = ["MODES", "PerSample"]

MODES = ("auto", "bk", "ghost", "instantiate", "vmap")
_NORM_HOW = {"bk": "auto", "auto": "auto", "ghost": "auto", "instantiate": "instantiate", "vmap": "auto"}


class _Unit:
    """A hooked module and the parameters its rule differentiates."""

    __slots__ = ("module", "name", "opaque", "params", "rule")

    def __init__(self, name: str, module: nn.Module, rule: Any, params: list[tuple[str, torch.Tensor]]):
        self.name, self.module, self.rule, self.params = name, module, rule, params
        # Every parameter its forward touches is its own (a leaf, or MultiheadAttention handled
        # whole): the graph check may step over its calls. A parent with parameters of its own
        # runs children and may use their parameters directly, so its body is walked.
        self.opaque = rule is not None or isinstance(module, nn.MultiheadAttention) or not any(module.children())


def check_clipper(where: str, clipper: Any) -> str:
    """``"global"`` or ``"layer"``: how a clipper bounds each example; refuses the others.

    Raises:
        InvalidArgumentError: A clipper without a per-example meaning (element-wise, AGC, spike
            skipping) or an adaptive one whose threshold follows private data without noise
            (ZClip, AutoClip, AdaGC: their threshold would leak it under differential privacy).
    """
    if isinstance(clipper, (ZClip, AutoClip, AdaGC)):
        raise InvalidArgumentError(
            f"{where}: {type(clipper).__name__} sets its threshold from the (private) gradient norms without "
            "noise, which breaks differential privacy; use GlobalNorm(C), Norm(C) or QuantileNorm (whose "
            "count DPOptimizer noises). Nothing was changed."
        )
    if isinstance(clipper, (GlobalNorm, QuantileNorm, Norm)):
        if getattr(clipper, "norm_type", 2.0) != 2.0:
            raise InvalidArgumentError(
                f"{where}: per-example clipping bounds L2 norms; got norm_type={clipper.norm_type!r}. "
                "Nothing was changed."
            )
        if clipper.nonfinite not in ("propagate", "skip"):
            raise InvalidArgumentError(
                f"{where}: nonfinite={clipper.nonfinite!r} is not supported per example; use 'propagate' or "
                "'skip'. Nothing was changed."
            )
        return "layer" if isinstance(clipper, Norm) else "global"
    raise InvalidArgumentError(
        f"{where}: clipper must be GlobalNorm(C), Norm(C) or QuantileNorm(...) for per-example clipping, got "
        f"{type(clipper).__name__}. Nothing was changed."
    )


class PerSample:
    """Per-example clipping of a model's gradients (see the module docstring for the modes).

    Args:
        model: The model. Forward hooks are put on its modules that own trainable parameters
            (removed by :meth:`remove`); nothing else about it changes.
        clipper: ``GlobalNorm(C)``, ``Norm(C)`` (per parameter) or ``QuantileNorm(...)``.
        mode: ``"auto"``, ``"bk"``, ``"ghost"``, ``"instantiate"`` or ``"vmap"``.
        chunk_size: Examples per vectorized chunk of the ``torch.func`` rule (None: all).
        check_graph: Walk the autograd graph each step to refuse parameters used outside the
            calls of their modules (cheap; turn off only for a model known to be clean).
        cut: Ghost mode only (with ``GlobalNorm``/``QuantileNorm``): where its first pass stops
            retaining the graph (``per_sample_ghost``). ``"auto"``: at the input of the layer
            an estimate from the recorded sizes favours, or nowhere; a module with trainable
            parameters, called once per step: at its input; ``None``: never. Exact in every
            case; a cut that would not be (a skip connection around it) is not taken.

    Raises:
        InvalidArgumentError: An unknown mode; an unsupported clipper; a module that mixes
            examples (BatchNorm), a recurrent layer, an Embedding with ``max_norm``, or (in
            ``bk``/``ghost``/``instantiate``) a module with trainable parameters and no rule —
            each named.
    """

    def __init__(
        self,
        model: nn.Module,
        clipper: Any,
        mode: str = "auto",
        *,
        chunk_size: int | None = 32,
        check_graph: bool = True,
        cut: Any = "auto",
    ):
        if mode not in MODES:
            raise InvalidArgumentError(f"PerSample: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"PerSample: model must be a torch.nn.Module, got {type(model).__name__}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidArgumentError(f"PerSample: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        self.kind = check_clipper("PerSample", clipper)
        self.model, self.clipper, self.mode = model, clipper, mode
        self.chunk_size, self.check_graph = chunk_size, check_graph
        self._units = self._plan(model, mode)
        self.parameters: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.requires_grad
        ]
        self._tracked = {id(p): n for n, p in self.parameters}
        self._recorder = Recorder({u.module: u for u in self._units})
        self._state: Any = None
        self._counts: torch.Tensor | None = None  # QuantileNorm, move_bound=False: see take_counts
        self._cut_choice = self._cut_rule(cut)

    # -- construction ------------------------------------------------------------------------
    def _plan(self, model: nn.Module, mode: str) -> list[_Unit]:
        units: list[_Unit] = []
        whole: list[str] = []  # modules handled with their subtree (MultiheadAttention)
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in whole):
                continue
            reason = refusal(name, module)
            if reason is not None:
                raise InvalidArgumentError(f"PerSample: {reason}. Nothing was changed.")
            if isinstance(module, nn.MultiheadAttention):
                # Its forward reads out_proj's weight directly (F.multi_head_attention_forward),
                # never calling out_proj: the whole attention is one torch.func unit.
                whole.append(name)
                # Its rule, in every mode, is the torch.func one.
                params = owned_parameters(module, recurse=True)
                if params:
                    units.append(_Unit(name, module, None, params))
                continue
            params = owned_parameters(module, recurse=False)
            if not params:
                continue
            rule = None if mode == "vmap" else rule_for(module)
            if rule is None:
                self._need_func(mode, name, module)
            units.append(_Unit(name, module, rule, params))
        return units

    def _cut_rule(self, cut: Any) -> Any:
        """``calls -> index or None``: at which recorded call's input ghost mode cuts."""
        if cut is None:
            return None
        if isinstance(cut, nn.Module):
            if cut not in {u.module for u in self._units}:
                raise InvalidArgumentError(
                    f"PerSample: cut must be one of the model's modules with trainable parameters, got "
                    f"{type(cut).__name__}. Nothing was changed."
                )

            def at_module(calls: list, batch: int) -> list[int]:
                found = [i for i, c in enumerate(calls) if c.unit.module is cut]
                return found if len(found) == 1 else []  # a module called twice: no single cut

            return at_module
        if cut == "auto":
            return auto_cut
        raise InvalidArgumentError(f"PerSample: cut must be 'auto', None or a module, got {cut!r}. Nothing was changed.")

    @staticmethod
    def _need_func(mode: str, name: str, module: nn.Module) -> None:
        if mode not in ("auto", "vmap"):
            raise InvalidArgumentError(
                f"PerSample: {name or 'the model'} ({type(module).__name__}) has trainable parameters and no "
                f"per-example rule in mode={mode!r}; use mode='auto' (torch.func for such modules) or "
                "mode='vmap'. Nothing was changed."
            )

    def remove(self) -> None:
        """Remove the hooks: the model is as it was before."""
        self._recorder.remove()

    @property
    def state(self) -> Any:
        """The clipper's state (QuantileNorm's current bound), None before the first step."""
        return self._state

    # -- the step ----------------------------------------------------------------------------
    def backward(
        self,
        per_example_losses: torch.Tensor,
        *,
        loss_scale: Any = None,
        count_noise: Any = None,
        expected_batch_size: int | None = None,
        move_bound: bool = True,
    ) -> ClipInfo:
        """Clip each example's gradient and write their sum into ``p.grad``.

        Args:
            per_example_losses: 1-D tensor, one loss per example of the batch the model saw.
            loss_scale: The factor the losses were multiplied by (AMP's ``GradScaler``): norms
                are divided by it before they are compared with the threshold, so the bound
                holds for the unscaled gradients; the written sum stays scaled.
            count_noise: For ``QuantileNorm`` under DP, the noise added to the count of unclipped
                examples (a 0-d tensor) when this batch moves the bound on its own
                (:class:`~gradclip.torch.DPOptimizer` instead passes ``move_bound=False`` and
                noises the logical step's count once, in :meth:`move_bound`'s ``counts``).
            expected_batch_size: The denominator of the noised unclipped fraction (the batch
                size when None).
            move_bound: For ``QuantileNorm``: move the bound from this batch now (True), or
                (False) clip at the current bound, leave it, and add this batch's counts to
                those :meth:`take_counts` returns, for :meth:`move_bound` to move it once from
                several batches or processes (:class:`~gradclip.torch.DPOptimizer` does, once per
                logical step; ``count_noise`` is then unused).

        Returns:
            A ClipInfo whose ``norm``, ``coef``, ``clipped`` and ``finite`` hold one entry per
            example (``coef`` the effective scale ``‖c ⊙ g‖ / ‖g‖`` for ``Norm``).

        Raises:
            InvalidArgumentError: Losses that are not a 1-D tensor with one entry per example of
                every recorded call; a parameter whose ``.grad`` is already set (call
                ``zero_grad(set_to_none=True)`` first); a parameter used outside its module's
                calls. Gradients are unchanged in every case.
        """
        where = "PerSample.backward"
        losses = per_example_losses
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise InvalidArgumentError(
                f"{where}: per_example_losses must be a 1-D tensor with one loss per example (reduction='none'), "
                f"got {shape}; gradients are unchanged"
            )
        stale = [n for n, p in self.parameters if p.grad is not None]
        if stale:
            raise InvalidArgumentError(
                f"{where}: {stale[0]} (and {len(stale) - 1} more) already has a .grad: call "
                "optimizer.zero_grad(set_to_none=True) between steps (a second backward would mix clipped sums); "
                "gradients are unchanged"
            )
        batch = losses.shape[0]
        calls = self._recorder.take()
        if batch == 0:  # an empty Poisson batch: every clipped sum is zero
            for _, p in self.parameters:
                p.grad = torch.zeros_like(p)
            empty = torch.zeros(0, device=losses.device)
            return ClipInfo(empty, self._threshold(losses.device), empty, empty.bool(), empty.bool(), torch.tensor(False))
        if losses.grad_fn is None:
            raise InvalidArgumentError(f"{where}: per_example_losses does not require grad; gradients are unchanged")
        missing = InvalidArgumentError(
            f"{where}: no module call was recorded for these losses: run the forward pass after creating "
            "PerSample, with gradients enabled, between backward calls; gradients are unchanged"
        )
        if not calls:
            raise missing
        if self.check_graph:
            # Also drops calls of another forward (an evaluation run with gradients enabled).
            calls = check_graph(losses, calls, self._tracked)
        if not calls:
            raise missing
        _check_batch(where, calls, batch)
        ghost = self.mode == "ghost" and self.kind == "global"
        if ghost:
            # Norms taken as each layer's output gradient arrives; nothing per layer is kept
            # (but for the layers above a cut, whose clipped sum is taken book-keeping style).
            cut = None if self._cut_choice is None else find_cut(losses, calls, self._cut_choice(calls, batch))
            norms_by_param = ghost_norms(self, losses, calls, batch, cut)
            self._seen = set(norms_by_param)
            names = [n for n, p in self.parameters if id(p) in norms_by_param]
            norms_sq = torch.stack([norms_by_param[id(p)] for _, p in self.parameters if id(p) in norms_by_param], 1)
        else:
            grads = output_grads(losses.sum(), calls)
            pieces = self._pieces(calls, grads, batch)
            del grads
            names = [n for n, p in self.parameters if id(p) in pieces]
            norms_sq = torch.stack([self._norm_sq(pieces, p, False) for _, p in self.parameters if id(p) in pieces], 1)
        norms = norms_sq.sqrt()
        if loss_scale is not None:
            norms = norms / torch.as_tensor(loss_scale, dtype=norms.dtype, device=norms.device)
        coef, info = self._decide(norms, names, count_noise, expected_batch_size, move_bound)
        if ghost:
            weights = coef.to(losses.dtype).detach()
            if cut is None:
                params = [p for _, p in self.parameters if id(p) in self._seen]
                torch.autograd.backward((losses * weights).sum(), inputs=params)
            else:
                _second_pass_cut([p for _, p in self.parameters if id(p) in self._seen], cut, weights)
        else:
            self._write(pieces, coef)
        return info

    def _pieces(self, calls: list, grads: list[list[Any]], batch: int) -> dict[int, list[Any]]:
        """Every parameter's contributions from every call (``grads``: each call's output
        gradients), ``{id(param): [piece, ...]}``."""
        pieces: dict[int, list[Any]] = {}
        for call, call_grads in zip(calls, grads):
            for piece in self.call_pieces(call, call_grads, batch):
                pieces.setdefault(id(piece.param), []).append(piece)
        self._seen = set(pieces)
        return pieces

    def call_pieces(self, call: Any, call_grads: list, batch: int) -> list[Any]:
        """The contributions of one recorded call, given its outputs' gradients."""
        unit = call.unit
        if all(g is None for g in call_grads):
            return []  # a call whose output the loss does not use (another forward's)
        if unit.rule is not None:
            return contributions(unit.module, unit.rule, call.args, tuple(call_grads))
        self._recorder.enabled = False  # the module re-runs under torch.func
        try:
            return func_contributions(
                unit.name, unit.module, unit.params, call.args, call.kwargs, call.shapes, call_grads,
                batch, self.chunk_size,
            )
        finally:
            self._recorder.enabled = True

    def _norm_sq(self, pieces: dict[int, list[Any]], param: torch.Tensor, drop: bool) -> torch.Tensor:
        found = pieces[id(param)]
        if len(found) > 1:
            # A tied parameter (or a module called twice): the example's gradient is the sum of
            # the contributions, and its norm is not the sum of their norms. Instantiated once.
            total = sum(piece.grad_sample() for piece in found)
            for piece in found:
                piece.release()
            found[:] = [Direct(param, total)]
        norm_sq = found[0].norm_sq(_NORM_HOW[self.mode])
        if drop:  # ghost: the second backward writes the sum; keep nothing per layer
            found[0].release()
        return norm_sq

    def _threshold(self, device: torch.device) -> torch.Tensor:
        if isinstance(self.clipper, QuantileNorm):
            value = self._state.norm if self._state is not None else self.clipper.initial_norm
        else:
            value = self.clipper.max_norm if isinstance(self.clipper, GlobalNorm) else self.clipper.threshold
        return torch.as_tensor(value, dtype=torch.float32, device=device)

    def _decide(
        self, norms: torch.Tensor, names: list[str], count_noise: Any, expected: int | None, move_bound: bool = True
    ) -> tuple[torch.Tensor, ClipInfo]:
        """The clipper's decide on per-example measurements: one coefficient per example (per
        example and parameter for ``Norm``)."""
        total = norms.pow(2).sum(1).sqrt()
        finite = torch.isfinite(total)
        ops = get_ops([norms], framework="torch", where="PerSample")
        if self._state is None:
            self._state = self.clipper.init_state(ops, [])
        per_layer = self.kind == "layer"
        quantile = isinstance(self.clipper, QuantileNorm)
        # QuantileNorm's state update is gated by one "the step is finite" flag, so it gets the
        # batch's (a non-finite example then propagates into the sum under "propagate" anyway).
        gate = finite.all() if quantile else finite
        measured = Measured(
            grads=[p for _, p in self.parameters if _ in names] if per_layer else [],
            norms=norms if per_layer else None,
            norm=total,
            finite=gate,
            given_finite=gate,
            norm_type=2.0,
            names=names,
        )
        signals = NO_SIGNALS
        deferred = quantile and not move_bound
        if deferred:
            self._count(total, finite)
            signals = Signals(sample_norms=total.float())
        elif quantile:
            signals = Signals(sample_norms=_noised_sample_norms(total, self._state.norm, count_noise, expected))
        decision = self.clipper.decide(ops, measured, self._state, signals)
        if not deferred:  # deferred: the coefficients at the current bound, which stays
            self._state = decision.state
        coef, info = decision.coef, decision.info
        if per_layer:
            after = (coef * norms).pow(2).sum(1).sqrt()
            one = torch.ones_like(total)
            usable = (total > 0) & finite
            effective = torch.where(usable, after / torch.where(usable, total, one), one)
            info = ClipInfo(total, info.threshold, effective, (coef < 1).any(1), finite, info.skip)
        else:
            info = info._replace(clipped=coef < 1, finite=finite)
        return coef, info

    def _count(self, total: torch.Tensor, finite: torch.Tensor) -> None:
        """Add a batch's ``[unclipped, examples, non-finite]`` to the kept counts, compared as
        QuantileNorm compares (fp32 norms, ``<= C``)."""
        values = total.float()
        valid = torch.isfinite(values)
        below = (valid & (values <= self._state.norm.to(values.device))).sum()
        counts = torch.stack([below, valid.sum(), (~finite).sum()]).to(torch.float32)
        self._counts = counts if self._counts is None else self._counts + counts

    def take_counts(self) -> torch.Tensor:
        """QuantileNorm's counts from the ``backward(move_bound=False)`` calls since the last
        take, and forget them: a float32 tensor ``[unclipped, examples, non-finite]`` (an example
        is unclipped when its norm is ``<= C``; zeros when there was none). Sums of counts, so the
        counts of several processes add up (``all_reduce``) to those of their whole batch."""
        counts, self._counts = self._counts, None
        if counts is None:
            device = self.parameters[0][1].device if self.parameters else torch.device("cpu")
            counts = torch.zeros(3, dtype=torch.float32, device=device)
        return counts

    def move_bound(self, counts: torch.Tensor, expected_batch_size: int | None = None) -> None:
        """Move QuantileNorm's bound once from :meth:`take_counts`'s ``counts`` (summed over
        physical batches, processes).

        Args:
            counts: ``[unclipped, examples, non-finite]``. Under DP the unclipped count already
                holds its noise (added once: Andrew et al. 2021's query is one noised count).
            expected_batch_size: Given (DP): ``b̃ = counts[0] / expected_batch_size``, clamped to
                [0, 1], the noised fraction (an empty batch still moves C by its noise). None:
                ``b = unclipped / examples``; no example leaves the bound where it is.

        A non-finite example in any batch leaves the bound where it is, as one batch does.
        """
        if not isinstance(self.clipper, QuantileNorm):
            return
        counts = counts.to(torch.float32)
        ops = get_ops([counts], framework="torch", where="PerSample")
        if self._state is None:
            self._state = self.clipper.init_state(ops, [])
        below, seen, nonfinite = counts[0], counts[1], counts[2]
        gate = nonfinite == 0
        if expected_batch_size is None:
            fraction = below / seen.clamp(min=1.0)
            gate = gate & (seen > 0)
        else:
            fraction = (below / expected_batch_size).clamp(0.0, 1.0)
        measured = Measured(
            grads=[], norms=None, norm=torch.zeros(1, device=counts.device), finite=gate, given_finite=gate,
            norm_type=2.0, names=[],
        )
        signals = Signals(sample_norms=_fraction_samples(fraction))
        self._state = self.clipper.decide(ops, measured, self._state, signals).state

    def _write(self, pieces: dict[int, list[Any]], coef: torch.Tensor) -> None:
        keep = self.mode == "instantiate"
        for column, (_, p) in enumerate((n, p) for n, p in self.parameters if id(p) in pieces):
            c = coef[:, column] if coef.dim() == 2 else coef
            found = pieces[id(p)]
            grad = sum(piece.weighted(c) for piece in found)
            if keep:
                p.grad_sample = sum(piece.grad_sample() for piece in found).to(p.dtype)
            p.grad = grad.to(p.dtype)
            for piece in found:
                piece.release()

    def sensitivity(self) -> Any:
        """The largest L2 norm one example can add to the clipped sum: ``C`` (the current bound
        for QuantileNorm), ``C·√P`` for ``Norm`` over ``P`` parameters."""
        threshold = self._threshold(self.parameters[0][1].device if self.parameters else torch.device("cpu"))
        if self.kind == "layer":
            return threshold * math.sqrt(len(self.parameters))
        return threshold


def _second_pass_cut(seen: list, cut: Any, weights: torch.Tensor) -> None:
    """Ghost mode's second pass with a cut: ``Σ_i c_i ∇_i`` from both sides of it.

    Below the cut, a backward from ``h`` with ``c_i`` times the first pass's gradient of
    ``Σ_i ℓ_i`` at ``h``, row by row: each loss depends on its own example's row of ``h`` only
    (what per-example clipping presumes, and why BatchNorm is refused), so
    ``∂(Σ_j c_j ℓ_j)/∂h_i = c_i ∂ℓ_i/∂h_i = c_i ∂(Σ_j ℓ_j)/∂h_i``, and the lower graph receives
    exactly what a backward of ``Σ_i c_i ℓ_i`` would send it. Above the cut (whose graph the
    first pass did not retain), each layer's clipped sum from its input and rescaled output
    gradient, one weight-gradient product per layer, as book-keeping does (Bu et al. 2023,
    "Differentially private optimization on large model at small cost", ICML). A parameter used
    on both sides (tied weights) receives both.
    """
    # Above the cut first: its pieces are freed before the lower backward runs.
    for found in cut.pieces.values():
        param = found[0].param
        grad = sum(piece.weighted(weights) for piece in found).to(param.dtype)
        for piece in found:
            piece.release()
        param.grad = grad
    cut.pieces = {}
    if cut.grad is not None and seen:
        shape = [1] * cut.grad.dim()
        shape[cut.dim] = -1
        scaled = cut.grad * weights.to(cut.grad.dtype).view(shape)
        cut.grad = None
        # Accumulates into a tied parameter's .grad, which already holds its upper part.
        torch.autograd.backward(cut.edge, [scaled], inputs=seen)


def _check_batch(where: str, calls: list, batch: int) -> None:
    """Refuse losses whose count differs from the examples every recorded call saw.

    A function of its own so that no reference to a layer's input outlives the check: a local
    of ``backward`` would keep one activation alive through ghost mode's second pass."""
    for call in calls:
        dim = batch_dim_of(call.unit.module)
        first = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else None
        if first is not None and (first.dim() <= dim or first.shape[dim] != batch):
            raise InvalidArgumentError(
                f"{where}: per_example_losses has {batch} entries but {call.unit.name or 'the model'} saw an "
                f"input of shape {tuple(first.shape)} (examples along dim {dim}); pass one loss per example "
                "(reduction='none'); gradients are unchanged"
            )


def _noised_sample_norms(total: torch.Tensor, bound: torch.Tensor, count_noise: Any, expected: int | None) -> torch.Tensor:
    """The sample norms QuantileNorm counts, with the DP count noise folded in.

    QuantileNorm moves C by the fraction of entries ``<= C`` (Andrew et al. 2021); under DP that
    count is noised: ``b̃ = (Σ_i [‖g_i‖ <= C] + N(0, σ_b²)) / B``. The clipper's decide is reused
    unchanged by handing it a vector whose fraction below C is ``b̃`` (clamped to [0, 1]) to a
    resolution of 1e-4, far below the noise.
    """
    if count_noise is None:
        return total.float()
    below = (total <= bound.to(total.dtype)).sum().to(torch.float32)
    denominator = expected if expected is not None else total.shape[0]
    return _fraction_samples(((below + count_noise.to(torch.float32)) / denominator).clamp(0.0, 1.0))


def _fraction_samples(fraction: torch.Tensor) -> torch.Tensor:
    """A vector whose fraction of entries QuantileNorm counts as unclipped (0, ``<= C``) is
    ``fraction`` to a resolution of 1e-4; the rest are 3e38 (finite, above any C)."""
    resolution = 10_000
    device = fraction.device
    count = (fraction.to(torch.float32) * resolution).round()
    index = torch.arange(resolution, device=device, dtype=torch.float32)
    return torch.where(index < count, torch.zeros((), device=device), torch.full((), 3.0e38, device=device))
