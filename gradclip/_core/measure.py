"""The non-finite policy and the norm measurement every norm-based clipper starts from.

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
from typing import Any

from gradclip._core.contract import Measured
from gradclip._core.errors import NonFiniteError
from gradclip._core.ops import Ops, accumulation, largest_finite
from gradclip._core.validation import check_choice

__all__ = ["POLICIES", "POLICY_HINT", "check_policy", "gradients_finite", "measurement", "raise_if_nonfinite", "settle"]

POLICIES = ("propagate", "raise", "zero", "skip")


def check_policy(where: str, policy: object) -> str:
    """Validate a ``nonfinite=`` argument.

    Raises:
        UnknownNameError: Not one of :data:`POLICIES`.
    """
    return check_choice(where, "nonfinite", policy, POLICIES)


#: What the ``"raise"`` policy's message suggests instead of raising.
POLICY_HINT = "Use nonfinite='skip' or 'zero' to handle them instead of raising."


def raise_if_nonfinite(
    ops: Ops,
    grads: list[Any],
    norm: Any,
    names: list[str],
    where: str,
    norm_type: float = 2.0,
    hint: str = POLICY_HINT,
) -> None:
    """Raise :class:`NonFiniteError` when ``norm`` (the reduced global norm) is not finite.

    Reads the norm's flag on the host (the ``"raise"`` policy synchronises; no other does), and
    only on a bad step the per-tensor flags. Every rank of a process group sees the same reduced
    norm, so every rank raises; one whose own gradients are all finite says the non-finite values
    are on another rank rather than blaming an overflow. ``hint`` ends the message (the torch
    drop-ins put torch's own wording there, which code written against torch matches on).
    """
    if ops.to_host(ops.finite_norm(norm)):
        return
    finite_each = ops.to_list(ops.finite_each(grads))
    offenders = [name for name, finite in zip(names, finite_each) if not finite]
    if offenders:
        shown = ", ".join(offenders[:10]) + (f" and {len(offenders) - 10} more" if len(offenders) > 10 else "")
        raise NonFiniteError(
            f"{where}: non-finite gradient values (NaN or inf) in {shown}; nothing was clipped. {hint}",
            offenders,
        )
    if ops.distributed:
        # The norm was reduced over the process group (or a DTensor mesh): with every local
        # element finite, the NaN/inf came from another rank, or the reduced sum overflowed.
        raise NonFiniteError(
            f"{where}: the global gradient norm reduced over the process group is not finite, but "
            "every gradient element on this rank is finite: the non-finite values (NaN or inf) are "
            "on another rank (or the global norm overflowed the fp32 accumulator). Nothing was "
            f"clipped. {hint}",
            [],
        )
    raise NonFiniteError(
        f"{where}: the gradient norm overflowed the accumulator although every element is finite; "
        f"the gradients are beyond ~{_overflow_magnitude(norm, norm_type)} in magnitude. Nothing was clipped. "
        f"{hint}",
        [],
    )


def _overflow_magnitude(norm: Any, norm_type: float) -> str:
    """The element magnitude past which a p-norm overflows its accumulator, as ``"1eN"``
    (``1e19`` for fp32 and p = 2, ``1e154`` for fp64)."""
    exponent = math.log10(largest_finite(accumulation(norm)))
    if math.isfinite(norm_type) and norm_type > 1:
        exponent /= norm_type
    return f"1e{math.floor(exponent)}"


def gradients_finite(ops: Ops, grads: list[Any], norm_type: float = 2.0) -> Any:
    """Device bool: every element of ``grads`` is finite and their global norm does not overflow.

    One read pass. It goes through the same norm and reduction as the measurement itself, so
    the flag agrees on every rank of a process group and counts an overflow as every policy
    does; used under ``"zero"``, before zeroing, for ``info.finite``.
    """
    return ops.finite_norm(ops.global_norm(grads, norm_type))


def measurement(
    ops: Ops,
    grads: list[Any],
    norm_type: float,
    policy: str,
    names: list[str],
    where: str,
    params: list[Any] | None = None,
    hint: str = POLICY_HINT,
) -> Measured:
    """Apply the pre-measurement part of the policy and measure the gradients.

    Args:
        ops: The backend.
        grads: Gradients (no None).
        norm_type: Order of the norms.
        policy: One of :data:`POLICIES`.
        names: One name per gradient, for ``"raise"`` messages.
        where: The public entry point, for messages.
        params: The parameters, carried along for ``decide`` (AGC-like methods).
        hint: How ``"raise"``'s message ends (see :func:`raise_if_nonfinite`).

    Returns:
        A :class:`~gradclip._core.contract.Measured`. Under ``"zero"`` its gradients have their non-finite elements
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
        raise_if_nonfinite(ops, grads, norm, names, where, norm_type, hint)
    finite = ops.finite_norm(norm)
    return Measured(
        grads, norms, norm, finite, finite if given_finite is None else given_finite, norm_type, names, params
    )


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
    if policy != "skip":
        return coef, ops.scalar(False, "bool")
    # A 0-d flag is its own any().
    return coef, ~finite if getattr(finite, "ndim", None) == 0 else ops.any(~finite)
