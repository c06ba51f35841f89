"""The torch backend's CPU norm fast paths (``foreach=None``, the default, on CPU).

**Blocked norms.** On CPU, ``torch._foreach_norm`` is a C++ loop over
``linalg.vector_norm``, whose whole-tensor reduction accumulates in a handful of SIMD lanes:
it does not gain from a second core, and its error grows with the length (2.7e-3 relative on
GPT-2's 38.6M-element embedding in fp32). Tensors of at least :data:`BLOCKED_MIN_NUMEL`
(fp16/bf16) or :data:`BLOCKED_MIN_NUMEL_WIDE` (fp32/fp64) elements laid out densely
(contiguous in some dimension order) are instead viewed as rows of :data:`ROW` elements,
reduced per row (rows are shared among the cores; each row's sum is accurate) and the row
norms combined. fp16/bf16 tensors are widened to fp32 :data:`CHUNK`
elements at a time into one scratch buffer and reduced there in rows of
:data:`LOW_PRECISION_ROW`: torch's upcasting reduction allocates a full fp32 copy of the
tensor on every call, whose page faults make bf16 slower per element than fp32. Smaller
tensors keep the one foreach call, whose cost per tensor is dispatch, not reading; tensors
with gaps (slices with steps) keep torch's kernel. CUDA keeps ``torch._foreach_norm`` (one
fused multi-tensor kernel). ``foreach=True`` and ``False`` keep torch's kernels, bit-for-bit
equal to ``torch.nn.utils.clip_grad_norm_``. A deviation from torch, by design: for fp32/fp64
tensors of :data:`BLOCKED_MIN_NUMEL_WIDE` elements and more, the default path's norms are not
bit-for-bit torch's but closer to the exact value (within 1e-6 relative of it, where torch's
own kernel drifts by up to 1e-3); smaller fp32/fp64 tensors are bit-for-bit torch's. The
drop-ins of :mod:`gradclip.torch.clip` keep torch's kernels throughout (their promise is
torch's results).

**Stacked norms of small tensors.** ``torch._foreach_norm`` on CPU dispatches one kernel
per tensor (about 1.5 us each), which for thousands of biases and norm weights costs more
than reading them. Small tensors (up to :data:`STACK_MAX_NUMEL` elements) that share a shape
are stacked, at most :data:`CHUNK` elements at a time, and reduced row by row in one call;
each row's norm is bit-for-bit what ``torch._foreach_norm`` gives for that tensor.

Extra memory stays O(number of tensors) in all but a sliver: the row norms of the one fp32
tensor being reduced (``numel / ROW`` values, 0.025% of its bytes, freed before the next
tensor), one value per :data:`CHUNK` elements for fp16/bf16, and a scratch buffer of at most
:data:`CHUNK` fp32 elements per call (4 MiB; allocated per call, so concurrent calls from
several threads never share it), or a stack of at most :data:`CHUNK` small-tensor elements.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BLOCKED_MIN_NUMEL",
    "BLOCKED_MIN_NUMEL_WIDE",
    "CHUNK",
    "LOW_PRECISION_ROW",
    "ROW",
    "STACK_MAX_NUMEL",
    "cpu_norms",
    "plain_norms",
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


def cpu_norms(tensors, dtype, device, norm_type, acc, use_foreach) -> torch.Tensor:
    """Norms of CPU tensors of one dtype, in order, as one 1-D ``acc`` tensor.

    Large dense tensors take the blocked norm and small tensors sharing a shape are stacked and
    reduced row by row (see the module docstring); the rest take torch's own kernels.
    """
    low = BLOCKED_MIN_NUMEL if dtype in _LOW_PRECISION else BLOCKED_MIN_NUMEL_WIDE
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
        return plain_norms(tensors, norm_type, acc, use_foreach, device)
    # (positions in the group, their norms as a 1-D tensor), assembled in order below.
    pieces: list[tuple[list[int], torch.Tensor]] = []
    if large:
        scratch = None
        if dtype in _LOW_PRECISION:
            size = min(CHUNK, max(flat.numel() for _, flat in large))
            scratch = torch.empty(size, dtype=torch.float32, device=device)
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
        norms = plain_norms([tensors[i] for i in rest], norm_type, acc, use_foreach, device)
        pieces.append((rest, norms))
    order = [i for positions, _ in pieces for i in positions]
    values = torch.cat([norms for _, norms in pieces])
    out = torch.empty(len(tensors), dtype=acc, device=device)
    return out.index_copy_(0, torch.tensor(order, dtype=torch.int64), values)


def plain_norms(tensors, norm_type, acc, use_foreach, device) -> torch.Tensor:
    """torch's own kernels (one foreach call, or ``vector_norm`` per tensor), as a 1-D tensor.

    torch raises for the inf-norm of an empty tensor (a max has no identity); it is defined
    as 0 here, as for every finite p and in the NumPy backend. ``numel()`` is metadata: no
    device read.
    """
    if norm_type == math.inf and any(t.numel() == 0 for t in tensors):
        # Rare: assembled from 0-d values, without an index tensor (a host-to-device copy).
        kept = [t for t in tensors if t.numel() > 0]
        found = iter(plain_norms(kept, norm_type, acc, use_foreach, device).unbind() if kept else ())
        zero = torch.zeros((), dtype=acc, device=device)
        return torch.stack([next(found) if t.numel() > 0 else zero for t in tensors])
    if use_foreach:
        return torch.stack(torch._foreach_norm(tensors, norm_type, dtype=acc))
    return torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in tensors])
