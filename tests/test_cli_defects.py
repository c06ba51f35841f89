"""Defects a new user met in ``gradclip compare``/``bench`` and the experiment runner, each pinned
by a small, fast check: exit statuses, the verdict's note on divergence, repeated spec keys,
argument validation, single specs given as a string, wall time without start-up costs, and
``--quick`` runs that meet the perturbation their task is about."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("rich", reason="compare prints rich tables")
pytest.importorskip("matplotlib", reason="compare writes plots")

from gradclip import InvalidArgumentError  # noqa: E402
from gradclip import cli  # noqa: E402
from gradclip.experiments import judge  # noqa: E402


def _compare(tmp_path: Path, *args: str) -> list[str]:
    return ["compare", "--seeds", "1", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "run"), *args]


# -- 1: a comparison where no run finished exits 1 -----------------------------------------------

FAILING = '''
def train(clipper, seed, steps, report):
    raise RuntimeError("boom: my training loop crashed")
'''

SOMETIMES = '''
def train(clipper, seed, steps, report):
    if clipper.config().get("max_norm") == 1.0:
        raise RuntimeError("boom")
    for step in range(steps):
        report(step, 1.0 / (step + 1))
    return {"accuracy": 0.5, "loss": 0.5}
'''


def test_compare_exits_1_when_no_run_finished(tmp_path, capsys):
    task = tmp_path / "failing_task.py"
    task.write_text(FAILING)
    status = cli.main(_compare(tmp_path, "--task", f"{task}:train", "--clipper", "none",
                               "--clipper", "global_norm:max_norm=1", "--steps", "3"))
    captured = capsys.readouterr()
    assert status == 1
    assert "no run finished (2 of 2 failed or were killed)" in captured.err
    assert "failed run:" in captured.out  # the errors are still listed, and the report written
    assert (tmp_path / "run" / "results.jsonl").is_file()


def test_compare_exits_0_when_only_some_runs_failed(tmp_path, capsys):
    task = tmp_path / "sometimes.py"
    task.write_text(SOMETIMES)
    status = cli.main(_compare(tmp_path, "--task", f"{task}:train", "--clipper", "none",
                               "--clipper", "global_norm:max_norm=1.0", "--steps", "3"))
    out = capsys.readouterr().out
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith("│ global_norm"))
    assert "1/1" in row and "failed" in out  # the failed column names the failure


# -- 2: the verdict counts divergence ------------------------------------------------------------


def _record(clipper, seed, metric, eval_loss=0.1, diverged=False):
    return {"clipper": clipper, "seed": seed, "metric_name": "success", "greater_is_better": True,
            "metric": metric, "solved": metric >= 0.9 and not diverged, "diverged": diverged,
            "eval_loss": eval_loss, "status": "diverged" if diverged else "ok"}


def test_no_clipping_that_diverges_where_the_bound_does_not_is_not_called_a_bound_that_mattered_little():
    records = []
    for seed in range(2):
        records.append(_record("none", seed, 0.0, math.nan, diverged=True))
        records.append(_record("global_norm:max_norm=1.0", seed, 0.0, 0.17))
    verdict = judge(records)
    assert verdict.best_fixed.clipper == "global_norm:max_norm=1.0"
    text = "\n".join(verdict.lines())
    assert "mattered little" not in text
    assert "diverged on 2/2 seeds against 0/2: the bound kept runs from diverging" in text


def test_a_tied_metric_at_zero_with_a_worse_held_out_loss_is_not_called_little():
    records = []
    for seed in range(2):
        records.append(_record("none", seed, 0.0, 0.9))
        records.append(_record("global_norm:max_norm=1.0", seed, 0.0, 0.2))
    text = "\n".join(judge(records).lines())
    assert "mattered little" not in text and "held-out loss of 0.9 against 0.2: the bound mattered" in text


def test_no_clipping_as_good_and_as_stable_still_mattered_little():
    records = []
    for seed in range(2):
        records.append(_record("none", seed, 0.95))
        records.append(_record("global_norm:max_norm=1.0", seed, 0.95))
    assert any("on this task the bound mattered little" in note for note in judge(records).notes)


# -- 5: a key given twice in a spec ------------------------------------------------------------


@pytest.mark.parametrize("text", ["global_norm:max_norm=1,max_norm=2", "zclip+global_norm:max_norm=1, max_norm=1"])
def test_a_spec_naming_a_key_twice_is_refused(text):
    from gradclip.experiments.spec import parse_spec

    with pytest.raises(InvalidArgumentError, match=r"max_norm is given twice") as error:
        parse_spec(text)
    assert repr(text) in str(error.value)


def test_a_sweep_naming_a_key_twice_is_refused():
    from gradclip.experiments.sweep import parse_sweep

    with pytest.raises(InvalidArgumentError, match=r"--sweep 'global_norm:max_norm=1,2,max_norm=3': max_norm is given twice"):
        parse_sweep("global_norm:max_norm=1,2,max_norm=3")


def test_compare_refuses_a_repeated_key_as_a_usage_error(tmp_path, capsys):
    status = cli.main(_compare(tmp_path, "--task", "digits", "--steps", "2",
                               "--clipper", "global_norm:max_norm=1,max_norm=2"))
    assert status == 2
    assert "clipper spec 'global_norm:max_norm=1,max_norm=2': max_norm is given twice" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_compare_refuses_a_repeated_task_option_as_a_usage_error(tmp_path, capsys):
    status = cli.main(_compare(tmp_path, "--task", "adding", "--steps", "2", "--clipper", "none",
                               "--task-option", "seq_len=6", "--task-option", "seq_len=8"))
    assert status == 2
    assert "--task-option seq_len is given twice ('seq_len=8')" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.jsonl").exists()


# -- 4: gradclip bench checks its options before running -----------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N, got 'tpu'"),
        (["--threads", "-1"], "argument --threads: must be an integer >= 1, got '-1'"),
        (["--threads", "0"], "argument --threads: must be an integer >= 1, got '0'"),
        (["--rounds", "-3"], "argument --rounds: must be an integer >= 1, got '-3'"),
        (["--rounds", "0"], "argument --rounds: must be an integer >= 1, got '0'"),
    ],
)
def test_bench_refuses_bad_options_as_usage_errors(options, message, capsys, tmp_path):
    from gradclip import bench

    out = tmp_path / "RESULTS.md"
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--only", "p3", "--out", str(out), *options])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran


def test_bench_refuses_cuda_on_a_machine_without_it(capsys):
    import torch

    from gradclip import bench

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quick", "--only", "p3", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device 'cuda': this PyTorch sees no CUDA device" in capsys.readouterr().err


def test_gradclip_bench_exits_2_on_a_bad_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--only", "p3", "--rounds", "0"])
    assert exit_.value.code == 2


# -- 6: one spec as a string; a directory given as a log -----------------------------------------


def test_compare_takes_one_spec_given_as_a_string():
    from gradclip.experiments.compare import plan_comparison

    plan = plan_comparison("digits", "global_norm", seeds=1, steps=2)
    assert plan.clippers == ["global_norm"]
    plan = plan_comparison("digits", "zclip+skip_on_spike", seeds=1, steps=2)
    assert [c.clipper for c in plan.configs] == ["zclip+skip_on_spike"]
    plan = plan_comparison("digits", "none", sweep="global_norm:max_norm=1,2", seeds=1, steps=2)
    assert plan.clippers == ["none", "global_norm:max_norm=1.0", "global_norm:max_norm=2.0"]


def test_expand_reads_a_string_as_one_spec():
    from gradclip.experiments.sweep import expand

    assert expand("zclip", "global_norm:max_norm=1,2") == ["zclip", "global_norm:max_norm=1.0", "global_norm:max_norm=2.0"]


@pytest.mark.parametrize("command", ["suggest", "report"])
def test_a_directory_given_as_the_log_is_named_a_directory(command, tmp_path, capsys):
    (tmp_path / "clip.jsonl").write_text('{"norm": 1.0}\n')
    assert cli.main([command, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"'{tmp_path}' is a directory; give the path of a Monitor JSON Lines log file" in err
    assert "does not exist" not in err and "(there: clip.jsonl)" in err


# -- 3: wall time counts training, not a process's start-up --------------------------------------

from gradclip.experiments import Task  # noqa: E402

#: How long the simulated one-time costs below take, on a simulated clock: a real sleep against a
#: real bound would make the tests depend on how fast a loaded machine runs three tiny steps.
SLOW = 10.0


class _Clock:
    """The runner's clock (``runner.time``) with a simulated delay: ``sleep`` moves it forward
    instantly, so a slow one-time cost shows up in any interval it falls into."""

    def __init__(self):
        import time

        self._real, self.offset = time.perf_counter, 0.0

    def perf_counter(self) -> float:
        return self._real() + self.offset

    def sleep(self, seconds: float) -> None:
        self.offset += seconds


_CLOCK = _Clock()


@pytest.fixture
def simulated_clock(monkeypatch):
    from types import SimpleNamespace

    from gradclip.experiments import runner

    monkeypatch.setattr(runner, "time", SimpleNamespace(perf_counter=_CLOCK.perf_counter))
    return _CLOCK


class _SlowToBuild(Task):
    """A tiny regression whose construction takes SLOW seconds of the simulated clock (as loading
    a data set or importing a heavy library does on a worker's first run)."""

    name = "slow-to-build"
    metric_name = "loss"
    greater_is_better = False

    def __init__(self, seed):
        _CLOCK.sleep(SLOW)
        super().__init__(seed)

    def model(self):
        import torch

        return torch.nn.Linear(2, 1)

    def batch(self, step):
        import torch

        return torch.ones(4, 2), torch.zeros(4, 1)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, model):
        loss = float(self.loss(model, self.batch(0)).detach())
        return {"loss": loss}

    def solved(self, metric):
        return metric < 0.1


