"""SkipOnSpike: flag the optimizer step when the norm spikes above mean + sigma·std."""

from __future__ import annotations

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")


def reference_skip(norms, window, sigma, min_history, std_floor=0.01):
    """The rule in float64 NumPy: the window holds accepted positive norms only (current
    excluded), std with ddof=1 floored at std_floor·mean; non-finite norms are always skipped."""
    accepted, decisions, limits = [], [], []
    for n in norms:
        recent = np.asarray(accepted[-window:], np.float64)
        if len(recent) >= min_history:
            limit = recent.mean() + sigma * max(recent.std(ddof=1), std_floor * recent.mean())
        else:
            limit = np.inf
        spike = not np.isfinite(n) or bool(n > limit)
        decisions.append(spike)
        limits.append(limit)
        if not spike and n > 0:
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


def _skips(clipper, norms, dtype=np.float32):
    return [bool(clipper.clip([np.asarray([n], dtype)])[1].skip) for n in norms]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_spread_floor_prevents_a_stall_on_identical_norms(scale):
    """A window of identical norms has std 0: without a floor any slightly larger norm is a
    spike, never enters the window, and every later step is skipped. The floor (1% of the mean,
    times sigma = 6) accepts norms up to 6% above a constant level, at every loss scale."""
    clipper = gradclip.SkipOnSpike(window=8, min_history=4)
    assert _skips(clipper, [scale] * 6) == [False] * 6
    drift = [scale * (1.0 + r) for r in (1e-4, 0.01, 0.03, 0.05, 0.02, 0.059)]
    assert _skips(clipper, drift) == [False] * len(drift)
    # Real spikes are still skipped, and do not enter the window.
    before = clipper.state_dict()["state"]["count"]
    assert _skips(clipper, [scale * 10.0, scale * 1.5, float("nan")]) == [True, True, True]
    assert clipper.state_dict()["state"]["count"] == before
    assert _skips(clipper, [scale * 1.01]) == [False]


def test_difference_without_the_floor_identical_norms_stall_for_ever():
    """std_floor=0 is the bare mean + sigma·std rule: after identical norms, a norm 0.01% higher
    and everything after it is skipped."""
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, std_floor=0.0)
    _skips(clipper, [1.0] * 6)
    assert _skips(clipper, [1.0001 + i * 1e-6 for i in range(5)]) == [True] * 5
    floored = gradclip.SkipOnSpike(window=8, min_history=4)
    _skips(floored, [1.0] * 6)
    assert _skips(floored, [1.0001 + i * 1e-6 for i in range(5)]) == [False] * 5


def test_floor_only_widens_a_narrow_band():
    """With a real spread above the floor, the limit is mean + sigma·std (ddof=1) exactly."""
    norms = [1.0, 1.2, 0.8, 1.1, 0.9]
    clipper = gradclip.SkipOnSpike(window=8, min_history=4, sigma=3.0)
    _skips(clipper, norms)
    info = clipper.clip([np.asarray([1.0], np.float32)])[1]
    reference = np.asarray(norms, np.float64)
    assert float(info.threshold) == pytest.approx(reference.mean() + 3.0 * reference.std(ddof=1), rel=1e-6)
    narrow = gradclip.SkipOnSpike(window=8, min_history=4, sigma=3.0, std_floor=0.5)
    _skips(narrow, norms)
    info = narrow.clip([np.asarray([1.0], np.float32)])[1]
    assert float(info.threshold) == pytest.approx(1.0 + 3.0 * 0.5 * 1.0, rel=1e-6)


def test_zero_norms_are_accepted_but_not_recorded():
    """A window of zeros would have mean and spread 0: every positive norm after it would be
    skipped for ever. Zero norms pass (nothing to skip) and stay out of the window."""
    clipper = gradclip.SkipOnSpike(window=8, min_history=4)
    assert _skips(clipper, [0.0] * 10) == [False] * 10
    assert clipper.state_dict()["state"]["count"] == 0
    assert _skips(clipper, [1.0, 1.1, 0.9, 1.0, 0.0, 1.05]) == [False] * 6
    assert clipper.state_dict()["state"]["count"] == 5
    assert _skips(clipper, [20.0]) == [True]


def test_load_state_dict_refuses_a_window_that_cannot_arise():
    clipper = gradclip.SkipOnSpike(window=4, min_history=2)
    _skips(clipper, [1.0, 2.0])
    sd = clipper.state_dict()
    for window in ([1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 0.0, 0.0]):
        with pytest.raises(gradclip.StateError, match="2 positive norm"):
            clipper.load_state_dict({**sd, "state": {**sd["state"], "window": window}})
    assert clipper.state_dict() == sd


def test_in_place_leaves_gradients_bit_identical():
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    gradclip.SkipOnSpike().clip_(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))


def test_registry_default():
    clipper = gradclip.get("skip_on_spike")
    assert (clipper.window, clipper.sigma, clipper.min_history, clipper.std_floor) == (128, 6.0, 20, 0.01)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"window": 1}, r"window must be an integer >= 2, got 1"),
        ({"window": 8.0}, r"window must be an integer >= 2, got 8\.0"),
        ({"sigma": 0}, r"sigma must be in \(0, inf\), got 0"),
        ({"sigma": float("nan")}, r"sigma .* got nan"),
        ({"min_history": 1}, r"min_history must be an integer >= 2, got 1"),
        ({"window": 10, "min_history": 11}, r"min_history must be in \[2, window=10\], got 11"),
        ({"std_floor": -0.01}, r"std_floor must be in \[0, inf\), got -0\.01"),
        ({"std_floor": float("inf")}, r"std_floor .* got inf"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.SkipOnSpike(**kwargs)
    assert str(excinfo.value).startswith("SkipOnSpike: ")
