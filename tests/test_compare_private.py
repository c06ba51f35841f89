"""``gradclip compare --private``: DP-SGD runs whose records carry ε beside the metric.

Cheap runs: the digits MLP for a few dozen steps, one seed, in this process.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="private training trains torch models")
pytest.importorskip("sklearn", reason="the digits task loads scikit-learn's digits")
pytest.importorskip("opacus", reason="epsilon comes from Opacus' accountants (gradclip[privacy])")

import torch

from gradclip import cli
from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip.experiments import (
    Task,
    TaskError,
    compare,
    private,
)
from gradclip.experiments.tasks import DigitsTask
from gradclip.torch.accounting import Accountant, noise_multiplier_for

# The module (the package's ``compare`` attribute is the function).
compare_module = importlib.import_module("gradclip.experiments.compare")

STEPS = 40
EXAMPLES = len(DigitsTask(0).y_train)  # the 75 % training split of the 1,797 digits
Q = DigitsTask.batch_size / EXAMPLES


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if any run starts: bad input must be refused while planning."""
    started = []
    monkeypatch.setattr(compare_module._runner, "run_many", lambda *a, **k: started.append(a) or [])
    yield started
    assert started == [], "a run started despite the bad input"


def test_epsilon_is_the_accountants_for_the_runs_q_sigma_steps_and_delta(tmp_path):
    result = compare("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=STEPS, private="noise_multiplier=1.1",
                     out=tmp_path / "run")
    (record,) = result.records
    expected = Accountant("rdp")
    expected.step(1.1, Q, STEPS)
    assert record["status"] == "ok" and record["steps_run"] == STEPS
    assert record["sample_rate"] == pytest.approx(Q) and record["delta"] == 1e-5
    assert record["noise_multiplier"] == 1.1
    assert record["epsilon"] == pytest.approx(expected.epsilon(1e-5), rel=1e-9)
    assert result.rows[0]["epsilon"] == record["epsilon"]
    assert record["private"]["expected_batch_size"] == 64 and record["private"]["examples"] == EXAMPLES
    # 40 noisy steps of the 64-128-10 MLP: far above chance (10 %), not perfect.
    assert 0.5 < record["metric"] < 1.0
    # Per-example traces: the median norm, C, the fraction of examples clipped.
    history = record["history"]
    assert len(history["loss"]) == STEPS and set(history["threshold"]) == {1.0}
    assert all(0.0 <= c <= 1.0 for c in history["clipped"]) and 0 < record["clip_rate"] <= 1
    stored = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert stored["epsilon"] == pytest.approx(record["epsilon"]) and stored["private"]["noise_multiplier"] == 1.1
    assert "DP-SGD σ=1.1" in result.meta["private"]


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_epsilon_target_solves_sigma_over_the_runs_steps():
    result = compare("digits", ["norm:max_norm=1.0"], seeds=1, steps=STEPS, private="epsilon=2,delta=1e-4")
    (record,) = result.records
    assert record["noise_multiplier"] == pytest.approx(noise_multiplier_for(2.0, 1e-4, Q, STEPS))
    assert record["epsilon"] == pytest.approx(2.0, abs=0.02)  # Opacus' bisection tolerance is 0.01
    assert record["private"]["target_epsilon"] == 2.0 and record["delta"] == 1e-4