def test_wall_time_leaves_out_building_the_task(tmp_path, simulated_clock):
    from gradclip.experiments import compare

    result = compare(_SlowToBuild, "none", seeds=1, steps=3, jobs=1)
    (record,) = result.records
    assert record["status"] == "ok", record.get("error")
    assert 0 < record["wall_time"] < SLOW


def test_wall_time_leaves_out_a_clippers_first_use_in_the_process(monkeypatch, simulated_clock):
    import gradclip
    from gradclip.experiments import compare, runner

    original, calls = gradclip.GlobalNorm.clip_, []

    def clip_(self, *args, **kwargs):
        if not calls:
            simulated_clock.sleep(SLOW)  # a lazy import on the first use, say
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(gradclip.GlobalNorm, "clip_", clip_)
    monkeypatch.setattr(runner, "_WARM", set())
    result = compare(_SlowToBuild, "global_norm:max_norm=1.0", seeds=1, steps=3, jobs=1)
    (record,) = result.records
    assert record["status"] == "ok", record.get("error")
    assert len(calls) == 3 + 1 and record["wall_time"] < SLOW


def test_the_warm_up_changes_no_result():
    # The first run of a spec in a process (warmed up) and a later one (not) are bit for bit equal.
    from gradclip.experiments import runner
    from gradclip.experiments.runner import RunConfig, run_one

    config = RunConfig("digits", "zclip", 0, 25, 0.1, "sgd")
    runner._WARM.discard("zclip")
    first, again = run_one(config), run_one(config)
    assert first["history"] == again["history"] and first["metric"] == again["metric"]


