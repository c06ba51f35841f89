"""``gradclip.suggest_threshold`` and ``Monitor.suggest``: a recommended max_norm, with reasons."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gradclip
from gradclip.monitor import JsonlWriter, Monitor, ThresholdSuggestion, read_log, suggest_threshold


def _lognormal(n=500, seed=0):
    return np.random.default_rng(seed).lognormal(mean=0.0, sigma=0.5, size=n)


def test_suggests_the_quantile_of_observed_norms_and_explains_it():
    norms = _lognormal()
    suggestion = gradclip.suggest_threshold(norms, quantile=0.9)
    assert isinstance(suggestion, ThresholdSuggestion)
    assert suggestion.max_norm == pytest.approx(float(np.quantile(norms, 0.9)))
    assert float(suggestion) == suggestion.max_norm
    assert suggestion.samples == 500 and suggestion.dropped == 0 and suggestion.confident
    assert suggestion.expected_clip_rate == pytest.approx(0.1, abs=0.01)
    assert suggestion.percentiles["p50"] == pytest.approx(float(np.median(norms)))
    text = str(suggestion)
    assert "90% quantile of 500" in text
    assert f"{suggestion.max_norm:.4g}" in text
    assert "10.0% of the observed steps" in text
    json.dumps(suggestion.to_dict())  # plain data


@pytest.mark.parametrize("quantile", [0.5, 0.99, 1.0])
def test_other_quantiles(quantile):
    norms = _lognormal()
    suggestion = suggest_threshold(norms, quantile)
    assert suggestion.max_norm == pytest.approx(float(np.quantile(norms, quantile)))
    assert suggestion.quantile == quantile


def test_non_finite_and_missing_norms_are_dropped_and_counted():
    norms = list(_lognormal(100)) + [float("nan"), float("inf"), None]
    suggestion = suggest_threshold(norms)
    assert suggestion.samples == 100 and suggestion.dropped == 3
    assert "3 non-finite or missing" in str(suggestion)


def test_accepts_torch_tensors_and_lists_of_scalars():
    torch = pytest.importorskip("torch")
    norms = _lognormal(80)
    expected = suggest_threshold(norms).max_norm
    assert suggest_threshold(torch.tensor(norms)).max_norm == pytest.approx(expected)
    assert suggest_threshold([torch.tensor(v) for v in norms]).max_norm == pytest.approx(expected)


def test_current_threshold_that_clips_most_steps_is_called_a_step_size_limit():
    norms = _lognormal()
    suggestion = suggest_threshold(norms, current_threshold=0.5)
    assert suggestion.current_clip_rate > 0.5
    assert "step-size limit" in str(suggestion)
    assert suggest_threshold(norms, current_threshold=1e6).current_clip_rate == 0.0


def test_few_samples_and_heavy_tails_are_flagged():
    few = suggest_threshold([1.0, 1.2, 0.9])
    assert not few.confident and "poorly estimated" in str(few)
    spiky = np.concatenate([np.ones(95), np.full(5, 1000.0)])
    assert "heavy" in str(suggest_threshold(spiky, 0.5))


def test_falling_norms_are_noted():
    falling = np.linspace(10.0, 1.0, 100)
    assert "fell during the run" in str(suggest_threshold(falling))


@pytest.mark.parametrize(
    "norms, quantile, match",
    [
        ([], 0.9, "no finite norm"),
        ([float("nan")], 0.9, "no finite norm"),
        ([1.0, -2.0], 0.9, "must be >= 0"),
        ([1.0], 0.0, r"quantile must be a number in \(0, 1\]"),
        ([1.0], 1.5, r"quantile must be a number in \(0, 1\]"),
        ([1.0], True, r"quantile must be a number in \(0, 1\]"),
        ("1.0", 0.9, "norms must be a sequence"),
        ([1.0, "x"], 0.9, "norms must be numbers"),
    ],
)
def test_bad_input(norms, quantile, match):
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        suggest_threshold(norms, quantile)


def test_monitor_suggest_uses_the_observed_pre_clip_norms(tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    monitor = Monitor(model, every=7, writers=[JsonlWriter(tmp_path / "log.jsonl")], warn=False)
    clipper = gradclip.GlobalNorm(0.05)
    norms = []
    for step in range(30):
        model.zero_grad()
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).pow(2).sum().backward()
        info = clipper.clip_(model)
        norms.append(float(info.norm))
        monitor.observe(info)
    suggestion = monitor.suggest(0.8)
    assert suggestion.max_norm == pytest.approx(float(np.quantile(norms, 0.8)), rel=1e-6)
    assert suggestion.current_threshold == pytest.approx(0.05)
    assert "step-size limit" in str(suggestion)
    monitor.close()
    # What `gradclip suggest LOG` does: read the JSON Lines log and suggest from its norms.
    from_log = suggest_threshold([r["norm"] for r in read_log(tmp_path / "log.jsonl")], 0.8)
    assert from_log.max_norm == pytest.approx(suggestion.max_norm, rel=1e-6)
