"""Subset: apply a clipper to a random subset of elements or tensors (seed 003 strategies)."""

from __future__ import annotations

import numpy as np
import pytest

import gradclip
from adaptive_helpers import to_np

torch = pytest.importorskip("torch")


def _grads(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in [(40, 50), (50,), (30, 20), (7,)]]


def test_fraction_one_is_the_wrapped_clipper_and_zero_changes_nothing():
    grads = _grads()
    inner, _ = gradclip.Value(clip_value=1.0).clip(grads)
    everything, _ = gradclip.Subset(gradclip.Value(clip_value=1.0), 1.0, seed=0).clip(grads)
    nothing, info = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.0, seed=0).clip(grads)
    assert all(np.array_equal(a, b) for a, b in zip(everything, inner))
    assert all(np.array_equal(a, b) for a, b in zip(nothing, grads))
    assert not bool(info.clipped) and float(info.coef) == 1.0


def test_random_element_clipping_hits_the_expected_fraction():
    """Seed 003's random clipping: each element is clamped with probability 0.3."""
    grads = _grads(scale=100.0)  # nearly every element is outside [-1, 1]
    out, info = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.3, seed=11).clip(grads)
    changed = sum(int(np.sum(o != g)) for o, g in zip(out, grads))
    outside = sum(int(np.sum(np.abs(g) > 1)) for g in grads)
    assert changed / outside == pytest.approx(0.3, abs=0.03)
    for o, g in zip(out, grads):
        assert np.all((o == g) | (o == np.clip(g, -1, 1)))
    assert bool(info.clipped) and 0 < float(info.coef) < 1


def test_by_tensor_clips_whole_tensors():
    grads = _grads(scale=100.0)
    seen = set()
    clipper = gradclip.Subset("global_norm", 0.5, by="tensor", seed=3)
    for _ in range(12):
        grads = [g.copy() for g in grads]
        out, info = clipper.clip(grads)
        coef = float(gradclip.GlobalNorm(1.0).clip(grads)[1].coef)
        pattern = []
        for o, g in zip(out, grads):
            same, scaled = np.array_equal(o, g), np.allclose(o, g * coef, rtol=1e-6)
            assert same or scaled
            pattern.append(not same)
        seen.add(tuple(pattern))
    assert len(seen) > 3  # a fresh draw every step


def test_stream_is_reproducible_and_identical_on_numpy_and_torch():
    grads = _grads(scale=10.0)
    runs = []
    for framework in ("numpy", "torch", "numpy"):
        clipper = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.5, seed=42)
        outs = []
        for step in range(3):
            arrays = [g * np.float32(step + 1) for g in grads]
            if framework == "torch":
                arrays = [torch.from_numpy(a) for a in arrays]
            outs.append([to_np(o) for o in clipper.clip(arrays)[0]])
        runs.append(outs)
    for other in runs[1:]:
        for a_step, b_step in zip(runs[0], other):
            assert all(np.array_equal(a, b) for a, b in zip(a_step, b_step))
    other_seed = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.5, seed=43).clip([g * 1 for g in grads])[0]
    assert not all(np.array_equal(a, b) for a, b in zip(other_seed, runs[0][0]))


def test_seed_none_draws_a_key_that_the_checkpoint_keeps():
    a = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.5)
    a.clip(_grads(scale=10.0))
    b = gradclip.Subset(gradclip.Value(clip_value=1.0), 0.5)
    b.load_state_dict(a.state_dict())
    grads = _grads(seed=1, scale=10.0)
    assert all(np.array_equal(x, y) for x, y in zip(a.clip(grads)[0], b.clip(grads)[0]))


def test_in_place_with_a_stateful_inner_clipper():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    clipper = gradclip.Subset(gradclip.ZClip(warmup_steps=3), 0.5, seed=5)
    for step in range(5):
        model.zero_grad()
        model(torch.randn(3, 6)).pow(2).sum().backward()
        clipper.clip_(model)
    state = clipper.state_dict()["state"]
    assert state["step"] == 5 and state["inner"]["state"]["step"] == 5


def test_agc_inside_gets_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    model(torch.randn(3, 6)).pow(2).sum().mul(100).backward()
    info = gradclip.Subset(gradclip.AGC(), 1.0, seed=0).clip_(model)
    assert bool(info.clipped)


def test_registry_default_and_config_round_trip():
    default = gradclip.get("subset")
    assert isinstance(default.clipper, gradclip.Value) and default.fraction == 0.5
    clipper = gradclip.Subset(gradclip.AutoClip(history=5), 0.25, by="tensor", seed=9)
    rebuilt = gradclip.get("subset", **clipper.config())
    assert rebuilt.config() == clipper.config()


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        ({"clipper": 3, "fraction": 0.5}, gradclip.InvalidArgumentError, r"clipper must be a gradclip clipper.*got 3"),
        ({"clipper": "nope", "fraction": 0.5}, gradclip.UnknownNameError, r"unknown clipper name 'nope'"),
        ({"clipper": {"clipper": "value", "config": 1}, "fraction": 0.5}, gradclip.InvalidArgumentError, r"clipper\['config'\] must be a mapping"),
        ({"clipper": "value", "fraction": -0.1}, gradclip.InvalidArgumentError, r"fraction must be in \[0, 1\], got -0\.1"),
        ({"clipper": "value", "fraction": 1.5}, gradclip.InvalidArgumentError, r"fraction .* got 1\.5"),
        ({"clipper": "value", "fraction": 0.5, "by": "row"}, gradclip.UnknownNameError, r"by must be one of 'element', 'tensor'; got 'row'"),
        ({"clipper": "value", "fraction": 0.5, "seed": -1}, gradclip.InvalidArgumentError, r"seed must be an integer >= 0 or None, got -1"),
        ({"clipper": "value", "fraction": 0.5, "seed": 2**62}, gradclip.InvalidArgumentError, r"seed must be None or an int in \[0, 2\*\*62\)"),
        ({"clipper": "value", "fraction": 0.5, "seed": 1.5}, gradclip.InvalidArgumentError, r"seed .* got 1\.5"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        gradclip.Subset(**kwargs)
