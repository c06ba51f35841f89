"""Per-example clipping (DP-SGD) throughput and peak memory, side by side, in one run.

    python benchmarks/per_sample.py                 # both models, every method, prints a table
    python benchmarks/per_sample.py --write         # and appends it to benchmarks/RESULTS.md
    python benchmarks/per_sample.py --steps 5 --models cnn

Methods (timed in the same interleaved rounds, one process; peak memory each in its own
subprocess): non-private training (mean loss,
one backward), gradclip ``PerSample`` in ``bk`` and ``ghost`` modes, Opacus 1.6 hooks mode
(``GradSampleModule`` + ``DPOptimizer``) and ghost clipping (``GradSampleModuleFastGradientClipping``),
and plain ``torch.func`` (``vmap(grad)`` of the whole model, then clip and sum). Every private
method clips at the same C with noise 0 (the noise costs the same everywhere). A step is
forward + backward + clip + SGD step; samples/s is the batch over the median step time.

Peak extra memory (CPU), each method alone in a fresh subprocess, three columns:

* **steady** (the target's measure): three warm-up steps, then the kernel's peak-RSS counter is
  reset (``5`` written to ``/proc/self/clear_refs`` resets ``VmHWM``), and the peak over three
  more steps (``VmHWM``) minus the resident size after the warm-up (``VmRSS``, read once glibc
  has returned the freed heap to the system: ``malloc_trim``). Until 2026-12-06
  this benchmark reported the growth of ``ru_maxrss`` over the process' first three steps, and
  about half of that was one-time cost that is no method's memory: library code paged in on
  first use, kernels' and the allocator's first arenas (15 of 32 MiB for non-private training on
  the transformer). Where ``clear_refs`` cannot be written (not Linux) the column falls back to
  that first-steps measure and the output says so (``rss: ru_maxrss``).
  The subprocesses run with glibc's mmap threshold fixed at its initial 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``; ``--glibc-default-malloc`` leaves it alone). By default glibc
  raises the threshold whenever a large block is freed, after which blocks of that size come from
  the heap, where freed memory stays resident: the steady RSS then depends on the order in which
  a method happens to allocate and free, not on how much it holds. On 2026-12-06 ghost's
  transformer runs, with the same live tensors every run (11.3 MiB), measured 1.23x-1.55x
  non-private's RSS under the default heuristics and 1.09x in three runs with the fixed
  threshold, within 0.1 MiB of the tensor peak; non-private's steady RSS moved from 14-16 MiB to
  10.1-10.3 MiB (its tensor peak is 10.1). The setting is the same for every method.
* **tensors**: the highest sum of live tensor bytes during one more step, from the torch
  profiler's allocation events (``profile_memory=True``), counted from the step's start: no
  allocator or page effects, the steadiest of the three.
* **first steps**: the old measure (``ru_maxrss`` growth over the first three steps), kept beside
  the others so the change of definition can be judged.

Models: a tiny transformer (B=32: embedding, two blocks of attention built from Linear layers —
``opacus.layers.DPMultiheadAttention``, as Opacus needs — LayerNorm and an MLP) and a small CNN
(B=64: three convolutions with GroupNorm, 3x32x32 inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

#: glibc's mmap threshold in the memory subprocesses (its initial value, made fixed; see the
#: module docstring).
MMAP_THRESHOLD = 128 * 1024
METHODS = ["nonprivate", "gradclip-bk", "gradclip-ghost", "opacus-hooks", "opacus-ghost", "torch.func"]
MODELS = {"transformer": 32, "cnn": 64}
C = 1.0


def _models():
    import torch
    from opacus.layers import DPMultiheadAttention
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.attn = DPMultiheadAttention(d, heads, batch_first=True)
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            h, _ = self.attn(x, x, x, need_weights=False)
            x = self.ln1(x + h)
            return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))

    class Transformer(nn.Module):
        def __init__(self, vocab=1000, d=64, heads=4, layers=2, classes=4):
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
            self.head = nn.Linear(d, classes)

        def forward(self, ids):
            return self.head(self.blocks(self.emb(ids)).mean(1))

    class CNN(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
            )
            self.head = nn.Linear(32, classes)

        def forward(self, x):
            return self.head(self.net(x).mean(dim=(2, 3)))

    def data(name, batch):
        g = torch.Generator().manual_seed(0)
        if name == "transformer":
            return torch.randint(0, 1000, (batch, 32), generator=g), torch.randint(0, 4, (batch,), generator=g)
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    return {"transformer": Transformer, "cnn": CNN}, data


def _step_fn(method: str, model, batch: int):
    """A closure running one training step of ``method`` on (x, y)."""
    import torch
    from torch.nn import functional as F

    if method == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return step
    if method.startswith("gradclip"):
        import gradclip
        import gradclip.torch as gct

        ps = gct.PerSample(model, gradclip.GlobalNorm(C), mode=method.split("-")[1])
        opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), ps, 0.0, batch)

        def step(x, y):
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(x), y, reduction="none"))
            opt.step()

        return step
    if method == "opacus-hooks":
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=0.0, max_grad_norm=C,
                          expected_batch_size=batch)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(gsm(x), y).backward()
            opt.step()

        return step
    if method == "opacus-ghost":
        from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import (
            GradSampleModuleFastGradientClipping,
        )
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=C, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=0.0,
                                              max_grad_norm=C, expected_batch_size=batch)
        criterion = DPLossFastGradientClipping(gsm, opt, torch.nn.CrossEntropyLoss())

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            criterion(gsm(x), y).backward()
            opt.step()

        return step
    if method == "torch.func":
        from torch.func import functional_call, grad, vmap

        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        names = [n for n, _ in model.named_parameters()]

        def loss_one(params, x, y):
            out = functional_call(model, params, (x.unsqueeze(0),))
            return F.cross_entropy(out, y.unsqueeze(0))

        per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            params = {n: p.detach() for n, p in model.named_parameters()}
            grads = per_example(params, x, y)
            norms = torch.cat([grads[n].flatten(1) for n in names], 1).norm(dim=1)
            coef = (C / (norms + 1e-6)).clamp(max=1.0)
            for n, p in model.named_parameters():
                p.grad = torch.tensordot(coef, grads[n], dims=1) / batch
            opt.step()

        return step
    raise ValueError(method)


def _vm_kib() -> dict[str, int] | None:
    """``VmHWM`` and ``VmRSS`` (KiB) from ``/proc/self/status``, None off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(fields[k].split()[0]) for k in ("VmHWM", "VmRSS")}
    except (OSError, KeyError, ValueError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (``VmHWM``) to the current RSS; False where that is
    not possible (not Linux, or ``/proc`` read-only).

    Freed heap memory that glibc's allocator still holds is first returned to the system
    (``malloc_trim``): left resident, it would be in the base, and the next steps would reuse it
    without raising the peak, hiding part of what they need."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass  # another C library: the base keeps what its allocator retains
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _vm_kib() is not None


def _tensor_peak_mib(step, x, y) -> float:
    """The highest sum of live tensor bytes during one call of ``step``, from the profiler's
    allocation events (counted from the call's start: what the step itself allocates)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, y)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def run_one(model_name: str, method: str, steps: int, threads: int) -> dict:
    """Peak memory of one method, alone in this process (see the module docstring)."""
    import gc

    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    models, data = _models()
    batch = MODELS[model_name]
    model = models[model_name]()
    x, y = data(model_name, batch)
    step = _step_fn(method, model, batch)
    first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):  # the warm-up, measured as before 2026-12-06
        step(x, y)
    first_steps = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - first) / 1024
    gc.collect()
    steady, how = first_steps, "ru_maxrss"
    if _reset_peak_rss():
        base = _vm_kib()["VmRSS"]
        for _ in range(steps):
            step(x, y)
        steady, how = (_vm_kib()["VmHWM"] - base) / 1024, "VmHWM"
    return {"peak_extra_mib": steady, "rss": how, "tensor_mib": _tensor_peak_mib(step, x, y),
            "first_steps_mib": first_steps}


def time_interleaved(model_name: str, methods: list[str], steps: int, threads: int) -> dict:
    """Samples/s of every method, timed in the same rounds (one step of each per round, the
    order rotating), so that load on a shared machine hits them alike; the median per method."""
    import torch

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    models, data = _models()
    batch = MODELS[model_name]
    x, y = data(model_name, batch)
    steps_of = {}
    for method in methods:
        torch.manual_seed(0)
        steps_of[method] = _step_fn(method, models[model_name](), batch)
        steps_of[method](x, y)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(steps):
        for method in methods[r % len(methods):] + methods[: r % len(methods)]:
            start = time.perf_counter()
            steps_of[method](x, y)
            times[method].append(time.perf_counter() - start)
    return {m: batch / statistics.median(t) for m, t in times.items()}


def _mib_vs(r: dict, base: dict, key: str) -> str:
    """``"12.3 MiB (1.05x)"``: a memory column and its ratio to non-private's."""
    ratio = r[key] / base[key] if base.get(key) else float("nan")
    return f"{r[key]:.1f} MiB ({ratio:.2f}x)"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, help="batch size for every model (default: 32 transformer, 64 CNN)")
    parser.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="measure memory under glibc's default, self-adjusting mmap threshold "
                             f"(default: fixed at {MMAP_THRESHOLD} B, see the module docstring)")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch:
        for name in MODELS:
            MODELS[name] = args.batch
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.steps, args.threads)))
        return 0
    # Memory first, each method in a fresh process started while this one is still small:
    # Linux keeps a process' peak RSS across exec, so a child of a torch-loaded parent would
    # start with the parent's peak.
    memory: dict[tuple[str, str], dict] = {}
    for model_name in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", model_name, method, "--steps", "3",
                   "--threads", str(args.threads), *(["--batch", str(args.batch)] if args.batch else [])]
            env = dict(os.environ)
            if not args.glibc_default_malloc:
                env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                memory[model_name, method] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
            else:
                memory[model_name, method] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = []
    for model_name in args.models:
        speed = time_interleaved(model_name, args.methods, args.steps, args.threads)
        results = {}
        for method in args.methods:
            results[method] = dict(memory[model_name, method])
            if "error" not in results[method]:
                results[method]["samples_per_s"] = speed[method]
            print(model_name, method, results[method], flush=True)
        base = results.get("nonprivate", {})
        opacus_best = max((results[m]["samples_per_s"] for m in ("opacus-hooks", "opacus-ghost")
                           if "samples_per_s" in results.get(m, {})), default=None)
        for method in args.methods:
            r = results[method]
            if "error" in r:
                rows.append(f"| {model_name} (B={MODELS[model_name]}) | {method} | failed: {r['error'][:60]} | | | | | |")
                continue
            vs_np = r["samples_per_s"] / base["samples_per_s"] if "samples_per_s" in base else float("nan")
            vs_op = r["samples_per_s"] / opacus_best if opacus_best else float("nan")
            mem = [_mib_vs(r, base, key) for key in ("peak_extra_mib", "tensor_mib", "first_steps_mib")]
            rows.append(
                f"| {model_name} (B={MODELS[model_name]}) | {method} | {r['samples_per_s']:.0f} | {vs_np:.2f}x | "
                f"{vs_op:.2f}x | {mem[0]} | {mem[1]} | {mem[2]} |"
            )
    how = sorted({r.get("rss", "") for r in memory.values()} - {""})
    header = (f"| model | method | samples/s | vs non-private | vs Opacus best | peak extra memory, steady "
              f"(rss: {'/'.join(how)}) | tensors | first steps (old) |\n|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    print(table)
    if args.write:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
        with open(path, "a") as f:
            f.write(f"\n\n## Per-example clipping (issue 18), CPU, {args.threads} thread(s), "
                    f"{time.strftime('%Y-%m-%d')}\n\n`python benchmarks/per_sample.py --steps {args.steps} "
                    f"--threads {args.threads}` (interleaved rounds)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
