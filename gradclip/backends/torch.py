"""PyTorch backend: multi-tensor primitives on ``torch._foreach_*`` kernels.

Tensors are grouped by (device, dtype) with torch's own grouping helper, the same one
``torch.nn.utils.clip_grad_norm_`` uses, and each group goes through one foreach kernel. Every
reduction accumulates in fp32 (fp64 for fp64 gradients) through the kernels' ``dtype`` argument, so
fp16 gradients above 65504 no longer overflow to inf (the torch bug listed in DESIGN.md).

No function here reads a tensor value on the host except :meth:`TorchOps.to_host`: scalars are
0-d tensors on the gradients' device, and conditions are applied with ``torch.where``, so a
clipping step never waits for the device (DESIGN.md rule 1).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from gradclip._core.errors import BackendError, SparseGradientError
from gradclip.backends._hashing import hash_streams

__all__ = ["TorchOps", "BACKEND"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bool": torch.bool,
    "int32": torch.int32,
    "int64": torch.int64,
}


def _may_hold_dtensor(arrays: Sequence[Any]) -> bool:
    """False when no array can be a DTensor (torch.distributed.tensor is not even imported, or
    every array is a plain tensor); True means: look closer."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    return any(type(a) is not torch.Tensor for a in arrays)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class TorchOps:
    """Ops over lists of ``torch.Tensor``.

    Args:
        arrays: The gradients the operations will see; they fix the device of scalars and the
            accumulation dtype (fp64 if any gradient is fp64, else fp32).
        inplace: Write results into the input tensors (``clip_``) instead of new tensors.
        foreach: ``None`` uses the foreach kernels where the device supports them and silently
            falls back; ``True`` raises where they are unavailable; ``False`` always loops.
        where: The public entry point, for error messages.

    Raises:
        SparseGradientError: A gradient is sparse (its norm could be taken, but clamping and
            zeroing would densify it silently, so gradclip refuses rather than guess).
        BackendError: ``foreach=True`` on a device without foreach kernels.
    """

    name = "torch"
    #: torch weights are output-major (``nn.Linear``: ``(out, in)``): AGC's units are rows.
    unit_axis = 0

    def __new__(cls, arrays: Sequence[Any] = (), *args: Any, process_group: Any = None, **kwargs: Any):
        # DTensor gradients (FSDP2, tensor parallel) or a process group over which plain tensors
        # are sharded: the distributed subclass reduces norms with torch.distributed. A
        # DTensor can only exist once torch.distributed.tensor is imported, so the common case
        # costs one dictionary lookup.
        if cls is TorchOps and (process_group is not None or _may_hold_dtensor(arrays)):
            from gradclip.torch.distributed import DistributedTorchOps, any_dtensor

            if process_group is not None or any_dtensor(arrays):
                cls = DistributedTorchOps
        return super().__new__(cls)

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
        process_group: Any = None,
    ):
        # process_group is handled by gradclip.torch.distributed.DistributedTorchOps, which
        # __new__ returns whenever one is given.
        self.inplace = inplace
        self.foreach = foreach
        self.caller = where
        for index, tensor in enumerate(arrays):
            if tensor.layout != torch.strided:
                raise SparseGradientError(
                    f"{where}: gradient #{index} has layout {tensor.layout}; sparse gradients are not "
                    "supported (use a dense embedding, or densify the gradient before clipping)"
                )
        self.device = arrays[0].device if len(arrays) else torch.device("cpu")
        self.acc = (
            torch.float64 if any(t.dtype == torch.float64 for t in arrays) else torch.float32
        )

    # -- grouping ---------------------------------------------------------------------------
    def _groups(self, grads: list[torch.Tensor]):
        """Yield ``(device, dtype, tensors, indices, use_foreach)`` per (device, dtype) group."""
        if not grads:
            # torch's grouping helper fails on an empty list; no tensors, no groups (reached by
            # clip_ on a module before backward(), which now gets a torch ClipInfo).
            return
        grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
        for (device, dtype), ([tensors], indices) in grouped.items():
            if self.foreach is None:
                use_foreach = _has_foreach_support(tensors, device)
            elif self.foreach:
                if not _device_has_foreach_support(device):
                    raise BackendError(
                        f"{self.caller}: foreach=True was passed, but the foreach kernels are not "
                        f"available for {device.type} tensors; pass foreach=None or False"
                    )
                use_foreach = True
            else:
                use_foreach = False
            yield device, dtype, tensors, indices, use_foreach

    def context(self):
        """Context for in-place work on ``.grad``: autograd must not record the clipping."""
        return torch.no_grad()

    def world_size(self) -> int:
        """How many processes train together (``torch.distributed``), 1 when not initialised.

        An optional hook, not an Ops primitive: clippers whose state must agree across ranks
        without communicating (a random key) look it up with ``getattr``.
        """
        distributed = sys.modules.get("torch.distributed")
        if distributed is None or not distributed.is_available() or not distributed.is_initialized():
            return 1
        return distributed.get_world_size()

    # -- scalars ----------------------------------------------------------------------------
    def scalar(self, value, dtype: str = "float32"):
        # torch.full launches a fill kernel; torch.tensor(value, device=cuda) would copy from host.
        return torch.full((), value, dtype=_DTYPES[dtype], device=self.device)

    def where(self, cond, a, b):
        return torch.where(cond, a, b)

    def minimum(self, a, b):
        return torch.minimum(torch.as_tensor(a, device=self.device), torch.as_tensor(b, device=self.device))

    def maximum(self, a, b):
        return torch.maximum(torch.as_tensor(a, device=self.device), torch.as_tensor(b, device=self.device))

    def sqrt(self, x):
        return torch.sqrt(x)

    def exp(self, x):
        return torch.exp(x)

    def log(self, x):
        return torch.log(x)

    def isfinite(self, x):
        return torch.isfinite(x)

    def stack(self, xs):
        if len(xs) == 0:
            return torch.zeros((0,), dtype=self.acc, device=self.device)
        return torch.stack([x.to(self.device, non_blocking=True) for x in xs])

    def any(self, x):
        return torch.any(x)

    def to_host(self, x):
        return x.item()

    def array(self, value, dtype: str = "float32"):
        return torch.tensor(value, dtype=_DTYPES[dtype], device=self.device)

    def to_list(self, x):
        return x.detach().cpu().tolist()

    # -- multi-tensor -------------------------------------------------------------------------
    def norms(self, grads, norm_type):
        result: list[torch.Tensor | None] = [None] * len(grads)
        for device, dtype, tensors, indices, use_foreach in self._groups(grads):
            acc = _accumulation_dtype(dtype)
            if norm_type == math.inf and any(t.numel() == 0 for t in tensors):
                # torch raises for the inf-norm of an empty tensor (a max has no identity);
                # define it as 0, as for every finite p and in the NumPy backend. numel() is
                # metadata: no device read.
                for index, tensor in zip(indices, tensors):
                    if tensor.numel() == 0:
                        result[index] = torch.zeros((), dtype=self.acc, device=self.device)
                kept = [(t, i) for t, i in zip(tensors, indices) if t.numel() > 0]
                tensors, indices = [t for t, _ in kept], [i for _, i in kept]
                if not tensors:
                    continue
            if use_foreach:
                group_norms = torch._foreach_norm(tensors, norm_type, dtype=acc)
            else:
                group_norms = [torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors]
            for index, norm in zip(indices, group_norms):
                result[index] = norm.to(self.device, self.acc, non_blocking=True)
        return self.stack(result)

    def combine_norms(self, norms, norm_type):
        if norms.numel() == 0:
            return torch.zeros((), dtype=self.acc, device=self.device)
        return torch.linalg.vector_norm(norms, norm_type)

    def global_norm(self, grads, norm_type):
        return self.combine_norms(self.norms(grads, norm_type), norm_type)

    def _apply(self, grads, coefs_for_group, foreach_op, foreach_op_, loop_op):
        """Run a per-group binary op in place or out of place, keeping the input order."""
        result: list[torch.Tensor | None] = [None] * len(grads)
        for device, _dtype, tensors, indices, use_foreach in self._groups(grads):
            coefs = coefs_for_group(device, indices)
            if use_foreach:
                if self.inplace:
                    foreach_op_(tensors, coefs)
                    outs = tensors
                else:
                    outs = foreach_op(tensors, coefs)
            else:
                many = isinstance(coefs, (list, tuple))
                outs = []
                for position, tensor in enumerate(tensors):
                    coef = coefs[position] if many else coefs
                    outs.append(loop_op(tensor, coef))
            for index, out in zip(indices, outs):
                result[index] = out
        return result

    def scale(self, grads, coef):
        mul = (lambda t, c: t.mul_(c)) if self.inplace else (lambda t, c: t * c)
        return self._apply(
            grads,
            lambda device, _indices: coef.to(device, non_blocking=True),
            torch._foreach_mul,
            torch._foreach_mul_,
            mul,
        )

    def scale_each(self, grads, coefs):
        mul = (lambda t, c: t.mul_(c)) if self.inplace else (lambda t, c: t * c)

        def per_group(device, indices):
            if len(indices) == coefs.shape[0] and list(indices) == list(range(len(indices))):
                # One group holding every tensor in order (the usual case): no index tensor,
                # whose creation would be a host-to-device copy on every step.
                return list(coefs.to(device, non_blocking=True).unbind())
            index = torch.as_tensor(indices, device=coefs.device)
            return list(coefs.index_select(0, index).to(device, non_blocking=True).unbind())

        return self._apply(grads, per_group, torch._foreach_mul, torch._foreach_mul_, mul)

    def clamp(self, grads, low, high):
        # An infinite bound is a no-op that would still cost a full pass: leave it out.
        steps = [
            (bound, foreach_op, foreach_op_, key)
            for bound, foreach_op, foreach_op_, key in (
                (low, torch._foreach_clamp_min, torch._foreach_clamp_min_, "min"),
                (high, torch._foreach_clamp_max, torch._foreach_clamp_max_, "max"),
            )
            if math.isfinite(bound)
        ]
        result: list[torch.Tensor | None] = [None] * len(grads)
        for _device, _dtype, tensors, indices, use_foreach in self._groups(grads):
            outs, writable = tensors, self.inplace
            for bound, foreach_op, foreach_op_, key in steps:
                if use_foreach:
                    if writable:
                        foreach_op_(outs, bound)
                    else:
                        outs = foreach_op(outs, bound)
                elif writable:
                    outs = [t.clamp_(**{key: bound}) for t in outs]
                else:
                    outs = [t.clamp(**{key: bound}) for t in outs]
                # After the first out-of-place step the results are ours to write into.
                writable = True
            if not writable:  # no finite bound at all and not in place: still return copies
                outs = [t.clone() for t in outs]
            for index, out in zip(indices, outs):
                result[index] = out
        return result

    def _elementwise(self, grads, fn):
        """Apply ``fn(tensor) -> new tensor`` to each gradient, copying back when in place."""
        outs = []
        for tensor in grads:
            new = fn(tensor)
            if self.inplace:
                tensor.copy_(new)
                outs.append(tensor)
            else:
                outs.append(new)
        return outs

    def zero_above(self, grads, threshold):
        if self.inplace:
            return [t.masked_fill_(t.abs() > threshold, 0) for t in grads]
        return [t.masked_fill(t.abs() > threshold, 0) for t in grads]

    def sign_where(self, grads, magnitude, cond):
        return self._elementwise(
            grads,
            lambda t: torch.where(cond.to(t.device, non_blocking=True), t.sign() * magnitude, t),
        )

    def zero_nonfinite(self, grads):
        if self.inplace:
            return [torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0) for t in grads]
        return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in grads]

    def finite_each(self, grads):
        if len(grads) == 0:
            return torch.zeros((0,), dtype=torch.bool, device=self.device)
        return torch.stack([torch.isfinite(t).all().to(self.device, non_blocking=True) for t in grads])

    def extrema(self, grads):
        highs, lows = [], []
        for tensor in grads:
            if tensor.numel() == 0:
                highs.append(torch.full((), -math.inf, device=self.device))
                lows.append(torch.full((), math.inf, device=self.device))
            else:
                low, high = torch.aminmax(tensor)
                highs.append(high.to(self.device, torch.float32, non_blocking=True))
                lows.append(low.to(self.device, torch.float32, non_blocking=True))
        if not grads:
            empty = torch.zeros((0,), dtype=torch.float32, device=self.device)
            return empty, empty
        return torch.stack(highs), torch.stack(lows)

    def numel(self, grad):
        return grad.numel()

    # -- small-vector math for adaptive state -------------------------------------------------
    def sum(self, x):
        if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
            return torch.sum(x, dtype=torch.int64)
        return torch.sum(x)

    def arange(self, n, dtype="int64"):
        return torch.arange(n, dtype=_DTYPES[dtype], device=self.device)

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def floor(self, x):
        return torch.floor(x)

    def sort(self, x):
        return torch.sort(x, stable=True).values

    def take(self, x, index):
        # Not x[index]: indexing with a 0-d integer tensor reads it on the host (.item() in
        # C++). torch.take gathers on the device.
        return torch.take(x, index)

    def cumsum(self, x):
        return torch.cumsum(x, 0, dtype=x.dtype)

    def version_token(self, grads):
        # ``_version`` is a host-side counter that every in-place write bumps: reading it never
        # touches the device. Inference tensors have none; then detection is off.
        try:
            return tuple(t._version for t in grads)
        except RuntimeError:
            return None

    def unit_norms(self, arrays, axes):
        out = []
        for tensor, kept in zip(arrays, axes):
            tensor = tensor.detach()
            acc = _accumulation_dtype(tensor.dtype)
            if kept is None:
                norm = torch.linalg.vector_norm(tensor, 2, dtype=acc)
                out.append(norm.reshape((1,) * tensor.dim()))
                continue
            reduce = tuple(d for d in range(tensor.dim()) if d not in kept)
            if not reduce:  # dim=() would mean "all dims" to some torch versions
                out.append(tensor.abs().to(acc))
                continue
            out.append(torch.linalg.vector_norm(tensor, 2, dim=reduce, keepdim=True, dtype=acc))
        return out

    def scale_units(self, grads, coefs):
        out = []
        for tensor, coef in zip(grads, coefs):
            coef = coef.to(tensor.device, non_blocking=True)
            if self.inplace:
                # In-place mul with an fp32 operand computes in fp32 and rounds once into the
                # gradient's dtype.
                out.append(tensor.mul_(coef))
            else:
                out.append((tensor.to(coef.dtype) * coef).to(tensor.dtype))
        return out

    def uniform(self, key, counter, shapes):
        key = key.to(self.device)
        counter = counter.to(self.device)
        arange = lambda n: torch.arange(n, dtype=torch.int64, device=self.device)  # noqa: E731
        return [
            (h >> 8).to(torch.float32) * (2.0**-24) for h in hash_streams(key, counter, shapes, arange)
        ]

    def select(self, grads, replacements, masks):
        out = []
        for tensor, replacement, mask in zip(grads, replacements, masks):
            mask = mask.to(tensor.device, non_blocking=True)
            new = torch.where(mask, replacement.to(tensor.dtype), tensor)
            if self.inplace:
                tensor.copy_(new)
                out.append(tensor)
            else:
                out.append(new)
        return out


BACKEND = TorchOps
