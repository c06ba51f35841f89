"""Skip the optimizer step on a spike of the gradient norm, of the loss, or of either.

PaLM (Chowdhery et al. 2022) restarted from a checkpoint and skipped batches around loss
spikes; Megatron-LM and OLMo (Groeneveld et al. 2024; OLMo-core's ``SkipStepOptimizer``) skip the
update itself when the gradient norm or the loss is more than ``sigma`` standard deviations above
its recent mean. Here, for each watched signal ``x`` (``signal="grad_norm"``: the global gradient
norm; ``"loss"``: the step's loss, passed as ``clip_(model, loss=loss)`` or ``update(...,
loss=loss)``; ``"both"``: either)::

    spike = not finite(x)  or  (enough history and x > mean + sigma · max(std, floor))

over a window of the last ``window`` accepted values of that signal — the current one excluded,
``std`` the sample standard deviation (``ddof=1``, as ``torch.std_mean`` in OLMo-core). With
``log_space=True`` the statistics are those of ``log x`` (a spike is a large *ratio* to the recent
level, the natural scale of a loss that falls by orders of magnitude) and the threshold reported is
``exp`` of the log-space one. On a skipped step ``info.skip`` is True and no value of that step
enters any window, so one spike cannot widen the band for the next. Gradients are never modified:
the optimizer wrapper (:class:`gradclip.torch.ClippedOptimizer`) or the caller skips the step.
Non-finite gradient norms are flagged whatever the signal watched.

Deviations from OLMo-core's rule (each a strict expectation in ``tests/test_skip_on_loss.py``):

* **One-sided.** OLMo-core tests ``|z| > sigma``: a sudden *drop* of the loss or norm skips the
  step too. Only rises are spikes here: a better-than-usual batch is no reason to skip.
* **Skipped values stay out of the window.** OLMo-core appends every loss and norm, spikes
  included, so a spike widens the band for the next ``window`` steps.
* **Spread floor** (as ZClip's variance floor): the spread used is at least ``std_floor`` times
  ``|mean|`` (in log space: ``std_floor`` itself, a relative spread). A window of identical values
  has ``std = 0``: OLMo-core's z-score is then infinite for any larger value, which never enters
  its window in our rule, so every later step would be skipped. With the default 0.01 and
  ``sigma = 6`` a value up to 6% above a constant level is accepted; the floor scales with the
  values, so decisions do not depend on the loss scale.
* ``min_history`` counts the values before the current one (OLMo-core waits for
  ``max(20, window // 2)`` values, the current included).
* **Zero norms** are accepted (nothing to skip) but do not enter the window: a window of zeros
  has mean and spread 0, and every positive norm after it would be skipped for ever. In log space
  a loss ``<= 0`` (no logarithm) is accepted and not recorded either.

An fp64 norm or loss beyond fp32's range (~3.4e38, the windows are fp32) is skipped like a
non-finite one. A lasting shift of the level by more than ``sigma`` floored standard deviations
is skipped step after step, because skipped values never enter the window; bound the consecutive
skips in the training loop (``ClippedOptimizer(max_consecutive_skips=...)``) if the level can move
that fast.

State: ``4·window`` bytes per watched signal and int64 counters. With ``signal="grad_norm"``
(the default) the state and the checkpoint format are those of earlier versions, whose
checkpoints load.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured, Signals
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import Ops
from gradclip._core.registry import register
from gradclip._core.validation import check_choice, check_int, check_number
from gradclip.clippers._adaptive import (
    accumulation,
    as_f32,
    check_field,
    fp32_finite,
    ring_write,
)

__all__ = ["SkipOnSpike", "SkipOnSpikeState", "SkipOnLossState", "SkipOnBothState"]

SIGNALS = ("grad_norm", "loss", "both")


class SkipOnSpikeState(NamedTuple):
    """``signal="grad_norm"``: the window of accepted norms and counters."""

    window: Any  # (window,) fp32 ring buffer of accepted positive norms (slots not reached yet: 0)
    count: Any  # int64 0-d: norms ever recorded (the next write goes to count % window)
    skipped: Any  # int64 0-d: steps flagged so far


class SkipOnLossState(NamedTuple):
    """``signal="loss"``: the window of accepted losses and counters."""

    loss_window: Any  # (window,) fp32 ring buffer of accepted losses (slots not reached yet: 0)
    loss_count: Any  # int64 0-d: losses ever recorded
    skipped: Any  # int64 0-d: steps flagged so far


class SkipOnBothState(NamedTuple):
    """``signal="both"``: both windows and counters."""

    window: Any
    count: Any
    loss_window: Any
    loss_count: Any
    skipped: Any


_STATES = {"grad_norm": SkipOnSpikeState, "loss": SkipOnLossState, "both": SkipOnBothState}
_DTYPES = {"window": "float32", "count": "int64", "loss_window": "float32", "loss_count": "int64", "skipped": "int64"}


class _Band(NamedTuple):
    """One signal's decision this step."""

    threshold: Any  # fp32 0-d, in the signal's own units (inf before min_history)
    spike: Any  # bool 0-d
    usable: Any  # bool 0-d: the value may enter the window (if the step is not skipped)
    value: Any  # fp32 0-d: what is written (0 where not usable)


