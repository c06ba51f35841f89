"""NumPy backend: the reference implementation of the Ops protocol.

Plain NumPy on the CPU. It is also the reference the other backends are tested against, so it
favours clarity; it is still vectorised per tensor. Low-precision inputs (float16, and
``ml_dtypes.bfloat16`` where installed) are upcast to float32 for every reduction.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradclip._core.errors import BackendError, ReadOnlyArrayError
from gradclip._core.ops import Ops
from gradclip.backends._hashing import Int64Words, hash_streams

__all__ = ["NumpyOps", "BACKEND"]


def _accumulation_dtype(array: np.ndarray) -> np.dtype:
    # fp64 gradients keep fp64; everything narrower accumulates in fp32 (DESIGN.md rule 2).
    return np.dtype(np.float64) if array.dtype == np.float64 else np.dtype(np.float32)


def _check_writeable(arrays: Sequence[np.ndarray], where: str) -> None:
    """Refuse read-only arrays before an in-place call writes anything.

    The primitives write array by array, so without this check a read-only array in second
    place would leave the first one clipped and the call failing half-way through with NumPy's
    bare ``ValueError: assignment destination is read-only``.

    Raises:
        ReadOnlyArrayError: Some arrays are read-only; the message gives their positions.
    """
    frozen = [index for index, array in enumerate(arrays) if not array.flags.writeable]
    if frozen:
        # Positions count the arrays written (None entries left out); shape and dtype help to
        # find the array in a dict or a long list.
        shown = ", ".join(f"#{i} (shape {arrays[i].shape}, {arrays[i].dtype})" for i in frozen)
        raise ReadOnlyArrayError(
            f"{where}: cannot write in place into read-only array(s) {shown} of the "
            f"{len(arrays)} array(s) to write; nothing was changed. Pass writeable arrays "
            "(e.g. array.copy())"
        )


class NumpyOps(Ops):
    """Ops over lists of ``numpy.ndarray``."""

    name = "numpy"
    #: NumPy follows torch's output-major weight layout for AGC (see ``Ops.unit_axis``).
    unit_axis = 0

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
    ):
        del foreach  # NumPy has no multi-tensor kernels; the flag only matters for torch.
        self.inplace = inplace
        self.caller = where
        for index, array in enumerate(arrays):
            if not isinstance(array, np.ndarray):
                # NumPy scalars (np.float32(3.0)) cannot be written in place; ask for an array.
                raise BackendError(
                    f"{where}: gradient #{index} is a {type(array).__name__}, not a numpy.ndarray"
                    " (wrap scalars with numpy.asarray)"
                )
        if inplace:
            _check_writeable(arrays, where)
        self._acc = np.dtype(np.float64) if any(
            getattr(a, "dtype", None) == np.float64 for a in arrays
        ) else np.dtype(np.float32)

    def context(self):
        """Nothing to guard: NumPy has no autograd."""
        return contextlib.nullcontext()

    # -- scalars ------------------------------------------------------------------------------
    def scalar(self, value, dtype: str = "float32"):
        return np.asarray(value, dtype=np.dtype(dtype))

    def where(self, cond, a, b):
        return np.where(cond, a, b)

    def minimum(self, a, b):
        return np.minimum(a, b)

    def maximum(self, a, b):
        return np.maximum(a, b)

    def sqrt(self, x):
        return np.sqrt(x)

    def exp(self, x):
        return np.exp(x)

    def log(self, x):
        return np.log(x)

    def isfinite(self, x):
        return np.isfinite(x)

    def stack(self, xs):
        return np.stack([np.asarray(x) for x in xs]) if len(xs) else np.zeros((0,), self._acc)

    def any(self, x):
        return np.any(x)

    def to_host(self, x):
        return np.asarray(x).item()

    def array(self, value, dtype: str = "float32"):
        return np.array(value, dtype=np.dtype(dtype))

    def to_list(self, x):
        return np.asarray(x).tolist()

    # -- multi-tensor ---------------------------------------------------------------------
    def _norm(self, array: np.ndarray, norm_type: float) -> np.ndarray:
        flat = np.asarray(array).reshape(-1)
        acc = _accumulation_dtype(flat)
        if flat.size == 0:
            return np.zeros((), acc)
        values = np.abs(flat.astype(acc, copy=False))
        with np.errstate(over="ignore", invalid="ignore"):
            if norm_type == math.inf:
                return np.asarray(values.max(), acc)
            if norm_type == 2.0:
                return np.asarray(np.sqrt(np.dot(values, values)), acc)
            if norm_type == 1.0:
                return np.asarray(values.sum(dtype=acc), acc)
            return np.asarray(np.sum(values**norm_type, dtype=acc) ** (1.0 / norm_type), acc)

    def norms(self, grads, norm_type):
        return np.asarray(
            [self._norm(g, norm_type).astype(self._acc) for g in grads], dtype=self._acc
        ).reshape(len(grads))

    def combine_norms(self, norms, norm_type):
        norms = np.asarray(norms, dtype=self._acc)
        if norms.size == 0:
            return np.zeros((), self._acc)
        with np.errstate(over="ignore", invalid="ignore"):
            if norm_type == math.inf:
                return np.asarray(norms.max(), self._acc)
            if norm_type == 2.0:
                return np.asarray(np.sqrt(np.dot(norms, norms)), self._acc)
            return np.asarray(np.sum(norms**norm_type) ** (1.0 / norm_type), self._acc)

    def global_norm(self, grads, norm_type):
        return self.combine_norms(self.norms(grads, norm_type), norm_type)

    def _out(self, grad: np.ndarray, result: np.ndarray) -> np.ndarray:
        result = np.asarray(result).astype(grad.dtype, copy=False)
        if self.inplace:
            grad[...] = result
            return grad
        return result

    def scale(self, grads, coef):
        # Multiply in the accumulation dtype and round once into the gradient dtype, as torch's
        # foreach kernels do for low-precision tensors.
        out = []
        for g in grads:
            with np.errstate(invalid="ignore", over="ignore"):
                out.append(self._out(g, g.astype(self._acc, copy=False) * coef))
        return out

    def scale_each(self, grads, coefs):
        out = []
        for g, c in zip(grads, np.asarray(coefs)):
            with np.errstate(invalid="ignore", over="ignore"):
                out.append(self._out(g, g.astype(self._acc, copy=False) * c))
        return out

    def clamp(self, grads, low, high):
        out = []
        for g in grads:
            if self.inplace:
                np.clip(g, low, high, out=g)
                out.append(g)
            else:
                # Through _out: np.clip of a 0-d array returns a NumPy scalar, which the next
                # clipper of a chain (an out-of-place Ops) refuses as "not an ndarray".
                out.append(self._out(g, np.clip(g, low, high)))
        return out

    def zero_above(self, grads, threshold):
        return [self._out(g, np.where(np.abs(g) > threshold, np.zeros_like(g), g)) for g in grads]

    def sign_where(self, grads, magnitude, cond):
        return [
            self._out(g, np.where(cond, (magnitude * np.sign(g)).astype(g.dtype), g)) for g in grads
        ]

    def zero_nonfinite(self, grads):
        return [self._out(g, np.where(np.isfinite(g), g, np.zeros_like(g))) for g in grads]

    def finite_each(self, grads):
        return np.asarray([bool(np.isfinite(g).all()) for g in grads], dtype=bool).reshape(len(grads))

    def extrema(self, grads):
        highs, lows = [], []
        for g in grads:
            if g.size == 0:
                highs.append(-np.inf)
                lows.append(np.inf)
            else:
                values = np.asarray(g).astype(np.float32, copy=False)
                highs.append(values.max())
                lows.append(values.min())
        return np.asarray(highs, np.float32).reshape(len(grads)), np.asarray(lows, np.float32).reshape(
            len(grads)
        )

    def numel(self, grad):
        return int(np.size(grad))

    # -- small-vector math for adaptive state -------------------------------------------------
    def sum(self, x):
        x = np.asarray(x)
        if x.dtype == np.bool_ or np.issubdtype(x.dtype, np.integer):
            return np.asarray(x.sum(dtype=np.int64))
        return np.asarray(x.sum(dtype=x.dtype))

    def arange(self, n, dtype="int64"):
        return np.arange(n, dtype=np.dtype(dtype))

    def cast(self, x, dtype):
        with np.errstate(invalid="ignore", over="ignore"):
            return np.asarray(x).astype(np.dtype(dtype))

    def floor(self, x):
        return np.floor(x)

    def sort(self, x):
        return np.sort(np.asarray(x), kind="stable")

    def take(self, x, index):
        return np.asarray(x)[np.asarray(index)]

    def cumsum(self, x):
        x = np.asarray(x)
        return np.cumsum(x, dtype=x.dtype)

    def version_token(self, grads):
        # NumPy arrays have no version counter; a XOR of their 64-bit words changes with any
        # realistic write (new gradients) and costs one fast read pass, on the host (no device).
        token = []
        for g in grads:
            raw = np.ascontiguousarray(g).reshape(-1).view(np.uint8)
            whole = raw.size // 8 * 8
            words = np.bitwise_xor.reduce(raw[:whole].view(np.uint64)) if whole else np.uint64(0)
            tail = bytes(raw[whole:])
            token.append((g.shape, str(g.dtype), int(words), tail))
        return tuple(token)

    def unit_norms(self, arrays, axes):
        out = []
        for array, kept in zip(arrays, axes):
            x = np.asarray(array)
            values = x.astype(_accumulation_dtype(x), copy=False)
            with np.errstate(over="ignore", invalid="ignore"):
                if kept is None:
                    squares = np.sum(values * values, keepdims=True) if x.size else np.zeros((1,) * x.ndim)
                    out.append(np.sqrt(np.asarray(squares, values.dtype)))
                    continue
                reduce = tuple(d for d in range(x.ndim) if d not in kept)
                if not reduce:
                    out.append(np.abs(values))
                    continue
                out.append(np.sqrt(np.sum(values * values, axis=reduce, keepdims=True)))
        return out

    def scale_units(self, grads, coefs):
        out = []
        for g, c in zip(grads, coefs):
            with np.errstate(invalid="ignore", over="ignore"):
                out.append(self._out(g, g.astype(self._acc, copy=False) * c))
        return out

    def write_back(self, targets, values):
        return [self._out(t, v) for t, v in zip(targets, values)]

    def flat_concat(self, arrays):
        if not arrays:
            return np.zeros((0,), self._acc)
        return np.concatenate([np.asarray(a).reshape(-1) for a in arrays])

    def split_as(self, vector, like):
        shapes = [np.shape(a) for a in like]
        offsets = np.cumsum([math.prod(shape) for shape in shapes])[:-1]
        return [piece.reshape(shape) for piece, shape in zip(np.split(vector, offsets), shapes)]

    def uniform(self, key, counter, shapes):
        return [
            (h >> np.int64(8)).astype(np.float32) * np.float32(2.0**-24)
            for h in hash_streams(key, counter, shapes, Int64Words(lambda n: np.arange(n, dtype=np.int64)))
        ]

    def select(self, grads, replacements, masks):
        return [self._out(g, np.where(m, r, g)) for g, r, m in zip(grads, replacements, masks)]


BACKEND = NumpyOps
