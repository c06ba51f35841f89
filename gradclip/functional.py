"""One-shot functions for the stateless methods (API.md section 2).

Each dispatches on the arrays' framework and returns new arrays (``clip_weights_`` excepted,
which works in place as its name says). They are thin wrappers over the clipper classes, so the
algorithms stay written once; their errors name the function called, not the class underneath
(``"clip_by_norm: max_norm must be in [0, inf], got -1.0"``).
"""

from __future__ import annotations

from typing import Any

from gradclip._core.ops import get_ops
from gradclip._core.tree import flatten
from gradclip._core.validation import check_norm_type, check_range_pair, reported_as
from gradclip.clippers.norm import GlobalNorm, Norm
from gradclip.clippers.outliers import ZeroOutliers
from gradclip.clippers.value import Value

__all__ = [
    "global_norm",
    "clip_by_value",
    "clip_by_norm",
    "clip_by_global_norm",
    "zero_outliers",
    "clip_weights_",
]


def global_norm(grads: Any, norm_type: float = 2.0):
    """The global p-norm of all gradients together, accumulated in fp32.

    Args:
        grads: An array or a list/tuple/dict of arrays (None entries are ignored).
        norm_type: Any p > 0, or ``inf``.

    Returns:
        A 0-d array of the gradients' framework, on their device (fp32; fp64 for fp64 inputs).
        An empty list gives a NumPy 0.

    Raises:
        InvalidArgumentError: ``norm_type <= 0``.
        BackendError: Unknown array types or mixed frameworks.
    """
    norm_type = check_norm_type("global_norm", norm_type)
    leaves, _, _ = flatten(grads)
    # The same array listed twice (tied weights) counts once.
    present = list({id(g): g for g in leaves if g is not None}.values())
    return get_ops(present, where="global_norm").global_norm(present, norm_type)


def clip_by_value(grads: Any, min_value: float, max_value: float):
    """Clamp every element into ``[min_value, max_value]`` (asymmetric ranges allowed).

    Returns:
        New arrays in the structure of ``grads``.

    Raises:
        InvalidArgumentError: NaN bounds or ``min_value > max_value``.
    """
    with reported_as("clip_by_value", "Value"):
        return Value(min_value, max_value).update(grads, None)[0]


def clip_by_norm(grads: Any, max_norm: float, norm_type: float = 2.0):
    """Clip each tensor to its own p-norm ``max_norm`` (``tf.clip_by_norm`` per tensor).

    Returns:
        New arrays in the structure of ``grads``.

    Raises:
        InvalidArgumentError: Negative/NaN ``max_norm`` or ``norm_type <= 0``.
    """
    with reported_as("clip_by_norm", "Norm"):
        return Norm(max_norm, norm_type=norm_type).update(grads, None)[0]


def clip_by_global_norm(grads: Any, max_norm: float, norm_type: float = 2.0):
    """Clip all tensors together to global p-norm ``max_norm``.

    Returns:
        ``(new_grads, norm)``: the clipped arrays in the structure of ``grads`` and the global
        norm before clipping (unlike ``optax.clip_by_global_norm``, which does not return it).

    Raises:
        InvalidArgumentError: Negative/NaN ``max_norm`` or ``norm_type <= 0``.
    """
    with reported_as("clip_by_global_norm", "GlobalNorm"):
        clipped, _, info = GlobalNorm(max_norm, norm_type=norm_type).update(grads, None)
    return clipped, info.norm


def zero_outliers(grads: Any, threshold: float):
    """Set elements with ``|g| > threshold`` to zero (seed 004).

    Returns:
        New arrays in the structure of ``grads``.

    Raises:
        InvalidArgumentError: Negative or NaN threshold.
    """
    with reported_as("zero_outliers", "ZeroOutliers"):
        return ZeroOutliers(threshold).update(grads, None)[0]


def clip_weights_(params: Any, min_value: float, max_value: float) -> None:
    """Clamp parameter values (not gradients) into ``[min_value, max_value]``, in place.

    Seed 003's weight clipping, ``w ← clamp(w, -T, T)``, as used for the critic of a Wasserstein
    GAN (Arjovsky et al. 2017) and in quantisation-aware training.

    Args:
        params: A ``torch.nn.Module``, an iterable of torch parameters or tensors, or NumPy
            arrays; every one is clamped, whether or not it has a gradient.
        min_value: Lower bound.
        max_value: Upper bound, ``>= min_value``.

    Raises:
        InvalidArgumentError: NaN bounds or ``min_value > max_value``.
        BackendError: Something that is not a parameter or array.
        ReadOnlyArrayError: A read-only NumPy array (a ``BackendError`` and a ``ValueError``);
            raised before any array is clamped.
    """
    low, high = check_range_pair("clip_weights_", min_value, max_value)
    if hasattr(params, "parameters") and callable(params.parameters):
        params = list(params.parameters())
    leaves = [params] if hasattr(params, "shape") else list(params)
    # torch parameters are clamped through .data: in-place updates of leaves that require grad
    # must not be recorded by autograd.
    weights = [p.data if type(p).__module__.startswith("torch") else p for p in leaves]
    ops = get_ops(weights, inplace=True, where="clip_weights_")
    with ops.context():
        ops.clamp(weights, low, high)
