"""Shared fixtures for the gradclip test suite (add new fixtures below; keep existing ones)."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded NumPy generator, fresh for each test."""
    return np.random.default_rng(20240607)


@pytest.fixture
def make_torch_params():
    """Factory: ``make_torch_params(grads)`` -> torch Parameters whose ``.grad`` are copies of ``grads``.

    ``grads`` may hold NumPy arrays or torch tensors; ``dtype`` (a torch dtype) converts them.
    Skips the test when torch is not installed.
    """
    torch = pytest.importorskip("torch", reason="torch is needed for in-place clipping of .grad")

    def make(grads, dtype=None):
        params = []
        for g in grads:
            t = g.detach().clone() if isinstance(g, torch.Tensor) else torch.from_numpy(np.array(g))
            if dtype is not None:
                t = t.to(dtype)
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t
            params.append(p)
        return params

    return make
