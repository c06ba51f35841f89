"""Skip the optimizer step when the gradient norm exceeds an absolute bound.

Megatron-LM's ``--grad-norm-skip-threshold`` style of protection, and what llm.c's ``-sg`` does
with a fixed value: a step whose global gradient norm is above ``max_norm`` (or is NaN/inf) is not
taken at all, rather than taken in a clipped direction. The gradients are never modified;
``info.skip`` asks the optimizer wrapper (:class:`gradclip.torch.ClippedOptimizer`,
``gradclip.optax.clip_then``, Keras' ``ClippingOptimizer``) or the caller to skip the step.

Compose it with a clipper for "clip the usual spikes, skip the catastrophic ones"::

    gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.SkipAbove(100.0))

(in a chain each link measures what the previous one left, so put ``SkipAbove`` first to bound
the raw norm).
"""

from __future__ import annotations

from typing import Any

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.ops import accumulation
from gradclip._core.registry import register
from gradclip._core.types import EmptyState
from gradclip._core.validation import check_norm_type
from gradclip.clippers._scheduled import Scheduled, as_threshold

__all__ = ["SkipAbove"]


@register("skip_above")
class SkipAbove(Scheduled, Clipper):
    """Flag the optimizer step for skipping when the global norm exceeds ``max_norm``.

    ``info.skip = not (‖g‖ <= max_norm)``: a norm above the bound, NaN or ±inf skips (the
    comparison is False for NaN). A norm equal to the bound is taken.

    Args:
        max_norm: The largest norm whose step is taken, ``>= 0`` (``inf``: skip only non-finite
            norms), or a schedule of it (:mod:`gradclip.schedules`; the step is then kept in
            the state).
        norm_type: The p of the global p-norm (any p > 0, or ``inf``).
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    ``info.threshold`` is ``max_norm`` (this step's value of a schedule); ``info.coef`` is
    always 1 and ``info.clipped`` False: the gradients are left exactly as they are.

    Raises:
        InvalidArgumentError: A negative or NaN ``max_norm`` (or a schedule reaching one),
            ``norm_type <= 0``.
    """

    #: A generous default for ``gradclip.get("skip_above")``: only blow-ups are skipped.
    defaults = {"max_norm": 100.0}
    coefficient = Coefficient.NONE
    may_skip = True

    def __init__(self, max_norm: float, norm_type: float = 2.0, *, process_group: Any = None):
        super().__init__()
        self.process_group = process_group
        where = "SkipAbove"
        self.max_norm = as_threshold(where, "max_norm", max_norm)
        self.norm_type = check_norm_type(where, norm_type)
        self._use_schedules({"max_norm": 0.0}, EmptyState, {})

    def init_state(self, ops, grads):
        return self._with_clock(ops, EmptyState())

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        norm = measured.norm
        acc = accumulation(norm)
        step = self._step_of(ops, state, signals)
        bound = self._setting(ops, "max_norm", step, acc)
        # `not (norm <= bound)` rather than `norm > bound`: NaN compares False both ways and
        # must skip; +inf is above every finite bound, and above inf only as NaN would be, so
        # a non-finite norm is flagged explicitly too.
        skip = ~(norm <= bound) | ~measured.finite
        one = ops.scalar(1.0, acc)
        info = make_info(ops, norm, bound, one, ops.scalar(False, "bool"), measured.given_finite, skip)
        return Decision(one, self._advance(state, step), info)

    def validate_state(self, where, state):
        self._check_clock(where, state)
