"""The torch backend's scalar, small-vector and unit-wise primitives.

The part of :class:`~gradclip.backends.torch.TorchOps` that works on 0-d tensors, short vectors
(adaptive clippers' state) and unit-wise norms (AGC): everything except the grouped multi-tensor
kernels. Scalars are 0-d tensors on the gradients' device; nothing here reads a value on the
host except :meth:`TorchVectorOps.to_host`. Methods that read shards go through the Ops'
Reducer when it is distributed (attributes set by ``TorchOps.__init__``).
"""

from __future__ import annotations

import math

import torch

from gradclip._core.ops import Ops
from gradclip.backends._hashing import Int64Words, hash_streams

__all__ = ["TorchVectorOps"]

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bool": torch.bool,
    "int32": torch.int32,
    "int64": torch.int64,
}


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Constants handed out by ``scalar`` and ``arange`` (thresholds, 0, 1, inf, False, index
#: vectors), by value, dtype and device (and CUDA stream): on a GPU every ``torch.full`` and
#: ``torch.arange`` is a kernel launch on the clipping step's path, so each is made once. Nothing
#: in gradclip writes into them; a tensor found written to (its version counter moved) is
#: replaced, so later callers never see the change. Bounded: a scheduled threshold is a new
#: value every step.
_CONSTANTS: dict[tuple, torch.Tensor] = {}
_MAX_CONSTANTS = 512
_SHAREABLE_TYPES = (bool, int, float)


def _constant(key: tuple, device: torch.device, make) -> torch.Tensor:
    cached = _CONSTANTS.get(key)
    if cached is not None and cached._version == 0:
        return cached
    # Made during a CUDA graph capture, a tensor lives in the graph's private pool: not shared.
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return make()
    if len(_CONSTANTS) >= _MAX_CONSTANTS:
        _CONSTANTS.clear()
    value = _CONSTANTS[key] = make()
    return value


def _stream(device: torch.device) -> int | None:
    # A constant made on one CUDA stream and read on another could be read before it is filled.
    return torch.cuda.current_stream(device).stream_id if device.type == "cuda" else None


def _dtype_name(dtype: torch.dtype) -> str:
    return "float64" if dtype == torch.float64 else "float32"


class TorchVectorOps(Ops):
    """Scalars, small vectors and unit-wise primitives over ``torch.Tensor`` (a base of
    ``TorchOps``, which sets ``device``, ``inplace``, ``acc``, ``distributed``, ``reducer``)."""

    def _shares_constants(self) -> bool:
        # Not while dynamo traces (constants of a graph are its own), not where autograd records
        # (a shared tensor saved for backward by one graph is another's input), not across
        # processes (a reducer may write its inputs).
        return not (self.traced or self.distributed or torch.is_grad_enabled())

    def scalar(self, value, dtype: str = "float32"):
        # torch.full launches a fill kernel; torch.tensor(value, device=cuda) would copy from host.
        torch_dtype, device = _DTYPES[dtype], self.device
        if type(value) not in _SHAREABLE_TYPES or not self._shares_constants():
            return torch.full((), value, dtype=torch_dtype, device=device)
        # repr: -0.0 and 0.0 are equal keys otherwise, NaN never equal to itself.
        key = ("scalar", repr(value), dtype, device, _stream(device))
        return _constant(key, device, lambda: torch.full((), value, dtype=torch_dtype, device=device))

    def _one(self, dtype: str = "float32"):
        """A 0-d 1 of ``dtype``, shared where constants are (see :func:`_constant`)."""
        return self.scalar(1.0, dtype)

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

    def finite_norm(self, norm):
        # A norm is >= 0 or NaN: one comparison tells NaN and +inf from the rest.
        return norm < math.inf

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
        return torch.where(above, torch.reciprocal(norm + eps).mul_(threshold), self._one(_dtype_name(norm.dtype)))

    def count_up(self, counter, flag):
        # int64 + bool promotes to int64: one kernel, no cast.
        return torch.add(counter, flag)

    def abs(self, x):
        return torch.abs(x)

    def clamp_values(self, x, low, high):
        # min(max(x, low), high), as torch.clamp defines it: one kernel instead of two.
        return torch.clamp(x, low, high)

    def ratio_or_one(self, cond, num, den):
        # The discarded quotients (x / 0, inf / inf) are computed harmlessly: no guard needed.
        return torch.where(cond, num / den, self._one(_dtype_name(num.dtype)))

    def count_at_most(self, ascending, values):
        return torch.searchsorted(ascending, values, right=True)

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

    def sum(self, x):
        if x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex()):
            return torch.sum(x, dtype=torch.int64)
        return torch.sum(x)

    def arange(self, n, dtype="int64"):
        torch_dtype, device = _DTYPES[dtype], self.device
        if not self._shares_constants():
            return torch.arange(n, dtype=torch_dtype, device=device)
        key = ("arange", n, dtype, device, _stream(device))
        return _constant(key, device, lambda: torch.arange(n, dtype=torch_dtype, device=device))

    def cast(self, x, dtype):
        return x.to(_DTYPES[dtype])

    def floor(self, x):
        return torch.floor(x)

    def sort(self, x):
        return torch.sort(x, stable=True).values

    def take(self, x, index):
        # Not x[index]: indexing with a 0-d integer tensor reads it on the host (.item() in
        # C++). torch.take gathers on the device; inductor's decomposition of take specializes
        # on the index value, so a traced call gathers with index_select instead.
        if self.traced:
            return torch.index_select(x, 0, index.reshape(-1)).reshape(index.shape)
        return torch.take(x, index)

    def cumsum(self, x):
        return torch.cumsum(x, 0, dtype=x.dtype)

    def unit_norms(self, arrays, axes):
        if self.distributed:
            return self.reducer.unit_norms(self, arrays, axes)
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
        if self.distributed:
            return self.reducer.map(
                self, grads, lambda ls: self._twin.scale_units(ls, coefs), linear=True, operation="scale_units"
            )
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
        words = Int64Words(lambda n: torch.arange(n, dtype=torch.int64, device=self.device))
        return [(h >> 8).to(torch.float32) * (2.0**-24) for h in hash_streams(key, counter, shapes, words)]

    def unit_totals(self, values, arrays, axes):
        if self.distributed:
            return self.reducer.unit_totals(self, values, arrays, axes)
        return [torch.sum(v) for v in values]
