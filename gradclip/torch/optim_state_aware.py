"""What :class:`~gradclip.torch.ClippedOptimizer` does with the optimizer's own state and update.

Two policies need more than the gradients, and only the object that owns the optimizer step can
give it: the optimizer's moments (SPAM) and the parameter update itself (update clipping).

Optimizer-state-aware clipping (SPAM)
-------------------------------------
Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training" (ICLR
2025, arXiv:2501.06842); reference code TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py``
(commit e8185fb). :class:`~gradclip.SpikeAware` bounds ``g`` where ``g² > θ·v`` with ``v`` Adam's
second moment. A clipper that declares ``needs_optimizer_state`` (``SpikeAware``, or a ``Chain``
or ``Subset`` holding one) gets, at every optimizer step, ``optimizer_state=`` built from the
wrapped optimizer: ``optimizer.state[p]["exp_avg_sq"]`` for each parameter with a gradient, in the
order ``clip_`` receives them (None for a parameter the optimizer has not stepped yet: left
unclipped, as before Adam's first step). torch's ``Adam``, ``AdamW``, ``NAdam`` and ``RAdam``
keep that moment; another ``torch.optim`` optimizer (``SGD``, ``Adagrad``...) is refused when the
``ClippedOptimizer`` is built, and a third-party optimizer whose state lacks ``exp_avg_sq`` is
refused at the step, before anything changes.

SPAM also resets the momentum every ``ΔT`` steps (``SpikeAware(reset_interval=ΔT)``): at each step
``t`` with :meth:`SpikeAware.reset_due` true, ``exp_avg`` and ``exp_avg_sq`` of every parameter
with a gradient (with per-group clippers, of the SPAM clipper's group) are zeroed, as the reference's ``state["exp_avg"] = torch.zeros_like(grad)``
(Adam's own step count is kept, so its bias correction goes on, as in the reference). The zeroing
is ``masked_fill_`` with the device flag: no host read. ``ClippedOptimizer(...,
reset_momentum=False)`` keeps the moments (the clip still pauses after each multiple of
``reset_interval``, as the clipper was told).

Deviations from the reference (strict expectations in ``tests/test_optim_state_aware.py``; its
parity test follows the reference's clip and reset around torch's Adam, without the ramp):

* The reset is made after the clip of step ``t`` and before its optimizer update; the reference
  resets before its clip. The clip pauses at a reset step whenever ``warmup_steps >= 1`` (``t %
  ΔT = 0 < warmup_steps``), so the two agree; with ``warmup_steps=0`` the reference clips against
  the zeroed ``v`` and so replaces every gradient element by 0 at each reset step, here the clip
  sees the moments before the reset.
* The reference also scales the update by a cosine ramp from 0.01 to 1 over its
  ``warmup_steps`` after each reset (its ``CosineDecay``). That is a learning-rate schedule, left
  to the user's scheduler (``torch.optim.lr_scheduler.LambdaLR``).
* AMSGrad's ``max_exp_avg_sq`` is not reset: the reference has no AMSGrad.

Update clipping
---------------
``ClippedOptimizer(..., update_clipper=clipper)`` bounds the update itself after the optimizer
step: ``Δ = p_after − p_before`` is clipped with ``clipper`` and the parameters become
``p_before + clipped Δ``. ``gradclip.GlobalNorm(c)`` bounds the update's global norm by ``c``;
``gradclip.BlockRMS(d)`` is Adafactor's update clipping (Shazeer & Stern 2018, "Adafactor:
Adaptive Learning Rates with Sublinear Memory Cost", §6: ``U ← U / max(1, RMS(U)/d)`` per tensor,
``d = 1`` there). Adafactor clips ``U`` before the learning rate multiplies it, so its ``d`` is
``BlockRMS(lr·d)`` on ``Δ = lr·U`` here. A clipper that needs parameters (``AGC``) sees
``p_before``. Any threshold may be a schedule (:mod:`gradclip.schedules`).

Memory and cost: one copy of the parameters that have gradients (``p_before``), allocated for the
step and freed after it; ``Δ`` is computed in that copy and clipped there in place, with
``torch._foreach`` kernels (a copy, three updates of the copy or the parameters, the clip, one
add). ``p_before + Δ`` equals ``p_after`` when the clip leaves ``Δ`` alone, exactly whenever
``p_before`` and ``p_after`` are within a factor 2 of each other (Sterbenz), else up to one
rounding.

A skipped step (``info.skip``, or a ``GradScaler`` that found inf/NaN) leaves the parameters and
the update clipper's state alone: that is a host decision, one bool read per step when the step
can be skipped (a clipper that may skip, or a scaler). The update's :class:`~gradclip.ClipInfo`
is ``opt.last_update_info`` (the last step that was taken), and the update clipper's state is
part of ``opt.state_dict()`` (``state_dict()["gradclip"]["update_clipper"]``, the clipper's own
checkpoint; a checkpoint without it, from a plain optimizer or before update clipping was
switched on, starts the update clipper fresh with a warning). Closures (LBFGS) are not supported
with an update clipper, and the update clipper may not skip (the optimizer has already stepped:
use the gradient clipper to skip) nor read optimizer state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from gradclip._core.checkpoint import CHILD, CHILDREN, validate_checkpoint
from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.types import ClipInfo
from gradclip.clippers.spam import SpikeAware
from gradclip.torch.optim_state import KEY
from gradclip.torch.scaling import scaler_enabled

__all__ = [
    "UPDATE_KEY",
    "OptimizerStateLink",
    "UpdateClipping",
    "load_update_state",
    "optimizer_state_link",
    "save_update_state",
    "update_clipping",
]

#: The key of the update clipper's checkpoint in gradclip's part of ClippedOptimizer.state_dict().
UPDATE_KEY = "update_clipper"

#: The per-parameter state keys of Adam's moments in torch's optimizers.
FIRST_MOMENT = "exp_avg"
SECOND_MOMENT = "exp_avg_sq"
#: torch.optim's optimizers that keep ``exp_avg_sq`` (AdamW derives from Adam).
_KEEP_SECOND_MOMENT = (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam)


def _nodes(clipper: Clipper) -> Iterator[Clipper]:
    """The clipper and every clipper it wraps, depth first."""
    yield clipper
    for child in clipper.children():
        yield from _nodes(child)


def _states(clipper: Clipper, state: Any) -> Iterator[tuple[Clipper, Any]]:
    """``(clipper, its state)`` for the clipper and every clipper it wraps, pairing the wrapped
    clippers with the state fields of dtype ``CHILD``/``CHILDREN`` (gradclip._core.checkpoint)."""
    yield clipper, state
    children = clipper.children()
    for name in clipper.state_type._fields:
        kind = clipper.state_dtypes.get(name)
        if kind == CHILD:
            yield from _states(children[0], getattr(state, name))
        elif kind == CHILDREN:
            for child, part in zip(children, getattr(state, name)):
                yield from _states(child, part)


def _roots(optimizer: torch.optim.Optimizer, clipper: Any) -> list[tuple[Clipper, list[torch.Tensor] | None]]:
    """The clippers ClippedOptimizer calls, each with the parameters it clips (None: all of
    them): its one clipper, or the clipped groups' clippers of a per-group mapping (``key ->
    clipper or None`` in parameter-group order, :mod:`gradclip.torch.optim_groups`)."""
    if isinstance(clipper, Clipper):
        return [(clipper, None)]
    return [
        (clipper[key], list(group["params"]))
        for key, group in zip(clipper, optimizer.param_groups)
        if clipper[key] is not None
    ]


class OptimizerStateLink:
    """Hands the wrapped optimizer's second moments to a clipper that reads them, and performs
    SPAM's momentum reset (see the module documentation).

    Build it with :func:`optimizer_state_link`, which validates.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: Any, reset_momentum: bool):
        self.optimizer = optimizer
        self.clipper = clipper
        # Per clipper called (with per-group clipping, one per clipped group): the ids of the SPAM
        # clippers in it whose resets the optimizer performs (none with reset_momentum=False).
        self.resetting = []
        for root, params in _roots(optimizer, clipper):
            spam = {id(node) for node in _nodes(root) if isinstance(node, SpikeAware) and node.reset_interval is not None}
            if spam and reset_momentum:
                self.resetting.append((root, params, spam))

    def signals(self, named: list[tuple[str, torch.Tensor]], where: str) -> dict[str, Any]:
        """``{"optimizer_state": [...]}``: each parameter's ``exp_avg_sq`` (None before the
        optimizer's first step for it), for the parameters with a gradient, in ``named``'s order.

        Raises:
            InvalidArgumentError: The optimizer keeps state for a parameter but no
                ``exp_avg_sq``; nothing has changed.
        """
        state = self.optimizer.state
        moments = []
        for name, param in named:
            if param.grad is None:
                continue
            entry = state.get(param)  # .get: optimizer.state is a defaultdict, [] would insert
            if entry and SECOND_MOMENT not in entry:
                raise InvalidArgumentError(
                    f"{where}: {_needing(self.optimizer, self.clipper)!r} reads the optimizer's second moment, but "
                    f"{type(self.optimizer).__name__} keeps no {SECOND_MOMENT!r} in its state for {name} (it keeps "
                    f"{sorted(map(str, entry))}); use an Adam-family optimizer (Adam, AdamW, NAdam, RAdam). "
                    "Nothing was changed"
                )
            moments.append(entry.get(SECOND_MOMENT) if entry else None)
        return {"optimizer_state": moments}

    def reset_if_due(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """After the clip of step ``t``: zero ``exp_avg`` and ``exp_avg_sq`` where a SPAM
        clipper's :meth:`~gradclip.SpikeAware.reset_due` holds for ``t``, on the device, for the
        parameters with a gradient that clipper clips (every one, or its group's)."""
        state = self.optimizer.state
        for root, params, spam in self.resetting:
            # The state the clip just committed counts step t (SpikeAwareState.step).
            due = None
            for node, part in _states(root, root._kept.state):
                if id(node) in spam:
                    flag = node.reset_due(part.step)
                    due = flag if due is None else due | flag
            targets = [p for _, p in named] if params is None else params
            for param in targets:
                entry = state.get(param) if param.grad is not None else None
                for key in (FIRST_MOMENT, SECOND_MOMENT):
                    moment = entry.get(key) if entry else None
                    if moment is not None:
                        moment.masked_fill_(due.to(moment.device), 0)


def optimizer_state_link(
    where: str, optimizer: torch.optim.Optimizer, clipper: Any, reset_momentum: Any
) -> OptimizerStateLink | None:
    """The link for ``clipper`` (a clipper, or per-group clippers) when it reads the optimizer's
    state, else None.

    Raises:
        InvalidArgumentError: ``reset_momentum`` not a bool; a clipper that reads the optimizer's
            second moment with a ``torch.optim`` optimizer that keeps none (``SGD``...).
    """
    if reset_momentum is not True and reset_momentum is not False:
        raise InvalidArgumentError(f"{where}: reset_momentum must be True or False, got {reset_momentum!r}")
    if not clipper.needs_optimizer_state:
        return None
    built_in = type(optimizer).__module__.startswith("torch.optim")
    if built_in and not isinstance(optimizer, _KEEP_SECOND_MOMENT):
        raise InvalidArgumentError(
            f"{where}: {_needing(optimizer, clipper)!r} reads the optimizer's second moment (state[p][{SECOND_MOMENT!r}]), "
            f"but {type(optimizer).__name__} keeps none; use Adam, AdamW, NAdam or RAdam, or a clipper that "
            "does not need optimizer state"
        )
    return OptimizerStateLink(optimizer, clipper, reset_momentum)


def _needing(optimizer: torch.optim.Optimizer, clipper: Any) -> Any:
    """The innermost clipper of ``clipper`` that reads optimizer state, for messages."""
    roots = [root for root, _ in _roots(optimizer, clipper)]
    wanting = [node for root in roots for node in _nodes(root) if node.needs_optimizer_state and not node.children()]
    return wanting[0] if wanting else clipper


class UpdateClipping:
    """Clips the parameter update after the optimizer step (see the module documentation).

    Build it with :func:`update_clipping`, which validates.
    """

    def __init__(self, clipper: Clipper):
        self.clipper = clipper
        self.last_info: ClipInfo | None = None

    def check_call(self, closure: Any) -> None:
        """Refuse a closure (before anything changes): its re-evaluations would be stepped
        before the update could be measured."""
        if closure is not None:
            raise InvalidArgumentError(
                "ClippedOptimizer.step: closures are not supported together with update_clipper (the update "
                "is measured around one inner step); nothing was changed"
            )

    def step(self, opt: Any, prepared: Any) -> Any:
        """Take the inner step ``prepared`` of the ClippedOptimizer ``opt`` and clip its update.

        Returns:
            What the inner step returned.
        """
        info = prepared.info
        if opt._may_skip and bool(info.skip):  # one host read; the skipped step changes nothing
            return opt._inner_step(*prepared)
        named = [(name, p) for name, p in opt._named_parameters() if p.grad is not None]
        params = [p for _, p in named]
        if not params:
            return opt._inner_step(*prepared)
        delta = torch._foreach_mul(params, 1.0)  # p_before: the one copy of the parameters
        result = opt._inner_step(*prepared)
        if _scaler_skipped(opt.scaler, opt.optimizer):
            return result
        torch._foreach_sub_(delta, params)  # p_before - p_after = -Δ
        torch._foreach_add_(params, delta)  # the parameters back at p_before (AGC measures them)
        torch._foreach_neg_(delta)  # Δ
        grads = [p.grad for p in params]
        try:
            for param, update in zip(params, delta):
                param.grad = update  # clip_ clips .grad in place: Δ, without another copy
            self.last_info = self.clipper.clip_(named)
        except BaseException:
            torch._foreach_add_(params, delta)  # a clipper that refused: the step as taken
            raise
        finally:
            for param, grad in zip(params, grads):
                param.grad = grad
        torch._foreach_add_(params, delta)  # p_before + clipped Δ
        return result


def _scaler_skipped(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.step`` just skipped ``optimizer`` for inf/NaN (one host read)."""
    if not scaler_enabled(scaler):
        return False
    # GradScaler keeps the per-device flags of the step it just took until update().
    found = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})
    return any(bool(flag.item()) for flag in found.values())


def update_clipping(where: str, clipper: Clipper, update_clipper: Any) -> UpdateClipping | None:
    """The update clipping for ``update_clipper`` (None when it is None).

    Raises:
        InvalidArgumentError: Not a gradclip clipper; the gradient clipper itself (one state
            cannot advance twice per step); a clipper that may skip or reads optimizer state.
    """
    if update_clipper is None:
        return None
    if not isinstance(update_clipper, Clipper):
        raise InvalidArgumentError(
            f"{where}: update_clipper must be a gradclip clipper (e.g. gradclip.GlobalNorm(1.0) or "
            f"gradclip.BlockRMS(1.0)) or None, got {type(update_clipper).__qualname__}"
        )
    if update_clipper is clipper:
        raise InvalidArgumentError(
            f"{where}: update_clipper is the gradient clipper itself ({clipper!r}); its state would advance "
            "twice per step: give another instance"
        )
    if update_clipper.may_skip:
        raise InvalidArgumentError(
            f"{where}: update_clipper {update_clipper!r} may ask to skip, but the update is clipped after the "
            "optimizer has stepped; skip with the gradient clipper instead"
        )
    if update_clipper.needs_optimizer_state:
        raise InvalidArgumentError(
            f"{where}: update_clipper {update_clipper!r} reads the optimizer's state, which only the gradient "
            "clipper is given"
        )
    return UpdateClipping(update_clipper)


# -- checkpoints ------------------------------------------------------------------------------------
def save_update_state(update: UpdateClipping | None, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` (``ClippedOptimizer.state_dict()``) with the update clipper's state added
    to gradclip's part under :data:`UPDATE_KEY` (unchanged without update clipping)."""
    if update is not None:
        checkpoint[KEY] = {**checkpoint[KEY], UPDATE_KEY: update.clipper.state_dict()}
    return checkpoint


def load_update_state(update: UpdateClipping | None, state_dict: Any) -> Callable[[], None]:
    """Validate the update clipper's part of ``state_dict``, changing nothing; return what
    restores it, to be called once the rest of the checkpoint has loaded.

    Raises:
        StateError: A part for an update clipper this optimizer does not have, or one its update
            clipper refuses (as its ``load_state_dict`` would).
    """
    where = "ClippedOptimizer.load_state_dict"
    part = state_dict.get(KEY) if isinstance(state_dict, Mapping) else None
    saved = part.get(UPDATE_KEY) if isinstance(part, Mapping) else None
    if update is None:
        if saved is not None:
            raise StateError(
                f"{where}: the checkpoint holds an update clipper's state ({KEY!r}/{UPDATE_KEY!r}) but this "
                "ClippedOptimizer has no update_clipper; build it with the same update_clipper to resume"
            )
        return lambda: None
    if saved is None:

        def fresh() -> None:
            update.clipper.reset()
            warnings.warn(
                f"{where}: the checkpoint has no update clipper state; the update clipper "
                f"{type(update.clipper).__name__} starts fresh",
                UserWarning,
                stacklevel=4,
            )

        return fresh
    validate_checkpoint(update.clipper, saved)
    return lambda: update.clipper.load_state_dict(saved)
