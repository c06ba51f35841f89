"""Drop-in replacements for ``torch.nn.utils``: ``clip_grad_norm_``, ``clip_grad_value_``,
``get_total_norm`` and ``clip_grads_with_norm_`` (torch >= 2.6).

Same signatures and, on finite inputs, the same results as torch: the norms come from torch's
own kernels on every device and size (``get_ops(..., torch_kernels=True)``), not from the blocked
and stacked CPU norms that :class:`gradclip.GlobalNorm` uses (closer to the exact value on tensors
of millions of elements, where torch's reduction drifts by up to 1e-3). The same warnings
(an exhausted generator of parameters) and the same error wording
(``"The total norm of order {p} for gradients from `parameters` is non-finite"``) that code
written against torch matches on. Deviations, all deliberate:

* fp16/bf16 gradients: the norm accumulates in fp32, so fp16 gradients whose norm exceeds 65504
  are clipped correctly instead of being zeroed through an inf norm; the returned norm is fp32.
* A norm at or under ``max_norm`` leaves gradients bit-for-bit unchanged; torch scales by
  ``max_norm / (norm + 1e-6)`` even for norms in ``(max_norm - 1e-6, max_norm]``.
* A non-finite norm leaves the gradients as they are (torch computes ``max_norm / inf = 0`` and
  writes 0, or NaN through ``inf * 0``, everywhere; with ``max_norm=inf``, ``inf / inf``).
* Validation: ``max_norm``, ``norm_type`` and ``clip_value`` are read as torch's ``float()``
  reads them (numbers, numeric strings such as argparse values, one-element tensors); negative or
  NaN ``max_norm``/``clip_value``, ``norm_type <= 0`` and bools raise
  :class:`~gradclip.InvalidArgumentError` naming the argument (torch flips gradient signs for a
  negative ``max_norm``, counts tensors for ``norm_type=0`` and takes negative orders).
* A parameter (or tensor) listed twice, tied weights given by hand, is counted once in the norm
  and scaled once; torch counts it twice and, in ``clip_grad_norm_``/``clip_grads_with_norm_``,
  multiplies its gradient by the coefficient twice.
* Complex gradients raise :class:`~gradclip.BackendError` naming the parameter, before anything is
  modified: torch clips them by the norm of ``|z|``; gradclip's backends take real floating-point
  gradients only (``clip_grad_value_``: torch refuses them too).
* ``error_if_nonfinite=True`` raises :class:`~gradclip.NonFiniteError` (a ``RuntimeError``, as
  torch raises) naming the offending parameters, or the overflow and its magnitude for the
  gradients' dtype, before anything is modified.

All four compile under ``torch.compile(fullgraph=True)`` (see :mod:`gradclip._core.tracing`),
except ``error_if_nonfinite=True``, which reads the norm on the host by definition: there dynamo
breaks the graph, as it does for torch's own.
"""

from __future__ import annotations

import math
import numbers
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip._core.ops import get_ops
from gradclip._core.tracing import compiling, distinct_positions
from gradclip._core.tree import collect_gradients, position_names
from gradclip._core.validation import check_norm_type, check_number, reported_as
from gradclip.clippers.nonfinite import measurement
from gradclip.clippers.norm import GlobalNorm

__all__ = ["clip_grad_norm_", "clip_grad_value_", "clip_grads_with_norm_", "get_total_norm"]

Parameters = torch.Tensor | Iterable[torch.Tensor]

#: torch's eps in ``max_norm / (total_norm + 1e-6)``.
_TORCH_EPS = 1e-6


def _torch_hint(norm_type: float) -> str:
    # torch's own sentence, which code written against torch matches on (tests/upstream/).
    return (
        f"The total norm of order {float(norm_type)} for gradients from `parameters` is non-finite, so it "
        "cannot be clipped. Pass error_if_nonfinite=False to leave non-finite gradients as they are "
        "(gradclip never scales by a non-finite norm)."
    )


