"""SkipAbove: ask for the optimizer step to be skipped when the global norm exceeds a bound.

The registry-driven conformance suite runs it on every backend, dtype and compiled path; here:
the rule at its edges, that gradients are never touched, composition with a clipper, the
capabilities optimizers read, schedules, and bad arguments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from _frameworks import convert

import gradclip
from gradclip import schedules


def _step(clipper, norm, backend="numpy", dtype="float32"):
    g = convert(backend, np.array([0.0, norm]), dtype)
    (out,), info = clipper.clip([g])
    return out, info.to_dict()


@pytest.mark.parametrize("backend", ["numpy", "torch", "tensorflow", "jax"])
def test_skips_exactly_above_the_bound_and_on_non_finite_norms(backend):
    pytest.importorskip({"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}[backend])
    clipper = gradclip.SkipAbove(10.0)
    for norm, skip in [(3.0, False), (10.0, False), (10.5, True), (math.inf, True), (math.nan, True), (0.0, False)]:
        out, info = _step(clipper, norm, backend)
        assert info["skip"] is skip, norm
        assert info["threshold"] == 10.0 and info["coef"] == 1.0 and info["clipped"] is False
        # The gradients are never modified (NaN stays NaN).
        np.testing.assert_array_equal(np.asarray(out, np.float64), np.array([0.0, norm]))
    assert info["finite"] is True


def test_infinite_bound_skips_only_non_finite_norms():
    clipper = gradclip.SkipAbove(math.inf)
    assert [_step(clipper, n)[1]["skip"] for n in (1e18, math.inf, math.nan)] == [False, True, True]


def test_fp64_norms_are_compared_in_fp64():
    """A bound just under an fp64 norm skips even where fp32 would round them together."""
    clipper = gradclip.SkipAbove(1.0)
    assert _step(clipper, 1.0 + 1e-12, dtype="float64")[1]["skip"] is True
    assert _step(clipper, 1.0, dtype="float64")[1]["skip"] is False


def test_capabilities_and_registry_default():
    clipper = gradclip.get("skip_above")
    assert isinstance(clipper, gradclip.SkipAbove) and clipper.max_norm == 100.0
    assert clipper.may_skip and not clipper.keeps_state and clipper.one_coefficient
    assert gradclip.SkipAbove is gradclip.clippers.SkipAbove


def test_in_a_chain_it_sees_the_norm_the_links_before_left():
    """First in a chain it bounds the raw norm; after a GlobalNorm it would only see the clipped
    one (so it never fires there)."""
    g = [np.array([300.0, 400.0], np.float32)]  # norm 500
    first = gradclip.chain(gradclip.SkipAbove(100.0), gradclip.GlobalNorm(1.0))
    (out,), info = first.clip([g[0].copy()])
    assert bool(info.skip) and float(np.linalg.norm(out)) == pytest.approx(1.0, rel=1e-5)
    after = gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.SkipAbove(100.0))
    assert not bool(after.clip([g[0].copy()])[1].skip)


def test_clip_in_place_with_torch_leaves_gradients_and_reports_skip():
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 1)
    (model(torch.ones(2, 3)).sum() * 1e4).backward()
    before = [p.grad.clone() for p in model.parameters()]
    info = gradclip.SkipAbove(1.0).clip_(model)
    assert bool(info.skip)
    for a, p in zip(before, model.parameters()):
        assert torch.equal(a, p.grad)


def test_a_scheduled_bound():
    clipper = gradclip.SkipAbove(schedules.Piecewise([2], [100.0, 5.0]))
    assert [_step(clipper, 10.0)[1]["skip"] for _ in range(4)] == [False, False, True, True]
    assert clipper.state_dict()["state"] == {"clock": 4}


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"max_norm": -1.0}, r"SkipAbove: max_norm must be in \[0, inf\], got -1.0"),
        ({"max_norm": float("nan")}, r"SkipAbove: max_norm must not be NaN"),
        ({"max_norm": True}, r"SkipAbove: max_norm must be a real number, got True"),
        ({"max_norm": 1.0, "norm_type": 0}, r"SkipAbove: norm_type must be in \(0, inf\], got 0"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        gradclip.SkipAbove(**kwargs)


def test_missing_bound_names_the_argument():
    with pytest.raises(TypeError, match="max_norm"):
        gradclip.SkipAbove()  # type: ignore[call-arg]
