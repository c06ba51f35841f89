"""The counter-based random numbers behind ``Ops.uniform``, written once for every backend.

Element ``j`` (row-major) of shape ``i`` gets the hash ``h = m(t_i ^ j)``, in 32-bit unsigned
arithmetic, with ``m(x) = lowbias32(x)`` (``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
x *= 0x846CA68B; x ^= x >> 16``), ``s = m(m(key_lo ^ m(key_hi)) ^ m(counter_lo ^ m(counter_hi)))``
and ``t_i = m(s ^ m(i + 0x9E3779B9))``; ``Ops.uniform`` returns ``(h >> 8) * 2**-24``.

The hash (see ``Ops.uniform`` for the formula) is written against :class:`Words`, a tiny set of
operations on arrays of 32-bit words: xor, right shift, multiplication modulo 2**32, a constant,
``[0, n)``, the two halves of a 64-bit integer, and reshape. Two implementations cover every
framework, and give bit-identical numbers:

* :class:`Int64Words` keeps words in ``[0, 2**32)`` in int64 arrays with Python's operators
  (NumPy, torch). Products are split at 16 bits so that no intermediate exceeds 2**48: signed
  int64 overflow is undefined behaviour in C++ kernels, so it is never relied on.
* :class:`Uint32Words` (in the JAX and TensorFlow backends) holds them in uint32 arrays, whose
  multiplication wraps modulo 2**32: JAX has int64 only with x64 enabled, and TensorFlow's
  operators on unsigned integers are functions of ``tf.bitwise``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Int64Words", "Words", "hash_streams", "lowbias32"]

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9


class Words:
    """Operations on arrays of 32-bit words, what :func:`lowbias32` and :func:`hash_streams`
    need from a framework."""

    def xor(self, a: Any, b: Any) -> Any:
        raise NotImplementedError

    def shr(self, x: Any, bits: int) -> Any:
        raise NotImplementedError

    def mul(self, x: Any, constant: int) -> Any:
        """``(x * constant) mod 2**32``."""
        raise NotImplementedError

    def const(self, value: int, like: Any) -> Any:
        """The word ``value`` (in ``[0, 2**32)``) as an array on ``like``'s device."""
        raise NotImplementedError

    def index(self, n: int) -> Any:
        """The words ``[0, n)``."""
        raise NotImplementedError

    def halves(self, x: Any) -> tuple[Any, Any]:
        """A non-negative integer array as its (low, high) 32-bit words."""
        raise NotImplementedError

    def reshape(self, x: Any, shape: tuple[int, ...]) -> Any:
        return x.reshape(shape)


class Int64Words(Words):
    """Words in ``[0, 2**32)`` held in int64 arrays (NumPy, torch).

    Args:
        arange: ``arange(n)`` giving int64 ``[0, n)`` on the target device.
    """

    def __init__(self, arange: Callable[[int], Any]):
        self._arange = arange

    def xor(self, a, b):
        return a ^ b

    def shr(self, x, bits):
        return x >> bits

    def mul(self, x, constant):
        low = x & 0xFFFF
        high = x >> 16
        return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & MASK32

    def const(self, value, like):
        return like * 0 + value  # on like's device, without a host-to-device copy

    def index(self, n):
        return self._arange(n) & MASK32

    def halves(self, x):
        return x & MASK32, (x >> 32) & MASK32


def lowbias32(x: Any, words: Words) -> Any:
    """Chris Wellons' "lowbias32" integer hash (full avalanche in 32 bits)."""
    x = words.xor(x, words.shr(x, 16))
    x = words.mul(x, 0x7FEB352D)
    x = words.xor(x, words.shr(x, 15))
    x = words.mul(x, 0x846CA68B)
    return words.xor(x, words.shr(x, 16))


def hash_streams(key: Any, counter: Any, shapes: Sequence[tuple[int, ...]], words: Words) -> list[Any]:
    """One array of 32-bit hashes per shape (see ``Ops.uniform`` for the formula).

    Args:
        key, counter: Integer 0-d arrays >= 0 on the target device.
        shapes: The output shapes.
        words: The framework's word operations.
    """
    w = words

    def m(x):
        return lowbias32(x, w)

    key_lo, key_hi = w.halves(key)
    counter_lo, counter_hi = w.halves(counter)
    s = m(w.xor(m(w.xor(key_lo, m(key_hi))), m(w.xor(counter_lo, m(counter_hi)))))
    out = []
    for position, shape in enumerate(shapes):
        count = 1
        for size in shape:
            count *= int(size)
        t = m(w.xor(s, m(w.const((position + GOLDEN) & MASK32, s))))
        h = m(w.xor(t, w.index(count)))
        out.append(w.reshape(h, tuple(int(d) for d in shape)))
    return out
