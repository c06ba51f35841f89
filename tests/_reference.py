"""Plain NumPy float64 reference implementations of every stateless clipping method.

Written from the formulas in API.md / the seed articles, independently of gradclip's code, so the
library can be checked against them. Every function takes a list of arrays (any float dtype) and
returns a list of float64 arrays; none modifies its input.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "as64",
    "ref_norm_of",
    "ref_global_norm",
    "ref_value",
    "ref_global_clip",
    "ref_per_tensor",
    "ref_norm",
    "ref_average_norm",
    "ref_block_rms",
    "ref_norm_sign",
    "ref_zero_outliers",
    "to_numpy",
]


def to_numpy(x) -> np.ndarray:
    """Any array (NumPy, torch, 0-d) as a float64 NumPy array, without importing torch."""
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.double().numpy()
    return np.asarray(x, dtype=np.float64)


def as64(grads) -> list[np.ndarray]:
    return [to_numpy(g) for g in grads]


def ref_norm_of(array: np.ndarray, p: float) -> float:
    """The p-norm of one array's elements, in float64 (0 for an empty array)."""
    values = np.abs(np.asarray(array, dtype=np.float64).reshape(-1))
    if values.size == 0:
        return 0.0
    if p == math.inf:
        return float(values.max())
    return float(np.sum(values**p) ** (1.0 / p))


def ref_global_norm(grads, p: float = 2.0) -> float:
    """The p-norm of all elements of all arrays together."""
    grads = as64(grads)
    if not grads:
        return 0.0
    return ref_norm_of(np.concatenate([g.reshape(-1) for g in grads]), p)


def ref_value(grads, low: float, high: float):
    """seed 000 / 002 / 003: element-wise clamp into [low, high]."""
    return [np.clip(g, low, high) for g in as64(grads)]


def ref_global_clip(grads, max_norm: float, p: float = 2.0, eps: float = 1e-6):
    """seed 001: g * max_norm / (norm + eps) when norm > max_norm, else g unchanged."""
    grads = as64(grads)
    norm = ref_global_norm(grads, p)
    coef = max_norm / (norm + eps) if norm > max_norm else 1.0
    return [g * coef for g in grads], norm, coef


def ref_per_tensor(grads, threshold: float, divisor, p: float = 2.0):
    """Per-tensor clipping on the statistic ``norm_p(g) / divisor(n)``."""
    out = []
    for g in as64(grads):
        n = g.size
        stat = ref_norm_of(g, p) / divisor(n) if n else 0.0
        out.append(g * (threshold / stat) if stat > threshold else g.copy())
    return out


def ref_norm(grads, max_norm: float, p: float = 2.0):
    """tf.clip_by_norm per tensor."""
    return ref_per_tensor(grads, max_norm, lambda n: 1.0, p)


def ref_average_norm(grads, max_norm: float):
    """tf.clip_by_average_norm per tensor: ||g|| / n <= max_norm."""
    return ref_per_tensor(grads, max_norm, lambda n: float(n))


def ref_block_rms(grads, threshold: float):
    """optax.clip_by_block_rms: ||g|| / sqrt(n) <= threshold."""
    return ref_per_tensor(grads, threshold, lambda n: math.sqrt(n))


def ref_norm_sign(grads, eps: float):
    """seed 001 formula (2): eps * sign(g) if ||g||_2 > eps, else g."""
    grads = as64(grads)
    if ref_global_norm(grads, 2.0) > eps:
        return [eps * np.sign(g) for g in grads]
    return [g.copy() for g in grads]


def ref_zero_outliers(grads, threshold: float):
    """seed 004: g <- 0 where |g| > threshold."""
    return [np.where(np.abs(g) > threshold, 0.0, g) for g in as64(grads)]
