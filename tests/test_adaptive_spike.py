"""SkipOnSpike: flag the optimizer step when the norm spikes above mean + sigma·std."""

from __future__ import annotations

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")


def reference_skip(norms, window, sigma, min_history):
    """The rule in float64 NumPy: the window holds accepted norms only (current excluded),
    std with ddof=1; non-finite norms are always skipped."""
    accepted, decisions, limits = [], [], []
    for n in norms:
        recent = np.asarray(accepted[-window:], np.float64)
        if not np.isfinite(n):
            decisions.append(True)
            limits.append(np.inf if len(recent) < min_history else recent.mean() + sigma * recent.std(ddof=1))
            continue
        if len(recent) >= min_history:
            limit = recent.mean() + sigma * recent.std(ddof=1)
            spike = n > limit
        else:
            limit, spike = np.inf, False
        decisions.append(bool(spike))
        limits.append(limit)
        if not spike:
            accepted.append(n)
    return decisions, limits


def _norms(n=120, seed=0):
    rng = np.random.default_rng(seed)
    norms = rng.lognormal(0.0, 0.1, size=n).astype(np.float32)
    for i in (3, 30, 31, 70, 95):
        norms[i] *= 5.0
    norms[50] = np.nan
    norms[51] = np.inf
    return norms


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_matches_the_rule(framework):
    norms = _norms()
    clipper = gradclip.SkipOnSpike(window=32, sigma=4.0, min_history=10)
    decisions, limits = reference_skip([float(x) for x in norms], 32, 4.0, 10)
    for step, n in enumerate(norms):
        g = np.asarray([np.float32(n), 0.0], np.float32)
        arrays = [torch.from_numpy(g)] if framework == "torch" else [g]
        out, info = clipper.clip(arrays)
        assert bool(info.skip) == decisions[step], step
        if np.isfinite(limits[step]):
            assert float(info.threshold) == pytest.approx(limits[step], rel=1e-5)
        else:
            assert float(info.threshold) == np.inf
        # Gradients are never modified.
        np.testing.assert_array_equal(np.asarray(out[0]), g)
        assert float(info.coef) == 1.0 and not bool(info.clipped)
    assert decisions[3] is False  # before min_history: not a spike
    assert decisions[30] and decisions[31] and decisions[50] and decisions[51]
    state = clipper.state_dict()["state"]
    assert state["skipped"] == sum(decisions) and state["count"] == len(norms) - sum(decisions)


def test_spikes_do_not_widen_the_band():
    clipper = gradclip.SkipOnSpike(window=8, sigma=3.0, min_history=4)
    for n in [1.0, 1.1, 0.9, 1.0, 1.05]:
        clipper.clip([np.asarray([n], np.float32)])
    limit_before = float(clipper.clip([np.asarray([50.0], np.float32)])[1].threshold)
    (_, info) = clipper.clip([np.asarray([50.0], np.float32)])
    assert bool(info.skip) and float(info.threshold) == limit_before


def test_in_place_leaves_gradients_bit_identical():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    gradclip.SkipOnSpike().clip_(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_registry_default():
    clipper = gradclip.get("skip_on_spike")
    assert (clipper.window, clipper.sigma, clipper.min_history) == (128, 6.0, 20)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"window": 1}, r"window must be an integer >= 2, got 1"),
        ({"window": 8.0}, r"window must be an integer >= 2, got 8\.0"),
        ({"sigma": 0}, r"sigma must be in \(0, inf\), got 0"),
        ({"sigma": float("nan")}, r"sigma .* got nan"),
        ({"min_history": 1}, r"min_history must be an integer >= 2, got 1"),
        ({"window": 10, "min_history": 11}, r"min_history must be in \[2, window=10\], got 11"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.SkipOnSpike(**kwargs)
    assert str(excinfo.value).startswith("SkipOnSpike: ")
