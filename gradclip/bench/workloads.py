"""What the benchmark suites run on besides the clock: model shapes, operation counts, peak memory,
and timm's AGC as a reference.

Every function here is independent of the harness's timing: shapes are pure data, and the
probes measure one call of a step function (after one warm-up call, so lazily created state is
not counted as per-step cost).
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["gpt2_small_shapes", "resnet50_shapes"]


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M parameters, 148 tensors), HF Conv1D layout."""
    shapes: list[tuple[int, ...]] = [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [
            (768,), (768,),                  # ln_1
            (768, 2304), (2304,),            # attn.c_attn
            (768, 768), (768,),              # attn.c_proj
            (768,), (768,),                  # ln_2
            (768, 3072), (3072,),            # mlp.c_fc
            (3072, 768), (768,),             # mlp.c_proj
        ]
    return shapes + [(768,), (768,)]         # ln_f


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet-50 (25.6M parameters, 161 tensors)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            out = width * 4
            shapes += [(width, in_channels, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out, width, 1, 1), (out,), (out,)]
            if block == 0:
                shapes += [(out, in_channels, 1, 1), (out,), (out,)]
            in_channels = out
    return shapes + [(1000, 2048), (1000,)]


def _scaled(shapes, factor: float):
    """Shrink every dimension 0 (smoke runs, the memory benchmark), keeping the tensor count."""
    return [tuple(max(1, int(d * factor)) if i == 0 else d for i, d in enumerate(s)) for s in shapes]



def _count_ops(fn: Callable[[], Any]) -> int:
    """ATen operations ``fn`` dispatches (after one warm-up call), counted by a dispatch mode."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Counter.count += 1
            return func(*args, **(kwargs or {}))

    fn()
    with Counter():
        fn()
    return Counter.count


def _peak_extra_bytes(fn: Callable[[], Any], device) -> int:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs.

    CUDA: the caching allocator's peak statistic above what was allocated before. CPU: read
    from the profiler's allocation records, each an allocation (+bytes) or a free (-bytes) with
    a timestamp; the running sum's maximum is the peak extra memory, including temporaries
    allocated and freed inside one operator (which per-operator totals would hide).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: lazily created state is not the per-step cost
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    return max([0, *itertools.accumulate(nbytes for _, nbytes in records)])


def _load_timm_agc(path: str):
    """timm's ``utils/agc.py`` alone: importing timm itself pulls in torchvision and much more."""
    spec = importlib.util.spec_from_file_location("_timm_agc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timm_agc_path() -> str | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "agc.py"
    return str(path) if path.exists() else None