def _like_float(where: str, name: str, value: Any, check: Any) -> Any:
    """``value`` as torch's ``float(value)`` reads it, for gradclip's own checks.

    torch converts ``max_norm``, ``norm_type`` and ``clip_value`` with ``float()``: a numeric
    string (an argparse value), a ``Decimal``, a one-element array or tensor are numbers there
    too. Real numbers (numpy scalars included, bool refused on purpose) pass through unchanged;
    a one-element tensor becomes 0-d and stays a tensor (eagerly the checks read it; inside
    ``torch.compile`` a traced threshold stays on the device, where torch's ``float()`` would
    break the graph). Anything else is converted here and checked by ``check`` at once, so a
    range error quotes what the user passed.

    Raises:
        InvalidArgumentError: ``float()`` refuses the value (the message names the argument and
            the value), or the number fails ``check``.
    """
    if isinstance(value, numbers.Real):
        return value
    if isinstance(value, torch.Tensor):
        return value.reshape(()) if value.numel() == 1 and value.dim() > 0 else value
    try:
        number = float(value)
    except (TypeError, ValueError, ArithmeticError):
        raise InvalidArgumentError(
            f"{where}: {name} must be a real number (or what float() reads as one, as torch converts it), "
            f"got {value!r} of type {type(value).__name__}"
        ) from None
    try:
        check(number)
    except InvalidArgumentError as error:
        raise InvalidArgumentError(f"{error.args[0]} (given as {value!r})") from None
    return number


def _ops(arrays: list[Any], names: list[str], where: str, what: str, **options: Any) -> Any:
    """``get_ops`` for the drop-ins; a complex tensor is refused with a message that says so.

    The shared backends take real floating-point arrays only (complex ones are refused before
    anything is read); torch clips complex gradients by the norm of ``|z|``, which gradclip
    does not reproduce. The test runs on the error path only: nothing per tensor on a normal call.

    Raises:
        BackendError: A complex tensor (named), or what ``get_ops`` raises.
    """
    try:
        return get_ops(arrays, where=where, **options)
    except BackendError:
        complex_at = next((i for i, a in enumerate(arrays) if getattr(a, "is_complex", bool)()), None)
        if complex_at is None:
            raise
        upstream = "" if where == "clip_grad_value_" else f" (torch.nn.utils.{where} takes the norm of |z|)"
        raise BackendError(
            f"{where}: {what} {names[complex_at]} has the complex dtype {arrays[complex_at].dtype}; gradclip's "
            f"drop-ins do not support complex {what}s{upstream}, only float16, bfloat16, float32 and "
            "float64 ones. Nothing was changed."
        ) from None


