"""Dtype facts every backend shares, read from the dtype's name (each framework spells its
floating dtypes with the same names: ``"torch.bfloat16"``, ``"<dtype: 'float16'>"``, NumPy's
``"float32"``). Re-exported by :mod:`gradclip._core.ops`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["accumulation", "dtype_label", "largest_finite"]

#: The largest finite value of each floating dtype, by name (every framework spells its dtypes
#: with these names: "torch.bfloat16", "<dtype: 'float16'>", numpy's "float32").
_LARGEST_FINITE = (
    ("bfloat16", 3.3895313892515355e38),  # before "float16", which it contains
    ("float16", 65504.0),
    ("float32", 3.4028234663852886e38),
    ("float64", 1.7976931348623157e308),
)


def dtype_label(dtype: Any) -> str:
    """A floating dtype of any framework by its plain name (``"bfloat16"``), else as printed."""
    text = str(dtype)
    return next((name for name, _ in _LARGEST_FINITE if name in text), text)


def largest_finite(dtype: Any) -> float:
    """The largest finite value of a floating ``dtype`` of any framework (fp64's if unknown)."""
    text = str(dtype)
    return next((value for name, value in _LARGEST_FINITE if name in text), _LARGEST_FINITE[-1][1])


def accumulation(x: Any) -> str:
    """The accumulation dtype's name for a value computed from gradients (a norm, a
    coefficient): ``"float64"`` when ``x`` is fp64 (fp64 gradients), else ``"float32"``
    (DESIGN.md rule 2). A Python number counts as fp32."""
    return "float64" if "float64" in str(getattr(x, "dtype", "")) else "float32"
