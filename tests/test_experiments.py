"""The experiment runner in process: every task trains, records what happened, and is reproducible."""

from __future__ import annotations

import dataclasses
import math

import pytest

torch = pytest.importorskip("torch", reason="the experiment runner trains torch models")
pytest.importorskip("sklearn", reason="digits and spikes load scikit-learn's bundled digits")

from gradclip._core.errors import InvalidArgumentError, UnknownNameError  # noqa: E402
from gradclip.experiments.report import summarise  # noqa: E402
from gradclip.experiments.runner import RunConfig, run_many, run_one  # noqa: E402
from gradclip.experiments.spec import parse_spec  # noqa: E402
from gradclip.experiments.tasks import DIVERGENCE_FACTOR, TASKS, AddingTask, check_options, make_task  # noqa: E402


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
    for key in ("loss", "norm", "threshold", "clipped", "skipped", "spike"):
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
    assert record["steps_run"] < 300
    # It stopped at the first loss past 1000x the mean predictor's MSE, not at some 1e6.
    assert record["divergence_limit"] == pytest.approx(1000 / 6)
    losses = record["history"]["loss"]
    assert not (losses[-1] <= record["divergence_limit"])  # the last step is the one that blew up
    assert all(loss <= record["divergence_limit"] for loss in losses[:-1])
    clipped = run_one(_config("adding", "global_norm:max_norm=1.0", steps=300))
    assert not clipped["diverged"] and clipped["steps_run"] == 300


def test_divergence_is_judged_on_each_tasks_own_scale():
    # The reference is the trivial predictor's loss: uniform logits give ln(classes) exactly.
    for name, classes in (("temporal-order", 4), ("digits", 10), ("spikes", 10)):
        task = make_task(name, 0)
        model = task.model()
        for parameter in model.parameters():
            torch.nn.init.zeros_(parameter)
        assert task.loss(model, task.batch(0)).item() == pytest.approx(task.reference_loss, rel=1e-6)
        assert task.reference_loss == pytest.approx(math.log(classes))
    charlm = make_task("charlm", 0)
    assert charlm.reference_loss == pytest.approx(math.log(len(charlm.vocab)))
    # adding: predicting the mean target gives the targets' variance, 1/6.
    adding = make_task("adding", 0)
    _, targets = adding._sample(20_000, torch.Generator().manual_seed(1))
    assert float(targets.var()) == pytest.approx(adding.reference_loss, rel=0.03)
    for name in TASKS:
        task = make_task(name, 0)
        limit = task.divergence_limit
        assert limit == DIVERGENCE_FACTOR * task.reference_loss
        assert task.is_diverged(math.nan) and task.is_diverged(math.inf) and task.is_diverged(limit * 1.001)
        assert not task.is_diverged(limit) and not task.is_diverged(task.reference_loss * 60)
    # The audit's case: a held-out MSE of 3220 (2e4x the trivial 1/6) is divergence, not stability.
    assert adding.is_diverged(3220.5) and not make_task("digits", 0).is_diverged(3.0)


def test_a_wild_held_out_loss_counts_as_divergence(monkeypatch):
    quiet = run_one(_config("adding", "global_norm:max_norm=1.0", steps=5))
    assert not quiet["diverged"]
    real_evaluate = AddingTask.evaluate

    def wild(self, model):
        return {**real_evaluate(self, model), "loss": 1.01 * self.divergence_limit, "success": 1.0}

    monkeypatch.setattr(AddingTask, "evaluate", wild)
    record = run_one(_config("adding", "global_norm:max_norm=1.0", steps=5))
    assert record["history"]["loss"] == quiet["history"]["loss"]  # training itself stayed in range
    assert record["diverged"] and not record["solved"] and record["metric"] == 0.0


