"""AutoClip: the threshold is a percentile of the gradient norms seen so far.

Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks" (MLSP 2020). Each step::

    history.append(‖g‖)                     # the current norm first
    threshold = percentile(history, p)
    g ← g · min(1, threshold / (‖g‖ + 1e-6))  # global-norm clipping

Two kinds of history, both on the device and bounded:

* ``history=N`` keeps the last N norms in a ring buffer (``4·N`` bytes). The threshold equals
  ``numpy.percentile(last_N_norms, p)`` bit for bit (fp32 norms, method ``"linear"``). Sorting the
  window costs ``O(N log N)`` per step on the device.
* ``history=None`` (the default) keeps every step, in a fixed-size log-bin sketch: 4096 int64
  counts (32 KiB) plus the exact minimum and maximum, whatever the run's length. The threshold
  is within 0.54% (relative) of the exact percentile, and exact for percentile 0 and 100 and the
  first two steps. Work per step: one cumulative sum and two compare-and-count passes over the
  4096 bins. The bins are placed relative to the first positive norm (64 per octave, 9.6 decades
  either side of it; norms beyond that share the end bins, less accurately), so the sketch
  scales with the norms: multiplying the loss by a constant changes no clip decision, as with
  the exact percentile.

Differences from the ``autoclip`` 0.2.1 package's ``QuantileClip(global_threshold=True)`` (each a
named expectation in ``tests/test_adaptive_parity.py``): the package takes the quantile of the
history *before* appending the current norm (its first step is never clipped, and each threshold
lags one step), its ``quantile`` is a fraction where ``percentile`` here is in ``[0, 100]``, and
its history defaults to the last 1000 steps. Non-finite norms never enter the history here,
nor do fp64 norms beyond fp32's range (~3.4e38; the history is fp32): such a step is clipped to
the threshold of the history without it. Zero norms (all-zero gradients: a frozen model's first
steps, a loss that does not depend on the parameters, an injected fault) do not enter it either,
a deviation from the paper and the package: there, once ``percentile`` % of the steps were zero
the threshold is 0 and every later gradient is zeroed, so training stops for good. Before the
first positive norm the threshold is ``inf`` (nothing is clipped).

Precision: the history and the threshold are fp32. A step is clipped when its fp32-rounded norm
exceeds the threshold, so fp64 gradients whose norm is the threshold itself (the first step,
percentile 100) are left bit for bit as they are (DESIGN rule 4); the clip coefficient is then
computed in fp64.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Decision, Measured
from gradclip._core.errors import StateError
from gradclip._core.measure import check_policy, settle
from gradclip._core.registry import register
from gradclip._core.validation import check_int, check_number
from gradclip.clippers._adaptive import (
    SKETCH_SIZE,
    accumulation,
    as_f32,
    check_field,
    fp32_finite,
    prefix_percentile,
    ring_write,
    sketch_insert,
    sketch_percentile,
)

__all__ = ["AutoClip", "AutoClipWindowState", "AutoClipSketchState"]

#: Added to the norm in the divisor, as ``torch.nn.utils.clip_grad_norm_`` (which the paper's
#: code and the ``autoclip`` package call) does.
_EPS = 1e-6


class AutoClipWindowState(NamedTuple):
    """``history=N``: the last N finite norms (a ring buffer) and how many were ever seen."""

    history: Any  # (N,) fp32; slot i holds a norm once count > i; the next write goes to count % N
    count: Any  # int64 0-d


class AutoClipSketchState(NamedTuple):
    """``history=None``: log-bin counts of every finite norm, their number, min and max."""

    bins: Any  # (4096,) int64
    count: Any  # int64 0-d
    low: Any  # fp32 0-d, the smallest norm seen (0 before the first)
    high: Any  # fp32 0-d, the largest
    anchor: Any  # fp32 0-d, the first positive norm: the bins' unit (0 before it)


@register("autoclip")
class AutoClip(Clipper):
    """Clip by global norm at a percentile of the history of global norms (AutoClip).

    Args:
        percentile: p in ``[0, 100]``; the paper recommends 10 (clip 90% of steps a little).
        history: ``None`` keeps every step (in a bounded sketch, see the module docstring) or an
            int ``>= 1``: a sliding window of the last ``history`` steps, exact.
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`). A non-finite norm
            never enters the history, under every policy.

    Raises:
        InvalidArgumentError: ``percentile`` outside ``[0, 100]`` or NaN, ``history`` not None
            nor an int ``>= 1``, unknown policy.
    """

    defaults: dict[str, Any] = {}

    def __init__(self, percentile: float = 10.0, history: int | None = None, nonfinite: str = "propagate"):
        super().__init__()
        where = "AutoClip"
        self.percentile = check_number(where, "percentile", percentile, low=0.0, high=100.0)
        self.history = check_int(where, "history", history, low=1, allow_none=True)
        self.nonfinite = check_policy(where, nonfinite)
        # NumPy divides the percentile by 100 in double; so does this, once.
        self._q = self.percentile / 100.0
        if self.history is None:
            self.state_type = AutoClipSketchState
            self.state_dtypes = {
                "bins": "int64",
                "count": "int64",
                "low": "float32",
                "high": "float32",
                "anchor": "float32",
            }
        else:
            self.state_type = AutoClipWindowState
            self.state_dtypes = {"history": "float32", "count": "int64"}


    def init_state(self, ops, grads):
        count = ops.scalar(0, "int64")
        if self.history is None:
            zero = ops.scalar(0.0, "float32")
            return AutoClipSketchState(ops.cast(ops.arange(SKETCH_SIZE) * 0, "int64"), count, zero, zero, zero)
        return AutoClipWindowState(ops.cast(ops.arange(self.history), "float32") * 0.0, count)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        found = measured
        norm, finite = found.norm, found.finite
        f32, acc = "float32", accumulation(norm)
        zero, inf = ops.scalar(0.0, f32), ops.scalar(math.inf, f32)
        measured = as_f32(ops, norm)
        # Only positive norms finite in fp32 enter the history: a non-finite one, or an fp64
        # norm beyond fp32's range (it would be inf in the fp32 state), is replaced by 0 and not
        # counted; nor is a zero norm (a step without signal: enough of them would pull the
        # percentile to 0, and a threshold of 0 zeroes every later gradient).
        x = ops.where(fp32_finite(ops, norm, finite), measured, zero)
        accept = x > zero
        count = ops.count_up(state.count, accept)
        if self.history is None:
            bins, anchor = sketch_insert(ops, state.bins, state.anchor, x, accept, ops.scalar(1.0, f32))
            # Before the first norm low and high are 0 (load_state_dict checks it), and x is 0
            # where not accepted: the running maximum needs no condition.
            low = ops.where(accept, ops.where(state.count == 0, x, ops.minimum(x, state.low)), state.low)
            high = ops.maximum(x, state.high)
            threshold = sketch_percentile(ops, bins, count, low, high, anchor, self._q, zero, inf)
            new_state = AutoClipSketchState(bins, count, low, high, anchor)
        else:
            index = ops.arange(self.history)
            history = ring_write(ops, state.history, state.count % self.history, x, accept, index)
            threshold = prefix_percentile(ops, history, count, self._q, inf, index)
            new_state = AutoClipWindowState(history, count)
        if acc == f32:
            # On a finite step the norm is x; on another settle() leaves the gradients alone.
            bound = threshold
        else:
            # Clip where the fp32 norm, the value the history holds, exceeds the fp32 threshold.
            # Comparing the fp64 norm itself would clip fp64 gradients by an ulp whenever the
            # threshold is their own norm rounded down (the first step, percentile 100).
            compared = ops.where(finite, measured, zero)
            bound = ops.where(compared > threshold, ops.cast(threshold, acc), ops.scalar(math.inf, acc))
        coef, skip = settle(ops, ops.clip_coefficient(norm, bound, _EPS), finite, self.nonfinite)
        info = make_info(ops, norm, ops.cast(threshold, acc), coef, coef < 1, found.given_finite, skip)
        return Decision(coef, new_state, info)

    def validate_state(self, where, state):
        check_field(where, state, "count", "int", low=0)
        if self.history is None:
            check_field(where, state, "bins", "int", (SKETCH_SIZE,), low=0)
            check_field(where, state, "low", "float", low=0.0)
            check_field(where, state, "high", "float", low=0.0)
            check_field(where, state, "anchor", "float", low=0.0)
            if sum(state["bins"]) != state["count"]:
                raise StateError(
                    f"{where}: the sketch's bins hold {sum(state['bins'])} norms but count is "
                    f"{state['count']}; the state is inconsistent"
                )
            if (state["anchor"] > 0) != (state["count"] > state["bins"][0]):
                raise StateError(
                    f"{where}: anchor={state['anchor']!r} must be positive exactly when a positive "
                    "norm has been counted; the state is inconsistent"
                )
            if state["low"] > state["high"]:
                raise StateError(f"{where}: state low={state['low']!r} exceeds high={state['high']!r}")
            if state["count"] == 0 and (state["low"] != 0 or state["high"] != 0):
                raise StateError(
                    f"{where}: low={state['low']!r} and high={state['high']!r} must be 0 before the "
                    "first norm (count is 0); the state is inconsistent"
                )
        else:
            check_field(where, state, "history", "float", (self.history,), low=0.0)
