"""Zeroing gradient outliers (seed 004, "剪切为零").

Elements whose magnitude exceeds a threshold are set to zero rather than clamped: an element that
large is treated as noise, not as a too-long step in the right direction.
"""

from __future__ import annotations

from gradclip._core.registry import register
from gradclip._core.validation import check_number
from gradclip.clippers.value import ElementwiseBound

__all__ = ["ZeroOutliers"]


@register("zero_outliers")
class ZeroOutliers(ElementwiseBound):
    """Set every gradient element with ``|g| > threshold`` to 0.

    Seed 004: ``∇L ← 0`` where ``|∇L| > ε``. Elements equal to the threshold are kept. NaN
    elements are kept (``|NaN| > ε`` is false); ``±inf`` elements are zeroed.

    Args:
        threshold: ε, ``>= 0``.

    Raises:
        InvalidArgumentError: Negative or NaN threshold.
    """

    defaults = {"threshold": 1.0}

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = check_number("ZeroOutliers", "threshold", threshold)

    def _bounds(self):
        return -self.threshold, self.threshold

    def _rewrite(self, ops, grads):
        return ops.zero_above(grads, self.threshold)
