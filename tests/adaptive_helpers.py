"""Helpers shared by the tests of the adaptive and stateful clippers (tests/test_adaptive_*.py)."""

from __future__ import annotations

import copy
import importlib.util
import pathlib

import numpy as np

#: Shapes of a small model: a conv kernel, a linear weight, biases, a layer-norm gain.
SHAPES = [(6, 3, 3, 3), (6,), (10, 24), (10,), (4, 10), (4,)]


def grads_at(step: int, shapes=SHAPES, *, seed: int = 0, spikes=(), nan_steps=()) -> list[np.ndarray]:
    """Deterministic fp32 gradients for one step (the same in every process)."""
    rng = np.random.default_rng([seed, step])
    scale = 1.0 + 0.3 * np.sin(step / 5.0)
    if step in spikes:
        scale *= 25.0
    out = [(rng.normal(size=s) * scale).astype(np.float32) for s in shapes]
    if step in nan_steps:
        out[1][0] = np.nan
    return out


def torch_params(arrays, requires_grad: bool = True):
    """torch Parameters (zeros) whose ``.grad`` are copies of ``arrays``."""
    import torch

    params = []
    for a in arrays:
        p = torch.nn.Parameter(torch.zeros(a.shape, dtype=torch.float32), requires_grad=requires_grad)
        p.grad = torch.from_numpy(np.array(a, copy=True))
        params.append(p)
    return params


def to_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def snapshot(clipper) -> dict:
    """A deep copy of the clipper's checkpoint (to compare before/after)."""
    return copy.deepcopy(clipper.state_dict())


def load_timm_agc():
    """timm's ``timm/utils/agc.py`` loaded by file path (importing ``timm`` itself fails here)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "utils" / "agc.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location("timm_utils_agc", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# -- checkpoint / resume cases (run in this process and in fresh ones) ---------------------------
SPIKES = (20, 41)
NAN_STEPS = (12, 13, 44)


def checkpoint_cases() -> dict:
    """Every stateful configuration whose checkpoint must resume exactly."""
    import gradclip

    return {
        "autoclip": gradclip.AutoClip(),
        "autoclip_window": gradclip.AutoClip(percentile=25.0, history=16),
        "zclip": gradclip.ZClip(warmup_steps=10),
        "zclip_percentile": gradclip.ZClip(
            warmup_steps=5, mode="percentile", skip_update_on_spike=True, max_grad_norm=40.0
        ),
        "adagc": gradclip.AdaGC(start_clip_steps=10),
        "quantile_norm": gradclip.QuantileNorm(),
        "skip_on_spike": gradclip.SkipOnSpike(window=16, min_history=5, sigma=3.0),
        "non_finite": gradclip.NonFinite(max_consecutive=1),
        "subset_random_key": gradclip.Subset(gradclip.ZClip(warmup_steps=5), 0.5),
        "subset_tensor": gradclip.Subset(gradclip.AutoClip(history=8), 0.3, by="tensor", seed=7),
        "chain": gradclip.chain(gradclip.NonFinite("zero"), gradclip.AutoClip(history=10)),
        "agc": gradclip.AGC(clip_factor=0.1),
    }


def run_steps(clippers: dict, start: int, stop: int) -> dict:
    """Clip steps ``start..stop-1`` in place; return ``{name: [(threshold, skip, grads), ...]}``."""
    results: dict = {name: [] for name in clippers}
    for step in range(start, stop):
        for name, clipper in clippers.items():
            params = torch_params(grads_at(step, spikes=SPIKES, nan_steps=NAN_STEPS))
            for p in params:  # AGC clips relative to the weights: give them some
                p.data.add_(0.5)
            info = clipper.clip_(params).to_dict()
            results[name].append((info["threshold"], info["skip"], [to_np(p.grad).copy() for p in params]))
    return results


def load_zclip():
    """The ``zclip`` 1.0.0 package's ``ZClip`` class, or None when it is not installed.

    ``zclip`` imports Lightning when it is installed (for its optional Lightning callback),
    which costs seconds; the rule under test lives in ``zclip/zclip.py`` and needs only torch.
    So, unless Lightning is already loaded, that file is loaded by path with the optional
    import answered "not installed" (``zclip`` catches the ImportError itself).
    """
    import sys

    if "lightning" in sys.modules or "zclip.zclip" in sys.modules:
        try:
            from zclip.zclip import ZClip
        except ImportError:
            return None
        return ZClip
    spec = importlib.util.find_spec("zclip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "zclip.py"
    sys.modules["lightning"] = None  # makes `from lightning import ...` raise ImportError
    try:
        module_spec = importlib.util.spec_from_file_location("zclip_package_rule", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        del sys.modules["lightning"]
    return module.ZClip
