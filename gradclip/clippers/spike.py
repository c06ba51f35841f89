"""Skip the optimizer step on a gradient-norm spike (Megatron, OLMo, PaLM practice).

PaLM (Chowdhery et al. 2022) restarted from a checkpoint and skipped batches around loss
spikes; Megatron-LM and OLMo (Groeneveld et al. 2024; OLMo-core's ``SkipStepOptimizer``) skip the
update itself when the gradient norm (or loss) is more than ``sigma`` standard deviations above
its recent mean. Here::

    spike = not finite(‖g‖)  or  (enough history and ‖g‖ > mean + sigma · max(std, std_floor · mean))

over a window of the last ``window`` accepted positive norms — the current norm excluded,
``std`` the sample standard deviation (``ddof=1``, as ``torch.std_mean`` in OLMo-core). On a
spike ``info.skip`` is True and the norm does not enter the window, so one spike cannot widen
the band for the next. Gradients are never modified: the optimizer wrapper
(:class:`gradclip.torch.ClippedOptimizer`) or the caller skips the step.

Deviations from a bare ``mean + sigma·std`` rule, both against a stall for ever:

* **Spread floor** (as ZClip's variance floor): the spread used is at least ``std_floor`` times
  the window's mean. A window of identical norms has ``std = 0``; without the floor every
  slightly larger norm would be a spike, never enter the window, and every later step would be
  skipped. With the default 0.01 and ``sigma = 6`` a norm up to 6% above a constant level is
  accepted (and then widens the window's spread); the floor scales with the norms, so decisions
  do not depend on the loss scale.
* **Zero norms** are accepted (nothing to skip) but do not enter the window: a window of zeros
  has mean and spread 0, and every positive norm after it would be skipped for ever.

An fp64 norm beyond fp32's range (~3.4e38, the window is fp32) is skipped like a non-finite one,
as the same gradients in fp32 would overflow the norm. A lasting shift of the norm's level by
more than ``sigma`` floored standard deviations is still skipped step after step, because
skipped norms never enter the window; pair this with a bound on consecutive skips in the
training loop if the norm's level can move that fast.

State: the window (``4·window`` bytes) and two int64 counters.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.registry import register
from gradclip._core.validation import check_int, check_number
from gradclip.clippers._adaptive import (
    accumulation,
    as_f32,
    check_field,
    fp32_finite,
    ring_write,
)

__all__ = ["SkipOnSpike", "SkipOnSpikeState"]


class SkipOnSpikeState(NamedTuple):
    """The window of accepted norms and counters."""

    window: Any  # (window,) fp32 ring buffer of accepted positive norms (slots not reached yet: 0)
    count: Any  # int64 0-d: norms ever recorded (the next write goes to count % window)
    skipped: Any  # int64 0-d: steps flagged so far


@register("skip_on_spike")
class SkipOnSpike(Clipper):
    """Flag the optimizer step for skipping when the gradient norm spikes or is not finite.

    Args:
        window: How many recent accepted norms the statistics cover, ``>= 2``.
        sigma: The spike threshold in standard deviations above the mean, ``> 0``.
        min_history: Recorded norms needed before spikes are detected, in
            ``[2, window]`` (non-finite norms are flagged from the first step).
        std_floor: The spread used is at least ``std_floor`` times the window's mean, ``>= 0``
            (0 lets a window of identical norms skip every later step; see the module
            docstring).

    ``info.threshold`` is ``mean + sigma·max(std, std_floor·mean)`` (``inf`` before
    ``min_history``); ``info.coef`` is
    always 1 and ``info.clipped`` False: the gradients are left exactly as they are.

    Raises:
        InvalidArgumentError: An argument out of range (named in the message).
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.NONE
    may_skip = True
    state_type = SkipOnSpikeState
    state_dtypes = {"window": "float32", "count": "int64", "skipped": "int64"}

    def __init__(self, window: int = 128, sigma: float = 6.0, min_history: int = 20, std_floor: float = 0.01):
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


    def init_state(self, ops, grads):
        zero = ops.scalar(0, "int64")
        return SkipOnSpikeState(ops.cast(ops.arange(self.window), "float32") * 0.0, zero, zero)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        f32 = "float32"
        norm, finite = measured.norm, measured.finite
        acc = accumulation(norm)
        zero, one, inf = ops.scalar(0.0, f32), ops.scalar(1.0, f32), ops.scalar(math.inf, f32)
        # Non-finite, and beyond fp32's range (an fp64 norm), are both flagged.
        measurable = fp32_finite(ops, norm, finite)
        x = as_f32(ops, norm)
        # Statistics of the window, the current norm excluded. Slots not reached yet hold 0
        # (load_state_dict checks it), so the whole window sums to the valid slots' sum; the
        # divisors are max(k, 1) and max(k - 1, 1), k = min(count, window) the valid slots.
        index = ops.arange(self.window)
        valid = index < state.count
        kf = ops.cast(ops.sum(valid), f32)
        mean = ops.sum(state.window) / ops.maximum(kf, one)
        centred = ops.where(valid, state.window - mean, zero)
        var = ops.sum(centred * centred) / ops.maximum(kf - 1.0, one)
        std = ops.sqrt(var)
        if self.std_floor > 0:  # (with 0 the floor is 0 <= std)
            std = ops.maximum(std, mean * self.std_floor)
        # k >= min_history exactly when count is (min_history <= window).
        threshold = ops.where(state.count >= self.min_history, mean + self.sigma * std, inf)
        # A NaN norm is never above the threshold, nor is an inf one before min_history: both
        # are flagged as not measurable. Only a measurable positive norm under it is recorded.
        spike = ~measurable | (x > threshold)
        record = x > ops.where(spike, inf, zero)
        window = ring_write(ops, state.window, state.count % self.window, x, record, index)
        count = state.count + ops.cast(record, "int64")
        skipped = state.skipped + ops.cast(spike, "int64")
        coef = one if acc == f32 else ops.scalar(1.0, acc)
        info = make_info(ops, norm, ops.cast(threshold, acc), coef, ops.scalar(False, "bool"), finite, spike)
        return Decision(coef, SkipOnSpikeState(window, count, skipped), info)

    def validate_state(self, where, state):
        check_field(where, state, "window", "float", (self.window,), low=0.0)
        check_field(where, state, "count", "int", low=0)
        check_field(where, state, "skipped", "int", low=0)
        # Only positive norms are recorded, in order: the slots written so far are positive,
        # those not reached yet (count < window) still 0.
        filled = min(state["count"], self.window)
        recorded = state["window"]
        if any(v <= 0 for v in recorded[:filled]) or any(v != 0 for v in recorded[filled:]):
            raise StateError(
                f"{where}: state field 'window' must hold {filled} positive norm(s) followed by "
                f"zeros (count {state['count']}), got {recorded!r}; the state is inconsistent"
            )

