"""The non-finite policy: what a clipper does when a gradient holds NaN or inf.

DESIGN.md rule 3: non-finite values are a policy, not an accident. Every norm-based clipper takes
``nonfinite=`` with one of:

``"propagate"`` (default)
    Gradients with non-finite values pass through unclipped, as they are. Unlike
    ``torch.nn.utils.clip_grad_norm_``, finite elements are never turned into NaN (torch scales
    everything by ``max_norm / inf = 0``, and ``inf * 0`` is NaN).
``"raise"``
    Raise :class:`~gradclip.NonFiniteError` naming the offending tensors, before anything is
    modified. This reads one value on the host, so it synchronises. Under ``torch.distributed``
    with a process group, a rank whose own gradients are finite says that the non-finite values
    are on another rank (every rank raises, so none waits in a collective).
``"zero"``
    Replace each non-finite element with 0 (optax's ``zero_nans``, extended to ±inf), then
    measure and clip what is left. Costs one extra read-write pass for the zeroing and one read
    pass that measures the gradients as given (for ``info.finite``, below).
``"skip"``
    Leave the gradients untouched and set ``info.skip``: the optimizer step should not happen.
    :class:`gradclip.torch.ClippedOptimizer` honours it.

``info.finite`` describes the gradients as given, under every policy: it is False when any
element was NaN or ±inf, also under ``"zero"`` after those elements were zeroed (so a
:class:`~gradclip.Monitor` counts every non-finite step), while the clipping itself and the
adaptive statistics use the norm measured after zeroing.

A norm that overflows the accumulator (fp32 beyond ~3.4e38) counts as non-finite under every
policy except ``"raise"``, which reports the overflow as such; the gradients are then left
unclipped (``"zero"`` still zeroes the non-finite elements).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.errors import InvalidArgumentError, NonFiniteError, StateError
from gradclip._core.ops import Ops, accumulation
from gradclip._core.registry import register
from gradclip._core.validation import check_choice, check_int
from gradclip.clippers._adaptive import check_field

__all__ = ["POLICIES", "check_policy", "gradients_finite", "Measurement", "measurement", "settle", "NonFinite", "NonFiniteState"]

POLICIES = ("propagate", "raise", "zero", "skip")


def check_policy(where: str, policy: object) -> str:
    """Validate a ``nonfinite=`` argument.

    Raises:
        UnknownNameError: Not one of :data:`POLICIES`.
    """
    return check_choice(where, "nonfinite", policy, POLICIES)


def _raise_if_nonfinite(ops: Ops, grads: list[Any], norm: Any, names: list[str], where: str) -> None:
    """Raise :class:`NonFiniteError` when ``norm`` (the reduced global norm) is not finite.

    Reads the norm's flag on the host (the ``"raise"`` policy synchronises; no other does), and
    only on a bad step the per-tensor flags. Every rank of a process group sees the same reduced
    norm, so every rank raises; one whose own gradients are all finite says the non-finite values
    are on another rank rather than blaming an overflow.
    """
    if ops.to_host(ops.isfinite(norm)):
        return
    finite_each = ops.to_list(ops.finite_each(grads))
    offenders = [name for name, finite in zip(names, finite_each) if not finite]
    if offenders:
        shown = ", ".join(offenders[:10]) + (f" and {len(offenders) - 10} more" if len(offenders) > 10 else "")
        raise NonFiniteError(
            f"{where}: non-finite gradient values (NaN or inf) in {shown}; nothing was clipped. "
            "Use nonfinite='skip' or 'zero' to handle them instead of raising.",
            offenders,
        )
    if getattr(ops, "distributed", False):
        # The norm was reduced over the process group (or a DTensor mesh): with every local
        # element finite, the NaN/inf came from another rank, or the reduced sum overflowed.
        raise NonFiniteError(
            f"{where}: the global gradient norm reduced over the process group is not finite, but "
            "every gradient element on this rank is finite: the non-finite values (NaN or inf) are "
            "on another rank (or the global norm overflowed the fp32 accumulator). Nothing was "
            "clipped. Use nonfinite='skip' or 'zero' to handle them instead of raising.",
            [],
        )
    raise NonFiniteError(
        f"{where}: the gradient norm overflowed the accumulator although every element is finite; "
        "the gradients are beyond ~1e19 in magnitude. Nothing was clipped.",
        [],
    )


def gradients_finite(ops: Ops, grads: list[Any], norm_type: float = 2.0) -> Any:
    """Device bool: every element of ``grads`` is finite and their global norm does not overflow.

    One read pass. It goes through the same norm and reduction as the measurement itself, so
    the flag agrees on every rank of a process group and counts an overflow as every policy
    does; used under ``"zero"``, before zeroing, for ``info.finite``.
    """
    return ops.isfinite(ops.global_norm(grads, norm_type))


class Measurement(NamedTuple):
    """What :func:`measurement` found (device values; nothing is read back)."""

    grads: list[Any]  # the gradients to clip: under "zero", with non-finite elements zeroed
    norms: Any  # per-tensor norms of ``grads``
    norm: Any  # their global norm (reduced over a process group when there is one)
    finite: Any  # ``norm`` is finite: what the algorithm clips and learns from
    given_finite: Any  # every element as given was finite (and its norm did not overflow): info.finite


def measurement(
    ops: Ops,
    grads: list[Any],
    norm_type: float,
    policy: str,
    names: list[str],
    where: str,
) -> Measurement:
    """Apply the pre-measurement part of the policy and measure the gradients.

    Args:
        ops: The backend.
        grads: Gradients (no None).
        norm_type: Order of the norms.
        policy: One of :data:`POLICIES`.
        names: One name per gradient, for ``"raise"`` messages.
        where: The public entry point, for messages.

    Returns:
        A :class:`Measurement`. Under ``"zero"`` its gradients have their non-finite elements
        replaced by zero, its norms describe them, and ``given_finite`` comes from one more
        read pass over the gradients as given; under the other policies ``given_finite`` is
        ``finite``.

    Raises:
        NonFiniteError: Under ``"raise"``, when a value is not finite.
    """
    given_finite = None
    if policy == "zero":
        given_finite = gradients_finite(ops, grads, norm_type)
        grads = ops.zero_nonfinite(grads)
    norms = ops.norms(grads, norm_type)
    norm = ops.combine_norms(norms, norm_type)
    if policy == "raise":
        _raise_if_nonfinite(ops, grads, norm, names, where)
    finite = ops.isfinite(norm)
    return Measurement(grads, norms, norm, finite, finite if given_finite is None else given_finite)


def settle(ops: Ops, coef: Any, finite: Any, policy: str) -> tuple[Any, Any]:
    """Apply the post-measurement part of the policy to a clip coefficient.

    Non-finite steps under ``"propagate"`` and ``"skip"`` get ``coef = 1`` (gradients untouched);
    ``"skip"`` also raises the skip flag.

    Args:
        ops: The backend.
        coef: The coefficient computed from the norm (scalar or per-tensor vector).
        finite: Device bool scalar (or vector matching ``coef``).
        policy: One of :data:`POLICIES`.

    Returns:
        ``(coef, skip)``.
    """
    one = ops.scalar(1.0, accumulation(coef))
    coef = ops.where(finite, coef, one)
    # Only what the policy needs: every scalar operation is a kernel launch on a GPU.
    skip = ops.any(~finite) if policy == "skip" else ops.scalar(False, "bool")
    return coef, skip


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

    def config(self):
        return {"policy": self.policy, "max_consecutive": self.max_consecutive}

    def _init(self, ops, grads):
        zero = ops.scalar(0, "int64")
        return NonFiniteState(zero, zero)

    def _update(self, ops, grads, state, params, names):
        where = "NonFinite"
        norm = ops.global_norm(grads, 2.0)
        if self.policy == "raise":
            _raise_if_nonfinite(ops, grads, norm, names, where)
        finite = ops.isfinite(norm)
        bad = ops.cast(~finite, "int64")
        consecutive = ops.where(finite, state.consecutive * 0, state.consecutive + 1)
        total = state.total + bad
        acc = accumulation(norm)
        one = ops.scalar(1.0, acc)
        no = ops.scalar(False, "bool")
        skip, clipped = no, no
        if self.policy == "zero":
            grads = ops.zero_nonfinite(grads)
            clipped = ~finite
        elif self.policy == "skip":
            skip = ~finite
            if self.max_consecutive is not None:
                skip = skip & (consecutive <= self.max_consecutive)
        threshold = ops.scalar(math.inf, acc)
        info = make_info(ops, norm, threshold, one, clipped, finite, skip)
        return grads, NonFiniteState(consecutive, total), info

    def _validate_state(self, where, state):
        check_field(where, state, "consecutive", "int", low=0)
        check_field(where, state, "total", "int", low=0)
        if state["consecutive"] > state["total"]:
            raise StateError(
                f"{where}: consecutive={state['consecutive']!r} cannot exceed total={state['total']!r}"
            )
