"""Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``.

Same signatures and, on finite inputs, the same results as torch: the norms come from torch's
own kernels on every device and size (``get_ops(..., torch_kernels=True)``), not from the blocked and
stacked CPU norms that :class:`gradclip.GlobalNorm` uses (closer to the exact value on tensors of
millions of elements, where torch's reduction drifts by up to 1e-3). Deviations, all deliberate:

* fp16/bf16 gradients: the norm accumulates in fp32, so fp16 gradients whose norm exceeds 65504
  are clipped correctly instead of being zeroed through an inf norm; the returned norm is fp32.
* A norm at or under ``max_norm`` leaves gradients bit-for-bit unchanged; torch scales by
  ``max_norm / (norm + 1e-6)`` even for norms in ``(max_norm - 1e-6, max_norm]``.
* ``max_norm=inf`` with an inf norm leaves gradients as they are (torch computes ``inf/inf``
  and writes NaN everywhere); non-finite norms never turn finite elements into NaN.
* Validation: negative or NaN ``max_norm``/``clip_value`` and ``norm_type <= 0`` raise
  :class:`~gradclip.InvalidArgumentError` naming the argument (torch flips gradient signs for a
  negative ``max_norm`` and counts tensors for ``norm_type=0``).
* ``error_if_nonfinite=True`` raises :class:`~gradclip.NonFiniteError` (a ``RuntimeError``, as
  torch raises) naming the offending parameters, before anything is modified.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from gradclip._core.ops import get_ops
from gradclip._core.tree import collect_gradients, position_names
from gradclip._core.validation import check_norm_type, check_number, reported_as
from gradclip.clippers.nonfinite import measurement
from gradclip.clippers.norm import GlobalNorm

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm"]

Parameters = torch.Tensor | Iterable[torch.Tensor]


def clip_grad_norm_(
    parameters: Parameters,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> torch.Tensor:
    """Clip the gradients of ``parameters`` in place to global norm ``max_norm``.

    Distributed training: DTensor gradients (FSDP2 ``fully_shard``, tensor parallel) are reduced
    over their mesh and the norm returned is a plain, fully reduced tensor, identical on every
    rank (torch returns a DTensor). Under DDP pass nothing: the gradients are already averaged.

    Args:
        parameters: A tensor or an iterable of tensors (or a module) whose ``.grad`` is clipped.
        max_norm: Largest allowed global norm, ``>= 0``.
        norm_type: Any p > 0, or ``inf`` / ``"inf"``.
        error_if_nonfinite: Raise :class:`~gradclip.NonFiniteError` if the norm is NaN or inf.
        foreach: ``None`` uses foreach kernels where supported, ``True`` requires them,
            ``False`` loops over tensors.
        process_group: The ``torch.distributed`` group (or ``DeviceMesh``) over which plain
            tensors are sharded, each rank holding different ones; their norms are all-reduced
            over it, and a rank without gradients still takes part (no hang). See
            :mod:`gradclip.torch.distributed`.

    Returns:
        The global norm before clipping, a 0-d tensor (fp32, or fp64 for fp64 gradients) on the
        first gradient's device; ``tensor(0.)`` when there are no gradients (without a process
        group).

    Raises:
        InvalidArgumentError: Bad ``max_norm`` or ``norm_type``.
        NonFiniteError: Non-finite norm with ``error_if_nonfinite=True``.
        BackendError: ``foreach=True`` on a device without foreach kernels.
    """
    # GlobalNorm's messages (bad max_norm, non-finite norm) name clip_grad_norm_, which the user called.
    with reported_as("clip_grad_norm_", "GlobalNorm"):
        clipper = GlobalNorm(max_norm, norm_type=norm_type, nonfinite="raise" if error_if_nonfinite else "propagate")
        collected = collect_gradients(parameters, "clip_grad_norm_")
        if not collected.grads and process_group is None:
            return torch.tensor(0.0)
        ops = get_ops(
            collected.grads, inplace=True, foreach=foreach, framework="torch", where="clip_grad_norm_",
            process_group=process_group, torch_kernels=True,  # torch's results, bit for bit
        )
        with ops.context():
            _, _, info = clipper.run(ops, collected.grads, None, None, collected.names)
    return info.norm


def get_total_norm(
    tensors: Parameters,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> torch.Tensor:
    """The global norm of ``tensors`` themselves (``torch.nn.utils.get_total_norm``), in fp32.

    A tensor listed twice is counted once. DTensors are reduced over their mesh.

    Args:
        tensors: A tensor or an iterable of tensors (None entries are skipped).
        norm_type: Any p > 0, or ``inf``.
        error_if_nonfinite: Raise :class:`~gradclip.NonFiniteError` on a NaN or inf norm.
        foreach: As in :func:`clip_grad_norm_`.
        process_group: As in :func:`clip_grad_norm_`.

    Returns:
        A 0-d tensor.
    """
    norm_type = check_norm_type("get_total_norm", norm_type)
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else [t for t in tensors if t is not None]
    tensors = list({id(t): t for t in tensors}.values())  # tied: the same tensor counts once
    if not tensors and process_group is None:
        return torch.tensor(0.0)
    ops = get_ops(
        tensors, foreach=foreach, framework="torch", where="get_total_norm", process_group=process_group,
        torch_kernels=True,
    )
    names = position_names(len(tensors))
    policy = "raise" if error_if_nonfinite else "propagate"
    return measurement(ops, tensors, norm_type, policy, names, "get_total_norm").norm


def clip_grad_value_(parameters: Parameters, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp the gradients of ``parameters`` in place into ``[-clip_value, clip_value]``.

    Args:
        parameters: A tensor or an iterable of tensors (or a module) whose ``.grad`` is clipped.
        clip_value: Bound, ``>= 0`` (torch accepts negative values and produces garbage).
        foreach: As in :func:`clip_grad_norm_`.

    Raises:
        InvalidArgumentError: Negative or NaN ``clip_value``.
    """
    bound = check_number("clip_grad_value_", "clip_value", clip_value)
    collected = collect_gradients(parameters, "clip_grad_value_")
    if not collected.grads or math.isinf(bound):
        return
    ops = get_ops(collected.grads, inplace=True, foreach=foreach, where="clip_grad_value_")
    with ops.context():
        ops.clamp(collected.grads, -bound, bound)
