"""The performance harness behind ``gradclip bench`` and ``benchmarks/run.py``.

Every benchmark times gradclip and its reference in the same process, one after the other,
after warm-up, and reports the ratio of medians over repeats: absolute times depend on the
machine, ratios much less. Targets come from the performance issue and DESIGN.md:

=====  ============================================================================  ========
id     measurement                                                                   target
=====  ============================================================================  ========
P1     ``GlobalNorm().clip_`` / ``torch.nn.utils.clip_grad_norm_(foreach=True)``,       <= 0.70
       GPT-2-small gradient shapes (124M fp32 parameters in 148 tensors)
P1b    the same / the floor: one read of every gradient + ``_foreach_mul_`` in place     <= 1.15
P2     ``ClippedOptimizer(fused AdamW, GlobalNorm, fold=True).step`` / bare fused step   <= 1.30
P3     2,000 tensors of 1,000 elements, ours / torch                                     <= 1.00
P4     each adaptive clipper / ``GlobalNorm``                                            <= 1.10
P4z    ``ZClip`` / the ``zclip`` package's ``step`` (speed-up)                            >= 1.5x
P4a    ``AGC`` / timm's ``adaptive_clip_grad`` on ResNet-50 shapes (speed-up)             >= 2x
P5     bf16 gradients: time per element / fp32's (fp32-accurate norm)                    <= 1.20
MEM    extra bytes allocated by ``GlobalNorm().clip_`` at 1x and 8x the parameters,      equal
       same tensor count: O(tensors), not O(parameters)
=====  ============================================================================  ========

Nothing here asserts: the test suite runs ``--quick`` only to keep the harness from rotting.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main", "gpt2_small_shapes", "resnet50_shapes", "measure", "Result"]


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
    """Shrink every dimension-0 for smoke runs, keeping the tensor count."""
    return [tuple(max(1, int(d * factor)) if i == 0 else d for i, d in enumerate(s)) for s in shapes]


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 9, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn`` in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class Result:
    """One benchmark line."""

    id: str
    name: str
    ours: float | None = None
    reference: float | None = None
    target: str = ""
    ratio: float | None = None
    passed: bool | None = None
    note: str = ""

    def row(self) -> str:
        def ms(x):
            return "—" if x is None else f"{x * 1e3:.2f} ms"

        ratio = "—" if self.ratio is None else f"{self.ratio:.3f}"
        verdict = {True: "yes", False: "NO", None: "—"}[self.passed]
        return f"| {self.id} | {self.name} | {ms(self.ours)} | {ms(self.reference)} | {ratio} | {self.target} | {verdict} | {self.note} |"


def _compare(id_, name, ours, reference, limit, *, speedup=False, note=""):
    ratio = (reference / ours) if speedup else (ours / reference)
    target = f">= {limit}x faster" if speedup else f"<= {limit}"
    passed = ratio >= limit if speedup else ratio <= limit
    return Result(id_, name, ours, reference, target, ratio, passed, note)


class _Bench:
    def __init__(self, quick: bool, device: str):
        import torch

        self.torch = torch
        self.quick = quick
        self.device = torch.device(device)
        self.repeats = 3 if quick else 9
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None

    def params(self, shapes, dtype=None):
        torch = self.torch
        generator = torch.Generator(device="cpu").manual_seed(0)
        params = []
        for shape in shapes:
            p = torch.nn.Parameter(torch.empty(shape, device=self.device, dtype=dtype or torch.float32))
            p.grad = torch.randn(shape, generator=generator).to(self.device, dtype or torch.float32)
            params.append(p)
        return params

    def time(self, fn):
        return measure(fn, repeats=self.repeats, sync=self.sync)

    def gpt2(self):
        return _scaled(gpt2_small_shapes(), 0.01) if self.quick else gpt2_small_shapes()

    # -- P1 / P1b ----------------------------------------------------------------------------
    def p1(self) -> list[Result]:
        import gradclip

        torch = self.torch
        params = self.params(self.gpt2())
        grads = [p.grad for p in params]
        # max_norm far above the norm: both sides still multiply (coef 1), the values stay put.
        clipper = gradclip.GlobalNorm(1e12)
        ours = self.time(lambda: clipper.clip_(params))
        reference = self.time(lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True))
        one = torch.ones((), device=self.device)
        flats = [g.view(-1) for g in grads]
        read = min(
            self.time(lambda: [f.sum() for f in flats]),
            self.time(lambda: [torch.dot(f, f) for f in flats]),
        )
        scale = self.time(lambda: torch._foreach_mul_(grads, one))
        return [
            _compare("P1", "GlobalNorm.clip_ vs clip_grad_norm_(foreach=True), GPT-2 small fp32", ours, reference, 0.70),
            _compare("P1b", "GlobalNorm.clip_ vs floor (one read + _foreach_mul_)", ours, read + scale, 1.15,
                     note=f"floor = {read * 1e3:.2f} + {scale * 1e3:.2f} ms"),
        ]

    # -- P2 ----------------------------------------------------------------------------------
    def p2(self) -> list[Result]:
        import gradclip

        torch = self.torch
        try:
            from gradclip.torch import ClippedOptimizer
        except ImportError as error:
            return [Result("P2", "fold into fused AdamW", note=f"unavailable: {error}")]
        params = self.params(self.gpt2())
        bare = torch.optim.AdamW(params, lr=1e-4, fused=True)
        wrapped_params = self.params(self.gpt2())
        folded = ClippedOptimizer(torch.optim.AdamW(wrapped_params, lr=1e-4, fused=True), gradclip.GlobalNorm(1.0), fold=True)
        ours = self.time(folded.step)
        reference = self.time(bare.step)
        unfused = self.time(lambda: (torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), bare.step()))
        return [
            _compare("P2", "ClippedOptimizer(fused AdamW, GlobalNorm, fold=True).step vs bare fused step", ours, reference, 1.30,
                     note=f"torch clip + step = {unfused / reference:.2f}x"),
        ]

    # -- P3 ----------------------------------------------------------------------------------
    def p3(self) -> list[Result]:
        import gradclip

        torch = self.torch
        count = 200 if self.quick else 2000
        params = self.params([(1000,)] * count)
        clipper = gradclip.GlobalNorm(1e12)
        ours = self.time(lambda: clipper.clip_(params))
        reference = self.time(lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True))
        return [_compare("P3", f"{count} tensors of 1,000 elements, GlobalNorm.clip_ vs torch", ours, reference, 1.0)]

    # -- P4 ----------------------------------------------------------------------------------
    def p4(self) -> list[Result]:
        import gradclip

        torch = self.torch
        results = []
        params = self.params(self.gpt2())
        baseline = self.time(lambda c=gradclip.GlobalNorm(1e12): c.clip_(params))
        for name in ("autoclip", "zclip", "adagc", "quantile_norm", "skip_on_spike"):
            if name not in gradclip.available():
                results.append(Result("P4", f"{name} vs GlobalNorm", note="unavailable: not registered"))
                continue
            clipper = gradclip.get(name)
            # Steps alter the gradients; the cost per step does not depend on their values.
            # allow_repeat: the same gradients are clipped again and again (Clipper.clip_ refuses
            # that by default for stateful clippers: one update per optimizer step).
            ours = self.time(lambda c=clipper: c.clip_(params, allow_repeat=True))
            results.append(_compare("P4", f"{name} step vs GlobalNorm step", ours, baseline, 1.10))
        if "zclip" in gradclip.available() and importlib.util.find_spec("zclip") is not None:
            import zclip

            model = torch.nn.Module()
            for i, p in enumerate(params):
                model.register_parameter(f"p{i}", p)
            reference_clipper = zclip.ZClip(max_grad_norm=None)
            ours_clipper = gradclip.ZClip()
            ours = self.time(lambda: ours_clipper.clip_(params, allow_repeat=True))
            reference = self.time(lambda: reference_clipper.step(model))
            results.append(_compare("P4z", "ZClip vs zclip 1.0.0 step", ours, reference, 1.5, speedup=True))
        agc_path = _timm_agc_path()
        if "agc" in gradclip.available() and agc_path is not None:
            spec = importlib.util.spec_from_file_location("_timm_agc", agc_path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            shapes = _scaled(resnet50_shapes(), 0.05) if self.quick else resnet50_shapes()
            agc_params = self.params(shapes)
            for p in agc_params:
                p.data.normal_()
            ours_agc = gradclip.AGC(clip_factor=0.01)
            ours = self.time(lambda: ours_agc.clip_(agc_params))
            reference = self.time(lambda: module.adaptive_clip_grad(agc_params, clip_factor=0.01))
            results.append(_compare("P4a", "AGC vs timm adaptive_clip_grad, ResNet-50", ours, reference, 2.0, speedup=True))
        return results

    # -- P5 ----------------------------------------------------------------------------------
    def p5(self) -> list[Result]:
        import gradclip

        torch = self.torch
        shapes = self.gpt2()
        fp32 = self.params(shapes)
        bf16 = self.params(shapes, torch.bfloat16)
        clipper = gradclip.GlobalNorm(1e12)
        t32 = self.time(lambda: clipper.clip_(fp32))
        t16 = self.time(lambda: clipper.clip_(bf16))
        exact = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in bf16))
        measured = float(gradclip.global_norm([p.grad for p in bf16]))
        error = abs(measured - exact) / exact
        return [_compare("P5", "bf16 vs fp32 GlobalNorm.clip_ (same element count)", t16, t32, 1.20,
                         note=f"bf16 norm relative error vs fp64: {error:.1e}")]

    # -- memory ------------------------------------------------------------------------------
    def memory(self) -> list[Result]:
        import gradclip

        torch = self.torch
        if self.device.type != "cpu":
            return [Result("MEM", "extra memory of GlobalNorm.clip_", note="measured on CPU runs only")]
        from torch.profiler import ProfilerActivity, profile

        allocated = []
        count = 148
        for width in (1000, 8000):
            params = self.params([(width,)] * count)
            clipper = gradclip.GlobalNorm(1.0)
            clipper.clip_(params)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                clipper.clip_(params)
            allocated.append(sum(max(0, e.cpu_memory_usage) for e in prof.events()))
        same = allocated[1] <= allocated[0] * 1.05 + 1024
        return [Result("MEM", f"bytes allocated by GlobalNorm.clip_, {count} tensors, 1x vs 8x parameters",
                       target="equal", passed=same,
                       note=f"{allocated[0]} B at {count * 1000:,} params, {allocated[1]} B at {count * 8000:,} params")]


def _timm_agc_path() -> str | None:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "agc.py"
    return str(path) if path.exists() else None


def _machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    parts = [f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"Python {platform.python_version()}"]
    if torch.cuda.is_available():
        parts.append(f"GPU: {torch.cuda.get_device_name()}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print a table, and write RESULTS.md unless ``--quick``."""
    parser = argparse.ArgumentParser(prog="gradclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few repeats, no RESULTS.md")
    parser.add_argument("--out", type=Path, help="where to write RESULTS.md (default benchmarks/RESULTS.md)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", nargs="*", help="benchmark groups: p1 p2 p3 p4 p5 memory")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bench = _Bench(args.quick, device)
    groups = args.only or ["p1", "p2", "p3", "p4", "p5", "memory"]
    results: list[Result] = []
    for group in groups:
        try:
            results += getattr(bench, group)()
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            results.append(Result(group.upper(), group, note=f"failed: {type(error).__name__}: {error}"))
    header = [
        f"# gradclip benchmarks ({'quick smoke sizes' if args.quick else 'full sizes'}, device {device})",
        "",
        _machine(),
        "",
        "| id | measurement | gradclip | reference | ratio | target | met | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + [r.row() for r in results]) + "\n"
    print(text)
    out = args.out or (None if args.quick else Path("benchmarks") / "RESULTS.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    failed = [r for r in results if r.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
