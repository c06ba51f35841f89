"""Clipping off, as a clipper like any other: ``gradclip.get("none")``.

A baseline in a comparison, a switch in a config file, a training loop that always holds a
clipper: :class:`NoClip` measures the global norm and reports it (``info.norm``, so a
:class:`~gradclip.Monitor` still logs it) and never changes the gradients. Its coefficient kind is
``Coefficient.NONE``: ``apply`` returns the gradients untouched, and in a folded
:class:`~gradclip.torch.ClippedOptimizer` step no gradient scale is set at all.
"""

from __future__ import annotations

import math
from typing import Any

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured, Signals
from gradclip._core.ops import Ops, accumulation
from gradclip._core.registry import register
from gradclip._core.validation import check_norm_type

__all__ = ["NoClip"]


@register("none")
class NoClip(Clipper):
    """Measure and report the global gradient norm; change nothing.

    ``info.norm`` is the global ``norm_type``-norm (fp32 accumulation, reduced across processes
    like every norm), ``info.threshold`` is ``inf`` (no bound), ``info.coef`` is 1, and
    ``info.clipped`` and ``info.skip`` are always False; ``info.finite`` says whether the
    gradients were finite. Non-finite gradients pass through as they are.

    Args:
        norm_type: The p of the norm reported: any p > 0, or ``inf``.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: ``norm_type <= 0`` or NaN.
    """

    coefficient = Coefficient.NONE

    def __init__(self, norm_type: float = 2.0, *, process_group: Any = None):
        super().__init__()
        self.process_group = process_group
        self.norm_type = check_norm_type("NoClip", norm_type)

    def decide(self, ops: Ops, measured: Measured, state: Any, signals: Signals = NO_SIGNALS) -> Decision:
        dtype = accumulation(measured.norm)
        one = ops.scalar(1.0, dtype)
        never = ops.scalar(False, "bool")
        info = make_info(ops, measured.norm, ops.scalar(math.inf, dtype), one, never, measured.given_finite, never)
        return Decision(one, state, info)
