"""PyTorch backend: multi-tensor primitives on ``torch._foreach_*`` kernels.

Tensors are grouped by (device, dtype) with torch's own grouping helper, the same one
``torch.nn.utils.clip_grad_norm_`` uses, and each group goes through one foreach kernel. Every
reduction accumulates in fp32 (fp64 for fp64 gradients) through the kernels' ``dtype`` argument, so
fp16 gradients above 65504 have a finite norm (torch's own overflows to inf; see DESIGN.md).

No function here reads a tensor value on the host except :meth:`TorchOps.to_host`: scalars are
0-d tensors on the gradients' device, and conditions are applied with ``torch.where``, so a
clipping step never waits for the device (DESIGN.md rule 1).

Fast paths (``foreach=None``, the default; ``benchmarks/`` measures them against torch):

* **CPU norms** (:mod:`gradclip.backends.torch_cpu_norms`): large dense tensors reduced in rows,
  small tensors sharing a shape stacked; CUDA keeps ``torch._foreach_norm``. ``foreach=True``
  and ``False``, and ``torch_kernels=True`` (the drop-ins), keep torch's kernels.
* **Grouping once.** The (device, dtype) grouping of a gradient list is computed once per Ops
  and list (``norms`` then ``scale`` on the same list reuse it), and norms are stacked once per
  group instead of moved one tensor at a time.
* **Fewer scalar kernels.** The clip coefficient (:meth:`TorchOps.clip_coefficient`) and
  ``isfinite`` take fewer kernels than their generic forms, with the same bits: on a GPU every
  scalar operation is a launch on the clipping step's critical path.

Distribution is the Reducer's (:mod:`gradclip.backends.torch_reduce`), chosen at construction:
with one process (:data:`~gradclip.backends.torch_reduce.LOCAL`) every method runs its kernels
directly; otherwise the methods that read or rewrite shards go through the Reducer, which runs
the kernels of a local twin Ops on the local shards.
"""

from __future__ import annotations

import copy
import math
import operator
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _foreach_supported_types,
    _group_tensors_by_device_and_dtype,
)

from gradclip._core.errors import BackendError, SparseGradientError
from gradclip.backends.torch_cpu_norms import (
    BLOCKED_MIN_NUMEL,
    BLOCKED_MIN_NUMEL_WIDE,
    CHUNK,
    LOW_PRECISION_ROW,
    ROW,
    STACK_MAX_NUMEL,
    cpu_norms,
    plain_norms,
)
from gradclip.backends.torch_reduce import LOCAL, choose_reducer
from gradclip.backends.torch_vectors import TorchVectorOps, _accumulation_dtype

__all__ = [
    "BACKEND",
    "BLOCKED_MIN_NUMEL",
    "BLOCKED_MIN_NUMEL_WIDE",
    "CHUNK",
    "LOW_PRECISION_ROW",
    "ROW",
    "STACK_MAX_NUMEL",
    "TorchOps",
]

_layout_of = operator.attrgetter("layout")
_STRIDED = frozenset({torch.strided})



