"""Element-wise clipping by value, symmetric or asymmetric (seeds 000, 002, 003).

``g ← clip(g, min_value, max_value)``: ``tf.clip_by_value``, ``torch.nn.utils.clip_grad_value_``,
``np.clip``. Seed 000 uses an asymmetric range ``(0.5, 1.5)``; seed 003 clamps gradients to
``±C``. Value clipping changes the update's direction; prefer :class:`~gradclip.GlobalNorm`
when that matters.
"""

from __future__ import annotations

import math
from typing import Any

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.ops import Ops, accumulation
from gradclip._core.registry import register
from gradclip._core.validation import check_number, check_range_pair

__all__ = ["Value", "ElementwiseBound", "elementwise_info"]


def elementwise_info(ops: Ops, before_norm: Any, after: list[Any], threshold: Any, clipped: Any):
    """The :class:`ClipInfo` of an element-wise method, with coef = ``‖after‖ / ‖before‖``.

    Element-wise methods do not scale uniformly, so the coefficient reported is the effective
    scale of the global L2 norm (1 when nothing changed, by construction of ``clipped``).
    """
    one = ops.scalar(1.0, accumulation(before_norm))
    after_norm = ops.global_norm(after, 2.0)
    safe_before = ops.where(before_norm > 0, before_norm, one)
    coef = ops.where(clipped, after_norm / safe_before, one)
    # A ratio of norms is >= 0 or NaN, as a norm is: finite_norm tells NaN and inf apart in one
    # comparison.
    coef = ops.where(ops.finite_norm(coef), coef, one)
    return make_info(ops, before_norm, threshold, coef, clipped, ops.finite_norm(before_norm))


class ElementwiseBound(Clipper):
    """Shared steps of the methods that bound elements by value (:class:`Value`,
    :class:`~gradclip.ZeroOutliers`): measure the global norm and the extrema, decide whether any
    element lies outside ``[low, high]``, apply the subclass's rule (:meth:`_rewrite`)."""

    coefficient = Coefficient.ELEMENTWISE

    def _bounds(self) -> tuple[float, float]:
        raise NotImplementedError

    def _rewrite(self, ops: Ops, grads: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _symmetric(self) -> bool:
        low, high = self._bounds()
        return low == -high

    def measure(self, ops, grads, names, params):
        norm = ops.global_norm(grads, 2.0)
        finite = ops.finite_norm(norm)
        if self._symmetric():
            # Elements leave [-b, b] exactly where |g| > b: the largest |g| of each tensor (a norm
            # of order inf) is one multi-tensor kernel, where the extrema take a reduction per
            # tensor (on a GPU a launch each). In fp32, as the extrema are (rounding is monotonic
            # and symmetric, so the comparisons below are the same).
            extra = ops.cast(ops.norms(grads, math.inf), "float32")
        else:
            extra = ops.extrema(grads)
        return Measured(grads, None, norm, finite, finite, 2.0, names, params, extra=extra)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        low, high = self._bounds()
        grads = measured.grads
        if not len(grads):
            clipped = ops.scalar(False, "bool")
        elif self._symmetric():
            clipped = ops.any(measured.extra > high)
        else:
            highs, lows = measured.extra
            clipped = ops.any((highs > high) | (lows < low))
        largest = max(abs(low), abs(high))
        threshold = ops.scalar(largest if math.isfinite(low) or math.isfinite(high) else math.inf, "float32")
        one = ops.scalar(1.0, accumulation(measured.norm))
        return Decision(clipped, state, make_info(ops, measured.norm, threshold, one, clipped, measured.finite))

    def apply(self, ops, grads, decision):
        info = decision.info
        grads = self._rewrite(ops, grads)
        return grads, elementwise_info(ops, info.norm, grads, info.threshold, info.clipped)


@register("value")
class Value(ElementwiseBound):
    """Clamp every gradient element into ``[min_value, max_value]``.

    Either give both bounds (asymmetric ranges allowed, as seed 000's ``(0.5, 1.5)``), or one
    ``clip_value`` for the symmetric range ``[-clip_value, clip_value]``. A bound may be infinite
    for a one-sided clamp. NaN elements stay NaN (as in every framework's clamp).

    Args:
        min_value: Lower bound.
        max_value: Upper bound, ``>= min_value``.
        clip_value: Symmetric bound ``>= 0``; exclusive with ``min_value``/``max_value``.

    Raises:
        InvalidArgumentError: NaN bounds, ``min_value > max_value``, negative ``clip_value``,
            both forms given, or neither.
    """

    defaults = {"clip_value": 1.0}
    settings = ("min_value", "max_value")  # clip_value is another spelling of the same range

    @classmethod
    def with_defaults(cls, given):
        # The default range is [-1, 1] unless the caller chose a bound of either form.
        if {"min_value", "max_value", "clip_value"} & set(given):
            return dict(given)
        return {**cls.defaults, **given}

    def __init__(self, min_value: float | None = None, max_value: float | None = None, *, clip_value: float | None = None):
        super().__init__()
        if clip_value is not None:
            if min_value is not None or max_value is not None:
                raise InvalidArgumentError(
                    "Value: give either clip_value or min_value/max_value, not both "
                    f"(got clip_value={clip_value!r}, min_value={min_value!r}, max_value={max_value!r})"
                )
            bound = check_number("Value", "clip_value", clip_value)
            self.min_value, self.max_value = -bound, bound
        else:
            if min_value is None or max_value is None:
                raise InvalidArgumentError(
                    "Value: give clip_value, or both min_value and max_value "
                    f"(got min_value={min_value!r}, max_value={max_value!r})"
                )
            self.min_value, self.max_value = check_range_pair("Value", min_value, max_value)

    def _bounds(self):
        return self.min_value, self.max_value

    def _rewrite(self, ops, grads):
        return ops.clamp(grads, self.min_value, self.max_value)