def test_run_settings_reach_the_training():
    base = RunConfig("adding", "none", 0, 3, 0.05, "adam", {"seq_len": 6})
    reference = run_one(base)["history"]["loss"]
    for change in ({"lr": 0.01}, {"optimizer": "adamw"}, {"optimizer": "sgd"}):
        other = run_one(dataclasses.replace(base, **change))["history"]["loss"]
        assert other[0] == reference[0], change  # the same model and batch before any step
        assert other[1:] != reference[1:], change  # then the setting changes the steps
    longer = run_one(dataclasses.replace(base, task_options={"seq_len": 7}))["history"]["loss"]
    assert longer[0] != reference[0]
    assert len(run_one(dataclasses.replace(base, steps=5))["history"]["loss"]) == 5


def test_run_many_in_process_restores_the_thread_count():
    torch.set_num_threads(2)  # the autouse fixture restores the original afterwards
    inside = []
    run_many([_config("digits", steps=10)], jobs=1, on_progress=lambda index, done: inside.append(torch.get_num_threads()))
    assert inside and set(inside) == {1}  # runs use one thread, as the worker processes do
    assert torch.get_num_threads() == 2


def test_charlm_text_holds_the_zen_without_printing_it(capsys, monkeypatch):
    import sys

    from gradclip.experiments.tasks import _stdlib_text

    monkeypatch.delitem(sys.modules, "this", raising=False)  # a first import is what prints
    text = _stdlib_text()
    assert "Beautiful is better than ugly." in text
    assert capsys.readouterr().out == ""


def test_summary_medians_leave_diverged_runs_out():
    def record(seed, diverged, eval_loss, train_loss, metric):
        return {"clipper": "c", "seed": seed, "metric_name": "accuracy", "metric": metric, "solved": metric >= 0.9,
                "diverged": diverged, "eval_loss": eval_loss, "final_train_loss": train_loss,
                "clip_rate": 0.5, "skip_rate": 0.0, "wall_time": 1.0}

    rows = summarise([record(0, False, 0.2, 0.1, 0.95), record(1, True, 5000.0, 9000.0, 0.0), record(2, False, 0.4, 0.3, 0.8)])
    (row,) = rows
    assert row["eval_loss_median"] == pytest.approx(0.3) and row["final_train_loss_median"] == pytest.approx(0.2)
    assert row["diverged"] == 1 and row["solved"] == 1 and row["metric_mean"] == pytest.approx(1.75 / 3)
    (all_diverged,) = summarise([record(0, True, 5000.0, 9000.0, 0.0)])
    assert math.isnan(all_diverged["eval_loss_median"]) and math.isnan(all_diverged["final_train_loss_median"])


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
    for bad, message in (("global_norm:max_norm", "max_norm"), ("global_norm:max_norm=x", "got 'x'"),
                         ("global_norm:max_norm=x", "(max_norm expects float)"), ("none:x=1", "takes no parameters"),
                         ("nope", "valid names"), ("zclip:alpha=2", "alpha")):
        with pytest.raises((InvalidArgumentError, UnknownNameError, TypeError, ValueError)) as caught:
            parse_spec(bad).build()
        assert message in str(caught.value)


def test_gpt_is_a_causal_post_layer_norm_transformer():
    task = make_task("gpt", 0)
    model = task.model()
    x, y = task.batch(0)
    assert x.shape == (16, 64) and torch.equal(x[:, 1:], y[:, :-1])  # next-character targets
    logits = model(x)
    changed = x.clone()
    changed[:, 40:] = (changed[:, 40:] + 1) % len(task.vocab)
    # Causal: changing characters from position 40 on leaves the predictions before it alone.
    torch.testing.assert_close(model(changed)[:, :40], logits[:, :40])
    assert not torch.allclose(model(changed)[:, 40:], logits[:, 40:])
    assert isinstance(model.ln, torch.nn.Identity) and len(model.blocks) == 4  # post-LN: no final norm
    pre = make_task("gpt", 0, layer_norm="pre", layers=2).model()
    assert isinstance(pre.ln, torch.nn.LayerNorm) and len(pre.blocks) == 2
    optimizer = task.configure_optimizer(model.parameters(), "adamw", 1e-2)
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.1
    assert task.reference_loss == pytest.approx(math.log(len(task.vocab)))
    with pytest.raises(InvalidArgumentError, match="layer_norm must be 'post' or 'pre'"):
        make_task("gpt", 0, layer_norm="middle")
