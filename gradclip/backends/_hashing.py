"""The counter-based random numbers behind ``Ops.uniform``, written once for every backend.

Integer arithmetic only (``&``, ``^``, ``>>``, ``<<``, ``*``, ``+`` on int64 arrays), which NumPy,
torch and JAX arrays all support with the same meaning, so every backend that uses this module
produces bit-identical numbers. Values stay in ``[0, 2**32)``; products are split at 16 bits so
that no intermediate exceeds 2**48 (signed int64 overflow is undefined behaviour in C++ kernels,
so it is never relied on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["hash_streams", "lowbias32"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: Any, constant: int) -> Any:
    """``(x * constant) mod 2**32`` for int64 ``x`` in ``[0, 2**32)``."""
    low = x & 0xFFFF
    high = x >> 16
    return (low * constant + ((high * (constant & 0xFFFF)) << 16)) & _MASK32


def lowbias32(x: Any) -> Any:
    """Chris Wellons' "lowbias32" integer hash (full avalanche in 32 bits) on int64 arrays."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash_streams(
    key: Any, counter: Any, shapes: Sequence[tuple[int, ...]], arange: Callable[[int], Any]
) -> list[Any]:
    """One int64 array of 32-bit hashes per shape (see ``Ops.uniform`` for the formula).

    Args:
        key, counter: int64 0-d arrays >= 0 on the target device.
        shapes: The output shapes.
        arange: ``arange(n)`` giving int64 ``[0, n)`` on the same device.
    """
    m = lowbias32
    seed = m((key & _MASK32) ^ m((key >> 32) & _MASK32))
    step = m((counter & _MASK32) ^ m((counter >> 32) & _MASK32))
    s = m(seed ^ step)
    out = []
    for position, shape in enumerate(shapes):
        count = 1
        for size in shape:
            count *= int(size)
        # s * 0 + c builds the constant on s's device without a host-to-device copy.
        t = m(s ^ m(s * 0 + ((position + _GOLDEN) & _MASK32)))
        h = m(t ^ (arange(count) & _MASK32))
        out.append(h.reshape(tuple(int(d) for d in shape)))
    return out
