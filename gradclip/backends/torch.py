"""PyTorch backend: multi-tensor primitives on ``torch._foreach_*`` kernels.

Tensors are grouped by (device, dtype) with torch's own grouping helper, the same one
``torch.nn.utils.clip_grad_norm_`` uses, and each group goes through one foreach kernel. Every
reduction accumulates in fp32 (fp64 for fp64 gradients) through the kernels' ``dtype`` argument, so
fp16 gradients above 65504 no longer overflow to inf (the torch bug listed in DESIGN.md).

No function here reads a tensor value on the host except :meth:`TorchOps.to_host`: scalars are
0-d tensors on the gradients' device, and conditions are applied with ``torch.where``, so a
clipping step never waits for the device (DESIGN.md rule 1).

Fast paths (``foreach=None``, the default; ``benchmarks/`` measures them against torch):

* **Blocked CPU norms.** On CPU, ``torch._foreach_norm`` is a C++ loop over
  ``linalg.vector_norm``, whose whole-tensor reduction accumulates in a handful of SIMD lanes:
  it does not gain from a second core, and its error grows with the length (2.7e-3 relative on
  GPT-2's 38.6M-element embedding in fp32). Tensors of at least :data:`BLOCKED_MIN_NUMEL`
  (fp16/bf16) or :data:`BLOCKED_MIN_NUMEL_WIDE` (fp32/fp64) elements laid out densely
  (contiguous in some dimension order) are instead viewed as rows of :data:`ROW` elements,
  reduced per row (rows are shared among the cores; each row's sum is accurate) and the row
  norms combined. fp16/bf16 tensors are widened to fp32 :data:`CHUNK`
  elements at a time into one scratch buffer and reduced there in rows of
  :data:`LOW_PRECISION_ROW`: torch's upcasting reduction allocates a full fp32 copy of the
  tensor on every call, and its page faults made bf16 slower per element than fp32. Smaller
  tensors keep the one foreach call, whose cost per tensor is dispatch, not reading; tensors
  with gaps (slices with steps) keep torch's kernel. CUDA keeps ``torch._foreach_norm`` (one
  fused multi-tensor kernel). ``foreach=True`` and ``False`` keep torch's kernels, bit-for-bit
  equal to ``torch.nn.utils.clip_grad_norm_``. A deviation from torch, by design: for fp32/fp64
  tensors of :data:`BLOCKED_MIN_NUMEL_WIDE` elements and more, the default path's norms are not
  bit-for-bit torch's but closer to the exact value (within 1e-6 relative of it, where torch's
  own kernel drifts by up to 1e-3); smaller fp32/fp64 tensors are bit-for-bit torch's. The
  drop-ins of :mod:`gradclip.torch.clip` keep torch's kernels throughout (their promise is
  torch's results).
* **Grouping once.** The (device, dtype) grouping of a gradient list is computed once per Ops
  and list (``norms`` then ``scale`` on the same list reuse it), and norms are stacked once per
  group instead of moved one tensor at a time.
* **Stacked CPU norms of small tensors.** ``torch._foreach_norm`` on CPU dispatches one kernel
  per tensor (about 1.5 us each), which for thousands of biases and norm weights costs more
  than reading them. Small tensors (up to :data:`STACK_MAX_NUMEL` elements) that share a shape
  are stacked, at most :data:`CHUNK` elements at a time, and reduced row by row in one call;
  each row's norm is bit-for-bit what ``torch._foreach_norm`` gives for that tensor.
* **Fewer scalar kernels.** The clip coefficient (:meth:`TorchOps.clip_coefficient`) and
  ``isfinite`` take fewer kernels than their generic forms, with the same bits: on a GPU every
  scalar operation is a launch on the clipping step's critical path.

Extra memory stays O(number of tensors) in all but a sliver: the row norms of the one fp32
tensor being reduced (``numel / ROW`` values, 0.025% of its bytes, freed before the next
tensor), one value per :data:`CHUNK` elements for fp16/bf16, and a scratch buffer of at most
:data:`CHUNK` fp32 elements per call (4 MiB; allocated per call, so concurrent calls from
several threads never share it), or a stack of at most :data:`CHUNK` small-tensor elements.
"""

from __future__ import annotations

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
from gradclip._core.ops import Ops
from gradclip.backends._hashing import hash_streams

