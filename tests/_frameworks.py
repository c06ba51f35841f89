"""Moving test arrays between NumPy, torch, TensorFlow and JAX, in any float dtype.

Every helper imports its framework lazily, so test modules that need only some frameworks can
still share this file. Arrays are described in float64 NumPy and converted to the backend and
dtype under test; results come back as float64 NumPy for comparison.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DTYPES", "BACKENDS", "numpy_dtype", "convert", "to64", "dtype_name", "tolerance"]

DTYPES = ["float16", "bfloat16", "float32", "float64"]
BACKENDS = ["numpy", "torch", "tensorflow", "jax"]

#: Relative tolerance per dtype for values computed through fp32 accumulation and rounded once
#: into the dtype: two units in the last place of the dtype (fp64: fp32-level for reductions
#: that XLA/Eigen may order differently).
_RTOL = {"float16": 2.0**-9, "bfloat16": 2.0**-6, "float32": 2e-6, "float64": 1e-12}


def numpy_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def convert(backend: str, array: np.ndarray, dtype: str):
    """A float64 NumPy array as an array of ``backend`` in ``dtype`` (a new copy)."""
    host = np.asarray(array, dtype=np.float64).astype(numpy_dtype(dtype))
    if backend == "numpy":
        return host.copy()
    if backend == "torch":
        import torch

        if dtype == "bfloat16":
            return torch.from_numpy(host.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(host.copy())
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.constant(host)
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.asarray(host)
    raise ValueError(backend)


def to64(x) -> np.ndarray:
    """Any framework's array (or a Python number) as a float64 NumPy array."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.double().numpy()
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # tf
        x = x.numpy()
    return np.asarray(x).astype(np.float64)


def dtype_name(x) -> str:
    """The dtype of any framework's array as a short name (``"float16"``, ``"bfloat16"``...)."""
    text = str(getattr(x, "dtype", type(x)))
    for name in ("bfloat16", "float16", "float32", "float64", "int64", "int32", "bool"):
        if name in text:
            return name
    return text


def tolerance(dtype: str) -> float:
    return _RTOL[dtype]