def _may_hold_dtensor(arrays: Sequence[Any]) -> bool:
    """False when no array can be a DTensor (torch.distributed.tensor is not even imported, or
    every array is a plain tensor); True means: look closer."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    return any(type(a) is not torch.Tensor for a in arrays)


class _Group(NamedTuple):
    """Tensors of one (device, dtype), their positions in the input list, and the kernel choice."""

    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    indices: list[int]
    use_foreach: bool


class TorchOps(TorchVectorOps):
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

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
        process_group: Any = None,
        torch_kernels: bool = False,
        reducer: Any = None,
        device: Any = None,
    ):
        if reducer is None:
            # A DTensor can only exist once torch.distributed.tensor is imported, so the common
            # case costs one dictionary lookup.
            local = process_group is None and not _may_hold_dtensor(arrays)
            reducer = LOCAL if local else choose_reducer(arrays, process_group, where)
        #: How statistics are reduced across processes (see gradclip.backends.torch_reduce).
        self.reducer = reducer
        self.distributed = reducer.distributed
        self.inplace = inplace
        self.foreach = foreach
        self.caller = where
        #: Keep torch's own norm kernels on every device (no blocked or stacked CPU norms): the
        #: drop-ins of gradclip.torch.clip promise torch's results bit for bit.
        self.torch_kernels = torch_kernels
        arrays = reducer.local_arrays(arrays)
        #: Whether dynamo is tracing this call (torch.compile): then the grouping, the norms and
        #: the constants take the forms the compiler fuses (see gradclip/_core/tracing.py).
        self.traced = torch.compiler.is_compiling()
        # map with attrgetter: the layout test runs in C, not one Python frame per tensor
        # (dynamo traces the generator form).
        if (
            any(t.layout is not torch.strided for t in arrays)
            if self.traced
            else set(map(_layout_of, arrays)) - _STRIDED
        ):
            index, tensor = next((i, t) for i, t in enumerate(arrays) if t.layout is not torch.strided)
            raise SparseGradientError(
                f"{where}: gradient #{index} has layout {tensor.layout}; sparse gradients are not "
                "supported (use a dense embedding, or densify the gradient before clipping)"
            )
        # No arrays: the device asked for (a kept state's), else the CPU; a process group may
        # need its own (a rank without gradients still joins its collectives).
        fallback = torch.device("cpu") if device is None else torch.device(device)
        self.device = arrays[0].device if len(arrays) else reducer.device(fallback)
        self._arrays = arrays
        # What this Ops learns while it works, kept in one dict made here (the Ops itself is
        # never changed): "acc", the accumulation dtype, found on first use (most clipping steps
        # learn it from the grouping for free instead of another pass over thousands of
        # tensors); "grouping", (list, its tensors, groups) of the last _groups call (a clipper
        # measures and then scales the same list, and grouping 2,000 tensors costs as much as
        # scaling them); "layout", the reducer's view of the last list measured.
        self._memo: dict[str, Any] = {}
        if self.distributed:
            # The same Ops without a reducer: the kernels the reducer runs on local shards.
            twin = copy.copy(self)
            vars(twin).update(reducer=LOCAL, distributed=False)
            self._twin = twin

    @property
    def acc(self) -> torch.dtype:
        """fp64 when any gradient given at construction is fp64, else fp32."""
        acc = self._memo.get("acc")
        if acc is None:
            wide = any(t.dtype == torch.float64 for t in self._arrays)
            acc = self._memo["acc"] = torch.float64 if wide else torch.float32
        return acc

    def out_of_place(self) -> TorchOps:
        twin = super().out_of_place()
        if twin is not self and self.distributed:
            vars(twin)["_twin"] = self._twin.out_of_place()
        return twin

    # -- grouping ---------------------------------------------------------------------------
    def _groups(self, grads: list[torch.Tensor]) -> list[_Group]:
        """The gradients grouped by (device, dtype), with the kernel choice per group.

        Cached for the last list seen: a second call with the same list object holding the same
        tensors returns the same groups without regrouping.

        Raises:
            BackendError: ``foreach=True`` on a device without foreach kernels.
        """
        if not grads:
            # torch's grouping helper fails on an empty list; no tensors, no groups (clip_ on a
            # module before backward() still gets a torch ClipInfo).
            return []
        cached = self._memo.get("grouping")
        if (
            cached is not None
            and cached[0] is grads
            and len(cached[1]) == len(grads)
            and all(map(operator.is_, cached[1], grads))
        ):
            return cached[2]
        grouped = _group_tensors_by_device_and_dtype([list(grads)], with_indices=True)
        groups = []
        for (device, dtype), ([tensors], indices) in grouped.items():
            if self.foreach is None:
                # torch's _has_foreach_support, with the type test done once per distinct type.
                # (torch.distributed.tensor adds DTensor to that list on import: read it live.)
                use_foreach = _device_has_foreach_support(device) and all(
                    kind in _foreach_supported_types for kind in set(map(type, tensors))
                )
            elif self.foreach:
                if not _device_has_foreach_support(device):
                    raise BackendError(
                        f"{self.caller}: foreach=True was passed, but the foreach kernels are not "
                        f"available for {device.type} tensors; pass foreach=None or False"
                    )
                use_foreach = True
            else:
                use_foreach = False
            groups.append(_Group(device, dtype, tensors, indices, use_foreach))
        self._memo["grouping"] = (grads, tuple(grads), groups)
        if "acc" not in self._memo and grads is self._arrays:
            wide = any(group.dtype == torch.float64 for group in groups)
            self._memo["acc"] = torch.float64 if wide else torch.float32
        return groups

    def context(self):
        """Context for in-place work on ``.grad``: autograd must not record the clipping."""
        return torch.no_grad()

    def world_size(self) -> int:
        """How many processes train together (``torch.distributed``), 1 when not initialised."""
        distributed = sys.modules.get("torch.distributed")
        if distributed is None or not distributed.is_available() or not distributed.is_initialized():
            return 1
        return distributed.get_world_size()

    # -- multi-tensor -------------------------------------------------------------------------
    def norms(self, grads, norm_type):
        if self.distributed:
            return self.reducer.norms(self, grads, norm_type)
        groups = self._groups(grads)
        if not groups:
            return torch.zeros((0,), dtype=self.acc, device=self.device)
        if len(groups) == 1:
            # One group holds every tensor in input order (the usual case): one conversion.
            return self._group_norms(groups[0], norm_type).to(self.device, self.acc, non_blocking=True)
        result: list[torch.Tensor | None] = [None] * len(grads)
        for group in groups:
            values = self._group_norms(group, norm_type).to(self.device, self.acc, non_blocking=True)
            for index, value in zip(group.indices, values.unbind()):
                result[index] = value
        return torch.stack(result)

    def _group_norms(self, group: _Group, norm_type: float) -> torch.Tensor:
        """Norms of one group's tensors, in the group's order, as one 1-D tensor on its device:
        the CPU fast paths on CPU with ``foreach=None``, torch's kernels elsewhere."""
        acc = _accumulation_dtype(group.dtype)
        if not (self.foreach is None and group.device.type == "cpu") or self.torch_kernels or self.traced:
            return plain_norms(group.tensors, norm_type, acc, group.use_foreach, group.device)
        return cpu_norms(group.tensors, group.dtype, group.device, norm_type, acc, group.use_foreach)

    def combine_norms(self, norms, norm_type):
        if self.distributed:
            return self.reducer.combine_norms(self, norms, norm_type)
        if norms.numel() == 0:
            return torch.zeros((), dtype=self.acc, device=self.device)
        return torch.linalg.vector_norm(norms, norm_type)

    def global_norm(self, grads, norm_type):
        return self.combine_norms(self.norms(grads, norm_type), norm_type)

    def _apply(self, grads, coefs_for_group, foreach_op, foreach_op_, loop_op):
        """Run a per-group binary op in place or out of place, keeping the input order."""
        groups = self._groups(grads)
        result: list[torch.Tensor | None] = list(grads) if self.inplace else [None] * len(grads)
        for device, _dtype, tensors, indices, use_foreach in groups:
            coefs = coefs_for_group(device, indices)
            if use_foreach:
                if self.inplace:
                    foreach_op_(tensors, coefs)
                    continue  # the results are the inputs, already in place in ``result``
                outs = foreach_op(tensors, coefs)
            else:
                many = isinstance(coefs, (list, tuple))
                outs = []
                for position, tensor in enumerate(tensors):
                    coef = coefs[position] if many else coefs
                    outs.append(loop_op(tensor, coef))
            if len(groups) == 1:
                return list(outs)
            for index, out in zip(indices, outs):
                result[index] = out
        return result

    def scale(self, grads, coef):
        if self.distributed:
            return self.reducer.map(self, grads, lambda ls: self._twin.scale(ls, coef), linear=True, operation="scale")
        mul = (lambda t, c: t.mul_(c)) if self.inplace else (lambda t, c: t * c)
        return self._apply(
            grads,
            lambda device, _indices: coef.to(device, non_blocking=True),
            torch._foreach_mul,
            torch._foreach_mul_,
            mul,
        )

    def scale_each(self, grads, coefs):
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.scale_each(ls, coefs), linear=True, operation="scale_each"
            )
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
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.clamp(ls, low, high), linear=False, operation="clamping"
            )
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
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.zero_above(ls, threshold), linear=False,
                operation="zeroing outliers",
            )
        if self.inplace:
            return [t.masked_fill_(t.abs() > threshold, 0) for t in grads]
        return [t.masked_fill(t.abs() > threshold, 0) for t in grads]

    def sign_where(self, grads, magnitude, cond):
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.sign_where(ls, magnitude, cond), linear=False,
                operation="sign_where",
            )
        return self._elementwise(
            grads,
            lambda t: torch.where(cond.to(t.device, non_blocking=True), t.sign() * magnitude, t),
        )

    def zero_nonfinite(self, grads):
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.zero_nonfinite(ls), linear=False,
                operation="zeroing non-finite values",
            )
        if self.inplace:
            return [torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0) for t in grads]
        return [torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0) for t in grads]

    def finite_each(self, grads):
        if self.distributed:
            return self.reducer.finite_each(self, grads)
        if len(grads) == 0:
            return torch.zeros((0,), dtype=torch.bool, device=self.device)
        return torch.stack([torch.isfinite(t).all().to(self.device, non_blocking=True) for t in grads])

    def extrema(self, grads):
        if self.distributed:
            return self.reducer.extrema(self, grads)
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
        if self.distributed:  # a piece of a tensor split by hand or by FSDP1: the whole count
            return self.reducer.numel(self, grad)
        return grad.numel()

    def version_token(self, grads):
        if self.distributed:
            return self.reducer.version_token(self, grads)
        # ``_version`` is a host-side counter that every in-place write bumps: reading it never
        # touches the device. Inference tensors have none; then detection is off.
        try:
            return tuple(t._version for t in grads)
        except RuntimeError:
            return None

    def write_back(self, targets, values):
        if not self.inplace:
            return list(values)
        for _device, _dtype, tensors, indices, use_foreach in self._groups(targets):
            sources = [values[i] for i in indices]
            # DTensor has no sharding rule for _foreach_copy_ (torch 2.13): copy it per tensor.
            if use_foreach and not _may_hold_dtensor(tensors):
                torch._foreach_copy_(tensors, sources)
            else:
                for tensor, source in zip(tensors, sources):
                    tensor.copy_(source)
        return list(targets)

    def finish_info(self, info):
        if self.distributed:
            return self.reducer.finish_info(self, info)
        return info

    def select(self, grads, replacements, masks):
        if self.distributed:
            return self.reducer.select(self, grads, replacements, masks)
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