__all__ = [
    "TorchOps",
    "BACKEND",
    "BLOCKED_MIN_NUMEL",
    "BLOCKED_MIN_NUMEL_WIDE",
    "STACK_MAX_NUMEL",
    "ROW",
    "LOW_PRECISION_ROW",
    "CHUNK",
]

#: fp16/bf16 CPU tensors with at least this many elements take the blocked norm; below it,
#: reading the tensor costs less than dispatching a kernel, and one foreach call over all of
#: them wins.
BLOCKED_MIN_NUMEL = 1 << 16
#: The same for fp32/fp64, higher on purpose: below it gradclip's fp32/fp64 norms stay
#: bit-for-bit torch's (tests/test_torch_parity.py, tests/test_seeds.py), and torch's kernel is
#: still accurate there (about 1e-6 relative); the tensors that dominate the time of large
#: models (GPT-2 small: 589,824 elements and up) are above it.
BLOCKED_MIN_NUMEL_WIDE = 1 << 19
#: CPU tensors with at most this many elements, when several share a shape, are stacked and
#: reduced row by row: one copy and one reduction instead of one kernel dispatch per tensor in
#: ``torch._foreach_norm`` (about 1.5 us each on CPU, more than reading 4,096 fp32 values).
#: Each row's norm is bit-for-bit what ``torch._foreach_norm`` gives for that tensor (torch
#: 2.13 reduces both the same way up to 32,768 elements; tests/test_fast_paths.py checks it).
STACK_MAX_NUMEL = 1 << 12
#: Row length of the blocked norm for fp32/fp64 tensors: short enough for an accurate fp32 sum
#: per row (1e-7 relative or better for p = 1 and 2 on random data, against 2.7e-3 for torch's
#: whole-tensor reduction of 38.6M elements), long enough that the row norms stay few
#: (numel / 4096, freed before the next tensor) and each kernel call does real work. Row
#: lengths from 1,024 to 32,768 ran equally fast.
ROW = 1 << 12
#: Row length for widened fp16/bf16 values: their few mantissa bits make fp32 sums of long rows
#: drift systematically (1.9e-6 relative at 32,768, 1.2e-7 at 1,024, bf16 random data).
LOW_PRECISION_ROW = 1 << 10
#: fp16/bf16 elements widened to fp32 per step of the blocked norm: 4 MiB of scratch, which
#: stays in the last-level cache between the copy and the reduction. Smaller pieces paid more
#: in per-call overhead than they won in locality (measured on a 2-core EPYC: 2^16 elements
#: per piece took 2.2x as long as 2^20). A multiple of ROW.
CHUNK = 1 << 20

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_layout_of = operator.attrgetter("layout")
_STRIDED = frozenset({torch.strided})

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


def _flat_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """All elements of ``tensor`` as a 1-D view in memory order, or None if it has gaps.

    A norm does not depend on the order of the elements, so a transposed or channels-last tensor
    (contiguous in another dimension order) is read as one flat run of memory too.
    """
    if tensor.is_contiguous():
        return tensor.view(-1)
    order = sorted(range(tensor.dim()), key=tensor.stride, reverse=True)
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


class _Group(NamedTuple):
    """Tensors of one (device, dtype), their positions in the input list, and the kernel choice."""

    device: torch.device
    dtype: torch.dtype
    tensors: list[torch.Tensor]
    indices: list[int]
    use_foreach: bool


def _row_norms(flat: torch.Tensor, norm_type: float, row: int) -> torch.Tensor:
    """p-norms of consecutive ``row``-element rows of a 1-D tensor (the last row may be shorter)."""
    whole = flat.numel() // row * row
    if whole == 0:
        return torch.linalg.vector_norm(flat, norm_type).reshape(1)
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, row), norm_type, dim=1)
    if whole == flat.numel():
        return rows
    return torch.cat([rows, torch.linalg.vector_norm(flat[whole:], norm_type).reshape(1)])


