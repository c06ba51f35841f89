"""NumPy backend: the reference implementation of the Ops protocol.

Plain NumPy on the CPU. It is also the reference the other backends are tested against, so it
favours clarity; it is still vectorised per tensor. Low-precision inputs (float16, and
``ml_dtypes.bfloat16`` where installed) are upcast to float32 for every reduction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradclip._core.errors import BackendError, ReadOnlyArrayError
from gradclip.backends._array_api import ArrayApiOps
from gradclip.backends._hashing import Int64Words

__all__ = ["BACKEND", "NumpyOps"]


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


class NumpyOps(ArrayApiOps):
    """Ops over lists of ``numpy.ndarray``."""

    name = "numpy"
    #: NumPy follows torch's output-major weight layout for AGC (see ``Ops.unit_axis``).
    unit_axis = 0
    xp = np

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
        self.acc = np.dtype(np.float64) if any(
            getattr(a, "dtype", None) == np.float64 for a in arrays
        ) else np.dtype(np.float32)

    def _quiet(self):
        return np.errstate(over="ignore", invalid="ignore")

    def _words(self):
        return Int64Words(lambda n: np.arange(n, dtype=np.int64))

    # -- scalars ------------------------------------------------------------------------------
    def scalar(self, value, dtype: str = "float32"):
        return np.asarray(value, dtype=np.dtype(dtype))

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
            [self._norm(g, norm_type).astype(self.acc) for g in grads], dtype=self.acc
        ).reshape(len(grads))

    def combine_norms(self, norms, norm_type):
        norms = np.asarray(norms, dtype=self.acc)
        if norms.size == 0:
            return np.zeros((), self.acc)
        with np.errstate(over="ignore", invalid="ignore"):
            if norm_type == math.inf:
                return np.asarray(norms.max(), self.acc)
            if norm_type == 2.0:
                return np.asarray(np.sqrt(np.dot(norms, norms)), self.acc)
            return np.asarray(np.sum(norms**norm_type) ** (1.0 / norm_type), self.acc)

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
                out.append(self._out(g, g.astype(self.acc, copy=False) * coef))
        return out

    def scale_each(self, grads, coefs):
        out = []
        for g, c in zip(grads, np.asarray(coefs)):
            with np.errstate(invalid="ignore", over="ignore"):
                out.append(self._out(g, g.astype(self.acc, copy=False) * c))
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

    # -- small-vector math for adaptive state -------------------------------------------------
    def sort(self, x):
        return np.sort(np.asarray(x), kind="stable")

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

    def scale_units(self, grads, coefs):
        out = []
        for g, c in zip(grads, coefs):
            with np.errstate(invalid="ignore", over="ignore"):
                out.append(self._out(g, g.astype(self.acc, copy=False) * c))
        return out


BACKEND = NumpyOps
