"""ZClip: z-score spike clipping against EMA statistics of the gradient norm.

Kumar, Owen, Ashkboos et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", and
the rule of its ``zclip`` 1.0.0 package, step by step:

1. **Warm-up** (the first ``warmup_steps`` positive finite norms): record the norm. Then, with
   ``warmup="robust"`` (the default), from the third norm on a norm is clipped by the rule of
   step 2 against the *median* and the scaled *median absolute deviation* (``1.4826·MAD``, the
   standard deviation of normal data) of the norms recorded so far, the current one included,
   and after the last warm-up norm ``mean`` and ``var`` are that median and the square of that
   scaled MAD. With ``warmup="mean"`` (the ``zclip`` package's rule) nothing is clipped during
   warm-up but at ``max_grad_norm``, and ``mean`` and ``var`` are the population mean and
   variance of the warm-up norms.
2. **Threshold**, with ``std = sqrt(var)`` and ``z = (‖g‖ - mean) / std``:

   * ``mode="zscore"``, ``clip_option="adaptive_scaling"``: if ``z > z_thresh`` clip to
     ``(mean + (z_thresh**2 / z) * std) * clip_factor`` — the reciprocal threshold: the larger
     the outlier, the harder it is pulled in;
   * ``mode="zscore"``, ``clip_option="mean"``: if ``z > z_thresh`` clip to ``mean``;
   * ``mode="percentile"``: clip to ``mean + z_thresh * std`` when the norm exceeds it.

   The bound used is ``min(that, max_grad_norm)`` when ``max_grad_norm`` is set.
3. **EMA** with the clipped value ``x`` (the threshold on a spike, else the norm) — unless it
   was a spike and ``skip_update_on_spike``: ``mean ← α·mean + (1-α)·x``, then
   ``var ← α·var + (1-α)·(x - mean)²`` with the *updated* mean, as the package does.

Deliberate differences from ``zclip`` 1.0.0 (each a named expectation in
``tests/test_adaptive_parity.py``; ``warmup="mean"`` gives the package's warm-up):

* A robust warm-up by default. The package's statistics are a mean and a variance, which one
  spike among the warm-up norms dominates: in a nanoGPT run (issue 17) a norm of 50.8 among
  norms near 1 set the threshold near 27 for hundreds of steps, and the run was never clipped;
  and nothing is clipped during warm-up, where an RNN on the adding problem diverges within 16
  steps. The median and MAD ignore up to half of the warm-up norms, and clipping against them
  from the third norm on stops an early blow-up. (A checkpoint saved mid-warm-up by an earlier
  version finishes its warm-up with this rule: its state has the same layout.)
* ``max_grad_norm=None`` by default: the package's default 1.0 silently clips every step at 1.0.
* A variance floor: ``std`` is at least ``std_floor · mean``. With constant warm-up norms the
  package's variance is 0, its ``z = (‖g‖ - mean) / (0 + 1e-6)`` explodes for the slightest
  increase, every such step is clipped to the mean and the variance stays 0. The package adds
  ``eps=1e-6`` to ``std``; this divides by the floored ``std`` instead, which keeps the rule
  scale invariant (multiplying the loss by any constant leaves every decision unchanged).
  Where ``std ≫ 1e-6`` the two agree to about ``1e-6 / std``.
* Statistics live on the device (fp32) and nothing is read back; the package calls ``.item()``
  every step and keeps Python floats.
* Non-finite norms do not enter the statistics (the package's become NaN for good).
* Zero norms do not enter the statistics either (warm-up or EMA), and the warm-up waits for
  ``warmup_steps`` positive norms. In the package a warm-up of zero norms (a frozen or masked
  start) gives ``mean = var = 0``; every later positive norm is then an infinite z-score,
  clipped to ``mean + 0 = 0``, and the EMA of those zeros stays 0: every gradient is zeroed for
  ever. A zero norm has nothing to clip and says nothing about the norm's scale, so it is
  passed through and ignored. (For the same reason ``load_state_dict`` refuses a finished
  warm-up with ``mean == 0``.)
* An fp64 norm beyond fp32's range (~3.4e38, finite in fp64) is not recorded during warm-up
  (the fp32 state would hold inf); afterwards it is a spike like any other, clipped to its
  finite target, which is what the EMA takes.
* On a quiet step the gradients are left bit for bit as they are (DESIGN rule 4), fp64 ones
  included: the package clips to the norm itself, which is a no-op only when the norm and the
  bound have the same precision.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Decision, Measured
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.measure import check_policy, settle
from gradclip._core.registry import register
from gradclip._core.validation import check_choice, check_int, check_number
from gradclip.clippers._adaptive import (
    accumulation,
    as_f32,
    check_field,
    prefix_median_mad,
    ring_write,
    skip_flag,
)
from gradclip.clippers._scheduled import Scheduled, as_threshold

__all__ = ["ZClip", "ZClipState"]

#: Added to the norm in the divisor of the clip coefficient, as in the package.
_EPS = 1e-6
#: The median absolute deviation times this estimates the standard deviation of normal data.
_MAD_TO_STD = 1.4826
#: Norms in the warm-up buffer (the current one included) before the robust warm-up clips: the
#: median of three is the first that one outlier cannot move.
_ROBUST_START = 3


class ZClipState(NamedTuple):
    """Warm-up buffer and EMA statistics."""

    step: Any  # int64 0-d: positive finite norms seen (warm-up is over once step >= warmup_steps)
    warmup: Any  # (warmup_steps,) fp32: the warm-up norms, all positive (slots not reached yet: 0)
    mean: Any  # fp32 0-d
    var: Any  # fp32 0-d


@register("zclip")
class ZClip(Scheduled, Clipper):
    """Clip gradient-norm spikes found by a z-score against EMA statistics (ZClip).

    Args:
        alpha: EMA smoothing factor in ``(0, 1)``; larger is slower.
        z_thresh: z-score above which a norm is a spike, ``> 0``.
        max_grad_norm: Optional absolute cap ``> 0`` applied on every step (also during
            warm-up); ``None`` for none; or a schedule of it (:mod:`gradclip.schedules`, the
            step then kept in the state).
        warmup_steps: Positive finite norms collected before the EMA statistics start, ``>= 1``.
        mode: ``"zscore"`` or ``"percentile"`` (see the module docstring).
        clip_option: ``"adaptive_scaling"`` or ``"mean"``; used in ``"zscore"`` mode.
        clip_factor: Multiplies the adaptive-scaling threshold, ``> 0`` (the package
            multiplies the whole threshold, not only its ``std`` term as its docstring says;
            this follows its code).
        skip_update_on_spike: Leave the statistics unchanged on a spike.
        std_floor: The standard deviation used is at least ``std_floor · mean``, ``>= 0``
            (0 with a zero variance makes every norm above the mean a spike).
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`).
        warmup: ``"robust"`` (median and MAD, clipping from the third warm-up norm on) or
            ``"mean"`` (the ``zclip`` package's mean and variance, no clipping during warm-up).

    ``info.threshold`` is the value a spike is clipped to on a spike, otherwise the largest
    norm that passes (``mean + z_thresh·std``), capped at ``max_grad_norm``; before the
    statistics exist (the first two norms of a robust warm-up, all of a ``"mean"`` one) it is
    ``max_grad_norm`` or ``inf``.

    Raises:
        InvalidArgumentError: An argument out of range (the message names it), an unknown
            ``mode``, ``clip_option`` or policy.
    """

    defaults: dict[str, Any] = {}
    state_type = ZClipState
    state_dtypes = {"step": "int64", "warmup": "float32", "mean": "float32", "var": "float32"}

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        std_floor: float = 0.01,
        nonfinite: str = "propagate",
        warmup: str = "robust",
    ):
        super().__init__()
        where = "ZClip"
        self.alpha = check_number(where, "alpha", alpha, low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
        self.z_thresh = check_number(where, "z_thresh", z_thresh, low=0.0, low_inclusive=False, high_inclusive=False)
        self.max_grad_norm = (
            None
            if max_grad_norm is None
            else as_threshold(where, "max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False)
        )
        self.warmup_steps = check_int(where, "warmup_steps", warmup_steps, low=1)
        self.mode = check_choice(where, "mode", mode, ("zscore", "percentile"))
        self.clip_option = check_choice(where, "clip_option", clip_option, ("adaptive_scaling", "mean"))
        self.clip_factor = check_number(where, "clip_factor", clip_factor, low=0.0, low_inclusive=False, high_inclusive=False)
        if not isinstance(skip_update_on_spike, bool):
            raise InvalidArgumentError(
                f"{where}: skip_update_on_spike must be True or False, got {skip_update_on_spike!r}"
            )
        self.skip_update_on_spike = skip_update_on_spike
        self.std_floor = check_number(where, "std_floor", std_floor, high_inclusive=False)
        self.nonfinite = check_policy(where, nonfinite)
        self.warmup = check_choice(where, "warmup", warmup, ("robust", "mean"))
        self._use_schedules({"max_grad_norm": 0.0} if max_grad_norm is not None else {}, ZClipState, ZClip.state_dtypes)

    def config(self):
        """The settings, leaving out ``warmup`` at its default (a setting earlier versions
        lacked), so their checkpoints still load."""
        config = super().config()
        if self.warmup == "robust":
            del config["warmup"]
        return config

    def init_state(self, ops, grads):
        zero = ops.scalar(0.0, "float32")
        base = ZClipState(
            ops.scalar(0, "int64"), ops.cast(ops.arange(self.warmup_steps), "float32") * 0.0, zero, zero
        )
        return self._with_clock(ops, base)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        found = measured
        norm, finite = found.norm, found.finite
        f32, acc = "float32", accumulation(norm)
        zero, one, inf = ops.scalar(0.0, f32), ops.scalar(1.0, f32), ops.scalar(math.inf, f32)
        x = ops.where(finite, as_f32(ops, norm), zero)
        # The norms that may enter the statistics: positive (a zero norm says nothing about the
        # scale, and zeros alone would make a zero mean) and finite in fp32 (an fp64 norm beyond
        # fp32's range would be inf in the fp32 state; after warm-up it is a spike anyway).
        # `value` is x where usable, else 0: an fp32 x is 0 exactly where it is not usable.
        if acc == f32:
            usable = x > 0
            value = x
        else:
            usable = (x > 0) & (x < math.inf)
            value = ops.where(usable, x, zero)
        adaptive = state.step >= self.warmup_steps
        zt = self.z_thresh

        # -- warm-up: collect, and initialise the statistics after the last warm-up norm. The
        # slot `step` still holds 0 (load_state_dict checks it) and `value` is 0 unless usable,
        # so the write needs no condition; after warm-up `step` is past the buffer.
        warmup = ring_write(ops, state.warmup, state.step, value)
        initialise = usable & (state.step == self.warmup_steps - 1)
        # The usable norms so far, this one included: the next state's step.
        filled = ops.count_up(state.step, usable)
        old_mean, old_var = state.mean, state.var
        if self.warmup == "mean":
            size = float(self.warmup_steps)
            first_mean = ops.sum(warmup) / size
            centred = warmup - first_mean
            first_var = ops.sum(centred * centred) / size
            active = adaptive
        else:
            # Median and scaled MAD of the buffer with the current norm: the statistics the
            # warm-up clips against, and those it ends with (on the last warm-up norm the
            # buffer is full). Slots not reached yet are left out (prefix_median_mad). With nothing
            # recorded, slot 0 alone is the sample and holds 0 (the buffer's invariant): the
            # median and the MAD are then 0 (nothing is clipped), and no inf - inf is formed.
            median, mad = prefix_median_mad(ops, warmup, filled, inf, ops.arange(self.warmup_steps))
            robust_std = mad * _MAD_TO_STD
            first_mean, first_var = median, robust_std * robust_std
            # Clipping starts once three norms are in the buffer; before the end of warm-up
            # the robust statistics stand in for the EMA ones. (filled >= step, so with at least
            # three warm-up steps a finished warm-up has three norms: one comparison does.)
            ready = filled >= _ROBUST_START
            active = ready if self.warmup_steps >= _ROBUST_START else adaptive | ready
            old_mean = ops.where(adaptive, old_mean, median)
            old_var = ops.where(adaptive, old_var, first_var)

        # -- the adaptive threshold (computed every step, used once statistics exist).
        std = ops.sqrt(old_var)
        if self.std_floor > 0:  # (with 0 the floor is 0 <= std)
            std = ops.maximum(std, old_mean * self.std_floor)
        spread = zt * std
        if self.mode == "percentile":
            candidate = old_mean + spread
            spike = x > candidate
        else:
            if self.std_floor > 0:
                # After warm-up the mean is positive (load_state_dict checks it), so the floored
                # spread is too, unless the mean is below ~1e-43 (fp32 subnormals), where the
                # quotient below is ±inf or NaN and spike still means "above the mean", as with
                # a zero spread in the branch below. Before the statistics exist (mean and var
                # 0) the divisor is 1 instead of 0, and nothing is a spike.
                z = (x - old_mean) / ops.where(active, std, one)
                spike = z > zt
            else:
                has_spread = std > 0
                z = (x - old_mean) / ops.where(has_spread, std, one)
                # A zero spread makes z +inf above the mean (the package's 1e-6 makes it huge),
                # 0 elsewhere: a spike is a norm above the mean. Its target is then the mean,
                # with the finite z above as with the infinite one (0 / eta is 0 either way).
                spike = ops.where(has_spread, z > zt, x > old_mean)
            if self.clip_option == "mean":
                candidate = old_mean
            else:
                eta = ops.where(spike, z, one) / zt
                candidate = old_mean + spread / eta
                if self.clip_factor != 1.0:
                    candidate = candidate * self.clip_factor
        # A non-finite step has x = 0, never above the (non-negative) mean: not a spike.
        spike = spike & active
        clip_value = ops.where(spike, candidate, value)

        # -- the bound used this step: the spike's target on a spike, else none (coef exactly 1:
        # comparing the norm with its own fp32 rounding would clip fp64 gradients by an ulp),
        # then the absolute cap, compared in the norm's dtype. The threshold reported on a quiet
        # step is the largest norm that would have passed. (Neither is ever NaN, so minimum
        # caps as a comparison would.)
        bound = ops.cast(ops.where(spike, candidate, inf), acc)
        if self.mode == "percentile":
            reported = ops.where(active, candidate, inf)
        else:
            reported = ops.where(spike, candidate, ops.where(active, old_mean + spread, inf))
        reported = ops.cast(reported, acc)
        clock = self._step_of(ops, state, signals)
        if self.max_grad_norm is not None:
            cap = self._setting(ops, "max_grad_norm", clock, acc)
            bound = ops.minimum(bound, cap)
            reported = ops.minimum(reported, cap)
        coef = ops.clip_coefficient(norm, bound, _EPS)
        if self.max_grad_norm is None:
            # The bound is inf except on a spike, which is finite: coef is 1 on non-finite steps.
            skip = skip_flag(ops, finite, self.nonfinite)
        else:
            coef, skip = settle(ops, coef, finite, self.nonfinite)

        # -- the EMA (after warm-up only), with the clipped value and the updated mean. A
        # spike's value is its (finite) target; a quiet norm must be usable. (A spike is finite,
        # a usable norm finite.) Every operand is finite, so the values computed on a discarded
        # step are finite too. During warm-up the state's mean and var stay 0 (the robust
        # warm-up's statistics are recomputed from the buffer each step).
        if self.skip_update_on_spike:
            update = adaptive & usable & ~spike
        else:
            update = (spike | usable) & adaptive
        ema_mean = self.alpha * old_mean + (1.0 - self.alpha) * clip_value
        deviation = clip_value - ema_mean
        ema_var = self.alpha * old_var + (1.0 - self.alpha) * (deviation * deviation)
        mean = ops.where(update, ema_mean, ops.where(initialise, first_mean, state.mean))
        var = ops.where(update, ema_var, ops.where(initialise, first_var, state.var))
        new_state = self._next_state(ZClipState(filled, warmup, mean, var), clock)
        return Decision(coef, new_state, make_info(ops, norm, reported, coef, coef < 1, found.given_finite, skip))

    def validate_state(self, where, state):
        self._check_clock(where, state)
        check_field(where, state, "step", "int", low=0)
        check_field(where, state, "warmup", "float", (self.warmup_steps,), low=0.0)
        check_field(where, state, "mean", "float", low=0.0)
        check_field(where, state, "var", "float", low=0.0)
        step, warmup = state["step"], state["warmup"]
        if step < self.warmup_steps and (state["mean"] != 0 or state["var"] != 0):
            raise StateError(
                f"{where}: mean and var must be 0 during warm-up (step {step} < "
                f"warmup_steps {self.warmup_steps}), got mean={state['mean']!r}, var={state['var']!r}"
            )
        # Only positive norms are recorded, one slot per step, so the first min(step, warmup)
        # slots are positive and the others still 0; a finished warm-up has a positive mean.
        filled = min(step, self.warmup_steps)
        if any(v <= 0 for v in warmup[:filled]) or any(v != 0 for v in warmup[filled:]):
            raise StateError(
                f"{where}: state field 'warmup' must hold {filled} positive norm(s) followed by "
                f"zeros (step {step}), got {warmup!r}; the state is inconsistent"
            )
        if step >= self.warmup_steps and state["mean"] <= 0:
            raise StateError(
                f"{where}: mean must be positive once warm-up is over (step {step} >= "
                f"warmup_steps {self.warmup_steps}), got mean={state['mean']!r}; with a zero mean "
                "every gradient would be clipped to zero"
            )
