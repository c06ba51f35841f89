"""The benchmark suites: one method of :class:`_Bench` per group of rows (P1, P1b, P2, P2b, P3, P4,
P4z, P4a, P5, MEM, OPS, BW), each returning its rows.

Each group builds its own gradients, times gradclip against its reference with the harness
(:func:`~gradclip.bench.harness.interleave`) and judges the ratio against the target in
:mod:`gradclip.bench`'s table. A group that needs an optional package (zclip, timm) reports its
row as skipped when the package is missing.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from collections.abc import Callable
from typing import Any

from gradclip.bench.harness import Result, _compare, _ratio, interleave
from gradclip.bench.workloads import (
    _count_ops,
    _load_timm_agc,
    _op_profile,
    _peak_extra_bytes,
    _scaled,
    _timm_agc_path,
    gpt2_small_shapes,
    resnet50_shapes,
)

__all__ = ["GROUPS", "SLOW_GROUPS", "ROW_IDS", "ADAPTIVE", "PEAK_BANDWIDTH"]

#: Benchmark groups in the order they run; ``--only`` picks among them.
GROUPS = ("p1", "p2", "p3", "p4", "p5", "memory", "ops", "bandwidth", "compiled")
#: Groups a ``--quick`` run leaves out unless ``--only`` names them (compiling takes seconds
#: per function even at smoke sizes).
SLOW_GROUPS = ("compiled",)
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
        reference, reference_path = _op_profile(
            lambda: self.torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
        # Issue 14's targets: GlobalNorm at most torch's count, each adaptive clipper at most
        # GlobalNorm's + 8 (its state math on a handful of scalars), AGC at most timm's. The
        # critical path (the longest chain of dependent operations) is reported beside each
        # count: no regrouping of independent operations can launch fewer kernels than it, only
        # fusing dependent ones (a compiled or captured step, rows C1-C3).
        counts = {}
        for name in ("global_norm", *ADAPTIVE):
            clipper = gradclip.get(name)
            count, path = _op_profile(lambda c=clipper: c.clip_(params, allow_repeat=True))
            counts[name] = count
            limit = reference if name == "global_norm" else counts["global_norm"] + 8
            against = "clip_grad_norm_'s" if name == "global_norm" else "GlobalNorm's + 8"
            results.append(Result(
                "OPS", f"{name}: ATen operations per step (kernel launches on a GPU), 148 tensors",
                target=f"<= {limit} ({against})", ratio=count / reference, passed=count <= limit,
                note=f"{count} vs {reference} for clip_grad_norm_ (ratio: to torch's); critical path "
                     f"{path} vs {reference_path}"))
        # AGC works per unit of every tensor: its reference is timm's, which does the same.
        agc_path = _timm_agc_path()
        if agc_path is not None:
            timm_agc = _load_timm_agc(agc_path)
            count = _count_ops(lambda c=gradclip.AGC(): c.clip_(params))
            reference = _count_ops(lambda: timm_agc.adaptive_clip_grad(params))
            results.append(Result(
                "OPS", "agc: ATen operations per step vs timm adaptive_clip_grad's, 148 tensors",
                target=f"<= {reference} (timm's)", ratio=count / reference, passed=count <= reference,
                note=f"{count} vs {reference} operations"))
        return results

    # -- compiled (C1, C2, C3): see gradclip/bench/compiled.py -----------------------------------
    def compiled(self) -> list[Result]:
        from gradclip.bench.compiled import compiled_rows

        return compiled_rows(self)

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

