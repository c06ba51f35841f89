"""``ClippedOptimizer``: unscale once, clip once per optimizer step, skip when asked, then step.

::

    import gradclip, gradclip.torch as gct

    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=True),
                               gradclip.GlobalNorm(1.0), scaler=scaler)
    for batch in loader:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(batch)
        scaler.scale(loss).backward()
        opt.step()            # unscale (once), clip, skip on inf or info.skip, step
        scaler.update()       # as with a plain GradScaler: once per iteration, by you
        opt.zero_grad()

What ``step()`` does, in order:

1. **Unscale** the gradients with the ``torch.amp.GradScaler`` given as ``scaler``, exactly once:
   when you already called ``scaler.unscale_(opt)`` on this wrapper or on the optimizer inside it
   (to inspect the gradients yourself) it is not done again, and code that kept torch's
   ``scaler.step(opt)`` steps once with gradients unscaled once.
2. **Clip** with the clipper, once per optimizer step. With ``accumulation_steps=k`` only every
   k-th call to ``step()`` clips and steps; the calls in between (and their ``zero_grad()``) do
   nothing, so gradients accumulate over k micro-batches and the clipper's state advances once.
3. **Skip** the inner step when ``info.skip`` is set (``nonfinite="skip"``, ``SkipOnSpike``) or the
   scaler found inf/NaN; **step** otherwise.

Folding (``fold=``)
-------------------
A fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` built with ``fused=True``) already
divides every gradient by a ``grad_scale`` tensor and skips its update where a ``found_inf`` tensor
is non-zero: that is how ``GradScaler`` unscales for it without a pass of its own. ``fold`` uses
the same input for the clip coefficient ``c``: the norm is *measured* without rewriting any
gradient (divided by the AMP scale ``S`` when the gradients are still scaled), and the optimizer is
stepped with ``grad_scale = S / c``. The result equals unscale-then-clip-then-step up to fp32
rounding, and two full read+write passes over the gradients disappear. Everything stays on the
device: no host-device synchronisation.

The hook is public: ``GradScaler.step`` multiplies a ``grad_scale`` that is already set on the
optimizer into its own, and fused optimizers read ``grad_scale``/``found_inf`` in ``step()``.
``ClippedOptimizer`` sets them from a step pre-hook (``Optimizer.register_step_pre_hook``),
registered for the one call and removed after it.

* ``fold=None`` (default): fold when the optimizer is fused and the clipper produces a single
  global coefficient (``GlobalNorm``, ``AutoClip``, ``ZClip``, ``QuantileNorm``, chains of
  those...); otherwise clip in place, silently.
* ``fold=True``: fold or raise :class:`~gradclip.InvalidArgumentError` saying why not (a per-tensor
  or element-wise clipper such as ``Norm``, ``Value``, ``AGC``; the ``"zero"`` non-finite policy,
  which must rewrite gradients; an optimizer that is not fused).
* ``fold=False``: always clip in place.

With a fold, ``ClippedOptimizer`` never writes a gradient: the fused kernel divides each one by
``grad_scale`` as it reads it and, as torch's fused kernels do, stores the divided value back in
the same pass. So after a step ``.grad`` holds the clipped, unscaled gradient, as on the unfolded
path; after a step skipped on overflow it is left as it was (still scaled).

Stability policies
------------------
* **The loss** (``opt.step(loss=loss)``, or a closure's returned loss) reaches the clipper's
  decision, for ``SkipOnSpike(signal="loss" | "both")``. With ``accumulation_steps=k`` the
  clipper sees the mean of the losses given to the step's k calls (on the device; calls without
  ``loss=`` do not count): pass it on every micro-batch, or on the k-th call only.
* **Skip streaks**: ``last_info.consecutive_skips`` counts the optimizer steps skipped in a row
  (an int64 tensor on the device, every step). With ``max_consecutive_skips=N`` the N-th skipped
  step in a row raises :class:`gradclip.DivergenceError` (after it was skipped), naming the streak
  and its norms and losses, instead of skipping forever. Checking the bound reads one int per step,
  and only for clippers that can skip (``clipper.may_skip``). The count is checkpointed.
* **Per-group clipping**: ``ClippedOptimizer(optimizer, {0: gradclip.GlobalNorm(1.0), 1: None})``
  (keys are group indices or ``"name"`` entries, every group named, None for "not clipped")
  clips each parameter group with its own clipper and state; a skip from any group skips the
  whole step; ``measure="all"`` reports the norm of every group while clipping only some;
  ``last_infos`` holds each group's info. See :mod:`gradclip.torch.optim_groups`.

Checkpoints
-----------
``state_dict()`` is the wrapped optimizer's own (``state`` and ``param_groups`` at the top level,
so a plain torch optimizer, and code that handles optimizer checkpoints, take it) with gradclip's
part under one extra key: the clipper's state, the micro-batch count, the skip streak and the
update clipper's state. ``load_state_dict`` also takes a plain optimizer's checkpoint (the clipper
then starts fresh, with a ``UserWarning``). The format and its validation:
:mod:`gradclip.torch.optim_state`.

Compiled steps: ``torch.compile(opt.step)`` compiles the clip (or the fold) with the step; torch's
optimizers break the graph inside their own ``step()`` by design, and the clip adds no break of
its own, except where it hands a fused optimizer its ``grad_scale``/``found_inf`` (fold, or a skip
on the device): those attribute writes run outside the trace, because dynamo drops writes made on
an optimizer inside one (a fused step compiled with them traced applied no clip and no skip;
``tests/test_compile.py`` checks the update itself). With ``accumulation_steps=k`` each micro-batch count compiles once (the count is a Python
number the step branches on). The counters live in a plain object, not on this optimizer: dynamo
models ``torch.optim.Optimizer`` instances specially and drops attribute writes made on them.

Host-device synchronisation: none on the folded path and none for clippers that never ask to skip.
Skipping the step of a non-fused optimizer is a host decision, so for clippers that can set
``info.skip`` (``nonfinite="skip"``, ``SkipOnSpike``) a non-fused optimizer reads one bool per step;
a fused optimizer takes the flag on the device (``found_inf``) instead. A ``GradScaler`` with a
non-fused optimizer synchronises once per step on its own, as it always does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch

from gradclip._core.clipper import Clipper
from gradclip._core.contract import Coefficient, signals_from
from gradclip._core.errors import DivergenceError, InvalidArgumentError, StateError
from gradclip._core.ops import get_ops
from gradclip._core.streaks import SkipStreak
from gradclip._core.tracing import compiling
from gradclip._core.types import ClipInfo
from gradclip.torch import optim_state
from gradclip.torch.optim_groups import MEASURES, GroupClippers
from gradclip.torch.optim_state_aware import (
    load_update_state,
    optimizer_state_link,
    save_update_state,
    update_clipping,
)
from gradclip.torch.scaling import (
    clear_step_flags,
    fold_unsupported_reason,
    scaler_enabled,
    scaler_stage,
    scaler_step_outside_trace,
    set_step_flags,
    share_wrapper_stage,
)
from gradclip.torch.trainer_signals import StepLoss, loss_across_ranks, monitor_hook

__all__ = ["ClippedOptimizer", "fold_unsupported_reason", "scaler_enabled", "scaler_stage"]

_UNSET: Any = object()  # add_param_group's clipper= not given


class ClippedOptimizer(torch.optim.Optimizer):
    """A torch optimizer that unscales (AMP), clips and skips before it steps.

    It is a ``torch.optim.Optimizer`` (so LR schedulers accept it) that forwards ``param_groups``,
    ``state``, ``defaults``, ``add_param_group`` and hook registration to the optimizer it wraps.

    Args:
        optimizer: Any ``torch.optim.Optimizer``.
        clipper: Any gradclip clipper (``gradclip.GlobalNorm(1.0)``, ``gradclip.get("zclip")``...),
            or a mapping ``{group index or name: clipper or None}`` naming every parameter group
            to clip each group apart (:mod:`gradclip.torch.optim_groups`).
        scaler: A ``torch.amp.GradScaler`` (or None). You still call ``scaler.scale(loss)`` before
            ``backward()`` and ``scaler.update()`` after a ``step()`` that stepped
            (``if opt.stepped: scaler.update()``; every call with ``accumulation_steps=1``).
        fold: ``None`` fold the clip coefficient into a fused optimizer's step when possible,
            ``True`` require it, ``False`` never (see the module documentation).
        accumulation_steps: Micro-batches per optimizer step, ``>= 1``. Call ``step()`` and
            ``zero_grad()`` after every backward: only every k-th call clips and steps.
        monitor: A :class:`gradclip.Monitor`; ``monitor.observe(info)`` is called after each clip,
            and with ``Monitor(updates=True)`` its ``before_step()``/``after_step()`` around each
            optimizer step (the update's norms join the step's record; call neither yourself).
        max_consecutive_skips: Keyword only. Raise :class:`gradclip.DivergenceError` when this
            many optimizer steps in a row were skipped (an int ``>= 1``), or None (default) to
            only count them in ``last_info.consecutive_skips``. The clipper's skips count (warns
            if it can never skip); a GradScaler's overflow skips do not: they are how the scaler
            finds its scale, often several in a row at the start.
        measure: Keyword only, with a per-group mapping: ``"clipped"`` (default) reports in
            ``last_info.norm`` the clipped groups' norm, ``"all"`` the norm of every group's
            gradients before clipping (one more read of them per step).
        reset_momentum: With a SPAM clipper (``gradclip.SpikeAware(reset_interval=ΔT)``), zero the
            optimizer's ``exp_avg`` and ``exp_avg_sq`` at the steps it resets (default True);
            False keeps them. A clipper that reads the optimizer's state is given
            ``optimizer_state=`` (Adam's ``exp_avg_sq``) either way
            (:mod:`gradclip.torch.optim_state_aware`).
        update_clipper: A clipper for the parameter update after the optimizer step (``Δ =
            p_after − p_before`` becomes the clipped ``Δ``: ``gradclip.GlobalNorm(c)``,
            Adafactor's ``gradclip.BlockRMS(1.0)``), or None. Costs one copy of the parameters
            during the step (:mod:`gradclip.torch.optim_state_aware`).

    Attributes:
        last_info: The :class:`~gradclip.ClipInfo` of the last optimizer step (None before it),
            with ``consecutive_skips`` set; with a per-group mapping, the groups' infos combined.
        last_infos: With a per-group mapping, ``{group key: ClipInfo}`` of the last step's
            clipped groups; else None.
        last_update_info: The :class:`~gradclip.ClipInfo` of ``update_clipper`` at the last step
            taken (None before it, or without an update clipper).
        stepped: True when the last ``step()`` call reached an optimizer-step boundary (clipped,
            then stepped or skipped); with a scaler, call ``scaler.update()`` only then.
        folded: True when the last optimizer step folded the coefficient into the optimizer.

    Raises:
        InvalidArgumentError: A bad argument, or ``fold=True`` where folding is impossible; a
            clipper that reads optimizer state with an optimizer that keeps no ``exp_avg_sq``;
            ``max_consecutive_skips`` not None or an int ``>= 1``; a bad per-group mapping (an
            unknown group, a group left out or named twice, one clipper for two groups, a key
            neither int nor str, a value neither clipper nor None, an empty mapping).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        clipper: Clipper,
        scaler: Any = None,
        fold: bool | None = None,
        accumulation_steps: int = 1,
        monitor: Any = None,
        *,
        max_consecutive_skips: int | None = None,
        measure: str = "clipped",
        reset_momentum: bool = True,
        update_clipper: Clipper | None = None,
    ):
        # torch.optim.Optimizer.__init__ is deliberately not called: this object owns no
        # parameters of its own; param_groups/state/defaults are the wrapped optimizer's.
        where = "ClippedOptimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidArgumentError(
                f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__qualname__}"
            )
        if isinstance(optimizer, ClippedOptimizer):
            raise InvalidArgumentError(f"{where}: optimizer is already a ClippedOptimizer; wrap the inner one once")
        if measure not in MEASURES:
            raise InvalidArgumentError(f"{where}: measure must be one of {list(MEASURES)}, got {measure!r}")
        if isinstance(clipper, Mapping):
            clipper = GroupClippers(where, optimizer, clipper, measure)  # validates the mapping
        elif not isinstance(clipper, Clipper):
            raise InvalidArgumentError(
                f"{where}: clipper must be a gradclip clipper (e.g. gradclip.GlobalNorm(1.0)) or a mapping "
                f"{{param group index or name: clipper or None}}, got {type(clipper).__qualname__}"
            )
        streak = SkipStreak(max_consecutive_skips, where)  # validates max_consecutive_skips
        if scaler is not None and not all(hasattr(scaler, a) for a in ("scale", "unscale_", "step", "update")):
            raise InvalidArgumentError(
                f"{where}: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__qualname__}"
            )
        if not (fold is None or fold is True or fold is False):
            raise InvalidArgumentError(f"{where}: fold must be None, True or False, got {fold!r}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise InvalidArgumentError(
                f"{where}: accumulation_steps must be an integer >= 1, got {accumulation_steps!r}"
            )
        if monitor is not None and not callable(getattr(monitor, "observe", None)):
            raise InvalidArgumentError(
                f"{where}: monitor must have an observe(info) method (gradclip.Monitor), "
                f"got {type(monitor).__qualname__}"
            )
        # SPAM's optimizer state and momentum reset, and update clipping (optim_state_aware.py).
        self._state_link = optimizer_state_link(where, optimizer, clipper, reset_momentum)
        self._update_clipping = update_clipping(where, clipper, update_clipper)
        self.reset_momentum = reset_momentum
        self.update_clipper = update_clipper
        self.optimizer = optimizer
        self.clipper = clipper
        self.scaler = scaler
        self.fold = fold
        self.accumulation_steps = accumulation_steps
        self.monitor = monitor
        self.max_consecutive_skips = max_consecutive_skips
        self._streak = streak
        self._progress = _Progress()
        self._may_skip = clipper.may_skip
        streak.warn_if_never_skips(clipper)
        self._optimizer_reason = fold_unsupported_reason(optimizer)
        self._clipper_reason = clipper.cannot_fold_reason()
        if fold is True:
            reason = self._optimizer_reason or self._clipper_reason
            if reason is not None:
                raise InvalidArgumentError(f"{where}: fold=True, but the clip cannot be folded: {reason}")
        self._fold_active = fold is not False and self._optimizer_reason is None and self._clipper_reason is None

    # -- the wrapped optimizer's view -------------------------------------------------------------
    @property
    def param_groups(self):  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def __getattr__(self, name: str):
        # Only reached for attributes this object lacks (hook dicts, grad_scale...): forward them.
        if name == "optimizer" or "optimizer" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"ClippedOptimizer({self.optimizer!r}, clipper={self.clipper!r}, "
            f"fold={self.fold!r}, accumulation_steps={self.accumulation_steps}"
            + (f", max_consecutive_skips={self.max_consecutive_skips}" if self.max_consecutive_skips is not None else "")
            + (f", update_clipper={self.update_clipper!r}" if self.update_clipper is not None else "")
            + ")"
        )

    def add_param_group(self, param_group: dict[str, Any], clipper: Any = _UNSET) -> None:
        """Add a parameter group to the wrapped optimizer.

        Args:
            param_group: As for ``torch.optim.Optimizer.add_param_group``.
            clipper: With per-group clipping (a mapping was given), required: the new group's
                clipper, or None to leave it unclipped; it is keyed by the group's ``"name"``, or
                else its index. With one clipper, not allowed: that clipper clips every group.

        Raises:
            InvalidArgumentError: ``clipper`` missing with per-group clipping, given with one
                clipper, not a clipper or None, already clipping another group, or making
                ``fold=True`` impossible. Nothing is added then.
        """
        where = "ClippedOptimizer.add_param_group"
        if not isinstance(self.clipper, GroupClippers):
            if clipper is not _UNSET:
                raise InvalidArgumentError(
                    f"{where}: clipper= names a new group's clipper only with per-group clipping; this "
                    f"ClippedOptimizer's {type(self.clipper).__name__} clips every group"
                )
            self.optimizer.add_param_group(param_group)
            return
        if clipper is _UNSET:
            raise InvalidArgumentError(
                f"{where}: this ClippedOptimizer clips per parameter group; say how the new group is clipped: "
                "add_param_group(group, clipper=gradclip.GlobalNorm(1.0)), or clipper=None to leave it unclipped"
            )
        self.clipper.add_group(where, param_group, clipper, self.fold)
        self._may_skip = self.clipper.may_skip
        self._streak.warn_if_never_skips(self.clipper)
        self._clipper_reason = self.clipper.cannot_fold_reason()
        self._fold_active = self.fold is not False and self._optimizer_reason is None and self._clipper_reason is None

    @property
    def will_step(self) -> bool:
        """True when the next ``step()`` call is an optimizer-step boundary (clips and steps).

        Useful to skip gradient all-reduce on the other micro-batches (``DDP.no_sync``).
        """
        return self._progress.micro + 1 >= self.accumulation_steps

    @property
    def last_info(self) -> ClipInfo | None:
        """The :class:`~gradclip.ClipInfo` of the last optimizer step (None before it)."""
        return self._progress.last_info

    @property
    def last_infos(self) -> dict[int | str, ClipInfo] | None:
        """With per-group clipping, ``{group key: ClipInfo}`` of the clipped groups that took part
        in the last optimizer step (see :mod:`gradclip.torch.optim_groups`); else None."""
        return self.clipper.last_infos if isinstance(self.clipper, GroupClippers) else None

    @property
    def stepped(self) -> bool:
        """Whether the last ``step()`` call reached an optimizer-step boundary (clipped, then
        stepped or skipped). With a GradScaler, call ``scaler.update()`` after ``step()`` only
        then: between the micro-batches of an accumulated step nothing was unscaled or stepped,
        and ``GradScaler.update()`` would fail ("No inf checks were recorded"). With
        ``accumulation_steps=1`` it is True after every call."""
        return self._progress.stepped

    @property
    def last_update_info(self) -> ClipInfo | None:
        """The update clipper's :class:`~gradclip.ClipInfo` at the last step taken (None before
        it, or without ``update_clipper``)."""
        return None if self._update_clipping is None else self._update_clipping.last_info

    @property
    def folded(self) -> bool:
        """Whether the last optimizer step folded the coefficient into the optimizer."""
        return self._progress.folded

    @property
    def fold_active(self) -> bool:
        """Whether the next optimizer step will fold the clip coefficient into the optimizer."""
        return self._fold_active

    # -- the step --------------------------------------------------------------------------------
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients, except between the micro-batches of one accumulated step.

        After a ``step()`` that raised at an optimizer-step boundary, it discards the gradients
        accumulated for that step and starts a new accumulation (the loop that catches the error
        and carries on recovers instead of accumulating onto the bad gradients).
        """
        if self._progress.micro == 0 or self._progress.failed_boundary:
            self.optimizer.zero_grad(set_to_none=set_to_none)
            self._progress.micro, self._progress.failed_boundary = 0, False
            self._progress.losses.clear()  # the discarded step's losses go with its gradients

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:  # type: ignore[override]
        """Unscale once, clip once, then step the optimizer unless the step must be skipped.

        Args:
            closure: Re-evaluates the model and returns the loss (LBFGS needs it). With a closure
                the gradients are clipped in place after every evaluation (no folding), and a
                skipped step clears the gradients so the optimizer leaves the parameters alone.
                Not supported together with a ``GradScaler``, as in torch. The loss it returns
                is the step's loss signal.
            loss: This micro-batch's loss (a number or a one-element tensor; its autograd
                history is dropped), for clippers that decide on it (``SkipOnSpike(signal=
                "loss")``). The clipper sees the mean of the losses given to the optimizer
                step's calls, computed on the device: with ``accumulation_steps=k``, pass
                ``loss=`` on every micro-batch for the step's mean loss, or only on the k-th call
                for that micro-batch's alone. Not together with a closure (its loss is used).

        Returns:
            The loss returned by ``closure`` (or the inner optimizer's step), else None.

        Raises:
            StateError: The GradScaler already stepped this optimizer since its last
                ``update()``; raised before the gradients are unscaled or clipped.
            InvalidArgumentError: A closure together with a GradScaler or with ``loss=``, a
                ``loss`` that is not a number or one-element tensor, or ``fold=True`` where the
                clipper turns out not to fold.
            DivergenceError: ``max_consecutive_skips`` steps in a row were skipped, this one
                included. Raised after the step was skipped and counted (the call is complete:
                :attr:`stepped` is True; call ``scaler.update()`` and ``zero_grad()`` as after
                any step if you catch it and carry on).

        A call that raises (these errors, or one from the clipper such as ``nonfinite="raise"``)
        leaves the micro-batch count, :attr:`stepped` and :attr:`folded` as they were. Then
        either fix the cause and call ``step()`` again (the same optimizer step; a clipper that
        already advanced on these gradients, say before a Monitor writer failed, refuses the
        repeat with :class:`~gradclip.StateError`), or call :meth:`zero_grad`, which discards the
        step's gradients and starts a new accumulation.
        """
        if closure is not None and scaler_enabled(self.scaler):
            raise InvalidArgumentError(
                "ClippedOptimizer.step: closures are not supported together with a GradScaler "
                "(torch.amp.GradScaler.step does not support them either)"
            )
        if closure is not None and loss is not None:
            raise InvalidArgumentError(
                "ClippedOptimizer.step: give the loss either as loss= or as the closure's return value, not both"
            )
        if loss is not None:  # validated before anything changes (a detached one-element value)
            loss = signals_from("ClippedOptimizer.step", {"loss": loss}, "torch").loss
        if self.will_step:
            if scaler_enabled(self.scaler):
                # scaler.unscale_(this wrapper), torch's AMP recipe: one unscale, not two.
                share_wrapper_stage(self.scaler, self, self.optimizer)
            self._check_scaler_not_stepped()  # before anything changes: gradients, state, counters
            if self._update_clipping is not None:
                self._update_clipping.check_call(closure)
        # A step() that raises counts for nothing: the counters go back to what they were, so a
        # retry after fixing the cause is the same call again. (The counters change up front
        # because a closure's zero_grad() looks at them.)
        progress = self._progress
        counters = (progress.micro, progress.stepped, progress.folded, progress.losses.snapshot())
        boundary = self.will_step
        if boundary:
            monitor_hook(self.monitor, "before_step")  # the parameters before the update, with updates=True
        try:
            # Clip (or fold) first, and call the inner step from this frame: torch's optimizers
            # break a torch.compile graph inside their step, and a break here, after every
            # attribute write of the clip, is the one dynamo resumes from reliably.
            prepared = self._count_and_prepare(closure, loss)
            if isinstance(prepared, _InnerStep) and self._update_clipping is not None:
                result = self._update_clipping.step(self, prepared)  # the step, its update clipped
            else:
                result = self._inner_step(*prepared) if isinstance(prepared, _InnerStep) else prepared
            if boundary and closure is not None:
                self._count_closure_skips()
        except BaseException:
            progress.micro, progress.stepped, progress.folded, losses = counters
            progress.losses.restore(losses)
            progress.failed_boundary = boundary
            progress.divergence = None
            raise
        progress.failed_boundary = False
        if boundary:
            monitor_hook(self.monitor, "after_step")  # the update's norms, into the step's record
        # The step is complete (skipped and counted): a streak past the bound is raised now.
        divergence, progress.divergence = progress.divergence, None
        if divergence is not None:
            raise divergence
        return result

    def _count_and_prepare(self, closure: Callable[[], Any] | None, loss: Any = None) -> Any:
        """Count the micro-batch; at a boundary clip or fold and return the inner step to take
        (an :class:`_InnerStep`), else the call's result (a closure's loss, or None)."""
        progress = self._progress
        progress.micro += 1
        if progress.micro < self.accumulation_steps:
            progress.stepped = False
            if closure is None:
                progress.losses.add(loss)
                return None
            with torch.enable_grad():
                result = closure()
            progress.losses.add(self._closure_loss(result))
            return result
        progress.micro = 0
        progress.stepped = True
        progress.folded = self._fold_active and closure is None
        if closure is not None:
            result = self.optimizer.step(self._clipping_closure(closure))
            progress.losses.clear()
            return result
        progress.losses.add(loss)
        # Under DDP: the mean over the ranks, so that every rank takes the same decision.
        loss = loss_across_ranks(progress.losses.take(), self.clipper)
        return self._fold(loss) if self._fold_active else self._clip(loss)

    def _check_scaler_not_stepped(self) -> None:
        """Refuse a second optimizer step before ``scaler.update()``, as ``GradScaler.step`` would
        (but before the gradients are unscaled or clipped, so that nothing has changed)."""
        if scaler_enabled(self.scaler) and scaler_stage(self.scaler, self.optimizer) == "stepped":
            raise StateError(
                "ClippedOptimizer.step: the GradScaler already stepped this optimizer since its last "
                "update(); call scaler.update() once after every optimizer step (nothing was changed)"
            )

    def _named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The optimizer's parameters with names: the monitor's model's, else the param groups'."""
        names = self._progress.names
        if names is None:
            model = getattr(self.monitor, "model", None)
            names = {}
            if model is not None and hasattr(model, "named_parameters"):
                names = {id(p): n for n, p in model.named_parameters()}
            self._progress.names = names
        pairs = []
        position = 0
        for group in self.optimizer.param_groups:
            group_names = group.get("param_names")
            for index, param in enumerate(group["params"]):
                name = names.get(id(param))
                if name is None and group_names is not None and index < len(group_names):
                    name = group_names[index]
                pairs.append((name or f"#{position}", param))
                position += 1
        return pairs

    def _count_skips(self, info: ClipInfo, loss: Any) -> ClipInfo:
        """Count the optimizer step in the skip streak (on the device); a streak that reached
        ``max_consecutive_skips`` is kept to be raised once the step is complete."""
        # An Ops per step costs tens of microseconds: keep one per device (not one built while
        # dynamo traces, whose constants belong to the graph).
        ops = self._progress.streak_ops
        if ops is None or ops.device != info.norm.device or compiling():
            ops = get_ops([info.norm], where="ClippedOptimizer.step")
            if not compiling():
                self._progress.streak_ops = ops
        try:
            return self._streak.observe(ops, info, loss, may_skip=self._may_skip)
        except DivergenceError as error:
            self._progress.divergence = error
            return info._replace(consecutive_skips=self._streak.count)

    def _count_closure_skips(self) -> None:
        """With a closure the clip runs once per evaluation: the optimizer step is counted once,
        on the last evaluation's info, after the inner step."""
        info = self._progress.last_info
        if info is not None:
            self._progress.last_info = self._count_skips(info, self._progress.closure_loss)

    @staticmethod
    def _closure_loss(result: Any) -> Any:
        """A closure's return value as a loss signal (validated; None stays None)."""
        if result is None:
            return None
        return signals_from("ClippedOptimizer.step", {"loss": result}, "torch").loss

    def _observe(self, info: ClipInfo, layer_norms: Any = None) -> None:
        self._progress.last_info = info
        if self.monitor is not None:
            if layer_norms is None:
                self.monitor.observe(info)
            else:
                self.monitor.observe(info, layer_norms=layer_norms)

    def _unscale_once(self) -> None:
        if not scaler_enabled(self.scaler):
            return
        if scaler_stage(self.scaler, self.optimizer) == "unscaled":
            return
        try:
            self.scaler.unscale_(self.optimizer)
        except RuntimeError as error:
            if "already been called" not in str(error):
                raise

    def _clip(self, loss: Any = None) -> _InnerStep:
        named = self._named_parameters()
        state_signals = self._state_signals(named)  # refuses a missing exp_avg_sq before unscaling
        self._unscale_once()
        info = self.clipper.clip_(named, **_signals(loss), **state_signals)
        self._reset_momentum(named)
        info = self._count_skips(info, loss)
        self._observe(info)
        return _InnerStep(info, None)

    def _inner_step(self, info: ClipInfo, divisor: torch.Tensor | None) -> Any:
        """Step (through the scaler when there is one), skipping on ``info.skip``."""
        takes_flags = self._optimizer_reason is None
        skip = info.skip if self._may_skip else None
        if skip is not None and not takes_flags:
            # A non-fused optimizer cannot skip on the device: one host read decides.
            if bool(skip):
                return None
            skip = None
        through_scaler = scaler_enabled(self.scaler)
        flags = set_step_flags(self.optimizer, divisor, skip, through_scaler)
        try:
            if through_scaler and takes_flags:
                return scaler_step_outside_trace(self.scaler, self.optimizer)
            if through_scaler:
                return self.scaler.step(self.optimizer)
            return self.optimizer.step()
        finally:
            clear_step_flags(self.optimizer, flags)

    def _fold(self, loss: Any = None) -> _InnerStep:
        named = self._named_parameters()
        amp_scale = None
        if scaler_enabled(self.scaler) and scaler_stage(self.scaler, self.optimizer) != "unscaled":
            grads = [p.grad for _, p in named if p.grad is not None]
            if grads:
                # GradScaler.scale of a 1 gives the current scale as a device tensor, without a sync.
                one = torch.ones((), dtype=torch.float32, device=grads[0].device)
                amp_scale = self.scaler.scale(one)
        # measure → decide without writing a gradient; the optimizer's step applies the scalar.
        folded = self.clipper.fold_(
            named, divide_by=amp_scale, where="ClippedOptimizer.step", **_signals(loss), **self._state_signals(named)
        )
        self._reset_momentum(named)
        measured, coef = folded.measured, folded.coef
        layer_norms = None
        if measured.norm_type == 2.0 and measured.norms is not None and len(measured.names) == len(measured.norms):
            layer_norms = (list(measured.names), measured.norms * coef.to(measured.norms.dtype))
        info = self._count_skips(folded.info, loss)
        self._observe(info, layer_norms)
        divisor = None if self.clipper.coefficient == Coefficient.NONE else torch.reciprocal(coef.to(torch.float32))
        return _InnerStep(info, divisor)

    def _state_signals(self, named: list[tuple[str, torch.Tensor]]) -> dict[str, Any]:
        """``optimizer_state=`` for a clipper that reads it (SPAM), else nothing."""
        if self._state_link is None:
            return {}
        return self._state_link.signals(named, "ClippedOptimizer.step")

    def _reset_momentum(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """SPAM's momentum reset, after the clip and before the optimizer's update."""
        if self._state_link is not None:
            self._state_link.reset_if_due(named)

    def _clipping_closure(self, closure: Callable[[], Any]) -> Callable[[], Any]:
        def clipped():
            with torch.enable_grad():
                loss = closure()
            # This evaluation's loss with those of the step's earlier micro-batches.
            signal = loss_across_ranks(self._progress.losses.mean_with(self._closure_loss(loss)), self.clipper)
            self._progress.closure_loss = signal
            named = self._named_parameters()
            info = self.clipper.clip_(named, **_signals(signal), **self._state_signals(named))
            self._reset_momentum(named)
            self._observe(info)
            if self._may_skip and bool(info.skip):
                for _, param in named:
                    param.grad = None
            return loss

        return clipped

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's ``state_dict()``, with the clipper's state under one more key.

        Torch's layout at the top level (``state``, ``param_groups``), so a plain torch optimizer
        loads it and code that handles optimizer checkpoints keeps working; gradclip's part is
        ``"gradclip": {"format", "version": 2, "clipper", "micro_step"}``, and ``"update_clipper"``
        with an update clipper (see :mod:`gradclip.torch.optim_state`). Loads with
        ``torch.load(weights_only=True)``.
        """
        checkpoint = optim_state.build(self.optimizer, self.clipper, self._progress.micro, self._streak.state_dict())
        return save_update_state(self._update_clipping, checkpoint)  # the update clipper's state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a checkpoint; on any error nothing changes.

        Takes what :meth:`state_dict` returned, a version-1 checkpoint of an older gradclip, or a
        plain torch optimizer's ``state_dict()`` (then the clipper starts fresh and the
        micro-batch count at 0, with a ``UserWarning``). gradclip's part is validated like a
        clipper checkpoint: exactly its keys, the format name, the version as the int 2 (``True``
        and ``2.0`` compare equal in Python and are refused), ``micro_step`` an int in
        ``[0, accumulation_steps)``, the clipper's part as its own ``load_state_dict`` checks it,
        and the optimizer's part as torch checks it (parameter groups and sizes must match).

        Raises:
            StateError: Anything of the above does not hold. The optimizer, the clipper and the
                micro-batch count are then as they were.
        """
        restore_update = load_update_state(self._update_clipping, state_dict)  # validates, changes nothing
        loaded = optim_state.load(self, state_dict)
        restore_update()
        self._progress.micro, self._progress.failed_boundary = loaded.micro_step, False
        self._progress.losses.clear()
        self._streak.load_state_dict(loaded.consecutive_skips)


class _Progress:
    """What a ClippedOptimizer counts and remembers between calls, in a plain object: under
    torch.compile (2.13) dynamo drops attribute writes on a ``torch.optim.Optimizer`` instance
    itself (it models optimizers specially), and these must survive a compiled step."""

    def __init__(self) -> None:
        self.micro = 0  # micro-batches counted towards the next optimizer step
        self.stepped = False
        self.folded = False
        self.last_info: ClipInfo | None = None
        # The last optimizer-step boundary raised: the next zero_grad() discards its gradients.
        self.failed_boundary = False
        self.names: dict[int, str] | None = None  # parameter names of the monitor's model, by id
        # The losses given to this optimizer step's calls so far, summed on the device (averaging
        # them never reads it).
        self.losses = StepLoss()
        self.closure_loss: Any = None  # the loss signal of a closure's last evaluation
        self.divergence: DivergenceError | None = None  # raised once the step is complete
        self.streak_ops: Any = None  # the Ops the skip streak counts with (see _count_skips)


def _signals(loss: Any) -> dict[str, Any]:
    """The signal keywords for the clipper (none when there is no loss, as before signals)."""
    return {} if loss is None else {"loss": loss}


class _InnerStep(NamedTuple):
    """The inner optimizer step a clip or fold prepared: the step's info and the divisor of a
    fold (None: the gradients were clipped in place)."""

    info: ClipInfo
    divisor: torch.Tensor | None
