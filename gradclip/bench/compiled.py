"""The compiled rows (C1, C2, C3): clipping inside ``torch.compile(fullgraph=True)``.

Training recipes compile their step; the clip must then fuse like torch's own and an adaptive
clipper may add only scalar work that the compiled kernels absorb:

* **C1**: compiled ``GlobalNorm.clip_`` / compiled ``torch.nn.utils.clip_grad_norm_``
  (``foreach=True``) on the GPT-2-small gradient shapes, target <= 1.0;
* **C2**: each compiled adaptive clipper (ZClip, AutoClip, AdaGC) / compiled ``GlobalNorm``,
  target <= 1.05;
* **C3**: the compile time of the clip region (dynamo's trace, inductor's code generation and
  the C++/Triton build, with a fresh inductor cache), ours / torch's, reported; the note gives
  each, and the kernels inductor generated for one step.

Run with ``--only compiled``; a full run includes it, a ``--quick`` run only when asked (it
compiles on the first round, which costs seconds per function even at smoke sizes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gradclip.bench.harness import Result, _compare

__all__ = ["COMPILED_ADAPTIVE", "COMPILED_ROW_IDS", "compiled_rows"]

#: The adaptive clippers compared with GlobalNorm under compile (C2).
COMPILED_ADAPTIVE = ("zclip", "autoclip", "adagc")
#: The ids of the rows of the compiled group.
COMPILED_ROW_IDS = ["C1", "C2", "C3"]


def _compile_once(torch: Any, fn: Callable[[], Any]) -> tuple[Callable[[], Any], float, int]:
    """``fn`` compiled with fullgraph=True and called twice (a stateful clipper creates its state
    on the first call and reads it back on the second: two traces): the compiled function, the
    seconds those two calls took, and the kernels inductor generated for the graph every later
    step runs (the second trace's, or the first's when the second call compiled nothing)."""
    from torch._inductor import metrics
    from torch._inductor.utils import fresh_inductor_cache

    compiled = torch.compile(fn, fullgraph=True)
    with fresh_inductor_cache():
        started = time.perf_counter()
        metrics.reset()
        compiled()
        first = metrics.generated_kernel_count
        metrics.reset()
        compiled()
        seconds = time.perf_counter() - started
    return compiled, seconds, metrics.generated_kernel_count or first


def compiled_rows(bench: Any) -> list[Result]:
    """C1, C2 (one row per adaptive clipper) and C3, with ``bench``'s sizes and timing."""
    import gradclip

    torch = bench.torch
    shapes = bench.gpt2()
    if bench.quick:
        shapes = shapes[:26]  # two blocks: compile time grows with the tensor count
    params = bench.params(shapes, data=True)
    torch._dynamo.reset()
    # max_norm far above the norm: both sides multiply by a coefficient of 1, the values stay.
    global_norm = gradclip.GlobalNorm(1e12)
    contenders: dict[str, Callable[[], Any]] = {
        "global_norm": lambda: global_norm.clip_(params),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True),
    }
    for name in COMPILED_ADAPTIVE:
        clipper = gradclip.get(name)
        contenders[name] = lambda c=clipper: c.clip_(params, allow_repeat=True)
    # Inductor's first compile in a process also loads and warms its own machinery: pay that on
    # a function of no interest, so the first contender's compile time is not inflated by it.
    _compile_once(torch, lambda: torch.ones(2, device=bench.device).mul(2.0))
    compiled, seconds, kernels = {}, {}, {}
    for name, fn in contenders.items():
        compiled[name], seconds[name], kernels[name] = _compile_once(torch, fn)
    times = bench.time(compiled)
    sizes = f"{len(shapes)} tensors" + (" (smoke)" if bench.quick else ", GPT-2 small fp32")
    rows = [
        _compare("C1", f"compiled GlobalNorm.clip_ vs compiled clip_grad_norm_(foreach=True), {sizes}",
                 times["global_norm"], times["torch"], 1.0,
                 note="fullgraph=True on both sides; the eager comparison is row P1"),
    ]
    for name in COMPILED_ADAPTIVE:
        rows.append(_compare("C2", f"compiled {name}.clip_ vs compiled GlobalNorm.clip_, {sizes}",
                             times[name], times["global_norm"], 1.05,
                             note=f"inductor kernels in the step's graph: {kernels[name]} vs {kernels['global_norm']}"))
    detail = ", ".join(f"{name} {seconds[name]:.1f} s" for name in contenders)
    rows.append(Result(
        "C3", f"compile time of the clip region (first two calls, fresh inductor cache), {sizes}",
        seconds["global_norm"], seconds["torch"], target="report", ratio=seconds["global_norm"] / seconds["torch"],
        note=f"{detail}; inductor kernels in the step's graph: GlobalNorm {kernels['global_norm']}, "
             f"torch {kernels['torch']}"))
    torch._dynamo.reset()
    return rows
