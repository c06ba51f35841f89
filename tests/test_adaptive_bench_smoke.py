"""Smoke test of benchmarks/bench_adaptive.py in its --quick mode (tiny shapes).

The benchmark prints ratios; nothing here asserts a timing (DESIGN.md: benchmarks are not timed
tests). It checks that the harness runs, covers every adaptive clipper and reports a ratio each.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "bench_adaptive.py"


def test_quick_benchmark_runs_and_prints_a_ratio_per_clipper():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--rounds", "2", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    out = result.stdout
    assert "148 tensors" in out and "quick mode" in out
    for name in ["AutoClip()", "AutoClip(history=1000)", "ZClip()", "AdaGC()", "QuantileNorm()", "SkipOnSpike()", "NonFinite('skip')", "AGC()"]:
        line = next(line for line in out.splitlines() if line.startswith(name))
        assert re.search(r"\d+\.\d{3}\s+\d+\.\d{3}", line), line
    assert re.search(r"worst adaptive median ratio: \d+\.\d{3}", out)
