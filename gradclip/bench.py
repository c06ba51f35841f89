"""The performance harness behind ``gradclip bench`` and ``benchmarks/run.py``.

Every benchmark times gradclip and its reference in the same process, in interleaved rounds
(each round calls every contender once, the order alternating between rounds), after warm-up.
The ratio reported is the median over rounds of the per-round ratio: both sides of one round
ran moments apart and saw the same machine, so load from other processes cancels out much
better than in two separate medians. Absolute times (medians) are printed for context only;
targets are judged on ratios. Targets come from the performance issue and DESIGN.md:

=====  ============================================================================  ========
id     measurement                                                                   target
=====  ============================================================================  ========
P1     ``GlobalNorm().clip_`` / ``torch.nn.utils.clip_grad_norm_(foreach=True)``,       <= 0.70
       GPT-2-small gradient shapes (124M fp32 parameters in 148 tensors)
P1b    the same / the floor: one read of every gradient + ``_foreach_mul_`` in place     <= 1.15
P2     ``ClippedOptimizer(fused AdamW, GlobalNorm, fold=True).step`` / bare fused step   <= 1.30
P2b    the same / its floor: the fused step with a ``grad_scale`` set (the kernel then    <= 1.15
       writes the divided gradients back) + one read of every gradient (the norm)
P3     2,000 tensors of 1,000 elements, ours / torch                                     <= 1.00
P4     each adaptive clipper / ``GlobalNorm``                                            <= 1.10
P4z    ``ZClip`` / the ``zclip`` package's ``step`` (speed-up)                            >= 1.5x
P4a    ``AGC`` / timm's ``adaptive_clip_grad`` on ResNet-50 shapes (speed-up)             >= 2x
P5     bf16 gradients: time per element / fp32's, with an fp32-accurate norm            <= 1.20
       (relative error against fp64 at most 1e-5)
MEM    peak extra memory of ``GlobalNorm().clip_`` at 1/8x and 1x the parameters,      bounded
       same tensor count: O(tensors), not O(parameters): at most two capped scratch
       buffers (CHUNK elements) and 1 KiB per tensor at both sizes (CPU: profiler
       allocation records; CUDA: the caching allocator's peak)
OPS    ATen operations per step (kernel launches on a GPU) / ``clip_grad_norm_``'s     report
       (GlobalNorm, adaptive clippers), 148 tensors on the foreach path; AGC / timm's
BW     CUDA only: bytes ``GlobalNorm().clip_`` must move (one read, one read+write of     report
       every gradient) / its time, as a fraction of the device's peak bandwidth
=====  ============================================================================  ========

Run ``python benchmarks/run.py`` (or ``gradclip bench``); ``--quick`` runs tiny sizes in seconds
(the test suite runs it so the harness cannot rot) and writes nothing unless ``--out`` is given.
A full run writes its section of ``benchmarks/RESULTS.md``, keyed by device and ``--label``,
and keeps the other sections (a CUDA run adds to the CPU results instead of replacing them).
Nothing here asserts a time: a benchmark that breaks is reported as failed and sets the exit
status, a target that is missed is reported as missed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import itertools
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "main",
    "gpt2_small_shapes",
    "resnet50_shapes",
    "interleave",
    "Result",
    "parse_results",
    "GROUPS",
    "ROW_IDS",
]

#: Benchmark groups in the order they run; ``--only`` picks among them.
GROUPS = ("p1", "p2", "p3", "p4", "p5", "memory", "ops", "bandwidth")
#: The ids of the rows a run on each kind of device writes, for the smoke test.
ROW_IDS = {
    "cpu": ["P1", "P1b", "P2", "P2b", "P3", "P4", "P4z", "P4a", "P5", "MEM", "OPS"],
    "cuda": ["P1", "P1b", "P2", "P2b", "P3", "P4", "P4z", "P4a", "P5", "MEM", "OPS", "BW"],
}
#: Adaptive clippers judged against GlobalNorm in P4 (AGC reads the weights too: P4a).
ADAPTIVE = ("autoclip", "zclip", "adagc", "quantile_norm", "skip_on_spike", "non_finite")
#: Nominal peak memory bandwidth (bytes/s) by device-name fragment, most specific first.
PEAK_BANDWIDTH = (
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 8.64e11),
    ("A10", 6.0e11),
)


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


def interleave(
    contenders: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    rounds: int = 9,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each contender once per round, for ``warmup`` untimed and ``rounds`` timed rounds.

    The order within a round alternates (forwards, backwards) so that no contender always runs
    after the same one (caches, allocator state, CPU frequency).

    Args:
        contenders: Name to a function of no arguments doing one step.
        warmup: Untimed rounds first (kernel selection, allocator, lazy imports).
        rounds: Timed rounds.
        sync: Called after each step inside the timed region (``torch.cuda.synchronize``), so
            that asynchronous device work is counted.

    Returns:
        Name to the list of wall times in seconds, one per timed round.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            if sync is not None:
                sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _ratio(ours: list[float], reference: list[float]) -> float:
    """Median over rounds of ``ours / reference`` (the two lists are paired by round)."""
    return statistics.median(a / b for a, b in zip(ours, reference))


@dataclass
class Result:
    """One row of the results table."""

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
        note = self.note.replace("|", "/")
        return f"| {self.id} | {self.name} | {ms(self.ours)} | {ms(self.reference)} | {ratio} | {self.target} | {verdict} | {note} |"


def _compare(id_, name, ours: list[float], reference: list[float], limit, *, speedup=False, note="", extra_ok=True):
    """A row from paired round times: the ratio (or speed-up) against ``limit``."""
    ratio = _ratio(ours, reference)
    if speedup:
        ratio = 1.0 / ratio
    target = f">= {limit}x faster" if speedup else f"<= {limit}"
    passed = (ratio >= limit if speedup else ratio <= limit) and extra_ok
    return Result(id_, name, statistics.median(ours), statistics.median(reference), target, ratio, passed, note)


TABLE_HEADER = [
    "| id | measurement | gradclip | reference | ratio | target | met | note |",
    "|---|---|---|---|---|---|---|---|",
]


def parse_results(text: str) -> list[dict[str, str]]:
    """Rows of every results table in ``text`` (a RESULTS.md or the printed output).

    Returns:
        One dict per row with the keys of the table header (``id``, ``ratio``, ``met``...).
    """
    keys = [k.strip() for k in TABLE_HEADER[0].strip("|").split("|")]
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line == TABLE_HEADER[0]:
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        if len(cells) == len(keys):
            rows.append(dict(zip(keys, cells)))
    return rows


class _Bench:
    """The benchmarks of one run: sizes, device and timing settings shared by every group."""

    def __init__(self, quick: bool, device: str, rounds: int | None = None):
        import torch

        self.torch = torch
        self.quick = quick
        self.device = torch.device(device)
        self.rounds = rounds or (3 if quick else 11)
        self.warmup = 1 if quick else 2
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else None

    def params(self, shapes, dtype=None, *, data=False):
        torch = self.torch
        dtype = dtype or torch.float32
        generator = torch.Generator(device="cpu").manual_seed(0)
        params = []
        for shape in shapes:
            if data:
                p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(self.device, dtype))
            else:
                p = torch.nn.Parameter(torch.empty(shape, device=self.device, dtype=dtype))
            p.grad = torch.randn(shape, generator=generator).to(self.device, dtype)
            params.append(p)
        return params

    def time(self, contenders: dict[str, Callable[[], Any]]) -> dict[str, list[float]]:
        return interleave(contenders, warmup=self.warmup, rounds=self.rounds, sync=self.sync)

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
        one = torch.ones((), device=self.device)
        flats = [g.view(-1) for g in grads]
        times = self.time({
            "ours": lambda: clipper.clip_(params),
            "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True),
            # The floor's read pass: the fastest single read torch offers, per round.
            "sum": lambda: [f.sum() for f in flats],
            "dot": lambda: [torch.dot(f, f) for f in flats],
            "foreach_norm": lambda: torch._foreach_norm(grads),
            "scale": lambda: torch._foreach_mul_(grads, one),
        })
        reads = [min(candidates) for candidates in zip(times["sum"], times["dot"], times["foreach_norm"])]
        floor = [r + s for r, s in zip(reads, times["scale"])]
        return [
            _compare("P1", "GlobalNorm.clip_ vs clip_grad_norm_(foreach=True), GPT-2 small fp32",
                     times["ours"], times["torch"], 0.70,
                     note=f"the floor (P1b) = {_ratio(floor, times['torch']):.2f}x torch"),
            _compare("P1b", "GlobalNorm.clip_ vs floor (one read + _foreach_mul_)", times["ours"], floor, 1.15,
                     note=f"floor = {statistics.median(reads) * 1e3:.2f} + "
                          f"{statistics.median(times['scale']) * 1e3:.2f} ms"),
        ]

    # -- P2 ----------------------------------------------------------------------------------
    def p2(self) -> list[Result]:
        import gradclip
        from gradclip.torch import ClippedOptimizer

        torch = self.torch
        bare_params = self.params(self.gpt2(), data=True)
        bare = torch.optim.AdamW(bare_params, lr=1e-4, fused=True)
        folded_params = self.params(self.gpt2(), data=True)
        folded = ClippedOptimizer(torch.optim.AdamW(folded_params, lr=1e-4, fused=True), gradclip.GlobalNorm(1.0),
                                  fold=True)
        torch_params = self.params(self.gpt2(), data=True)
        torch_opt = torch.optim.AdamW(torch_params, lr=1e-4, fused=True)

        def torch_clip_step():
            torch.nn.utils.clip_grad_norm_(torch_params, 1.0, foreach=True)
            torch_opt.step()

        # The floor of folding: a fused step that divides by a grad_scale (torch's kernels then
        # store the divided gradients back, one more write pass) plus the norm's one read.
        unit = torch.ones((), dtype=torch.float32, device=self.device)

        def scaled_step():
            bare.grad_scale = unit
            try:
                bare.step()
            finally:
                del bare.grad_scale

        flats = [p.grad.view(-1) for p in folded_params]
        grads = [p.grad for p in folded_params]
        # Steps change the parameters, not the gradients' sizes: the cost per step is stable.
        times = self.time({
            "folded": folded.step, "bare": bare.step, "torch": torch_clip_step, "scaled": scaled_step,
            "dot": lambda: [torch.dot(f, f) for f in flats],
            "foreach_norm": lambda: torch._foreach_norm(grads),
        })
        if not folded.folded:
            return [Result("P2", "fold into fused AdamW", note="failed: ClippedOptimizer did not fold")]
        reads = [min(pair) for pair in zip(times["dot"], times["foreach_norm"])]
        floor = [step + read for step, read in zip(times["scaled"], reads)]
        return [
            _compare("P2", "ClippedOptimizer(fused AdamW, GlobalNorm, fold=True).step vs bare fused step",
                     times["folded"], times["bare"], 1.30,
                     note=f"torch clip_grad_norm_ + step = {_ratio(times['torch'], times['bare']):.2f}x; "
                          f"the floor (P2b) = {_ratio(floor, times['bare']):.2f}x"),
            _compare("P2b", "the folded step vs its floor (fused step with grad_scale + one read)",
                     times["folded"], floor, 1.15,
                     note=f"floor = {statistics.median(times['scaled']) * 1e3:.2f} + "
                          f"{statistics.median(reads) * 1e3:.2f} ms"),
        ]

    # -- P3 ----------------------------------------------------------------------------------
    def p3(self) -> list[Result]:
        import gradclip

        torch = self.torch
        count = 200 if self.quick else 2000
        params = self.params([(1000,)] * count)
        clipper = gradclip.GlobalNorm(1e12)
        times = self.time({
            "ours": lambda: clipper.clip_(params),
            "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True),
        })
        return [_compare("P3", f"{count} tensors of 1,000 elements, GlobalNorm.clip_ vs torch",
                         times["ours"], times["torch"], 1.0)]

    # -- P4 ----------------------------------------------------------------------------------
    def p4(self) -> list[Result]:
        import gradclip

        torch = self.torch
        results = []
        params = self.params(self.gpt2(), data=True)
        # allow_repeat: the same gradients are clipped again and again (Clipper.clip_ refuses
        # that by default for stateful clippers: one update per optimizer step). Steps may
        # alter the gradients; the cost per step does not depend on their values.
        contenders = {"global_norm": lambda c=gradclip.GlobalNorm(1.0): c.clip_(params)}
        for name in ADAPTIVE:
            clipper = gradclip.get(name)
            contenders[name] = lambda c=clipper: c.clip_(params, allow_repeat=True)
        has_zclip = importlib.util.find_spec("zclip") is not None
        if has_zclip:
            import zclip

            model = torch.nn.Module()
            for i, p in enumerate(params):
                model.register_parameter(f"p{i}", p)
            reference_zclip = zclip.ZClip(max_grad_norm=None)
            contenders["zclip package"] = lambda: reference_zclip.step(model)
        times = self.time(contenders)
        for name in ADAPTIVE:
            results.append(_compare("P4", f"{name} step vs GlobalNorm step", times[name], times["global_norm"], 1.10))
        if has_zclip:
            results.append(_compare("P4z", "ZClip vs zclip 1.0.0 ZClip.step", times["zclip"], times["zclip package"],
                                    1.5, speedup=True))
        else:
            results.append(Result("P4z", "ZClip vs zclip package", note="skipped: zclip is not installed"))
        results.append(self._agc())
        return results

    def _agc(self) -> Result:
        import gradclip

        agc_path = _timm_agc_path()
        if agc_path is None:
            return Result("P4a", "AGC vs timm adaptive_clip_grad", note="skipped: timm is not installed")
        module = _load_timm_agc(agc_path)
        shapes = _scaled(resnet50_shapes(), 0.05) if self.quick else resnet50_shapes()
        params = self.params(shapes, data=True)
        ours = gradclip.AGC(clip_factor=0.01)
        times = self.time({
            "ours": lambda: ours.clip_(params),
            "timm": lambda: module.adaptive_clip_grad(params, clip_factor=0.01),
        })
        return _compare("P4a", "AGC vs timm adaptive_clip_grad, ResNet-50 shapes", times["ours"], times["timm"], 2.0,
                        speedup=True)

    # -- P5 ----------------------------------------------------------------------------------
    def p5(self) -> list[Result]:
        import gradclip

        torch = self.torch
        shapes = self.gpt2()
        fp32 = self.params(shapes)
        bf16 = self.params(shapes, torch.bfloat16)
        clipper = gradclip.GlobalNorm(1e12)
        times = self.time({"bf16": lambda: clipper.clip_(bf16), "fp32": lambda: clipper.clip_(fp32)})
        exact = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in bf16))
        measured = float(gradclip.global_norm([p.grad for p in bf16]))
        error = abs(measured - exact) / exact
        reference = float(torch.nn.utils.get_total_norm([p.grad for p in bf16], 2.0))
        torch_error = abs(reference - exact) / exact
        return [_compare("P5", "bf16 vs fp32 GlobalNorm.clip_ (same element count)", times["bf16"], times["fp32"], 1.20,
                         extra_ok=error <= 1e-5,
                         note=f"bf16 norm relative error vs fp64: {error:.1e} (target <= 1e-5; torch's "
                              f"get_total_norm: {torch_error:.1e})")]

    # -- memory --------------------------------------------------------------------------------
    def memory(self) -> list[Result]:
        import gradclip

        torch = self.torch
        results = []
        # Both sizes past the fp16/bf16 scratch buffer's cap (CHUNK elements), so that a constant
        # is seen as one; the blocked norm's tensors are large in both.
        base = _scaled(gpt2_small_shapes(), 1 / 8)
        big = _scaled(gpt2_small_shapes(), 1 / 4 if self.quick else 1.0)
        for dtype in (torch.float32, torch.bfloat16):
            peaks, sizes, torch_peaks = [], [], []
            for shapes in (base, big):
                params = self.params(shapes, dtype)
                sizes.append(sum(p.grad.numel() * p.grad.element_size() for p in params))
                clipper = gradclip.GlobalNorm(1.0)
                peaks.append(_peak_extra_bytes(lambda: clipper.clip_(params), self.device))
                torch_peaks.append(_peak_extra_bytes(
                    lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), self.device))
                del params
            growth = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
            # O(tensors), not O(parameters): at most the backend's capped scratch (a widening
            # buffer and a stack of small tensors, CHUNK elements each) and 1 KiB per tensor,
            # whatever the size of the gradients. Below its cap a scratch buffer grows with small
            # models, so the growth between the two sizes is shown but not judged.
            from gradclip.backends.torch import CHUNK

            bound = 2 * CHUNK * 4 + 1024 * len(base)
            name = str(dtype).replace("torch.", "")
            results.append(Result(
                "MEM", f"peak extra bytes of GlobalNorm.clip_, 148 {name} tensors, {sizes[0] >> 20} vs "
                       f"{sizes[1] >> 20} MiB of gradients",
                target=f"<= {bound:,} B", ratio=max(peaks) / sizes[1], passed=max(peaks) <= bound,
                note=f"{peaks[0]:,} B vs {peaks[1]:,} B extra (ratio: peak / gradient bytes; growth "
                     f"{growth:.1e} extra bytes per gradient byte added); "
                     f"torch clip_grad_norm_: {torch_peaks[0]:,} B vs {torch_peaks[1]:,} B"))
        return results

    # -- operations dispatched (the host-side cost on a GPU) -----------------------------------
    def ops(self) -> list[Result]:
        """ATen operations one clipping step dispatches, against torch's ``clip_grad_norm_``.

        On a GPU each operation is a kernel launch issued by the host, and the scalar ones sit
        on the step's critical path between the norm and the scale; the count is exact and
        machine-independent, where host timings on a shared CPU are not. The gradients are
        148 tensors of 8,192 elements: above the CPU stacking size and below the blocked size,
        so the CPU takes the foreach kernels a GPU takes.
        """
        import gradclip

        params = self.params([(8192,)] * 148)
        results = []
        reference = _count_ops(lambda: self.torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
        # Reported, not judged: the issue sets no target for them; they show where a GPU's
        # host time goes (P4 judges the time itself).
        for name in ("global_norm", *ADAPTIVE):
            clipper = gradclip.get(name)
            count = _count_ops(lambda c=clipper: c.clip_(params, allow_repeat=True))
            results.append(Result(
                "OPS", f"{name}: ATen operations per step vs clip_grad_norm_'s, 148 tensors", target="report",
                ratio=count / reference, note=f"{count} vs {reference} operations"))
        # AGC works per unit of every tensor: its reference is timm's, which does the same.
        agc_path = _timm_agc_path()
        if agc_path is not None:
            timm_agc = _load_timm_agc(agc_path)
            count = _count_ops(lambda c=gradclip.AGC(): c.clip_(params))
            reference = _count_ops(lambda: timm_agc.adaptive_clip_grad(params))
            results.append(Result(
                "OPS", "agc: ATen operations per step vs timm adaptive_clip_grad's, 148 tensors", target="report",
                ratio=count / reference, note=f"{count} vs {reference} operations"))
        return results

    # -- bandwidth (CUDA) ----------------------------------------------------------------------
    def bandwidth(self) -> list[Result]:
        if self.device.type != "cuda":
            return []
        import gradclip

        torch = self.torch
        results = []
        name = torch.cuda.get_device_name(self.device)
        nominal = next((bw for fragment, bw in PEAK_BANDWIDTH if fragment in name), None)
        # A device-to-device copy: the practical peak, two bytes moved per byte copied.
        source = torch.empty(1 << 28, dtype=torch.float32, device=self.device)
        target = torch.empty_like(source)
        copy = statistics.median(self.time({"copy": lambda: target.copy_(source)})["copy"])
        copy_bw = 2 * source.numel() * 4 / copy
        del source, target
        for label, factor in (("GPT-2 small", 1), ("GPT-2 small x8 (1B parameters)", 8)):
            shapes = self.gpt2() * factor
            params = self.params(shapes)
            clipper = gradclip.GlobalNorm(1e12)
            times = self.time({"ours": lambda: clipper.clip_(params),
                               "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e12, foreach=True)})
            moved = 3 * sum(p.grad.numel() * p.grad.element_size() for p in params)  # read; read + write
            ours, theirs = (statistics.median(times[k]) for k in ("ours", "torch"))
            fraction = moved / ours / (nominal or copy_bw)
            results.append(Result(
                "BW", f"GlobalNorm.clip_ achieved bandwidth, {label} fp32", ours, theirs,
                target="report", ratio=fraction,
                note=f"{moved / ours / 1e9:.0f} GB/s = {fraction:.0%} of "
                     f"{'nominal ' + format(nominal / 1e9, '.0f') if nominal else 'copy'} GB/s peak, "
                     f"{moved / ours / copy_bw:.0%} of a {copy_bw / 1e9:.0f} GB/s device copy; torch "
                     f"{moved / theirs / 1e9:.0f} GB/s"))
            del params
        return results


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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _machine(device) -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; torch uses {torch.get_num_threads()} threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}, gradclip {_version('gradclip')}, "
        f"zclip {_version('zclip')}, timm {_version('timm')}",
    ]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    try:
        lines.append(f"- load average at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return lines


def _merge_section(path: Path, key: str, section: str) -> str:
    """The text of ``path`` with the section ``key`` replaced by ``section`` (or appended)."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        return pattern.sub(lambda _: block, old)
    if not old.strip():
        old = (
            "# gradclip benchmark results\n\n"
            "Written by `python benchmarks/run.py` (also `gradclip bench`); see `gradclip/bench.py`\n"
            "for what each row measures. Ratios are medians of per-round ratios, gradclip and its\n"
            "reference timed in the same interleaved rounds; the times are medians, for context.\n"
        )
    return old.rstrip() + "\n\n" + block


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print a table, and write RESULTS.md unless ``--quick``.

    Returns:
        0, or 1 when a benchmark failed to run (a missed target is not a failure).
    """
    parser = argparse.ArgumentParser(prog="gradclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few rounds, no RESULTS.md unless --out")
    parser.add_argument("--out", type=Path, help="where to write RESULTS.md (default benchmarks/RESULTS.md)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--only", nargs="*", choices=GROUPS, help="benchmark groups to run (default: all)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per benchmark (default 11, quick 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    parser.add_argument("--label", default="", help="names this run's section of RESULTS.md (with the device)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bench = _Bench(args.quick, str(device), args.rounds)
    results: list[Result] = []
    started = time.perf_counter()
    machine = _machine(device)
    for group in args.only or GROUPS:
        try:
            results += getattr(bench, group)()
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            results.append(Result(group.upper(), group, note=f"failed: {type(error).__name__}: {error}"))
    key = device.type + (f", {args.label}" if args.label else "")
    sizes = "quick smoke sizes" if args.quick else "full sizes"
    section = "\n".join([
        f"## {key} ({sizes}, {bench.rounds} rounds after {bench.warmup} warm-up, "
        f"{time.perf_counter() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        *machine,
        "",
        *TABLE_HEADER,
        *(r.row() for r in results),
    ]) + "\n"
    print(section)
    out = args.out or (None if args.quick else Path("benchmarks") / "RESULTS.md")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_merge_section(out, key, section))
        print(f"wrote {out}")
    failed = [r for r in results if r.note.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
