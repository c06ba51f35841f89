"""The ``badbatch`` task (bad batches: every label wrong, inputs unnormalised) and the loss
reaching the clipper through ``gradclip compare``'s runner, so ``skip_on_spike:signal=loss``
skips exactly those batches."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("sklearn", reason="badbatch loads scikit-learn's bundled digits")

from gradclip import InvalidArgumentError
from gradclip.experiments.runner import RunConfig, run_one
from gradclip.experiments.spec import parse_spec
from gradclip.experiments.tasks import TASKS, check_options, make_task
from gradclip.experiments.tasks.digits import DigitsTask

STEPS = 200


def _run(clipper: str, seed: int = 0, steps: int = STEPS, **options) -> dict:
    defaults = TASKS["badbatch"].defaults
    return run_one(RunConfig("badbatch", clipper, seed, steps, defaults.lr, defaults.optimizer, options))


def _bad_steps(seed: int, steps: int = STEPS, **options) -> list[int]:
    task = make_task("badbatch", seed, **options)
    return [step for step in range(steps) if task.is_bad(step)]


def test_bad_steps_are_seeded_apart_from_the_data_and_differ_between_seeds():
    first, again, other = _bad_steps(0), _bad_steps(0), _bad_steps(1)
    assert first == again
    assert first and other and first != other
    assert min(first + other) >= 20  # a clean start for every method


def test_a_bad_batch_is_the_digits_batch_with_every_label_wrong_and_raw_inputs():
    task, plain = make_task("badbatch", 3), DigitsTask(3)
    bad = 0
    for step in range(STEPS):
        (x, y), (x_clean, y_clean) = task.batch(step), plain.batch(step)
        if task.is_bad(step):
            bad += 1
            assert torch.equal(x, 16.0 * x_clean)
            assert bool((y != y_clean).all())
        else:
            assert torch.equal(x, x_clean) and torch.equal(y, y_clean)
    assert bad > 0


def test_no_bad_fraction_is_plain_digits():
    task, plain = make_task("badbatch", 0, bad_fraction=0.0), DigitsTask(0)
    assert not any(task.is_bad(step) for step in range(1000))
    for step in range(50):
        assert all(torch.equal(a, b) for a, b in zip(task.batch(step), plain.batch(step)))


def test_every_clipper_meets_the_loss_spikes_at_the_same_bad_steps():
    # Inputs at their usual scale, so the unclipped model survives and every bad batch stays a
    # spike of its loss: the spikes are where the task put them, whatever the clipper.
    bad = _bad_steps(0, input_scale=1.0)
    for clipper in ("none", "global_norm:max_norm=1.0"):
        losses = _run(clipper, input_scale=1.0)["history"]["loss"]
        median = statistics.median(losses[20:])
        spikes = [step for step, loss in enumerate(losses) if step >= 20 and loss > 10 * median]
        assert spikes == bad, clipper


def test_a_bad_batch_spikes_the_loss_and_ruins_the_unclipped_run():
    record = _run("none")
    losses, first = record["history"]["loss"], _bad_steps(0)[0]
    assert losses[first] > 20 * statistics.median(losses[20:first])
    # The one update from the first bad batch throws the model to chance and it does not recover.
    assert record["metric"] < 0.2 and not record["solved"]


def test_loss_aware_skipping_skips_exactly_the_bad_steps():
    record = _run("skip_on_spike:signal=loss")
    assert record["status"] == "ok"  # the runner passed the loss (without it the clipper raises)
    skipped = [step for step, skip in enumerate(record["history"]["skipped"]) if skip]
    assert skipped == _bad_steps(0)
    assert record["metric"] > 0.9 and record["solved"]
    unclipped = _run("none")
    assert not any(unclipped["history"]["skipped"])


def test_the_clipper_spec_takes_the_signal_by_name():
    spec = parse_spec("skip_on_spike:signal=loss,log_space=true")
    clipper = spec.build()
    assert (clipper.signal, clipper.log_space) == ("loss", True)
    assert spec.text == "skip_on_spike:log_space=True,signal=loss"
    with pytest.raises(InvalidArgumentError, match="signal"):
        parse_spec("skip_on_spike:signal=losses")


@pytest.mark.parametrize(
    "options, named",
    [
        ({"bad_fraction": 1.5}, "bad_fraction"),
        ({"bad_fraction": -0.1}, "bad_fraction"),
        ({"bad_fraction": True}, "bad_fraction"),
        ({"bad_fraction": "often"}, "bad_fraction"),
        ({"input_scale": 0}, "input_scale"),
        ({"input_scale": -2.0}, "input_scale"),
        ({"input_scale": math.inf}, "input_scale"),
        ({"input_scale": math.nan}, "input_scale"),
    ],
)
def test_bad_task_options_are_refused_naming_the_option(options, named):
    with pytest.raises(InvalidArgumentError, match=f"'badbatch'.*{named}.*got"):
        check_options("badbatch", options)
    with pytest.raises(InvalidArgumentError, match=named):
        make_task("badbatch", 0, **options)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", "--task", "badbatch", "--seeds", "1", "--jobs", "1",
         "--no-progress", *args],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_compare_refuses_a_bad_task_option_before_any_run(tmp_path):
    out = tmp_path / "run"
    result = _cli("--task-option", "bad_fraction=2", "--clipper", "none", "--out", str(out))
    assert result.returncode == 2
    assert "bad_fraction must be a number in [0, 1]" in result.stderr and "got 2" in result.stderr
    assert not (out / "results.jsonl").exists()


def test_compare_skips_on_the_loss_from_the_command_line_as_the_readme_table_says(tmp_path):
    # scripts/evidence.py --only bad-batches ran the README's comparison through the command line
    # and stored each run's outcome; two of its runs again, the same way (a fresh process pins
    # the kernels before torch starts), must give the same numbers.
    root = Path(__file__).resolve().parent.parent
    entry = json.loads((root / "docs" / "evidence" / "bad-batches.json").read_text())
    assert entry["block"] in (root / "README.md").read_text()
    out = tmp_path / "run"
    clippers = ("none", "skip_on_spike:signal=loss")
    result = _cli("--clipper", clippers[0], "--clipper", clippers[1], "--out", str(out))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for record in records:
        stored = next(run for run in entry["runs"] if run["clipper"] == record["clipper"] and run["seed"] == 0)
        assert record["steps"] == entry["steps"]
        keys = ("metric", "solved", "diverged", "eval_loss", "cpu_capability")
        assert {key: record[key] for key in keys} == {key: stored[key] for key in keys}, record["clipper"]
    assert sorted(record["clipper"] for record in records) == sorted(clippers)
    # The spec string reached SkipOnSpike(signal="loss") and the runner gave it each step's loss.
    [loss_aware] = [record for record in records if record["clipper"] == clippers[1]]
    assert loss_aware["status"] == "ok"
    skipped = [step for step, skip in enumerate(loss_aware["history"]["skipped"]) if skip]
    assert skipped == _bad_steps(0, steps=entry["steps"])
