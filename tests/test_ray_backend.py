"""``--backend ray``: the same runs as Ray tasks on a local Ray cluster, records streamed into the
same report, failed and killed runs reported as such, a task error stops everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("matplotlib", reason="compare writes plots")

from gradclip.experiments import TaskError, compare  # noqa: E402
from gradclip.experiments.ray_backend import MissingRayError, _options, parse_resources, run_ray  # noqa: E402

from test_user_tasks import TASK_FILE  # noqa: E402


def test_resources_per_run_become_ray_options():
    options = _options(parse_resources("cpu=2,gpu=0.5,memory=1e9,gadget=1"))
    assert options["num_cpus"] == 2.0 and options["num_gpus"] == 0.5 and options["memory"] == 1_000_000_000
    assert options["resources"] == {"gadget": 1.0}
    assert options["max_retries"] == 0  # a killed run is reported, not silently retried
    assert options["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "1"
    assert parse_resources(None) == {"cpu": 1.0} and parse_resources({"gpu": 1}) == {"gpu": 1.0, "cpu": 1.0}
    for bad, message in (("cpu", "expected name=amount"), ("cpu=-1", "cpu must be a number >= 0"),
                         ("gpu=lots", "gpu must be a number >= 0, got 'lots'")):
        with pytest.raises(Exception, match=None) as caught:
            parse_resources(bad)
        assert message in str(caught.value)


def test_without_ray_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MissingRayError, match=r"pip install 'gradclip\[ray\]'"):
        run_ray([])


ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'gradclip[ray]')")
# Ray starts its workers (each importing PyTorch) on demand: minutes on a loaded two-core machine.
pytestmark = pytest.mark.timeout(900)


def test_the_command_line_runs_the_same_runs_on_a_local_ray(tmp_path):
    # The command line starts (and stops) its own local Ray; its records stream into the same
    # report and match the same runs made locally, bit for bit (both pinned to the same kernels).
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", "--task", "digits", "--steps", "15", "--seeds", "2",
         "--clipper", "none", "--clipper", "zclip", "--backend", "ray", "--resources", "cpu=1", "--no-progress",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    on_ray = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in on_ray] == ["ok"] * 4
    assert "backend=ray" in (out / "report.md").read_text() and result.stdout.startswith("Verdict")
    local = compare("digits", ["none", "zclip"], seeds=2, steps=15, jobs=2).records
    for a, b in zip(on_ray, local):
        assert (a["clipper"], a["seed"]) == (b["clipper"], b["seed"])
        assert a["history"]["loss"] == b["history"]["loss"] and a["metric"] == b["metric"]
        assert a["cpu_capability"] == b["cpu_capability"]


@pytest.fixture(scope="module")
def cluster():
    # A local two-CPU cluster, started once for the module; run_ray uses the connection.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray_tasks") / "my_tasks.py"
    path.write_text(TASK_FILE)
    return path


def test_failed_and_killed_ray_runs_are_reported(cluster, task_file, tmp_path):
    result = compare(f"{task_file}:kill_or_fail", ["global_norm:max_norm=1.0"], seeds=3, steps=4, backend="ray",
                     out=tmp_path / "run")
    by_seed = {r["seed"]: r for r in result.records}
    assert by_seed[0]["status"] == "ok" and by_seed[0]["steps_run"] == 4
    assert by_seed[1]["status"] == "killed" and "Ray" in by_seed[1]["error"]
    assert by_seed[2]["status"] == "failed" and by_seed[2]["error"] == "RuntimeError: out of data on seed 2"
    assert result.rows[0]["failed"] == 2
    assert "## Failed runs" in (tmp_path / "run" / "report.md").read_text()


def test_a_task_error_on_ray_stops_the_comparison_and_writes_nothing(cluster, task_file, tmp_path):
    with pytest.raises(TaskError, match=r"loss\(\) returned a tensor of shape \(16,\)"):
        compare(f"{task_file}:PerExampleLoss", ["none", "zclip"], seeds=2, backend="ray", out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
