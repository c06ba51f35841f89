"""The performance harness behind ``gradclip bench`` and ``benchmarks/run.py``.

Every benchmark times gradclip and its reference in the same process, in interleaved rounds
(each round calls every contender once, the order alternating between rounds), after warm-up.
The ratio reported is the median over rounds of the per-round ratio: both sides of one round
ran moments apart and saw the same machine, so load from other processes cancels out much
better than in two separate medians. Absolute times (medians) are printed for context only;
targets are judged on ratios. The targets are DESIGN.md's:

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

Layout: :mod:`~gradclip.bench.harness` (interleaved timing, ratios, result rows, RESULTS.md
sections), :mod:`~gradclip.bench.suites` (the rows above, one method per group) and
:mod:`~gradclip.bench.workloads` (model shapes, operation counts, peak memory, timm's AGC).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# Besides main and __all__, this namespace holds what the tests reach for (the suite class, the
# adaptive clippers' names, the probes): gradclip.bench.X is the one address of each.
from gradclip.bench.harness import (
    TABLE_HEADER,
    Result,
    _machine,
    format_section,
    interleave,
    parse_results,
    run_groups,
    write_section,
)
from gradclip.bench.suites import ADAPTIVE, GROUPS, ROW_IDS, SLOW_GROUPS, _Bench
from gradclip.bench.workloads import _count_ops, _peak_extra_bytes, gpt2_small_shapes, resnet50_shapes

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


def _at_least_one(text: str) -> int:
    """An argparse ``type=``: an integer >= 1 (argparse names the option in the usage error)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _device(parser: argparse.ArgumentParser, text: str | None):
    """The ``--device`` as a ``torch.device``: cpu, or cuda/cuda:N on a machine that has it.

    Anything else is a usage error (``parser.error``: exit status 2) naming the value."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = text.strip().lower().partition(":")
    if kind not in ("cpu", "cuda") or (colon and not index.isdigit()) or (kind == "cpu" and colon and index != "0"):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"--device {text!r}: this PyTorch sees no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu")
        if colon and int(index) >= count:
            parser.error(f"--device {text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device(f"{kind}{colon}{index}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print a table, and write RESULTS.md unless ``--quick``.

    Returns:
        0, or 1 when a benchmark failed to run (a missed target is not a failure).

    Raises:
        SystemExit: Status 2 for a bad option (argparse's usage error): an unknown group, a
            ``--device`` other than cpu/cuda/cuda:N or one this machine lacks, ``--rounds`` or
            ``--threads`` below 1; the message names the option, the value and the valid range.
    """
    parser = argparse.ArgumentParser(prog="gradclip bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, few rounds, no RESULTS.md unless --out")
    parser.add_argument("--out", type=Path, help="where to write RESULTS.md (default benchmarks/RESULTS.md)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--only", nargs="*", choices=GROUPS, help="benchmark groups to run (default: all)")
    parser.add_argument("--rounds", type=_at_least_one, default=None,
                        help="timed rounds per benchmark, >= 1 (default 11, quick 3)")
    parser.add_argument("--threads", type=_at_least_one, default=None,
                        help="torch.set_num_threads before running, >= 1 (default: torch's)")
    parser.add_argument("--label", default="", help="names this run's section of RESULTS.md (with the device)")
    args = parser.parse_args(argv)
    device = _device(parser, args.device)  # checked before anything runs or is written
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench = _Bench(args.quick, str(device), args.rounds)
    started = time.perf_counter()
    machine = _machine(device)
    groups = args.only or [g for g in GROUPS if not (args.quick and g in SLOW_GROUPS)]
    results = run_groups(bench, groups)
    key = device.type + (f", {args.label}" if args.label else "")
    sizes = "quick smoke sizes" if args.quick else "full sizes"
    section = format_section(key, sizes, bench.rounds, bench.warmup, started, machine, results)
    print(section)
    out = args.out or (None if args.quick else Path("benchmarks") / "RESULTS.md")
    if out is not None:
        write_section(out, key, section)
        print(f"wrote {out}")
    failed = [r for r in results if r.note.startswith("failed")]
    return 1 if failed else 0