def _materialise(parameters: Any, where: str, stacklevel: int) -> Any:
    """A generator of parameters becomes a list (it is read once); an exhausted one warns as
    torch does, outside a traced region (dynamo cannot trace a warning)."""
    if not isinstance(parameters, types.GeneratorType):
        return parameters
    parameters = list(parameters)
    if not parameters and not compiling():
        warnings.warn(
            "`parameters` is an empty generator, no gradient clipping will occur.", UserWarning, stacklevel=stacklevel
        )
    return parameters


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
            An exhausted generator warns as torch does and clips nothing. A parameter listed
            twice is counted and scaled once (torch: twice).
        max_norm: Largest allowed global norm, ``>= 0``: a number or what ``float()`` reads as
            one (``"1.0"``, a one-element tensor), as torch converts it.
        norm_type: Any p > 0, or ``inf`` / ``"inf"`` (``"2"`` too, as for ``max_norm``).
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
        NonFiniteError: Non-finite norm with ``error_if_nonfinite=True`` (nothing is modified).
        BackendError: ``foreach=True`` on a device without foreach kernels; a complex gradient
            (named; torch clips those, gradclip does not: nothing is modified).
    """
    where = "clip_grad_norm_"
    max_norm = _like_float(where, "max_norm", max_norm, lambda v: check_number(where, "max_norm", v))
    norm_type = _like_float(where, "norm_type", norm_type, lambda v: check_norm_type(where, v))
    # GlobalNorm's messages (a bad max_norm) name clip_grad_norm_, which the user called.
    with reported_as(where, "GlobalNorm"):
        clipper = GlobalNorm(max_norm, norm_type=norm_type, nonfinite="raise" if error_if_nonfinite else "propagate")
    parameters = _materialise(parameters, where, stacklevel=3)
    collected = collect_gradients(parameters, where)
    if not collected.grads and process_group is None:
        return torch.tensor(0.0)
    ops = _ops(
        collected.grads, collected.names, where, "gradient", inplace=True, foreach=foreach, framework="torch",
        process_group=process_group, torch_kernels=True,  # torch's results, bit for bit
    )
    with ops.context():
        measured = measurement(
            ops, collected.grads, clipper.norm_type, clipper.nonfinite, collected.names, where,
            hint=_torch_hint(clipper.norm_type),
        )
        decision = clipper.decide(ops, measured, None)
        clipper.apply(ops, measured.grads, decision)
    return measured.norm


def get_total_norm(
    tensors: Parameters,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
) -> torch.Tensor:
    """The global norm of ``tensors`` themselves (``torch.nn.utils.get_total_norm``), in fp32.

    A tensor listed twice is counted once (torch: twice). DTensors are reduced over their mesh.

    Args:
        tensors: A tensor or an iterable of tensors (None entries are skipped).
        norm_type: Any p > 0, or ``inf``; what ``float()`` reads as one (``"2"``, ``"inf"``, a
            one-element tensor) too, as torch converts it.
        error_if_nonfinite: Raise :class:`~gradclip.NonFiniteError` on a NaN or inf norm.
        foreach: As in :func:`clip_grad_norm_`.
        process_group: As in :func:`clip_grad_norm_`.

    Returns:
        A 0-d tensor (fp32, or fp64 for fp64 tensors); ``tensor(0.)`` for no tensors.

    Raises:
        InvalidArgumentError: Bad ``norm_type``.
        NonFiniteError: Non-finite norm with ``error_if_nonfinite=True``.
        BackendError: A complex tensor (torch takes the norm of ``|z|``; gradclip does not).
    """
    where = "get_total_norm"
    norm_type = check_norm_type(where, _like_float(where, "norm_type", norm_type, lambda v: check_norm_type(where, v)))
    leaves = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    positions, _ = distinct_positions(leaves)  # tied: the same tensor counts once
    tensors = [leaves[i] for i in positions]
    if not tensors and process_group is None:
        return torch.tensor(0.0)
    names = position_names(len(tensors))
    ops = _ops(
        tensors, names, where, "tensor", foreach=foreach, framework="torch", process_group=process_group,
        torch_kernels=True,
    )
    policy = "raise" if error_if_nonfinite else "propagate"
    with ops.context():
        measured = measurement(ops, tensors, norm_type, policy, names, where, hint=_torch_hint(norm_type))
    return measured.norm


def clip_grads_with_norm_(
    parameters: Parameters,
    max_norm: float,
    total_norm: torch.Tensor | float,
    foreach: bool | None = None,
) -> None:
    """Scale the gradients of ``parameters`` in place for a global norm measured beforehand
    (``torch.nn.utils.clip_grads_with_norm_``, torch >= 2.6): ``clip_grad_norm_`` is
    :func:`get_total_norm` of the gradients followed by this.

    The coefficient is torch's, ``min(max_norm / (total_norm + 1e-6), 1)`` computed in
    ``total_norm``'s dtype as torch computes it (so the gradients get torch's bits for every
    gradient and norm dtype), where ``total_norm > max_norm``; elsewhere exactly 1 (torch scales
    a norm in ``(max_norm - 1e-6, max_norm]`` too), and a non-finite ``total_norm`` leaves the
    gradients as they are. Nothing is read on the host.

    Args:
        parameters: A tensor or an iterable of tensors (or a module) whose ``.grad`` is scaled.
            A parameter listed twice is scaled once (torch scales it twice).
        max_norm: Largest allowed global norm, ``>= 0``: a number or what ``float()`` reads as
            one, as torch converts it.
        total_norm: The global norm of those gradients: a one-element tensor (any floating
            dtype and device; it is moved to the gradients' device), or a real number ``>= 0``
            (or NaN/inf).
        foreach: As in :func:`clip_grad_norm_`.

    Raises:
        InvalidArgumentError: ``max_norm`` negative or NaN; ``total_norm`` a negative number, a
            tensor with more than one element, or neither a tensor nor a real number.
        BackendError: A complex gradient (named; torch scales those, gradclip does not).
    """
    where = "clip_grads_with_norm_"
    max_norm = _like_float(where, "max_norm", max_norm, lambda v: check_number(where, "max_norm", v))
    with reported_as(where, "GlobalNorm"):
        max_norm = GlobalNorm(max_norm).max_norm  # its checks; a float (a tensor while traced)
    _check_total_norm(where, total_norm)
    parameters = _materialise(parameters, where, stacklevel=3)
    collected = collect_gradients(parameters, where)
    if not collected.grads:
        return
    ops = _ops(
        collected.grads, collected.names, where, "gradient", inplace=True, foreach=foreach, framework="torch",
        torch_kernels=True,
    )
    with ops.context():
        ops.scale(collected.grads, _coefficient(ops, max_norm, total_norm))


def _check_total_norm(where: str, total_norm: Any) -> None:
    if isinstance(total_norm, torch.Tensor):
        if total_norm.numel() != 1 or not total_norm.is_floating_point():
            raise InvalidArgumentError(
                f"{where}: total_norm must be a one-element floating-point tensor (the global norm), got a "
                f"{total_norm.dtype} tensor of shape {tuple(total_norm.shape)}; nothing was changed"
            )
        return
    if isinstance(total_norm, bool) or not isinstance(total_norm, (int, float)):
        raise InvalidArgumentError(
            f"{where}: total_norm must be a tensor or a real number (the global norm), got "
            f"{type(total_norm).__name__}; nothing was changed"
        )
    if total_norm < 0:
        raise InvalidArgumentError(
            f"{where}: total_norm must be >= 0 (a norm), got {total_norm!r}; nothing was changed"
        )


def _coefficient(ops: Any, max_norm: Any, total_norm: Any) -> torch.Tensor:
    """torch's ``clamp(max_norm / (total_norm + 1e-6), max=1)``, computed as torch computes it:
    in ``total_norm``'s dtype and on its device (the scaling moves it, as torch's does), so the
    gradients get torch's bits for every gradient and norm dtype. Then gradclip's deviations:
    exactly 1 where ``total_norm <= max_norm`` or is not finite. A Python number (which torch
    refuses) becomes a tensor in the gradients' accumulation dtype (fp64 for fp64 gradients)."""
    if isinstance(total_norm, torch.Tensor):
        norm = total_norm.reshape(())
    else:
        norm = torch.full((), float(total_norm), dtype=ops.acc, device=ops.device)
    coef = torch.clamp(max_norm / (norm + _TORCH_EPS), max=1.0)
    return torch.where((norm > max_norm) & torch.isfinite(norm), coef, 1.0)


def clip_grad_value_(parameters: Parameters, clip_value: float, foreach: bool | None = None) -> None:
    """Clamp the gradients of ``parameters`` in place into ``[-clip_value, clip_value]``.

    Args:
        parameters: A tensor or an iterable of tensors (or a module) whose ``.grad`` is clipped.
        clip_value: Bound, ``>= 0`` (torch accepts negative values and produces garbage): a
            number or what ``float()`` reads as one (``"0.5"``), as torch converts it.
        foreach: As in :func:`clip_grad_norm_`.

    Raises:
        InvalidArgumentError: Negative or NaN ``clip_value``.
        BackendError: A complex gradient (named; torch refuses those too).
    """
    where = "clip_grad_value_"
    clip_value = _like_float(where, "clip_value", clip_value, lambda v: check_number(where, "clip_value", v))
    bound = check_number(where, "clip_value", clip_value)
    collected = collect_gradients(parameters, where)
    if not collected.grads or math.isinf(bound):
        return
    ops = _ops(collected.grads, collected.names, where, "gradient", inplace=True, foreach=foreach)
    with ops.context():
        ops.clamp(collected.grads, -bound, bound)