def test_an_epsilon_no_noise_reaches_is_refused_before_anything_runs(nothing_runs):
    # Rényi DP over Opacus' orders (up to 63) cannot certify ε below about ln(1/δ)/62 ≈ 0.19 at
    # δ = 1e-5, however large σ; its search gives up with a bare ValueError.
    with pytest.raises(InvalidArgumentError, match=r"no noise multiplier reaches epsilon=0.05 at delta=1e-05 over 5 steps"):
        compare("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="epsilon=0.05")


def test_planning_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    compare_module.plan_comparison("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")
    assert torch.equal(torch.rand(3), expected)


def test_no_noise_is_infinite_epsilon_and_per_example_clipping_alone():
    result = compare("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=10, private="noise_multiplier=0")
    assert math.isinf(result.records[0]["epsilon"])
    assert private.describe_epsilon(result.rows[0]["epsilon"]) == "∞"


def test_the_clippers_default_to_ones_dp_sgd_accepts():
    plan = compare_module.plan_comparison("digits", seeds=1, steps=5, private="noise_multiplier=1")
    assert plan.clippers == list(private.PRIVATE_CLIPPERS)
    assert all(config.private["noise_multiplier"] == 1.0 for config in plan.configs)


def test_the_spec_may_be_a_mapping_of_the_same_keys():
    text = compare_module.plan_comparison("digits", ["norm:max_norm=0.5"], seeds=1, steps=5,
                                          private="noise_multiplier=0.8,delta=1e-6,accountant=prv")
    mapping = compare_module.plan_comparison("digits", ["norm:max_norm=0.5"], seeds=1, steps=5,
                                             private={"accountant": "prv", "delta": 1e-6, "noise_multiplier": 0.8})
    assert text.configs[0].private == mapping.configs[0].private
    assert text.configs[0].private["accountant"] == "prv" and text.configs[0].private["delta"] == 1e-6


def test_the_non_private_baseline_is_the_same_comparison_without_private():
    plan = compare_module.plan_comparison("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=5)
    assert plan.configs[0].private is None and "private" not in plan.configs[0].public()
    assert "private" not in plan.meta


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("noise_multiplier=-1", InvalidArgumentError, r"noise_multiplier must be in \[0, inf\), got -1"),
        ("noise_multiplier=inf", InvalidArgumentError, r"noise_multiplier must be in \[0, inf\), got inf"),
        ("epsilon=0", InvalidArgumentError, r"epsilon must be in \(0, inf\), got 0"),
        ("epsilon=-3", InvalidArgumentError, r"epsilon must be in \(0, inf\), got -3"),
        ("epsilon=3,delta=0", InvalidArgumentError, r"delta must be in \(0, 1\), got 0"),
        ("epsilon=3,delta=1", InvalidArgumentError, r"delta must be in \(0, 1\), got 1"),
        ("epsilon=3,delta=2.5", InvalidArgumentError, r"delta must be in \(0, 1\), got 2.5"),
        ("sigma=1.1", UnknownNameError, r"unknown key 'sigma'; valid keys: noise_multiplier, epsilon, delta"),
        ("noise_multiplier=1,epsilon=3", InvalidArgumentError, "exactly one of noise_multiplier"),
        ("delta=1e-5", InvalidArgumentError, "exactly one of noise_multiplier"),
        ("noise_multiplier", InvalidArgumentError, "expected key=value pairs"),
        ("", InvalidArgumentError, "expected a spec like 'noise_multiplier=1.1'"),
        ("noise_multiplier=1,accountant=moments", UnknownNameError, "accountant must be one of 'rdp', 'prv', 'gdp'"),
        ("noise_multiplier=1,mode=fast", UnknownNameError, "mode must be one of 'auto', 'bk'"),
        ("noise_multiplier=1,batch_size=0", InvalidArgumentError, "batch_size must be an integer >= 1, got 0"),
        ("noise_multiplier=1,batch_size=5000", InvalidArgumentError, f"at most the training set's {EXAMPLES} examples"),
    ],
)
def test_a_bad_privacy_spec_is_refused_before_anything_runs(spec, error, message, tmp_path, nothing_runs):
    with pytest.raises(error, match=message):
        compare("digits", ["global_norm:max_norm=1.0"], seeds=1, steps=5, private=spec, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "clipper, named, why",
    [
        ("zclip", "ZClip", "without noise, which breaks differential privacy"),
        ("autoclip", "AutoClip", "without noise, which breaks differential privacy"),
        ("adagc", "AdaGC", "without noise, which breaks differential privacy"),
        ("value:clip_value=0.1", "got Value", "must be GlobalNorm(C), Norm(C) or QuantileNorm"),
        ("none", "'none' bounds no example's gradient", "noise_multiplier=0"),
    ],
)
def test_a_clipper_dp_sgd_refuses_is_named_before_anything_runs(clipper, named, why, nothing_runs):
    with pytest.raises(InvalidArgumentError, match=f"clipper {clipper!r}|clipper 'none'") as caught:
        compare("digits", ["global_norm:max_norm=1.0", clipper], seeds=1, steps=5, private="noise_multiplier=1")
    assert named in str(caught.value) and why in str(caught.value)


@pytest.mark.parametrize("task, layer", [("charlm", "lstm (LSTM)"), ("adding", "rnn (RNN)")])
def test_a_task_with_a_refused_layer_names_the_task_and_the_layer(task, layer, nothing_runs):
    with pytest.raises(TaskError, match=rf"task {task!r} cannot train privately: {re.escape(layer)} is a fused recurrent"):
        compare(task, ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")


def test_a_task_that_perturbs_gradients_after_backward_is_refused(nothing_runs):
    with pytest.raises(TaskError, match="task 'spikes' cannot train privately: it changes the gradients after backward"):
        compare("spikes", ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")


def test_a_task_whose_batches_are_not_its_training_set_is_refused(nothing_runs):
    class Corrupted(DigitsTask):  # digits' training set, other batches (as badbatch)
        name = "corrupted"

        def batch(self, step):
            x, y = super().batch(step)
            return x, (y + 1) % 10

    with pytest.raises(TaskError, match="task 'corrupted' cannot train privately: its batches come from Corrupted.batch "
                       "but its training set from DigitsTask.training_set"):
        compare(Corrupted, ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")


class _NoTrainingSet(Task):
    name = "no-training-set"
    batch_size = 4

    def model(self):
        return torch.nn.Linear(3, 2)

    def batch(self, step):
        return torch.randn(4, 3, generator=self.generator), torch.randint(0, 2, (4,), generator=self.generator)

    def loss(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    def evaluate(self, model):
        return {"loss": 0.0, "accuracy": 1.0}


class _MeanLosses(_NoTrainingSet):
    name = "mean-losses"

    def training_set(self):
        return torch.randn(16, 3, generator=self.generator), torch.randint(0, 2, (16,), generator=self.generator)

    def example_losses(self, model, batch):
        return self.loss(model, batch)  # a scalar: not one loss per example


@pytest.mark.parametrize(
    "task, message",
    [
        (_NoTrainingSet, "task 'no-training-set' cannot train privately: it declares no training set"),
        (_MeanLosses, r"task 'mean-losses': example_losses\(\) returned shape \(\) for 2 examples"),
    ],
)
def test_a_task_without_per_example_losses_is_refused(task, message, nothing_runs):
    with pytest.raises(TaskError, match=message):
        compare(task, ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")


class _Scale(torch.nn.Module):
    """A module with a parameter and no dedicated per-example rule (torch.func handles it)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.weight


class _CustomLayer(_MeanLosses):
    name = "custom-layer"

    def model(self):
        return torch.nn.Sequential(_Scale(), torch.nn.Linear(3, 2))

    def example_losses(self, model, batch):
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def test_the_layer_check_uses_the_mode_asked_for(nothing_runs):
    # mode=auto differentiates _Scale with torch.func; mode=bk has no rule for it.
    plan = compare_module.plan_comparison(_CustomLayer, ["global_norm:max_norm=1.0"], seeds=1, steps=5,
                                          private="noise_multiplier=1")
    assert plan.configs[0].private["mode"] == "auto"
    with pytest.raises(TaskError, match=r"task 'custom-layer' cannot train privately: 0 \(_Scale\) has trainable "
                       r"parameters and no per-example rule in mode='bk'"):
        compare(_CustomLayer, ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1,mode=bk")


def test_a_train_function_is_refused(nothing_runs):
    def train(clipper, seed, steps, report):
        return {"accuracy": 1.0}

    with pytest.raises(InvalidArgumentError, match="private applies to Task tasks"):
        compare(train, ["global_norm:max_norm=1.0"], seeds=1, steps=5, private="noise_multiplier=1")


def test_the_modes_listed_for_parsing_are_per_samples():
    from gradclip.torch.per_sample import MODES

    assert private.MODES == MODES


def test_cli_prints_epsilon_beside_the_metric(tmp_path, capsys):
    status = cli.main([
        "compare", "--task", "digits", "--private", "noise_multiplier=1.1", "--clipper", "global_norm:max_norm=1.0",
        "--seeds", "1", "--steps", "20", "--jobs", "1", "--no-progress", "--out", str(tmp_path / "run"),
    ])
    out = capsys.readouterr().out
    assert status == 0
    expected = Accountant("rdp")
    expected.step(1.1, Q, 20)
    header = next(line for line in out.splitlines() if line.startswith("┃"))
    row = next(line for line in out.splitlines() if line.startswith("│ global_norm"))
    assert [c.strip() for c in header.strip("┃").split("┃")][:3] == ["clipper", "ε", "accuracy"]
    assert row.strip("│").split("│")[1].strip() == f"{expected.epsilon(1e-5):.3g}"
    assert "DP-SGD σ=1.1, δ=1e-05, q=64/1347" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--private", "epsilon=0"], "--private 'epsilon=0': epsilon must be in (0, inf), got 0"),
        (["--private", "noise_multiplier=1", "--clipper", "zclip"], "--private: clipper 'zclip' cannot train privately"),
        (["--task", "charlm", "--private", "noise_multiplier=1"], "task 'charlm' cannot train privately: lstm (LSTM)"),
    ],
)
def test_cli_bad_private_input_is_a_usage_error_before_training(args, message, tmp_path, capsys, nothing_runs):
    base = ["compare", "--task", "digits", "--seeds", "1", "--steps", "5", "--no-progress", "--out", str(tmp_path / "run")]
    assert cli.main([*base, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_readme_table_is_what_this_code_gives(tmp_path):
    # scripts/evidence.py --only private ran the README's four comparisons through the command
    # line and stored each run; one private run again, the same way (a fresh process pins the
    # kernels before torch starts), must give the same accuracy and ε.
    root = Path(__file__).resolve().parent.parent
    entry = json.loads((root / "docs" / "evidence" / "private-eps3.json").read_text())
    assert entry["command"] in (root / "README.md").read_text()
    arguments = list(entry["arguments"])
    quantile = arguments.index("quantile_norm")
    del arguments[quantile - 1:quantile + 1]  # "--clipper quantile_norm": the fixed C of seed 0 only
    arguments[arguments.index("--seeds") + 1] = "1"
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gradclip.cli", "compare", *arguments, "--no-progress", "--jobs", "1", "--out", str(out)],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr
    (record,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    stored = next(run for run in entry["runs"] if run["clipper"] == "global_norm:max_norm=1.0" and run["seed"] == 0)
    keys = ("metric", "eval_loss", "diverged", "epsilon", "noise_multiplier", "cpu_capability")
    assert {key: record[key] for key in keys} == {key: stored[key] for key in keys}
