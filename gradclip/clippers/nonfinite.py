"""The non-finite policy as a clipper of its own: :class:`NonFinite`.

The policy itself (``nonfinite=`` of every norm-based clipper: ``"propagate"``, ``"raise"``,
``"zero"``, ``"skip"``) and the measurement it shapes live in :mod:`gradclip._core.measure`,
re-exported here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.measure import (
    POLICIES,
    check_policy,
    gradients_finite,
    measurement,
    raise_if_nonfinite,
    settle,
)
from gradclip._core.ops import accumulation
from gradclip._core.registry import register
from gradclip._core.validation import check_choice, check_int
from gradclip.clippers._adaptive import check_field

__all__ = ["POLICIES", "check_policy", "gradients_finite", "measurement", "settle", "NonFinite", "NonFiniteState"]

# -- the policy as a clipper of its own -------------------------------------------------------
class NonFiniteState(NamedTuple):
    """Counters of non-finite steps (optax ``apply_if_finite``'s ``notfinite_count`` and
    ``total_notfinite``)."""

    consecutive: Any  # int64 0-d: non-finite steps in a row, up to and including the last
    total: Any  # int64 0-d: non-finite steps ever

@register("non_finite")
class NonFinite(Clipper):
    """Handle NaN/inf gradients explicitly, with counters, and nothing else.

    The standalone form of the non-finite policy (optax ``apply_if_finite`` for ``"skip"``,
    ``zero_nans`` for ``"zero"``), for chains such as ``chain(NonFinite("zero"), AutoClip())``
    or to count bad steps. A step is non-finite when any element is NaN or ±inf, or when the
    global norm overflows fp32.

    Args:
        policy: ``"skip"`` (gradients untouched, ``info.skip`` set), ``"zero"`` (non-finite
            elements set to 0), ``"raise"`` (:class:`~gradclip.NonFiniteError` naming the
            tensors; reads one value on the host) or ``"propagate"`` (count only).
        max_consecutive: With ``"skip"`` only: after this many non-finite steps in a row the
            next ones are no longer flagged, so the failure reaches the optimizer instead of
            stalling training silently (optax's ``max_consecutive_errors``: a step is skipped
            while the run of non-finite steps, itself included, is ``<= max_consecutive``).
            ``None`` skips for ever; otherwise an int ``>= 0``.

    ``info.norm`` is the global norm as given (non-finite on a bad step); ``info.threshold`` is
    ``inf`` and ``info.coef`` 1; ``info.clipped`` is True when ``"zero"`` changed something.

    Raises:
        InvalidArgumentError: Unknown policy, or a bad ``max_consecutive`` (not an int ``>= 0``,
            or given with a policy other than ``"skip"``).
        NonFiniteError: Under ``"raise"``, at call time.
    """

    defaults: dict[str, Any] = {}
    state_type = NonFiniteState
    state_dtypes = {"consecutive": "int64", "total": "int64"}

    def __init__(self, policy: str = "skip", max_consecutive: int | None = None):
        super().__init__()
        where = "NonFinite"
        self.policy = check_choice(where, "policy", policy, POLICIES)
        self.max_consecutive = check_int(where, "max_consecutive", max_consecutive, low=0, allow_none=True)
        if self.max_consecutive is not None and self.policy != "skip":
            raise InvalidArgumentError(
                f"{where}: max_consecutive applies to policy='skip' only, got "
                f"max_consecutive={max_consecutive!r} with policy={policy!r}"
            )
        # "zero" rewrites elements; the other policies never change a gradient.
        self.coefficient = Coefficient.ELEMENTWISE if self.policy == "zero" else Coefficient.NONE

    @property
    def may_skip(self) -> bool:
        return self.policy == "skip"

    @property
    def one_coefficient(self) -> bool:
        return self.policy != "zero"

    def cannot_fold_reason(self):
        if self.policy == "zero":
            return f"{self!r} must rewrite gradient elements (policy 'zero')"
        return None

    def init_state(self, ops, grads):
        zero = ops.scalar(0, "int64")
        return NonFiniteState(zero, zero)

    def measure(self, ops, grads, names, params):
        norm = ops.global_norm(grads, 2.0)
        if self.policy == "raise":
            raise_if_nonfinite(ops, grads, norm, names, "NonFinite")
        finite = ops.finite_norm(norm)
        return Measured(grads, None, norm, finite, finite, 2.0, names, params)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        norm, finite = measured.norm, measured.finite
        bad = ~finite
        consecutive = ops.where(finite, ops.scalar(0, "int64"), state.consecutive + 1)
        total = ops.count_up(state.total, bad)
        acc = accumulation(norm)
        one = ops.scalar(1.0, acc)
        no = ops.scalar(False, "bool")
        skip, clipped = no, no
        if self.policy == "zero":
            clipped = bad
        elif self.policy == "skip":
            skip = bad
            if self.max_consecutive is not None:
                skip = skip & (consecutive <= self.max_consecutive)
        threshold = ops.scalar(math.inf, acc)
        info = make_info(ops, norm, threshold, one, clipped, finite, skip)
        return Decision(one, NonFiniteState(consecutive, total), info)

    def apply(self, ops, grads, decision):
        if self.policy == "zero":
            return ops.zero_nonfinite(grads), decision.info
        return grads, decision.info

    def validate_state(self, where, state):
        check_field(where, state, "consecutive", "int", low=0)
        check_field(where, state, "total", "int", low=0)
        if state["consecutive"] > state["total"]:
            raise StateError(
                f"{where}: consecutive={state['consecutive']!r} cannot exceed total={state['total']!r}"
            )
