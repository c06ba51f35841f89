"""Quantile-tracking norm bound, updated geometrically (Andrew et al. 2021).

Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
Clipping" (NeurIPS 2021); the same update is Opacus' ``AdaClipDPOptimizer`` and TF-Privacy's
``QuantileEstimatorQuery`` with ``geometric_update=True``. Each step clips by global norm at the
current bound ``C``, then moves ``C`` toward the ``target_quantile`` of the norms::

    b = fraction of norms <= C          # the step's norm (0 or 1), or per-sample norms
    C ← clamp(C · exp(-learning_rate · (b - target_quantile)), min_norm, max_norm)

In expectation ``C`` settles where a ``target_quantile`` fraction of norms is unclipped. Without
differential privacy no noise is added to ``b``: this is the estimator, not the private query.

What counts as an observation depends on what ``b`` counts:

* **The step's own norm** (``clip_``/``clip``/``update`` without ``sample_norms``): a zero norm
  (no gradient at all, all-zero gradients: a frozen model, a detached loss, ``clip_`` before
  ``backward()``) or a non-finite one leaves ``C`` unchanged, as ZClip, AutoClip and
  SkipOnSpike ignore such steps. A zero norm has nothing to clip and says nothing about the
  scale of the norms; counted, each one would shrink ``C`` by ``exp(-η(1 - q))``, so a run of
  them (100 at the defaults: from 1.0 to 4.5e-5) would clip the next real gradient to almost
  nothing.
* **Per-sample norms** (``sample_norms=``, DP-SGD: :class:`gradclip.torch.PerSample`,
  :mod:`gradclip.jax_per_example`): the paper's query, unchanged. Each finite entry is one
  example's norm, and an example whose gradient is zero is a legitimate observation: it is
  unclipped (``‖g‖ = 0 <= C``), and the private query is the (noised) count over every example
  of the batch, each adding 0 or 1; leaving some out would be another query than the one whose
  privacy is accounted. Only a step with no finite entry, or a non-finite step, leaves ``C``
  unchanged.

Differences from the references (named expectations in ``tests/test_adaptive_parity.py``):
Opacus counts a sample as unclipped when ``C / (‖g‖ + 1e-6) >= 1``, so a norm within 1e-6 of
``C`` counts as clipped there and unclipped here (TF-Privacy and the paper use ``‖g‖ <= C``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Decision, Measured
from gradclip._core.measure import check_policy, settle
from gradclip._core.ops import accumulation
from gradclip._core.registry import register
from gradclip._core.validation import check_number
from gradclip.clippers._adaptive import as_f32, check_field

__all__ = ["QuantileNorm", "QuantileNormState"]

_EPS = 1e-6


class QuantileNormState(NamedTuple):
    """The current bound."""

    norm: Any  # fp32 0-d: C, used by the next step


@register("quantile_norm")
class QuantileNorm(Clipper):
    """Clip by global norm at a bound that tracks a quantile of the norms geometrically.

    Args:
        target_quantile: The fraction of norms to leave unclipped, in ``[0, 1]``.
        learning_rate: η of the geometric update, ``>= 0`` (the paper: 0.2).
        initial_norm: C before the first step, in ``[min_norm, max_norm]``.
        min_norm: Lower bound of C, ``> 0`` (a bound of 0 could never grow again).
        max_norm: Upper bound of C, ``> min_norm`` and finite.
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`); a non-finite step
            leaves C unchanged, and so does a step whose norm is 0 (see the module
            documentation).

    Per-sample norms (DP-SGD style) are passed per call: ``clip(grads, sample_norms=v)``,
    ``clip_(model, sample_norms=v)`` or ``update(grads, state, sample_norms=v)`` with ``v`` a 1-D
    array of the gradients' framework; then ``b`` is the fraction of its finite entries ``<= C``
    (zero entries included: a zero per-example norm counts, unlike a zero norm of the step).
    ``info.threshold`` is the C used this step (before the update).

    Raises:
        InvalidArgumentError: An argument out of range (named in the message), unknown policy,
            or at call time a ``sample_norms`` that is not a non-empty 1-D array of the
            gradients' framework.
    """

    defaults: dict[str, Any] = {}
    state_type = QuantileNormState
    state_dtypes = {"norm": "float32"}

    def __init__(
        self,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        initial_norm: float = 1.0,
        min_norm: float = 1e-12,
        max_norm: float = 1e12,
        nonfinite: str = "propagate",
    ):
        super().__init__()
        where = "QuantileNorm"
        self.target_quantile = check_number(where, "target_quantile", target_quantile, low=0.0, high=1.0)
        self.learning_rate = check_number(where, "learning_rate", learning_rate, high_inclusive=False)
        self.min_norm = check_number(where, "min_norm", min_norm, low=0.0, low_inclusive=False, high_inclusive=False)
        self.max_norm = check_number(where, "max_norm", max_norm, low=self.min_norm, low_inclusive=False, high_inclusive=False)
        self.initial_norm = check_number(where, "initial_norm", initial_norm, low=self.min_norm, high=self.max_norm)
        self.nonfinite = check_policy(where, nonfinite)
        self._exponents = _exponents(self.target_quantile, self.learning_rate)

    def init_state(self, ops, grads):
        return QuantileNormState(ops.scalar(self.initial_norm, "float32"))

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        samples = signals.sample_norms
        found = measured
        norm, finite = found.norm, found.finite
        bound = state.norm
        acc = accumulation(norm)
        threshold = ops.cast(bound, acc)
        coef, skip = settle(ops, ops.clip_coefficient(norm, threshold, _EPS), finite, self.nonfinite)

        if samples is None:
            # b is the step's own norm, 0 or 1, compared in the norm's dtype as the clip decision
            # above is (an fp64 norm just above C is clipped and counted as clipped); so the
            # exponent is one of two constants (see _exponents): one select where the per-sample
            # form takes a cast, a subtraction and a product. A zero norm is no observation.
            exponent = ops.where(
                norm <= threshold, ops.scalar(self._exponents[0], "float32"), ops.scalar(self._exponents[1], "float32")
            )
            informative = finite & (norm > 0)
        else:
            values = as_f32(ops, samples)
            valid = ops.isfinite(values)
            count = ops.sum(valid)
            below = ops.sum(valid & (values <= bound))
            safe_count = ops.maximum(count, ops.scalar(1, "int64"))  # no 0 / 0 (then uninformative)
            unclipped = ops.cast(below, "float32") / ops.cast(safe_count, "float32")
            informative = finite & (count > 0)
            exponent = (unclipped - self.target_quantile) * -self.learning_rate
        moved = bound * ops.exp(exponent)
        # Never NaN (C is positive and finite, exp never NaN), so minimum/maximum clamp as
        # comparisons would.
        moved = ops.clamp_values(moved, ops.scalar(self.min_norm, "float32"), ops.scalar(self.max_norm, "float32"))
        new_bound = ops.where(informative, moved, bound)
        info = make_info(ops, norm, threshold, coef, coef < 1, found.given_finite, skip)
        return Decision(coef, QuantileNormState(new_bound), info)

    def validate_state(self, where, state):
        check_field(where, state, "norm", "float", low=self.min_norm * (1 - 1e-6), high=self.max_norm * (1 + 1e-6))


def _exponents(target_quantile: float, learning_rate: float) -> tuple[float, float]:
    """``(b - target_quantile) * -learning_rate`` for ``b = 1`` and ``b = 0``, rounded as the fp32
    device arithmetic of the per-sample form rounds it (each Python number cast to fp32, then
    fp32 subtraction and product; NumPy's fp32 scalars do exactly that): the same bits, so a step
    decided by its own norm moves ``C`` exactly as it did when it computed this on the device.
    (Where the device form gave 0, on a backend flushing subnormals, this keeps the subnormal,
    and TensorFlow may drop the sign of a zero: ``exp`` of either is 1 exactly.)"""
    with np.errstate(over="ignore", invalid="ignore"):
        quantile, rate = np.float32(target_quantile), np.float32(-learning_rate)
        return float((np.float32(1.0) - quantile) * rate), float((np.float32(0.0) - quantile) * rate)
