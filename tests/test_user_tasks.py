"""Your own task in ``gradclip compare``: the Task protocol, the train-function form, loading from
``file.py:factory`` and ``package.module:factory``, sweeps, the verdict, failed and killed runs,
and every kind of bad input (one clear line, exit status 2, nothing written)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("matplotlib", reason="compare writes plots")
pytest.importorskip("rich", reason="compare prints rich tables")

from gradclip._core.errors import InvalidArgumentError, UnknownNameError  # noqa: E402
from gradclip.experiments import (  # noqa: E402
    Task,
    TaskDefaults,
    TaskError,
    TrainTask,
    compare,
    judge,
    linspace,
    logspace,
    sweep,
)
from gradclip.experiments.loading import load_task  # noqa: E402
from gradclip.experiments.report import line_styles, loss_figure, sweep_figure  # noqa: E402
from gradclip.experiments.sweep import parse_sweep  # noqa: E402
from gradclip.experiments.train import Diverged, Report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# A small Task subclass and a train function, written to files the way users write them.
TASK_FILE = '''
import math, torch
from gradclip.experiments import Task, TaskDefaults, TrainTask

class Line(Task):
    """Fit y = 3x - 1 with a 2-layer MLP; metric: held-out R^2."""
    name = "line"
    metric_name = "r2"
    defaults = TaskDefaults(steps=30, lr=0.1, optimizer="sgd", quick_steps=5)
    reference_loss = 10.0

    def __init__(self, seed, width=8):
        super().__init__(seed)
        self.width = width
        self.x_test = torch.linspace(-1, 1, 50).unsqueeze(1)

    def model(self):
        return torch.nn.Sequential(torch.nn.Linear(1, self.width), torch.nn.Tanh(), torch.nn.Linear(self.width, 1))

    def batch(self, step):
        x = torch.rand(16, 1, generator=self.generator) * 2 - 1
        return x, 3 * x - 1

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, model):
        y = 3 * self.x_test - 1
        with torch.no_grad():
            mse = ((model(self.x_test) - y) ** 2).mean().item()
        return {"loss": mse, "r2": 1 - mse / y.var(unbiased=False).item()}

class PerExampleLoss(Line):
    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).squeeze(1)      # a vector: the bug the runner must name

def train(clipper, seed, steps, report):
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([w], lr=0.1)
    target = torch.tensor([1.0, -2.0, 0.5])
    for step in range(steps):
        loss = ((w - target) ** 2).sum() * (1 + seed)
        opt.zero_grad(); loss.backward()
        info = clipper.clip_([w])
        opt.step()
        report(step, loss.detach(), info)
    error = float(((w.detach() - target) ** 2).sum())
    return {"accuracy": math.exp(-error), "loss": error}

def make_line():
    return Line

def make_train():
    return TrainTask(train, name="quadratic", steps=12, quick_steps=4, reference_loss=1.0, solved_at=0.9)

def wrong():
    return 42

def raising():
    raise RuntimeError("no data here")

def vector_report(clipper, seed, steps, report):
    report(0, torch.ones(32))
    return {"accuracy": 1.0}

def kill_or_fail(clipper, seed, steps, report):
    import os, signal
    if seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if seed == 2:
        raise RuntimeError("out of data on seed 2")
    return train(clipper, seed, steps, report)

def no_metric(clipper, seed, steps, report):
    report(0, 1.0)
    return {"accuracy": 0.5, "f1": 0.4}
'''


@pytest.fixture(autouse=True)
def own_environment():
    # `gradclip compare` pins threads and kernels in os.environ (for the workers it starts);
    # run in process here, it must not leak into the rest of the test session.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tasks") / "my_tasks.py"
    path.write_text(TASK_FILE)
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gradclip.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


# -- the Task protocol and the train-function form ------------------------------------------------


def test_a_task_subclass_from_a_file_runs_under_every_clipper(task_file, tmp_path):
    result = compare(f"{task_file}:Line", ["none", "global_norm:max_norm=0.5"], seeds=2, out=tmp_path / "run")
    assert [(r["clipper"], r["seed"]) for r in result.records] == [
        ("none", 0), ("none", 1), ("global_norm:max_norm=0.5", 0), ("global_norm:max_norm=0.5", 1)]
    for record in result.records:
        assert record["status"] == "ok" and record["metric_name"] == "r2" and record["steps_run"] == 30
        assert record["lr"] == 0.1 and record["optimizer"] == "sgd"  # the class's defaults
        assert record["divergence_limit"] == pytest.approx(1000 * 10.0)
        if record["clipper"] == "none":  # measured, never clipped
            assert record["history"]["threshold"] == [math.inf] * 30 and not any(record["history"]["clipped"])
        else:
            assert record["history"]["clipped"] == [n > 0.5 for n in record["history"]["norm"]]
    # The same seeds see the same data: the first step's loss is the same under every clipper.
    firsts = {r["seed"]: set() for r in result.records}
    for record in result.records:
        firsts[record["seed"]].add(record["history"]["loss"][0])
    assert all(len(v) == 1 for v in firsts.values())
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"results.jsonl", "summary.csv", "report.md", "report.html", "loss.png"} <= written
    assert result.files["report_md"].read_text().startswith("# gradclip compare: ")


def test_task_options_reach_the_constructor_and_bad_ones_are_named(task_file):
    result = compare(f"{task_file}:Line", ["none"], seeds=1, steps=2, task_options={"width": 3})
    assert result.records[0]["task_options"] == {"width": 3}
    with pytest.raises(InvalidArgumentError, match=r"task 'line' has no option 'depth' \(it takes: width\)"):
        compare(f"{task_file}:Line", ["none"], seeds=1, task_options={"depth": 3})


def test_a_train_function_is_a_task(task_file):
    loaded = load_task(f"{task_file}:train")  # a bare function: the attribute itself is the train function
    assert loaded.is_train_function and loaded.label.endswith(":train")
    result = compare(f"{task_file}:make_train", ["none", "global_norm:max_norm=0.1"], seeds=2)
    for record in result.records:
        assert record["status"] == "ok" and record["steps"] == 12 and record["steps_run"] == 12
        assert record["lr"] is None and record["optimizer"] is None
        assert record["metric_name"] == "accuracy" and 0 <= record["metric"] <= 1
        assert len(record["history"]["norm"]) == 12 and all(n > 0 for n in record["history"]["norm"])
    clipped = [r for r in result.records if r["clipper"] != "none"]
    assert all(r["history"]["threshold"][0] == pytest.approx(0.1) for r in clipped)
    assert all(r["history"]["clipped"] == [n > 0.1 for n in r["history"]["norm"]] for r in clipped)
    # Clipping at 0.1 slows the descent: the clipper reached the user's loop.
    unclipped = {r["seed"]: r["history"]["loss"][-1] for r in result.records if r["clipper"] == "none"}
    assert all(r["history"]["loss"][-1] > unclipped[r["seed"]] for r in clipped)


def test_a_task_from_a_package_module(task_file, monkeypatch):
    package = task_file.parent / "mypkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(TASK_FILE)
    monkeypatch.syspath_prepend(str(task_file.parent))
    result = compare("mypkg.tasks:make_line", ["none"], seeds=1, steps=3)
    assert result.records[0]["status"] == "ok" and result.records[0]["task"] == "mypkg.tasks:make_line"


def test_objects_from_python_and_the_metric_inferred_from_the_result():
    def train(clipper, seed, steps, report):
        for step in range(steps):
            report(step, 1.0 / (step + 1))
        return {"accuracy": 0.75, "loss": 0.5}

    result = compare(train, ["none"], seeds=1, steps=3)
    (record,) = result.records
    assert record["metric_name"] == "accuracy" and record["metric"] == 0.75 and record["eval_loss"] == 0.5
    assert record["history"]["loss"] == [1.0, 0.5, pytest.approx(1 / 3)]

    class Quick(Task):
        name = "quick"
        defaults = TaskDefaults(steps=3, lr=0.1, optimizer="adam", quick_steps=1)

        def model(self):
            return torch.nn.Linear(2, 2)

        def batch(self, step):
            return torch.ones(4, 2), torch.zeros(4, dtype=torch.long)

        def loss(self, model, batch):
            return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

        def evaluate(self, model):
            return {"loss": 0.1, "accuracy": 1.0}

    result = compare(Quick, ["global_norm:max_norm=1.0"], seeds=1, quick=True)
    assert result.records[0]["steps_run"] == 1 and result.records[0]["optimizer"] == "adam"
    # A locally defined object cannot reach worker processes: said before anything runs.
    with pytest.raises(TaskError, match="cannot be sent to worker processes"):
        compare(Quick, ["none"], seeds=2, jobs=2)


def test_report_checks_what_it_is_given_and_stops_a_diverged_run():
    report = Report(limit=100.0)
    report(0, torch.tensor(2.0), {"norm": 3.0, "threshold": 1.0, "clipped": True, "skip": False})
    report(1, 1.5)
    assert report.history["loss"] == [2.0, 1.5] and report.history["norm"][0] == 3.0
    assert math.isnan(report.history["norm"][1]) and report.history["clipped"] == [True, False]
    for bad, message in ((torch.ones(3), "of shape (3,)"), ([1.0], "got list"), ("1", "got str"), (True, "got bool")):
        with pytest.raises(TaskError, match=None) as caught:
            report(2, bad)
        assert message in str(caught.value)
    with pytest.raises(TaskError, match="info must be a gradclip.ClipInfo, a dict or None"):
        report(2, 1.0, info=3)
    with pytest.raises(Diverged, match="past the divergence limit 100"):
        report(2, 101.0)
    with pytest.raises(Diverged):
        Report()(0, math.nan)


def test_a_train_function_whose_loss_diverges_is_recorded_as_diverged():
    task = TrainTask(lambda clipper, seed, steps, report: [report(s, 10.0 ** s) for s in range(steps)] and {"accuracy": 1.0},
                     name="blowup", reference_loss=1.0, steps=6)
    (record,) = compare(task, ["none"], seeds=1).records
    assert record["diverged"] and record["status"] == "diverged" and record["steps_run"] == 5  # 1e4 > 1000 x 1
    assert record["metric"] == 0.0 and not record["solved"]


# -- failed and killed runs ----------------------------------------------------------------------


def test_failed_and_killed_runs_are_reported_and_the_others_finish(task_file, tmp_path):
    result = compare(f"{task_file}:kill_or_fail", ["global_norm:max_norm=1.0"], seeds=3, steps=5, jobs=2,
                     out=tmp_path / "run")
    by_seed = {r["seed"]: r for r in result.records}
    assert by_seed[0]["status"] == "ok" and by_seed[0]["steps_run"] == 5
    assert by_seed[1]["status"] == "killed" and "SIGKILL" in by_seed[1]["error"]
    assert by_seed[2]["status"] == "failed" and by_seed[2]["error"] == "RuntimeError: out of data on seed 2"
    assert "raise RuntimeError" in by_seed[2]["traceback"]
    (row,) = result.rows
    assert row["runs"] == 3 and row["failed"] == 2 and row["solved"] <= 1
    assert any("2 run(s) failed or were killed" in note for note in result.verdict.notes)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Failed runs" in report and "seed 1: killed" in report and "seed 2: failed — RuntimeError" in report
    lines = (tmp_path / "run" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in lines] == ["ok", "killed", "failed"]


# -- sweeps and the verdict ----------------------------------------------------------------------


def test_sweep_helpers():
    assert logspace(0.1, 10, 5) == [0.1, 0.316, 1.0, 3.16, 10.0]
    assert linspace(0.05, 0.2, 4) == [0.05, 0.1, 0.15, 0.2]
    assert parse_sweep("global_norm:max_norm=0.1,0.3,1,3,10") == [
        f"global_norm:max_norm={v}" for v in ("0.1", "0.3", "1.0", "3.0", "10.0")]
    assert parse_sweep("global_norm:max_norm=logspace(0.1,10,5)") == [
        f"global_norm:max_norm={v}" for v in ("0.1", "0.316", "1.0", "3.16", "10.0")]
    # Any numeric argument, several keys (the product), a fixed non-numeric setting, ints kept.
    assert parse_sweep("zclip:z_thresh=2,3,max_grad_norm=1") == [
        "zclip:max_grad_norm=1.0,z_thresh=2.0", "zclip:max_grad_norm=1.0,z_thresh=3.0"]
    assert parse_sweep("zclip:mode=percentile,z_thresh=2,3")[0] == "zclip:mode=percentile,z_thresh=2.0"
    assert parse_sweep("skip_on_spike:window=32,64") == ["skip_on_spike:window=32", "skip_on_spike:window=64"]
    assert sweep("value", clip_value=[0.1, 1]) == ["value:clip_value=0.1", "value:clip_value=1.0"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("global_norm:max_norm=0.1,abc", "value 'abc' of max_norm is not a number"),
        ("global_norm:max_norm=", "value '' of max_norm is not a number"),
        ("global_norm:max_norm=0.1,,1", "empty value"),
        ("zclip:mode=zscore,percentile", "zclip's mode is not numeric"),
        ("global_norm:max_norm=logspace(0,1,3)", "logspace: start must be > 0"),
        ("global_norm:max_norm=logspace(1,2)", "needs three numbers: start, stop, count"),
        ("global_norm:max_norm=-1,1", "max_norm must be in [0, inf], got -1.0"),
        ("global_norm", "expected name:key=v1,v2"),
        ("nope:x=1", "unknown clipper 'nope'"),
        ("global_norm:bogus=1,2", "global_norm has no parameter 'bogus'"),
    ],
)
def test_bad_sweeps_name_the_problem(text, message):
    with pytest.raises((InvalidArgumentError, UnknownNameError)) as caught:
        parse_sweep(text)
    assert message in str(caught.value) and f"--sweep {text!r}" in str(caught.value)


def _record(clipper, seed, metric, eval_loss=0.1, diverged=False, status="ok"):
    return {"clipper": clipper, "seed": seed, "metric_name": "accuracy", "greater_is_better": True, "metric": metric,
            "solved": metric >= 0.9 and not diverged, "diverged": diverged, "eval_loss": eval_loss, "status": status}


def test_the_verdict_names_the_best_fixed_threshold_and_each_adaptive_distance():
    records = []
    for seed in range(3):
        records += [_record("none", seed, 0.0, math.nan, diverged=True)]
        for value, metric in ((0.1, 0.80), (1.0, 0.95), (10.0, 0.90)):
            records.append(_record(f"global_norm:max_norm={value}", seed, metric + 0.01 * seed))
        records.append(_record("zclip", seed, 0.93 + 0.01 * seed))       # -2.1 %: within
        records.append(_record("autoclip", seed, 0.50 + 0.01 * seed))    # far
    verdict = judge(records)
    assert verdict.best_fixed.clipper == "global_norm:max_norm=1.0"
    assert verdict.best_fixed.metric_mean == pytest.approx(0.96) and verdict.best_fixed.metric_sd == pytest.approx(0.01)
    distances = {d.standing.clipper: d for d in verdict.distances}
    assert set(distances) == {"zclip", "autoclip"}
    assert distances["zclip"].within and distances["zclip"].relative == pytest.approx(-0.02 / 0.96)
    assert not distances["autoclip"].within and distances["autoclip"].delta == pytest.approx(-0.45)
    assert verdict.recommendation.startswith("use zclip: untuned, it lands within 5% of the best fixed threshold")
    lines = verdict.lines()
    assert lines[0].startswith("Best fixed threshold in hindsight: global_norm:max_norm=1.0 — accuracy 0.960 ± 0.010")
    assert any("zclip (untuned): accuracy 0.940 ± 0.010 (0.930–0.950), -2.1% (-0.020)" in line for line in lines)
    assert any("autoclip (untuned)" in line and "not within 5%" in line for line in lines)
    # Without an adaptive clipper within 5 %, the fixed threshold is the recommendation.
    verdict = judge([r for r in records if r["clipper"] != "zclip"])
    assert verdict.recommendation.startswith("clip at global_norm:max_norm=1.0: no adaptive clipper came within 5%")


def test_the_verdict_notes_a_best_value_at_the_edge_of_the_sweep_and_unhelpful_clipping():
    records = [_record(f"global_norm:max_norm={v}", 0, m) for v, m in ((0.1, 0.5), (1.0, 0.6), (10.0, 0.7))]
    assert any("max_norm=10 is the largest value swept" in note for note in judge(records).notes)
    records.append(_record("none", 0, 0.9))
    assert judge(records).recommendation.startswith("clipping did not help here")
    # No fixed threshold at all: the verdict asks for a sweep.
    assert "add --sweep" in judge([_record("zclip", 0, 0.9)]).recommendation
    # Lower-is-better metrics rank the other way.
    low = [{**_record(f"global_norm:max_norm={v}", 0, m), "metric_name": "perplexity", "greater_is_better": False}
           for v, m in ((0.1, 5.0), (1.0, 4.0), (10.0, 6.0))]
    assert judge(low).best_fixed.clipper == "global_norm:max_norm=1.0"


def test_plots_stay_distinguishable_for_any_number_of_clippers():
    for count in (1, 5, 12, 40, 90):
        styles = line_styles(count)
        keys = {(s["color"], s["linestyle"], s.get("marker")) for s in styles}
        assert len(keys) == count
    # The 12-clipper run: none and agc, global_norm:max_norm=0.1 and skip_on_spike differ.
    clippers = ["none", "global_norm:max_norm=0.1", "global_norm:max_norm=0.3", "global_norm:max_norm=1.0",
                "global_norm:max_norm=3.0", "global_norm:max_norm=10.0", "value:clip_value=0.1", "zclip",
                "autoclip", "adagc", "agc", "skip_on_spike"]
    records = [{**_record(c, 0, 0.5), "history": {"loss": [1.0, 0.5, 0.25], "clipped": [False] * 3}} for c in clippers]
    axis = loss_figure(records, "t").axes[0]
    drawn = {(line.get_color(), line.get_linestyle()) for line in axis.get_lines()}
    assert len(drawn) == 12
    figure = sweep_figure(judge(records), "t")
    (axis,) = figure.axes
    (points,) = [line for line in axis.get_lines() if line.get_marker() == "o"]  # not the error bars' caps
    assert list(points.get_xdata()) == [0.1, 0.3, 1.0, 3.0, 10.0] and axis.get_xscale() == "log"


# -- bad input: one clear line, exit 2, nothing written --------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "{file}:Missing"], "has no attribute 'Missing' (it defines: "),
        (["--task", "{file}:wrong"], "the factory returned int (42); expected a gradclip.experiments.Task subclass"),
        (["--task", "{file}:raising"], "the factory raised RuntimeError: no data here"),
        (["--task", "{broken}:make"], "cannot be imported: ModuleNotFoundError: No module named 'no_such_module'"),
        (["--task", "{syntax}:make"], "cannot be imported: SyntaxError: "),
        (["--task", "no/such/file.py:make"], "file 'no/such/file.py' does not exist"),
        (["--task", "no_such_package.tasks:make"], "cannot be imported: ModuleNotFoundError: No module named 'no_such_package'"),
        (["--task", "mine.py"], "a file needs its factory: path.py:factory"),
        (["--task", "{file}:PerExampleLoss"], "loss() returned a tensor of shape (16,); it must be a scalar (0-d)"),
        (["--task", "{file}:vector_report"], "the loss passed to report() must be a scalar, got Tensor of shape (32,)"),
        (["--task", "{file}:no_metric"], "name the one to rank by with TrainTask(train, metric_name=...)"),
        (["--task", "{file}:make_train", "--lr", "0.1"], "is a train function, which sets up its own optimizer"),
        (["--sweep", "global_norm:max_norm=0.1,abc"], "value 'abc' of max_norm is not a number"),
        (["--sweep", "zclip:mode=a,b"], "zclip's mode is not numeric"),
        (["--resources", "cpu=1"], "--ray-address and --resources apply to --backend ray"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(task_file, tmp_path, monkeypatch, capsys, args, message):
    from gradclip import cli

    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def make(:\n")
    args = [a.format(file=task_file, broken=broken, syntax=syntax) for a in args]
    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    # In process (the subprocess test below shows the same through the console script).
    status = cli.main(["compare", "--quick", "--no-progress", "--jobs", "2", "--seeds", "2", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("gradclip compare: error: ")
    assert not out.exists()  # nothing half-written, not even an empty directory


def test_bad_input_from_the_command_line_is_one_line_and_status_2(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module\n")
    out = tmp_path / "run"
    result = run_cli("compare", "--task", "broken.py:make", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == (
        "gradclip compare: error: task 'broken.py:make' cannot be imported: "
        "ModuleNotFoundError: No module named 'no_such_module'\n"
    )
    assert not out.exists()


def test_a_contract_error_leaves_an_existing_run_directory_as_it_was(task_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TaskError, match=r"loss\(\) returned a tensor of shape \(16,\)"):
        compare(f"{task_file}:PerExampleLoss", ["none", "zclip"], seeds=2, out=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_cli_runs_a_task_file_with_a_sweep(task_file, tmp_path):
    out = tmp_path / "run"
    result = run_cli("compare", "--task", f"{task_file}:make_line", "--sweep", "global_norm:max_norm=logspace(0.01,1,3)",
                     "--clipper", "zclip", "--clipper", "none", "--seeds", "2", "--jobs", "2", "--no-progress",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted({r["clipper"] for r in records}) == sorted(
        ["zclip", "none", "global_norm:max_norm=0.01", "global_norm:max_norm=0.1", "global_norm:max_norm=1.0"])
    # The verdict opens the console output, the Markdown and the HTML report.
    assert result.stdout.startswith("Verdict\n  Best fixed threshold in hindsight: global_norm:max_norm=")
    assert "Recommendation: " in result.stdout
    markdown = (out / "report.md").read_text()
    assert markdown.splitlines()[2] == "## Verdict" and "- Recommendation: " in markdown
    html = (out / "report.html").read_text()
    assert html.index("Verdict") < html.index("<table>")
    assert (out / "sweep.png").is_file()
    assert "sweep.png" in markdown and "kernels=" in markdown
