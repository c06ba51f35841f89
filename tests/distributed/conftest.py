"""Launching real ``torch.distributed`` runs (gloo, 2 and 4 processes) for the distributed tests.

Each world size is launched once per session (process start-up with torch costs seconds; the
machine has two cores), every check is made inside the workers against a one-process reference
(see ``_worker.py``), and the tests below read the results by topic. A hang fails fast: the
workers' collectives time out after 60 s (gloo), a rank that fails exits at once and the others
are killed, and the launcher kills everything after a hard deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_worker.py")
ROOT = Path(__file__).resolve().parents[2]
#: Hard deadline of one launch, seconds (the 4-process run takes about 50 s on two idle cores).
DEADLINE = {2: 240, 4: 420}


class Run:
    """The outcome of one launch: per rank, the checks made and any error."""

    def __init__(self, world: int, ranks: list[dict]):
        self.world = world
        self.ranks = ranks

    def checks(self, prefix: str) -> list[tuple[int, str, bool, str]]:
        return [
            (rank, name, ok, detail)
            for rank, result in enumerate(self.ranks)
            for name, ok, detail in result["checks"]
            if name.startswith(prefix)
        ]

    def assert_ok(self, prefix: str, minimum: int = 1) -> None:
        found = self.checks(prefix)
        assert len(found) >= minimum * self.world, (
            f"only {len(found)} check(s) under {prefix!r} across {self.world} ranks"
        )
        failed = [f"rank {r}: {name}: {detail}" for r, name, ok, detail in found if not ok]
        shown = "\n".join(failed[:25]) + (f"\n... and {len(failed) - 25} more" if len(failed) > 25 else "")
        assert not failed, f"{len(failed)} of {len(found)} check(s) under {prefix!r} failed:\n{shown}"


def launch(world: int, scenario: str, directory: Path, deadline: float, worker: Path = WORKER, env_extra: dict | None = None) -> Run:
    """Start ``world`` worker processes and wait for all of them, at most ``deadline`` seconds.

    ``worker`` is the script each process runs (``_worker.py``, or one registering more
    scenarios into it); ``env_extra`` adds environment variables (DeepSpeed's accelerator)."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = directory / "store"
    procs, outs, logs = [], [], []
    for rank in range(world):
        out = directory / f"rank{rank}.json"
        log = open(directory / f"rank{rank}.log", "w")
        outs.append(out)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(worker), str(rank), str(world), str(store), scenario, str(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(ROOT),
            )
        )
    start = time.monotonic()
    problem = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                problem = f"rank {codes.index(next(c for c in codes if c not in (None, 0)))} failed"
                break
            if time.monotonic() - start > deadline:
                problem = f"hang: not finished after {deadline} s (exit codes {codes})"
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait(timeout=30)
        for log in logs:
            log.close()
    ranks = []
    errors = []
    for rank, out in enumerate(outs):
        if out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"checks": [], "error": "no result written"}
        ranks.append(result)
        if result.get("error"):
            errors.append(f"rank {rank}:\n{result['error']}")
    codes = [p.returncode for p in procs]
    if problem or errors or any(codes):
        tail = (directory / "rank0.log").read_text()[-3000:]
        pytest.fail(
            f"distributed run ({world} processes, scenario {scenario!r}) did not complete: "
            f"{problem or 'errors'}; exit codes {codes}\n" + "\n".join(errors) + f"\nrank 0 log tail:\n{tail}",
            pytrace=False,
        )
    return Run(world, ranks)


def _run_once(world: int, tmp_path_factory) -> Run:
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    directory = tmp_path_factory.mktemp(f"dist{world}")
    return launch(world, "main", directory, DEADLINE[world])


@pytest.fixture
def launcher():
    """The :func:`launch` function itself."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    return launch


@pytest.fixture(scope="session")
def dist2(tmp_path_factory) -> Run:
    """The 2-process run: DDP, FSDP2, tensor parallel, hand-made DTensors, partitions (plain, and
    mixed with DTensors) with a rank without gradients, tied embeddings."""
    return _run_once(2, tmp_path_factory)


@pytest.fixture(scope="session")
def dist4(tmp_path_factory) -> Run:
    """The 4-process run: everything the 2-process run does, plus HSDP (2-D mesh), FSDP2 x tensor
    parallel and hand-made DTensors on 2-D meshes."""
    return _run_once(4, tmp_path_factory)


@pytest.fixture(params=[2, 4], ids=["2proc", "4proc"])
def dist_run(request) -> Run:
    """The 2-process run, then the 4-process one, for the layouts both of them run."""
    return request.getfixturevalue(f"dist{request.param}")
