"""Reproducible tables: every run is pinned to one thread, deterministic algorithms and the same
kernels (AVX2 for PyTorch, MKL and oneDNN on x86-64), whatever the calling process uses, so a
seed gives the same numbers in a worker process, in the command line's own process and on
another x86-64 machine. Without the pins the kernels follow the processor, and so do the bits."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")

from gradclip.experiments.environment import PINNED_ENVIRONMENT, pinned_environment, pinned_torch  # noqa: E402
from gradclip.experiments.runner import RunConfig, run_many  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64")


def _cli_history(tmp_path: Path, name: str, **environment: str) -> list[dict]:
    out = tmp_path / name
    env = {**{k: v for k, v in os.environ.items() if k not in PINNED_ENVIRONMENT}, **environment,
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", "--task", "adding", "--steps", "60", "--seeds", "2",
         "--jobs", "1", "--clipper", "global_norm:max_norm=1.0", "--no-progress", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_worker_processes_and_the_command_line_give_the_same_bits(tmp_path):
    configs = [RunConfig("adding", "global_norm:max_norm=1.0", seed, 60, 0.2, "sgd", {}) for seed in (0, 1)]
    pooled = run_many(configs, jobs=2)  # spawned workers, started with the pinned environment
    # The command line runs in its own process (--jobs 1), with a user asking for 8 threads.
    cli = _cli_history(tmp_path, "cli", OMP_NUM_THREADS="8", MKL_NUM_THREADS="8")
    for a, b in zip(pooled, cli):
        assert a["history"]["loss"] == b["history"]["loss"] and a["history"]["norm"] == b["history"]["norm"]
        assert a["eval_loss"] == b["eval_loss"]
    if X86:
        assert {r["cpu_capability"] for r in pooled + cli} == {"AVX2"}


@pytest.mark.skipif(not X86 or " avx512f" not in Path("/proc/cpuinfo").read_text(), reason="needs an AVX-512 processor")
def test_other_kernels_change_the_bits_which_is_why_they_are_pinned(tmp_path):
    pinned = _cli_history(tmp_path, "pinned")
    # A user's explicit choice wins over the pins: here, the processor's own AVX-512 kernels.
    wide = _cli_history(tmp_path, "wide", ATEN_CPU_CAPABILITY="avx512", MKL_CBWR="AUTO", ONEDNN_MAX_CPU_ISA="ALL")
    assert {r["cpu_capability"] for r in wide} == {"AVX512"}
    assert [r["history"]["loss"][0] for r in pinned] == pytest.approx([r["history"]["loss"][0] for r in wide], rel=1e-5)
    assert any(a["history"]["loss"] != b["history"]["loss"] for a, b in zip(pinned, wide))


def test_the_pins_and_their_scope():
    environment = pinned_environment()
    assert environment["OMP_NUM_THREADS"] == "1" and environment["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    if X86:
        assert environment["ATEN_CPU_CAPABILITY"] == "avx2" and environment["MKL_CBWR"] == "AVX2,STRICT"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pinned_torch():
            assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        # The caller's settings come back: a library call leaves the process as it found it.
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
