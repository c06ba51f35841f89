"""Smoke test of the performance harness (gradclip/bench/) in its ``--quick`` mode.

Nothing here checks a time or a target (DESIGN.md: benchmarks are not timed tests): the harness
must run, write a RESULTS.md that parses, with every row and a ratio in each, and keep the
sections of other runs. The ``gradclip bench`` command's option forwarding is tested in
tests/test_cli.py. The adaptive clippers' cost (P4) is measured by this harness only, so
RESULTS.md holds one answer for it.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("torch", reason="the benchmarks are torch's")

from gradclip import bench  # noqa: E402


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_row_with_a_ratio(quick_results):
    text = quick_results.read_text()
    rows = bench.parse_results(text)
    ids = [row["id"] for row in rows]
    assert sorted(set(ids)) == sorted(bench.ROW_IDS["cpu"])
    assert ids.count("P4") == len(bench.ADAPTIVE)
    assert ids.count("MEM") == 2  # fp32 and bf16
    assert ids.count("OPS") == len(bench.ADAPTIVE) + 2  # GlobalNorm, each adaptive one, AGC
    for row in rows:
        assert not row["note"].startswith("failed"), row
        if row["note"].startswith("skipped"):  # zclip or timm not installed
            assert row["id"] in ("P4z", "P4a"), row
            continue
        assert math.isfinite(float(row["ratio"])), row
        # Judged rows say yes or NO; the reported ones (operation counts) carry no verdict.
        assert row["met"] in (("—",) if row["target"] == "report" else ("yes", "NO")), row
        assert row["target"], row
    assert "torch" in text and "CPU:" in text  # machine and versions


def test_sections_of_other_runs_are_kept_and_the_same_run_replaced(quick_results, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(quick_results.read_text())
    assert bench.main(["--quick", "--device", "cpu", "--only", "p3", "--label", "second", "--out", str(out)]) == 0
    text = out.read_text()
    assert "## cpu (" in text and "## cpu, second (" in text
    assert len(bench.parse_results(text)) == len(bench.parse_results(quick_results.read_text())) + 1
    # The unlabelled CPU section is replaced, not appended to.
    assert bench.main(["--quick", "--device", "cpu", "--only", "p3", "--out", str(out)]) == 0
    text = out.read_text()
    assert [row["id"] for row in bench.parse_results(text)] == ["P3", "P3"]
    assert text.count("# gradclip benchmark results") == 1


def test_interleave_pairs_rounds_and_alternates_the_order():
    calls = []
    times = bench.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_a_broken_benchmark_is_reported_and_sets_the_exit_status(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(bench._Bench, "p3", broken)
    out = tmp_path / "RESULTS.md"
    assert bench.main(["--quick", "--device", "cpu", "--only", "p3", "--out", str(out)]) == 1
    (row,) = bench.parse_results(out.read_text())
    assert row["id"] == "P3" and "failed: RuntimeError: boom" in row["note"]


def test_count_ops_counts_each_dispatched_operation_once():
    import torch

    x = torch.ones(3)
    assert bench._count_ops(lambda: (x + 1).mul_(2).sum()) == 3
    assert bench._count_ops(lambda: None) == 0


def test_the_critical_path_follows_what_each_operation_reads():
    import torch

    from gradclip.bench.workloads import _op_profile

    x = torch.ones(3)
    # A chain: each operation reads the one before (the in-place mul_ writes what sum reads).
    assert _op_profile(lambda: (x + 1).mul_(2).sum()) == (3, 3)
    # Three independent operations: one launch deep.
    assert _op_profile(lambda: (x + 1, x + 2, x * 3)) == (3, 1)
    # A write the operation does not return (_foreach_mul_ returns nothing) still carries its
    # depth: the sum reads the scaled tensors, two operations after the norm.
    ys = [torch.ones(4), torch.ones(5)]

    def scaled_then_summed():
        norm = torch.linalg.vector_norm(x)
        torch._foreach_mul_(ys, norm)
        return ys[0].sum()

    assert _op_profile(scaled_then_summed) == (3, 3)
    # torch's own clip_grad_norm_(foreach=True) is one dependent chain from the per-tensor
    # norms to the scale.
    params = [torch.nn.Parameter(torch.ones(8)) for _ in range(3)]
    for param in params:
        param.grad = torch.ones(8)
    count, path = _op_profile(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True))
    assert path == count