def _blocked_norm(flat: torch.Tensor, norm_type: float, scratch: torch.Tensor | None) -> torch.Tensor:
    """The p-norm of a contiguous 1-D CPU tensor, reduced in rows (see the module docstring).

    The norm of the row norms is the norm of the tensor, for every p > 0 and inf.

    Args:
        flat: The tensor, flattened (a view).
        norm_type: p > 0 or inf.
        scratch: For fp16/bf16 input, an fp32 buffer of at least ``min(numel, CHUNK)`` elements
            that the tensor is widened into piece by piece; None for fp32/fp64 input.

    Returns:
        A 0-d tensor: fp32 (fp64 for fp64 input). NaN and inf propagate as in
        ``torch.linalg.vector_norm``.
    """
    if scratch is None:
        return torch.linalg.vector_norm(_row_norms(flat, norm_type, ROW), norm_type)
    pieces = []
    for start in range(0, flat.numel(), CHUNK):
        piece = flat[start : start + CHUNK]
        wide = scratch[: piece.numel()]
        wide.copy_(piece)  # exact: every fp16/bf16 value is an fp32 value
        # One value per piece: the memory kept is numel / CHUNK values, whatever the size.
        pieces.append(torch.linalg.vector_norm(_row_norms(wide, norm_type, LOW_PRECISION_ROW), norm_type))
    return torch.linalg.vector_norm(torch.stack(pieces), norm_type)


