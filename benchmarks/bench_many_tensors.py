"""Tens of thousands of gradients: gradclip's global-norm clip against torch's, side by side.

Two rows, each measured in one run (ratios and the time per tensor, which stays flat when the
cost is linear in the count, are the result; absolute numbers depend on the machine):

* ``plain``: N plain CPU tensors in one process, gradclip ``GlobalNorm.clip_`` against
  ``torch.nn.utils.clip_grad_norm_(foreach=True)``.
* ``dtensor``: N DTensor gradients (``Shard(0)`` on a 1-D mesh) in 2 gloo processes, gradclip
  against torch's DTensor ``clip_grad_norm_``, whose cost grows faster than linearly (a
  high-priority pytorch issue): it is timed up to ``--torch-max`` tensors only.

Usage::

    python benchmarks/bench_many_tensors.py                 # N = 2,000 and 20,000
    python benchmarks/bench_many_tensors.py --counts 500 5000 --torch-max 2000

The regression tests count operations instead of timing (tests/test_many_tensors.py,
tests/distributed/test_sharding.py::test_20000_dtensor_gradients_linear_cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gradclip


def _plain(n: int):
    params = []
    for i in range(n):
        p = torch.nn.Parameter(torch.zeros(4, 3))
        p.grad = torch.randn(4, 3)
        params.append(p)
    return params


def _best(fn, repeat: int = 3, clock=time.perf_counter) -> float:
    """The median of ``repeat`` calls' times by ``clock`` (wall time by default)."""
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def plain_row(n: int) -> tuple[float, float, float]:
    """gradclip's wall time, torch's, and gradclip's CPU time (this process)."""
    ours, theirs = _plain(n), _plain(n)
    clipper = gradclip.GlobalNorm(1e9)
    return (
        _best(lambda: clipper.clip_(ours, allow_repeat=True)),
        _best(lambda: torch.nn.utils.clip_grad_norm_(theirs, 1e9, foreach=True)),
        _best(lambda: clipper.clip_(ours, allow_repeat=True), clock=time.process_time),
    )


def _dtensor_rank(rank: int, store: str, counts: list[int], torch_max: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    rows = []
    for n in counts:
        params = []
        for _ in range(n):
            p = torch.nn.Parameter(DTensor.from_local(torch.zeros(2, 3), mesh, [Shard(0)], run_check=False))
            p.grad = DTensor.from_local(torch.randn(2, 3), mesh, [Shard(0)], run_check=False)
            params.append(p)
        clipper = gradclip.GlobalNorm(1e9)
        clipper.clip_(params)  # warm-up: the first call builds what later ones reuse
        ours = _best(lambda c=clipper, ps=params: c.clip_(ps, allow_repeat=True), repeat=3)
        # CPU time of this rank: on a loaded machine the wall time also holds the waits for the
        # other rank, descheduled, at each collective.
        cpu = _best(lambda c=clipper, ps=params: c.clip_(ps, allow_repeat=True), repeat=3, clock=time.process_time)
        if n <= torch_max:
            theirs = _best(lambda ps=params: torch.nn.utils.clip_grad_norm_(ps, 1e9, foreach=True), repeat=1)
        else:
            theirs = float("nan")
        rows.append((n, ours, theirs, cpu))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(rows, handle)  # NaN (torch not run) survives as NaN
    dist.destroy_process_group()


def dtensor_rows(counts: list[int], torch_max: int) -> list[tuple[int, float, float, float]]:
    with tempfile.TemporaryDirectory() as directory:
        store, out = os.path.join(directory, "store"), os.path.join(directory, "rows")
        mp.spawn(_dtensor_rank, args=(store, counts, torch_max, out), nprocs=2)
        with open(out) as handle:
            return [tuple(row) for row in json.load(handle)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--torch-max", type=int, default=2_000, help="largest N timed for torch's DTensor clip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        "| setup | tensors | gradclip (ms) | gradclip (µs / tensor) | gradclip CPU (µs / tensor) "
        "| torch (ms) | torch (µs / tensor) | torch / gradclip |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.counts:
        print(_row("plain, 1 process", n, *plain_row(n)))
    for n, ours, theirs, cpu in dtensor_rows(args.counts, args.torch_max):
        print(_row("DTensor Shard(0), 2 gloo processes", n, ours, theirs, cpu))


def _row(setup: str, n: int, ours: float, theirs: float, cpu: float) -> str:
    """One table row: wall totals in ms, wall and CPU time per tensor in µs; torch's NaN (not
    run) shown as such."""
    mine = f"| {setup} | {n} | {ours * 1e3:.1f} | {ours / n * 1e6:.2f} | {cpu / n * 1e6:.2f} |"
    if math.isnan(theirs):
        return f"{mine} not run | | |"
    return f"{mine} {theirs * 1e3:.1f} | {theirs / n * 1e6:.2f} | {theirs / ours:.2f} |"


if __name__ == "__main__":
    main()
