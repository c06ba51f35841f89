"""What the NumPy and JAX backends share: the Ops written once against an array module.

:class:`ArrayApiOps` implements every primitive whose NumPy and ``jax.numpy`` spellings agree,
against the module in its ``xp`` attribute. A subclass sets ``xp`` and ``acc`` and provides only
what differs: how dtypes are named (:meth:`ArrayApiOps._dtype`), how a result lands in a gradient
(:meth:`ArrayApiOps._out`: NumPy writes in place, JAX arrays are immutable), floating-point
warnings (:meth:`ArrayApiOps._quiet`: NumPy's ``errstate``), its norms, its scaling, and its host
reads. The results are those each backend computed on its own, bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from gradclip._core.ops import Ops
from gradclip.backends._hashing import Words, hash_streams

__all__ = ["ArrayApiOps"]


class ArrayApiOps(Ops):
    """Ops over arrays of the module ``xp`` (NumPy or ``jax.numpy``)."""

    #: The array module.
    xp: Any = None
    #: The accumulation dtype: fp64 if any gradient is fp64, else fp32 (set by the constructor).
    acc: Any = None

    # -- what differs, for subclasses ---------------------------------------------------------
    def _dtype(self, name: str) -> Any:
        """The module's dtype for a dtype name."""
        return self.xp.dtype(name)

    def _out(self, grad: Any, result: Any) -> Any:
        """``result`` as the new value of ``grad`` (written into it when in place)."""
        raise NotImplementedError

    def _quiet(self) -> Any:
        """A context that silences floating-point warnings (overflow to inf, NaN)."""
        return contextlib.nullcontext()

    def _words(self) -> Words:
        """The 32-bit word operations of :func:`gradclip.backends._hashing.hash_streams`."""
        raise NotImplementedError

    # -- scalars ------------------------------------------------------------------------------
    def where(self, cond, a, b):
        return self.xp.where(cond, a, b)

    def minimum(self, a, b):
        return self.xp.minimum(a, b)

    def maximum(self, a, b):
        return self.xp.maximum(a, b)

    def sqrt(self, x):
        return self.xp.sqrt(x)

    def exp(self, x):
        return self.xp.exp(x)

    def log(self, x):
        return self.xp.log(x)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def stack(self, xs):
        xp = self.xp
        if len(xs) == 0:
            return xp.zeros((0,), self.acc)
        return xp.stack([xp.asarray(x) for x in xs])

    def any(self, x):
        return self.xp.any(x)

    # -- element-wise rewrites ------------------------------------------------------------------
    def zero_above(self, grads, threshold):
        xp = self.xp
        return [self._out(g, xp.where(xp.abs(g) > threshold, xp.zeros_like(g), g)) for g in grads]

    def sign_where(self, grads, magnitude, cond):
        xp = self.xp
        return [self._out(g, xp.where(cond, xp.sign(g) * xp.asarray(magnitude, g.dtype), g)) for g in grads]

    def zero_nonfinite(self, grads):
        xp = self.xp
        return [self._out(g, xp.where(xp.isfinite(g), g, xp.zeros_like(g))) for g in grads]

    def select(self, grads, replacements, masks):
        xp = self.xp
        return [self._out(g, xp.where(m, xp.asarray(r).astype(g.dtype), g)) for g, r, m in zip(grads, replacements, masks)]

    def write_back(self, targets, values):
        return [self._out(t, v) for t, v in zip(targets, values)]

    # -- per-tensor flags and extrema -----------------------------------------------------------
    def finite_each(self, grads):
        xp = self.xp
        if len(grads) == 0:
            return xp.zeros((0,), dtype=bool)
        return xp.stack([xp.all(xp.isfinite(g)) for g in grads])

    def extrema(self, grads):
        xp = self.xp
        if not grads:
            empty = xp.zeros((0,), xp.float32)
            return empty, empty
        highs, lows = [], []
        for g in grads:
            if g.size == 0:
                highs.append(xp.asarray(-math.inf, xp.float32))
                lows.append(xp.asarray(math.inf, xp.float32))
            else:
                values = xp.asarray(g).astype(xp.float32, copy=False)
                highs.append(xp.max(values))
                lows.append(xp.min(values))
        return xp.stack(highs), xp.stack(lows)

    def numel(self, grad):
        return int(self.xp.size(grad))

    # -- small-vector math --------------------------------------------------------------------
    def sum(self, x):
        xp = self.xp
        x = xp.asarray(x)
        if x.dtype == xp.bool_ or xp.issubdtype(x.dtype, xp.integer):
            return xp.asarray(xp.sum(x, dtype=self._dtype("int64")))
        return xp.asarray(xp.sum(x, dtype=x.dtype))

    def arange(self, n, dtype="int64"):
        return self.xp.arange(n, dtype=self._dtype(dtype))

    def cast(self, x, dtype):
        with self._quiet():
            return self.xp.asarray(x).astype(self._dtype(dtype))

    def floor(self, x):
        return self.xp.floor(x)

    def take(self, x, index):
        xp = self.xp
        return xp.asarray(x)[xp.asarray(index)]

    def cumsum(self, x):
        xp = self.xp
        x = xp.asarray(x)
        return xp.cumsum(x, dtype=x.dtype)

    # -- unit-wise and flat vectors -----------------------------------------------------------
    def unit_norms(self, arrays, axes):
        xp = self.xp
        out = []
        for array, kept in zip(arrays, axes):
            x = xp.asarray(array)
            acc = xp.float64 if x.dtype == xp.float64 else xp.float32
            values = x.astype(acc, copy=False)
            with self._quiet():
                if kept is None:
                    if x.size == 0:
                        out.append(xp.zeros((1,) * x.ndim, acc))
                    else:
                        out.append(xp.sqrt(xp.sum(values * values, keepdims=True)))
                    continue
                reduce = tuple(d for d in range(x.ndim) if d not in kept)
                if not reduce:
                    out.append(xp.abs(values))
                    continue
                out.append(xp.sqrt(xp.sum(values * values, axis=reduce, keepdims=True)))
        return out

    def flat_concat(self, arrays):
        xp = self.xp
        if not arrays:
            return xp.zeros((0,), self.acc)
        return xp.concatenate([xp.reshape(xp.asarray(a), (-1,)) for a in arrays])

    def split_as(self, vector, like):
        shapes = [self.xp.shape(a) for a in like]
        offsets, total = [], 0
        for shape in shapes[:-1]:  # Python ints: static under jax.jit
            total += math.prod(shape)
            offsets.append(total)
        return [piece.reshape(shape) for piece, shape in zip(self.xp.split(vector, offsets), shapes)]

    def uniform(self, key, counter, shapes):
        xp, words = self.xp, self._words()
        return [
            words.shr(h, 8).astype(xp.float32) * xp.float32(2.0**-24)
            for h in hash_streams(key, counter, shapes, words)
        ]