class TorchOps(Ops):
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
        torch_kernels: bool = False,
    ):
        # process_group is handled by gradclip.torch.distributed.DistributedTorchOps, which
        # __new__ returns whenever one is given.
        self.inplace = inplace
        self.foreach = foreach
        self.caller = where
        #: Keep torch's own norm kernels on every device (no blocked or stacked CPU norms): the
        #: drop-ins of gradclip.torch.clip promise torch's results bit for bit.
        self.torch_kernels = torch_kernels
        # map with attrgetter: the layout test runs in C, not one Python frame per tensor.
        if set(map(_layout_of, arrays)) - _STRIDED:
            index, tensor = next((i, t) for i, t in enumerate(arrays) if t.layout is not torch.strided)
            raise SparseGradientError(
                f"{where}: gradient #{index} has layout {tensor.layout}; sparse gradients are not "
                "supported (use a dense embedding, or densify the gradient before clipping)"
            )
        self.device = arrays[0].device if len(arrays) else torch.device("cpu")
        # The accumulation dtype is found on first use (see acc): most clipping steps learn it
        # from the grouping for free instead of another pass over thousands of tensors.
        self._arrays = arrays
        self._acc: torch.dtype | None = None
        # (list, its tensors, groups) of the last _groups call: a clipper measures and then
        # scales the same list, and grouping 2,000 tensors costs as much as scaling them.
        self._grouping: tuple[list[Any], tuple[Any, ...], list[_Group]] | None = None

    @property
    def acc(self) -> torch.dtype:
        """fp64 when any gradient given at construction is fp64, else fp32."""
        if self._acc is None:
            wide = any(t.dtype == torch.float64 for t in self._arrays)
            self._acc = torch.float64 if wide else torch.float32
        return self._acc

    @acc.setter
    def acc(self, dtype: torch.dtype) -> None:
        self._acc = dtype

    # -- grouping ---------------------------------------------------------------------------
    def _groups(self, grads: list[torch.Tensor]) -> list[_Group]:
        """The gradients grouped by (device, dtype), with the kernel choice per group.

        Cached for the last list seen: a second call with the same list object holding the same
        tensors returns the same groups without regrouping.

        Raises:
            BackendError: ``foreach=True`` on a device without foreach kernels.
        """
        if not grads:
            # torch's grouping helper fails on an empty list; no tensors, no groups (reached by
            # clip_ on a module before backward(), which now gets a torch ClipInfo).
            return []
        cached = self._grouping
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
        self._grouping = (grads, tuple(grads), groups)
        if self._acc is None and grads is self._arrays:
            wide = any(group.dtype == torch.float64 for group in groups)
            self._acc = torch.float64 if wide else torch.float32
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
        # torch.isfinite is (x == x) & (x.abs() != inf): four kernels. |x| < inf is False for
        # NaN and ±inf alike, in two (each a launch on a GPU, on the clipping step's path).
        if x.is_floating_point():
            return torch.abs(x) < math.inf
        return torch.isfinite(x)

    def clip_coefficient(self, norm, threshold, eps=0.0):
        """:meth:`Ops.clip_coefficient` in five kernels instead of eight, bit for bit.

        The generic form guards the divisor with a ``where`` (NumPy warns on 1 / 0) and builds
        its 1 with a fill; torch computes the discarded branch harmlessly and takes the 1 as a
        Python number. ``threshold * (1 / d)`` is what the generic form computes too:
        ``1.0 / d`` is ``d.reciprocal() * 1.0`` in torch, exact.
        """
        above = norm > threshold
        return torch.where(above, torch.reciprocal(norm + eps).mul_(threshold), 1.0)

    def stack(self, xs):
        if len(xs) == 0:
            return torch.zeros((0,), dtype=self.acc, device=self.device)
        return torch.stack([x.to(self.device, non_blocking=True) for x in xs])

    def any(self, x):
        return torch.any(x)

    def to_host(self, x):
        return x.item()

    def array(self, value, dtype: str = "float32"):
        if self.device.type != "cuda":
            return torch.tensor(value, dtype=_DTYPES[dtype], device=self.device)
        # torch.tensor(..., device="cuda") copies from pageable memory, which waits for the
        # device; from pinned memory the copy is queued (torch keeps the pinned block alive
        # until it has run).
        host = torch.tensor(value, dtype=_DTYPES[dtype]).pin_memory()
        return host.to(self.device, non_blocking=True)

    def to_list(self, x):
        return x.detach().cpu().tolist()

    # -- multi-tensor -------------------------------------------------------------------------
    def norms(self, grads, norm_type):
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
        """Norms of one group's tensors, in the group's order, as one 1-D tensor on its device.

        On CPU with ``foreach=None``, large dense tensors take the blocked norm and small
        tensors sharing a shape are stacked and reduced row by row (see the module docstring);
        the rest, and every tensor elsewhere, take torch's own kernels.
        """
        acc = _accumulation_dtype(group.dtype)
        tensors = group.tensors
        if not (self.foreach is None and group.device.type == "cpu") or self.torch_kernels:
            return self._plain_norms(tensors, norm_type, acc, group.use_foreach, group.device)
        low = BLOCKED_MIN_NUMEL if group.dtype in _LOW_PRECISION else BLOCKED_MIN_NUMEL_WIDE
        large: list[tuple[int, torch.Tensor]] = []
        same_shape: dict[torch.Size, list[int]] = {}
        rest: list[int] = []
        for i, tensor in enumerate(tensors):
            numel = tensor.numel()  # metadata: no device read
            if numel >= low:
                flat = _flat_view(tensor)
                if flat is not None:
                    large.append((i, flat))
                    continue
            elif 0 < numel <= STACK_MAX_NUMEL and tensor.is_contiguous():
                # Contiguous only: torch reduces a strided tensor in memory order, and a stacked
                # copy in logical order would not give the same bits.
                same_shape.setdefault(tensor.shape, []).append(i)
                continue
            rest.append(i)
        for positions in [p for p in same_shape.values() if len(p) == 1]:
            rest.extend(positions)  # a shape of its own gains nothing from stacking
        stacks = [p for p in same_shape.values() if len(p) > 1]
        if not large and not stacks:
            return self._plain_norms(tensors, norm_type, acc, group.use_foreach, group.device)
        # (positions in the group, their norms as a 1-D tensor), assembled in order below.
        pieces: list[tuple[list[int], torch.Tensor]] = []
        if large:
            scratch = None
            if group.dtype in _LOW_PRECISION:
                size = min(CHUNK, max(flat.numel() for _, flat in large))
                scratch = torch.empty(size, dtype=torch.float32, device=group.device)
            norms = [_blocked_norm(flat, norm_type, scratch) for _, flat in large]
            pieces.append(([i for i, _ in large], torch.stack(norms)))
        for positions in stacks:
            per_tensor = tensors[positions[0]].numel()
            step = max(1, CHUNK // per_tensor)  # at most CHUNK elements copied at a time
            for start in range(0, len(positions), step):
                chunk = positions[start : start + step]
                # One expression: the stack is freed before the next one is made (one chunk of
                # extra memory at a time, not two).
                pieces.append((chunk, torch.linalg.vector_norm(
                    torch.stack([tensors[i] for i in chunk]).view(len(chunk), per_tensor),
                    norm_type, dim=1, dtype=acc)))
        if rest:
            rest.sort()
            norms = self._plain_norms([tensors[i] for i in rest], norm_type, acc, group.use_foreach, group.device)
            pieces.append((rest, norms))
        order = [i for positions, _ in pieces for i in positions]
        values = torch.cat([norms for _, norms in pieces])
        out = torch.empty(len(tensors), dtype=acc, device=group.device)
        return out.index_copy_(0, torch.tensor(order, dtype=torch.int64), values)

    @staticmethod
    def _plain_norms(tensors, norm_type, acc, use_foreach, device) -> torch.Tensor:
        """torch's own kernels (one foreach call, or ``vector_norm`` per tensor), as a 1-D tensor.

        torch raises for the inf-norm of an empty tensor (a max has no identity); it is defined
        as 0 here, as for every finite p and in the NumPy backend. ``numel()`` is metadata: no
        device read.
        """
        if norm_type == math.inf and any(t.numel() == 0 for t in tensors):
            # Rare: assembled from 0-d values, without an index tensor (a host-to-device copy).
            kept = [t for t in tensors if t.numel() > 0]
            found = iter(TorchOps._plain_norms(kept, norm_type, acc, use_foreach, device).unbind() if kept else ())
            zero = torch.zeros((), dtype=acc, device=device)
            return torch.stack([next(found) if t.numel() > 0 else zero for t in tensors])
        if use_foreach:
            return torch.stack(torch._foreach_norm(tensors, norm_type, dtype=acc))
        return torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors])

    def combine_norms(self, norms, norm_type):
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
        # Under no_grad (clip_) nothing records history: detaching would be one more operation
        # per tensor.
        detach = torch.is_grad_enabled()
        for tensor, kept in zip(arrays, axes):
            if detach:
                tensor = tensor.detach()
            acc = _accumulation_dtype(tensor.dtype)
            if kept is None:
                # The whole tensor, kept as (1,) * ndim: one reduction over every dimension.
                everything = tuple(range(tensor.dim())) or None
                out.append(torch.linalg.vector_norm(tensor, 2, dim=everything, keepdim=True, dtype=acc))
                continue
            reduce = tuple(d for d in range(tensor.dim()) if d not in kept)
            if not reduce:  # dim=() would mean "all dims" to some torch versions
                out.append(tensor.abs().to(acc))
                continue
            out.append(torch.linalg.vector_norm(tensor, 2, dim=reduce, keepdim=True, dtype=acc))
        return out

    def scale_units(self, grads, coefs):
        if self.inplace and grads and all(c.device == g.device for g, c in zip(grads, coefs)):
            # One call: torch loops over the pairs in C++ (the per-tensor path of the foreach
            # kernels broadcasts each coefficient over its tensor, in fp32 for fp16/bf16
            # gradients, exactly as mul_ does), instead of a Python dispatch per tensor.
            torch._foreach_mul_(list(grads), list(coefs))
            return list(grads)
        out = []
        for tensor, coef in zip(grads, coefs):
            coef = coef.to(tensor.device, non_blocking=True)
            if self.inplace:
                # In-place mul with an fp32 operand computes in fp32 and rounds once into the
                # gradient's dtype.
                out.append(tensor.mul_(coef))
            else:
                # Type promotion computes in the wider of the two (fp32 for fp16/bf16 gradients,
                # fp64 for fp64 ones) and rounds once into the gradient dtype.
                out.append((tensor * coef).to(tensor.dtype))
        return out

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

    def flat_concat(self, arrays):
        if not arrays:
            return torch.zeros((0,), dtype=self.acc, device=self.device)
        if all(a.device == self.device for a in arrays):
            # torch's C++ flatten-and-concatenate (DDP's bucketing helper): no Python per array.
            return torch._C._nn.flatten_dense_tensors(list(arrays))
        # On the first gradient's device, like every scalar here.
        return torch.cat([a.reshape(-1).to(self.device, non_blocking=True) for a in arrays])

    def split_as(self, vector, like):
        if all(a.device == vector.device for a in like):
            # flat_concat's inverse in C++ (DDP's bucketing helper): views of the vector in the
            # shapes of ``like``, without a Python view per array.
            return list(torch._C._nn.unflatten_dense_tensors(vector, list(like)))
        pieces = torch.split(vector, [a.numel() for a in like])
        return [piece.view(a.shape) for piece, a in zip(pieces, like)]

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
