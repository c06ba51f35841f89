"""The experiment runner in process: every task trains, records what happened, and is reproducible."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("sklearn", reason="digits and spikes load scikit-learn's bundled digits")

from gradclip._core.errors import InvalidArgumentError, UnknownNameError  # noqa: E402
from gradclip.experiments.report import summarise  # noqa: E402
from gradclip.experiments.runner import RunConfig, run_one  # noqa: E402
from gradclip.experiments.spec import parse_spec  # noqa: E402
from gradclip.experiments.tasks import TASKS, check_options, make_task  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    # The runner's worker processes use one thread; in process, so do we (bitwise reproducibility).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(task: str, clipper: str = "global_norm:max_norm=1.0", seed: int = 0, steps: int | None = None, **options):
    defaults = TASKS[task].defaults
    return RunConfig(task, clipper, seed, steps or defaults.quick_steps, defaults.lr, defaults.optimizer, options)


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_and_records_each_step(task):
    config = _config(task, seq_len=12) if task in ("adding", "temporal-order") else _config(task)
    reported = []
    record = run_one(config, reported.append)
    steps = config.steps
    assert record["steps_run"] == steps and not record["diverged"]
    for key in ("loss", "norm", "threshold", "clipped", "spike"):
        assert len(record["history"][key]) == steps, key
    assert all(math.isfinite(x) and x >= 0 for x in record["history"]["norm"])
    assert all(t == 1.0 for t in record["history"]["threshold"])
    # clipped is exactly "the pre-clip norm exceeded the threshold", step by step.
    assert record["history"]["clipped"] == [n > 1.0 for n in record["history"]["norm"]]
    assert record["clip_rate"] == pytest.approx(sum(record["history"]["clipped"]) / steps)
    assert record["metric_name"] == TASKS[task].metric_name
    assert 0.0 <= record["metric"] <= 1.0 and math.isfinite(record["eval_loss"])
    assert record["solved"] == make_task(task, 0, **config.task_options).solved(record["metric"])
    assert reported[-1] == steps  # progress reaches the end


@pytest.mark.parametrize("task", ["adding", "digits", "charlm"])
def test_a_run_is_reproducible_from_its_config(task):
    # A stateful clipper: its statistics must replay too. (Uncapped ZClip lets the adding RNN
    # diverge during its warm-up; the capped one is what the default comparison runs.)
    clipper = "zclip:max_grad_norm=1.0"
    first, second = run_one(_config(task, clipper, seed=3)), run_one(_config(task, clipper, seed=3))
    assert not first["diverged"]
    assert first["history"] == second["history"]
    assert first["metric"] == second["metric"] and first["eval_loss"] == second["eval_loss"]
    other = run_one(_config(task, clipper, seed=4))
    assert other["history"]["loss"] != first["history"]["loss"]  # the seed matters


def test_training_learns_on_digits():
    # Not just "runs": a few hundred steps of the seeds' classifier reach a real accuracy.
    record = run_one(_config("digits", steps=300))
    assert record["metric"] > 0.9 and record["solved"]
    history = record["history"]["loss"]
    assert sum(history[-20:]) / 20 < 0.5 * sum(history[:20]) / 20


def test_spikes_task_injects_large_gradients_that_clipping_sees():
    record = run_one(_config("spikes", "none", steps=200))
    spikes = [(step, factor) for step, factor in enumerate(record["history"]["spike"]) if factor != 1.0]
    assert spikes, "200 steps at 3 % should hold spikes"
    assert all(step >= 20 and 100.0 <= factor <= 1000.0 for step, factor in spikes)
    norms = record["history"]["norm"]
    clean = sorted(n for n, f in zip(norms, record["history"]["spike"]) if f == 1.0)
    median_clean = clean[len(clean) // 2]
    for step, factor in spikes:
        assert norms[step] > 20 * median_clean  # the spike reached the gradient the clipper reads


def test_spike_skipping_skips_the_spiked_steps():
    record = run_one(_config("spikes", "skip_on_spike", steps=200))
    spike_steps = sum(1 for f in record["history"]["spike"] if f != 1.0)
    assert spike_steps and record["skip_rate"] * record["steps_run"] >= spike_steps


def test_no_clipping_diverges_on_the_adding_problem():
    # The default comparison's premise: at lr 0.2 with momentum the tanh RNN blows up unclipped.
    record = run_one(_config("adding", "none", steps=300))
    assert record["diverged"] and not record["solved"] and record["metric"] == 0.0
    assert record["steps_run"] < 300 and math.isnan(record["eval_loss"])
    clipped = run_one(_config("adding", "global_norm:max_norm=1.0", steps=300))
    assert not clipped["diverged"] and clipped["steps_run"] == 300


def test_summary_aggregates_the_records():
    records = [run_one(_config("digits", clipper, seed=seed)) for clipper in ("none", "value:clip_value=0.01") for seed in (0, 1)]
    rows = {row["clipper"]: row for row in summarise(records)}
    for clipper, row in rows.items():
        runs = [r for r in records if r["clipper"] == clipper]
        assert row["runs"] == 2
        assert row["metric_mean"] == pytest.approx(sum(r["metric"] for r in runs) / 2)
        assert row["clip_rate_mean"] == pytest.approx(sum(r["clip_rate"] for r in runs) / 2)
    assert rows["none"]["clip_rate_mean"] == 0.0 and rows["value:clip_value=0.01"]["clip_rate_mean"] > 0.9


def test_task_solved_criteria_are_the_papers():
    assert TASKS["adding"](0).criterion == 0.01
    assert TASKS["temporal-order"](0).solved(0.99) and not TASKS["temporal-order"](0).solved(0.989)
    assert TASKS["digits"](0).solved(0.9) and not TASKS["digits"](0).solved(0.89)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("nope", {}, "valid tasks: adding, temporal-order, digits, spikes, charlm"),
        ("digits", {"seq_len": 20}, "task 'digits' has no option 'seq_len' (it takes: no options)"),
        ("temporal-order", {"seq_len": 9}, "seq_len must be an integer >= 10 for task 'temporal-order', got 9"),
        ("adding", {"seq_len": 1}, "seq_len must be an integer >= 2 for task 'adding', got 1"),
        ("adding", {"seq_len": 2.5}, "got 2.5"),
        ("adding", {"hidden_units": 3}, "has no option 'hidden_units' (it takes: hidden, seq_len)"),
    ],
)
def test_bad_task_options_are_named(name, options, message):
    error = UnknownNameError if name == "nope" else InvalidArgumentError
    with pytest.raises(error, match=None) as caught:
        check_options(name, options)
    assert message in str(caught.value)
    with pytest.raises(error):
        make_task(name, 0, **options)


def test_clipper_spec_round_trip_and_errors():
    spec = parse_spec("value:min_value=-0.5,max_value=0.5")
    assert spec.text == "value:max_value=0.5,min_value=-0.5"  # canonical: sorted parameters
    assert parse_spec(spec.text).text == spec.text
    assert spec.build().config()["min_value"] == -0.5
    assert parse_spec("none").build() is None
    for bad, message in (("global_norm:max_norm", "max_norm"), ("global_norm:max_norm=x", "max_norm"),
                         ("nope", "valid names"), ("zclip:alpha=2", "alpha")):
        with pytest.raises((InvalidArgumentError, UnknownNameError, TypeError, ValueError)) as caught:
            parse_spec(bad).build()
        assert message in str(caught.value)
