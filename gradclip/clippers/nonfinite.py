"""The non-finite policy: what a clipper does when a gradient holds NaN or inf.

DESIGN.md rule 3: non-finite values are a policy, not an accident. Every norm-based clipper takes
``nonfinite=`` with one of:

``"propagate"`` (default)
    Gradients with non-finite values pass through unclipped, as they are; ``info.finite`` is
    False. Unlike ``torch.nn.utils.clip_grad_norm_``, finite elements are never turned into NaN
    (torch scales everything by ``max_norm / inf = 0``, and ``inf * 0`` is NaN).
``"raise"``
    Raise :class:`~gradclip.NonFiniteError` naming the offending tensors, before anything is
    modified. This reads one value on the host, so it synchronises.
``"zero"``
    Replace each non-finite element with 0 (optax's ``zero_nans``, extended to ±inf), then
    measure and clip what is left. Costs one extra read-write pass.
``"skip"``
    Leave the gradients untouched and set ``info.skip``: the optimizer step should not happen.
    :class:`gradclip.torch.ClippedOptimizer` honours it.

A norm that overflows the accumulator (fp32 beyond ~3.4e38) counts as non-finite under every
policy except ``"raise"``, which reports the overflow as such.
"""

from __future__ import annotations

from typing import Any

from gradclip._core.errors import NonFiniteError
from gradclip._core.ops import Ops
from gradclip._core.validation import check_choice

__all__ = ["POLICIES", "check_policy", "measure", "settle"]

POLICIES = ("propagate", "raise", "zero", "skip")


def check_policy(where: str, policy: object) -> str:
    """Validate a ``nonfinite=`` argument.

    Raises:
        UnknownNameError: Not one of :data:`POLICIES`.
    """
    return check_choice(where, "nonfinite", policy, POLICIES)


def _raise_if_nonfinite(ops: Ops, grads: list[Any], norm: Any, names: list[str], where: str) -> None:
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
    raise NonFiniteError(
        f"{where}: the gradient norm overflowed the accumulator although every element is finite; "
        "the gradients are beyond ~1e19 in magnitude. Nothing was clipped.",
        [],
    )


def measure(
    ops: Ops,
    grads: list[Any],
    norm_type: float,
    policy: str,
    names: list[str],
    where: str,
) -> tuple[list[Any], Any, Any, Any]:
    """Apply the pre-measurement part of the policy and measure the gradients.

    Args:
        ops: The backend.
        grads: Gradients (no None).
        norm_type: Order of the norms.
        policy: One of :data:`POLICIES`.
        names: One name per gradient, for ``"raise"`` messages.
        where: The public entry point, for messages.

    Returns:
        ``(grads, per_tensor_norms, global_norm, finite)``; under ``"zero"`` the returned
        gradients have their non-finite elements replaced by zero and the norms describe them.

    Raises:
        NonFiniteError: Under ``"raise"``, when a value is not finite.
    """
    if policy == "zero":
        grads = ops.zero_nonfinite(grads)
    norms = ops.norms(grads, norm_type)
    norm = ops.combine_norms(norms, norm_type)
    if policy == "raise":
        _raise_if_nonfinite(ops, grads, norm, names, where)
    return grads, norms, norm, ops.isfinite(norm)


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
    one = ops.scalar(1.0, _dtype_name(coef))
    coef = ops.where(finite, coef, one)
    skip_value = ops.any(ops.where(finite, ops.scalar(False, "bool"), ops.scalar(True, "bool")))
    skip = skip_value if policy == "skip" else ops.scalar(False, "bool")
    return coef, skip


def _dtype_name(x: Any) -> str:
    return "float64" if "float64" in str(getattr(x, "dtype", "")) else "float32"
