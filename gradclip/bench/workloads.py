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
    return _op_profile(fn)[0]


def _op_profile(fn: Callable[[], Any]) -> tuple[int, int]:
    """``(operations, critical path)`` of one call of ``fn`` (after one warm-up call).

    The critical path is the longest chain of operations each of which reads what the one before
    it wrote: a lower bound on the launches of the same dataflow that no regrouping of
    independent operations can go under, only fusing dependent ones into one kernel (a compiled
    or captured step). Tensors are followed by their storage, so views and in-place writes
    (``mul_``, ``_foreach_mul_``, ``copy_`` into state) carry their writer's depth; every
    operation's outputs are kept alive until the count ends, so no storage address is reused
    for a different tensor while the depths are read. Tensors made before the call (gradients,
    state) have depth 0.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def key(tensor):
        storage = tensor.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else ("empty", id(tensor))

    class Profiler(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count, self.longest, self.depth, self.alive = 0, 0, {}, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            depth = 1 + max((self.depth.get(key(t), 0) for t in inputs), default=0)
            out = func(*args, **kwargs)
            written = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            # An in-place or out= operation writes its mutated arguments, which it may not return
            # (``_foreach_mul_`` returns nothing): the schema says which ones.
            for position, argument in enumerate(func._schema.arguments):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    value = args[position] if position < len(args) else kwargs.get(argument.name)
                    written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            for tensor in written:
                self.depth[key(tensor)] = depth
            self.alive.append(out)
            self.count += 1
            self.longest = max(self.longest, depth)
            return out

    fn()
    with Profiler() as profiler:
        fn()
    return profiler.count, profiler.longest


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

