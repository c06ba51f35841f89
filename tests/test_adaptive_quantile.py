"""QuantileNorm (Andrew et al. 2021): a norm bound tracking a quantile geometrically."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from adaptive_helpers import snapshot

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_bound_settles_at_the_target_quantile(target):
    rng = np.random.default_rng(0)
    clipper = gradclip.QuantileNorm(target_quantile=target, learning_rate=0.05, initial_norm=1.0)
    for _ in range(400):
        samples = rng.lognormal(0.0, 0.7, size=64).astype(np.float32)
        clipper.clip([np.ones(2, np.float32) * rng.random()], sample_norms=samples)
    bound = clipper.state_dict()["state"]["norm"]
    fraction = np.mean(rng.lognormal(0.0, 0.7, size=200_000) <= bound)
    assert fraction == pytest.approx(target, abs=0.05)


def test_threshold_is_the_bound_before_the_update_and_clipping_uses_it():
    clipper = gradclip.QuantileNorm(initial_norm=2.0)
    (out,), info = clipper.clip([np.asarray([0.0, 10.0], np.float32)])
    assert float(info.threshold) == 2.0 and np.linalg.norm(out) == pytest.approx(2.0, rel=1e-5)
    # Clipped (b = 0): the bound grows by exp(0.2 * 0.5).
    assert clipper.state_dict()["state"]["norm"] == pytest.approx(2.0 * math.exp(0.1), rel=1e-6)


def test_bound_is_clamped_to_its_range():
    clipper = gradclip.QuantileNorm(initial_norm=1.0, min_norm=0.5, max_norm=1.5, learning_rate=2.0)
    for _ in range(5):  # tiny norms, always unclipped (a zero norm would leave C alone)
        clipper.clip([np.full(2, 1e-6, np.float32)], allow_repeat=True)
    assert clipper.state_dict()["state"]["norm"] == pytest.approx(0.5)
    for _ in range(5):
        clipper.clip([np.full(2, 100.0, np.float32)], allow_repeat=True)
    assert clipper.state_dict()["state"]["norm"] == pytest.approx(1.5)


def test_nonfinite_steps_and_samples():
    clipper = gradclip.QuantileNorm()
    before = snapshot(clipper.clip([np.ones(2, np.float32)])[1] and clipper)
    _, info = clipper.clip([np.asarray([np.nan, 1.0], np.float32)])
    assert not bool(info.finite) and snapshot(clipper) == before
    # Non-finite per-sample norms are ignored; only NaN samples: no update.
    clipper.clip([np.ones(3, np.float32)], sample_norms=np.asarray([np.nan, np.inf], np.float32))
    assert snapshot(clipper) == before
    clipper.clip([np.ones(4, np.float32)], sample_norms=np.asarray([np.nan, 0.1], np.float32))
    assert snapshot(clipper)["state"]["norm"] < before["state"]["norm"]


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_fp64_norm_just_above_the_bound_is_clipped_and_counted_clipped(framework):
    """The step's own norm decides b in its dtype, as the clip does: an fp64 norm of 1 + 1e-12
    (1.0 in fp32) over C = 1 is clipped, so it counts as clipped and C grows."""
    g = np.asarray([1.0 + 1e-12])
    clipper = gradclip.QuantileNorm(initial_norm=1.0)
    (out,), info = clipper.clip([torch.from_numpy(g) if framework == "torch" else g])
    assert bool(info.clipped) and float(np.asarray(out)[0]) < g[0]
    assert clipper.state_dict()["state"]["norm"] == pytest.approx(math.exp(0.2 * 0.5), rel=1e-6)
    at_bound = gradclip.QuantileNorm(initial_norm=1.0)
    (out,), info = at_bound.clip([np.asarray([1.0])])
    assert not bool(info.clipped) and out[0] == 1.0
    assert at_bound.state_dict()["state"]["norm"] == pytest.approx(math.exp(-0.2 * 0.5), rel=1e-6)


def test_numpy_and_torch_agree_with_sample_norms():
    rng = np.random.default_rng(2)
    a, b = gradclip.QuantileNorm(), gradclip.QuantileNorm()
    for _ in range(30):
        samples = rng.lognormal(size=16).astype(np.float32)
        a.clip([np.ones(2, np.float32)], sample_norms=samples, allow_repeat=True)
        b.clip([torch.ones(2)], sample_norms=torch.from_numpy(samples), allow_repeat=True)
    assert a.state_dict()["state"]["norm"] == pytest.approx(b.state_dict()["state"]["norm"], rel=1e-6)


@pytest.mark.parametrize(
    "samples,pattern",
    [
        ([0.5, 1.0], r"sample_norms must be a non-empty 1-D array .* got list"),
        (np.zeros((2, 2), np.float32), r"sample_norms must be a non-empty 1-D array .* shape \(2, 2\)"),
        (np.zeros(0, np.float32), r"sample_norms .* shape \(0,\)"),
        ("torch", r"sample_norms is a torch array but the gradients are numpy arrays"),
    ],
)
def test_bad_sample_norms_are_refused_and_nothing_changes(samples, pattern):
    clipper = gradclip.QuantileNorm()
    clipper.clip([np.ones(2, np.float32)])
    before = snapshot(clipper)
    grads = [np.full(3, 7.0, np.float32)]
    if isinstance(samples, str):
        samples = torch.ones(3)
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        clipper.clip_(grads, sample_norms=samples)
    assert snapshot(clipper) == before and np.array_equal(grads[0], np.full(3, 7.0, np.float32))
    clipper.clip_(grads)  # the refused call did not count as this step's update


def test_sample_norms_in_place_and_pure():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    info = gradclip.QuantileNorm().clip_(model, sample_norms=torch.rand(4))
    assert float(info.threshold) == 1.0
    clipper = gradclip.QuantileNorm(initial_norm=1.0)
    grads = [np.ones(2, np.float32)]
    state = clipper.init(grads)
    _, state, _ = clipper.update(grads, state, sample_norms=np.asarray([0.1, 0.2, 5.0], np.float32))
    # b = 2/3 unclipped: the bound shrinks by exp(-0.2 * (2/3 - 0.5)).
    assert float(state.norm) == pytest.approx(math.exp(-0.2 * (2 / 3 - 0.5)), rel=1e-6)


def test_registry_default():
    clipper = gradclip.get("quantile_norm")
    assert (clipper.target_quantile, clipper.learning_rate, clipper.initial_norm) == (0.5, 0.2, 1.0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"target_quantile": -0.1}, r"target_quantile must be in \[0, 1\], got -0\.1"),
        ({"target_quantile": 1.5}, r"target_quantile .* got 1\.5"),
        ({"learning_rate": -0.2}, r"learning_rate must be in \[0, inf\), got -0\.2"),
        ({"learning_rate": float("nan")}, r"learning_rate .* got nan"),
        ({"initial_norm": 0.0}, r"initial_norm must be in \[1e-12, 1e\+12\], got 0\.0"),
        ({"initial_norm": 2e12}, r"initial_norm .* got 2000000000000\.0"),
        ({"min_norm": 0.0}, r"min_norm must be in \(0, inf\), got 0\.0"),
        ({"max_norm": 1e-13}, r"max_norm must be in \(1e-12, inf\), got 1e-13"),
        ({"max_norm": float("inf")}, r"max_norm .* got inf"),
        ({"nonfinite": "?"}, r"nonfinite must be one of .*; got '\?'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.QuantileNorm(**kwargs)
    assert str(excinfo.value).startswith("QuantileNorm: ")