# -- 7: a --quick run meets the perturbation its task is about -----------------------------------


@pytest.mark.parametrize("task", ["spikes", "badbatch"])
def test_a_quick_run_meets_a_perturbation_on_every_seed(task):
    pytest.importorskip("sklearn", reason="spikes and badbatch load scikit-learn's digits")
    from gradclip.experiments.compare import plan_comparison
    from gradclip.experiments.runner import run_one

    plan = plan_comparison(task, "none", quick=True)
    assert [c.seed for c in plan.configs] == [0, 1]
    digits = run_one(plan_comparison("digits", "none", seeds=1, quick=True).configs[0])
    for config in plan.configs:
        record = run_one(config)
        if task == "spikes":
            assert any(f != 1.0 for f in record["history"]["spike"]), config
        else:  # a bad batch raises the loss far above digits' at that step
            assert config.seed != 0 or max(record["history"]["loss"]) > 5 * max(digits["history"]["loss"][5:])
        assert config.seed != 0 or record["history"]["loss"] != digits["history"]["loss"]


def test_a_run_that_meets_faults_anyway_keeps_its_schedule():
    pytest.importorskip("sklearn", reason="spikes and badbatch load scikit-learn's digits")
    from gradclip.experiments.tasks import make_task
    from gradclip.experiments.tasks.digits import CLEAN_START, ensure_fault, fault_schedule

    draws, _ = fault_schedule(0, salt=20_000)
    for steps in (400, 200, 60):  # seed 0 of spikes meets a spike at step 31
        assert ensure_fault(draws, 0.03, steps) is draws
    short = ensure_fault(draws, 0.03, 30)
    changed = (short != draws).nonzero().flatten().tolist()
    assert len(changed) == 1 and CLEAN_START <= changed[0] < 30 and short[changed[0]] == 0
    assert ensure_fault(draws, 0.0, 30) is draws  # faults off: none added
    plain = make_task("badbatch", 1, bad_fraction=0.0)
    plain.begin_run(30)
    assert not any(plain.is_bad(step) for step in range(30))
    # The full-length runs behind the README's evidence tables (400 steps, seeds 0-4) are unchanged.
    for task, seeds in (("spikes", range(3)), ("badbatch", range(5))):
        for seed in seeds:
            before, after = make_task(task, seed), make_task(task, seed)
            after.begin_run(400)
            flags = (lambda t: [t.is_bad(s) for s in range(400)]) if task == "badbatch" else (
                lambda t: t._spike_draws[:400].tolist())
            assert flags(before) == flags(after), (task, seed)