@register("skip_on_spike")
class SkipOnSpike(Clipper):
    """Flag the optimizer step for skipping when the gradient norm or the loss spikes (or the
    gradient norm is not finite).

    Args:
        window: How many recent accepted values the statistics cover, ``>= 2``.
        sigma: The spike threshold in standard deviations above the mean, ``> 0``.
        min_history: Recorded values needed before spikes are detected, in ``[2, window]``
            (non-finite values are flagged from the first step).
        std_floor: The spread used is at least ``std_floor · |mean|`` (in log space
            ``std_floor``), ``>= 0`` (0 lets a window of identical values skip every later
            step; see the module docstring).
        signal: ``"grad_norm"`` (default), ``"loss"`` or ``"both"`` (skip when either spikes).
            With ``"loss"`` or ``"both"`` every call needs ``loss=``.
        log_space: Take the statistics of the logarithm of the values.

    ``info.threshold`` is ``mean + sigma·max(std, floor)`` for the gradient norm (``exp`` of the
    log-space one with ``log_space``; ``inf`` before ``min_history``); with ``signal="loss"`` it
    is the loss threshold, in the loss's units. ``info.coef`` is always 1 and ``info.clipped``
    False: the gradients are left exactly as they are.

    Raises:
        InvalidArgumentError: An argument out of range (named in the message); at call time,
            ``signal="loss"`` or ``"both"`` without ``loss=`` (nothing is changed).
        UnknownNameError: An unknown ``signal``.
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.NONE
    may_skip = True
    state_type = SkipOnSpikeState
    state_dtypes = {"window": "float32", "count": "int64", "skipped": "int64"}

    def __init__(
        self,
        window: int = 128,
        sigma: float = 6.0,
        min_history: int = 20,
        std_floor: float = 0.01,
        signal: str = "grad_norm",
        log_space: bool = False,
    ):
        super().__init__()
        where = "SkipOnSpike"
        self.window = check_int(where, "window", window, low=2)
        self.sigma = check_number(where, "sigma", sigma, low=0.0, low_inclusive=False, high_inclusive=False)
        self.min_history = check_int(where, "min_history", min_history, low=2)
        if self.min_history > self.window:
            raise InvalidArgumentError(
                f"{where}: min_history must be in [2, window={self.window}], got {min_history!r}"
            )
        self.std_floor = check_number(where, "std_floor", std_floor, high_inclusive=False)
        self.signal = check_choice(where, "signal", signal, SIGNALS)
        if not isinstance(log_space, bool):
            raise InvalidArgumentError(f"{where}: log_space must be True or False, got {log_space!r}")
        self.log_space = log_space
        # The state holds the windows the signal needs, no more (the gradient-norm state is the
        # one earlier versions saved).
        self.state_type = _STATES[self.signal]
        self.state_dtypes = {name: _DTYPES[name] for name in self.state_type._fields}

    def config(self):
        """The settings, leaving out ``signal`` and ``log_space`` at their defaults (settings that
        earlier versions lacked), so checkpoints saved before them still load."""
        config = super().config()
        if self.signal == "grad_norm":
            del config["signal"]
        if not self.log_space:
            del config["log_space"]
        return config

    @property
    def watches_norm(self) -> bool:
        return self.signal != "loss"

    @property
    def watches_loss(self) -> bool:
        return self.signal != "grad_norm"

    def init_state(self, ops, grads):
        zero = ops.scalar(0, "int64")
        empty = ops.cast(ops.arange(self.window), "float32") * 0.0
        fields = {"window": empty, "count": zero, "loss_window": empty, "loss_count": zero, "skipped": zero}
        return self.state_type(**{name: fields[name] for name in self.state_type._fields})

    def _loss(self, ops: Ops, signals: Signals) -> Any:
        loss = signals.loss
        if loss is None:
            raise InvalidArgumentError(
                f"SkipOnSpike: signal={self.signal!r} needs the step's loss: pass it as clip_(model, loss=loss), "
                "clip(grads, loss=loss) or update(grads, state, loss=loss) (ClippedOptimizer: step(loss=loss)); "
                "nothing was changed"
            )
        if not hasattr(loss, "shape"):
            return ops.scalar(float(loss), "float32")
        # A one-element array of any shape (signals_from checked it): sum() makes it 0-d.
        return ops.sum(ops.cast(loss, "float32"))

    def _band(self, ops: Ops, window: Any, count: Any, x: Any, measurable: Any, index: Any, positive_only: bool) -> _Band:
        """The statistics of one window (the current value excluded) and the decision on ``x``
        (fp32, 0 where not ``measurable``). Slots not reached yet hold 0 (load_state_dict checks
        it); the divisors are max(k, 1) and max(k - 1, 1) for the k = min(count, window) valid
        slots."""
        f32 = "float32"
        zero, one, inf = ops.scalar(0.0, f32), ops.scalar(1.0, f32), ops.scalar(math.inf, f32)
        valid = index < count
        # max(k, 1) from the count itself, and max(k - 1, 1) from it: small whole numbers, exact.
        size = ops.cast(ops.clamp_values(count, ops.scalar(1, "int64"), ops.scalar(self.window, "int64")), f32)
        if self.log_space:
            # Recorded values are positive in log space (and norms always): log of the valid
            # slots, 0 elsewhere.
            values = ops.where(valid, ops.log(ops.where(valid, window, one)), zero)
        else:
            values = window
        mean = ops.sum(values) / size
        centred = ops.where(valid, values - mean, zero)
        std = ops.sqrt(ops.sum(centred * centred) / ops.maximum(size - 1.0, one))
        if self.std_floor > 0:  # (with 0 the floor is 0 <= std)
            if self.log_space:
                floor = ops.scalar(self.std_floor, f32)
            elif positive_only:  # a window of norms has a non-negative mean
                floor = mean * self.std_floor
            else:  # a loss may be negative
                floor = ops.maximum(mean, -mean) * self.std_floor
            std = ops.maximum(std, floor)
        level = mean + self.sigma * std
        if self.log_space:
            level = ops.exp(level)
        # k >= min_history exactly when count is (min_history <= window).
        threshold = ops.where(count >= self.min_history, level, inf)
        # A NaN value is never above the threshold, nor is an inf one before min_history: both
        # are flagged as not measurable.
        spike = ~measurable | (x > threshold)
        if positive_only or self.log_space:
            usable = x > zero  # (x is 0 where not measurable)
        else:
            usable = measurable
        return _Band(threshold, spike, usable, x)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        f32 = "float32"
        norm, finite = measured.norm, measured.finite
        acc = accumulation(norm)
        zero = ops.scalar(0.0, f32)
        index = ops.arange(self.window)
        # Non-finite, and beyond fp32's range (an fp64 norm), are both not measurable.
        norm_ok = fp32_finite(ops, norm, finite)
        fields: dict[str, Any] = {}
        if self.watches_loss:
            loss = self._loss(ops, signals)  # raises before anything changes when absent
            loss_ok = ops.isfinite(loss)
            loss_band = self._band(
                ops, state.loss_window, state.loss_count, ops.where(loss_ok, loss, zero), loss_ok, index, False
            )
        if self.watches_norm:
            x = as_f32(ops, norm)
            band = self._band(ops, state.window, state.count, x, norm_ok, index, True)
            skip = band.spike if not self.watches_loss else band.spike | loss_band.spike
            threshold = band.threshold
        else:
            # Non-finite gradients are flagged whatever the signal: they would poison the weights.
            skip = loss_band.spike | ~norm_ok
            threshold = loss_band.threshold
        # Only a step that is taken records its values.
        taken = ~skip
        if self.watches_norm:
            record = band.usable & taken
            fields["window"] = ring_write(ops, state.window, state.count % self.window, band.value, record, index)
            fields["count"] = ops.count_up(state.count, record)
        if self.watches_loss:
            record = loss_band.usable & taken
            fields["loss_window"] = ring_write(
                ops, state.loss_window, state.loss_count % self.window, loss_band.value, record, index
            )
            fields["loss_count"] = ops.count_up(state.loss_count, record)
        fields["skipped"] = ops.count_up(state.skipped, skip)
        coef = ops.scalar(1.0, f32) if acc == f32 else ops.scalar(1.0, acc)
        info = make_info(ops, norm, ops.cast(threshold, acc), coef, ops.scalar(False, "bool"), finite, skip)
        return Decision(coef, self.state_type(**fields), info)

    def validate_state(self, where, state):
        check_field(where, state, "skipped", "int", low=0)
        if self.watches_norm:
            check_field(where, state, "window", "float", (self.window,), low=0.0)
            check_field(where, state, "count", "int", low=0)
            # Only positive norms are recorded, in order: the slots written so far are positive,
            # those not reached yet (count < window) still 0.
            _check_window(where, "window", state["window"], state["count"], self.window, positive=True, what="norm")
        if self.watches_loss:
            check_field(where, state, "loss_window", "float", (self.window,))
            check_field(where, state, "loss_count", "int", low=0)
            _check_window(
                where, "loss_window", state["loss_window"], state["loss_count"], self.window, positive=self.log_space, what="value"
            )


def _check_window(where: str, name: str, recorded: list, count: int, size: int, positive: bool, what: str) -> None:
    """Values are recorded in order from slot 0: the first min(count, size) slots are filled
    (positive where only positive values are recorded), the others still 0."""
    filled = min(count, size)
    bad_filled = any(v <= 0 for v in recorded[:filled]) if positive else False
    if bad_filled or any(v != 0 for v in recorded[filled:]):
        held = f"{filled} positive {what}(s)" if positive else f"{filled} recorded {what}(s)"
        raise StateError(
            f"{where}: state field {name!r} must hold {held} followed by zeros "
            f"(count {count}), got {recorded!r}; the state is inconsistent"
        )
