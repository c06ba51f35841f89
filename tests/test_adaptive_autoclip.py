"""AutoClip (Seetharaman et al. 2020): threshold = percentile of the history of global norms."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from gradclip.clippers._adaptive import SKETCH_RELATIVE_ERROR, SKETCH_SIZE

torch = pytest.importorskip("torch")


def _feed(clipper, norms, framework="numpy", dtype=np.float32):
    direction = np.asarray([0.6, 0.8], dtype)
    infos = []
    for n in norms:
        g = direction * dtype(n)
        if framework == "torch":
            g = torch.from_numpy(g)
        infos.append(clipper.clip([g])[1])
    return infos


def _norms(n, seed=0):
    return np.random.default_rng(seed).lognormal(0.0, 1.0, size=n).astype(np.float32)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_window_threshold_is_numpys_percentile_of_the_last_n_norms(framework):
    norms = _norms(50)
    infos = _feed(gradclip.AutoClip(percentile=30.0, history=7), norms, framework)
    seen = []
    for step, info in enumerate(infos):
        seen.append(np.float32(float(info.norm)))
        expected = np.percentile(np.asarray(seen[-7:], np.float32), 30.0)
        assert np.float32(float(info.threshold)) == expected, step
        assert bool(info.clipped) == (float(info.norm) > float(expected))


def test_first_step_is_never_clipped():
    info = _feed(gradclip.AutoClip(percentile=0.0, history=5), [123.0])[0]
    assert float(info.threshold) == pytest.approx(123.0) and not bool(info.clipped)


def test_numpy_and_torch_agree():
    norms = _norms(40)
    for make in (lambda: gradclip.AutoClip(), lambda: gradclip.AutoClip(history=9)):
        a = [float(i.threshold) for i in _feed(make(), norms, "numpy")]
        b = [float(i.threshold) for i in _feed(make(), norms, "torch")]
        assert a == pytest.approx(b, rel=1e-6)  # the two backends' norms may differ by an ulp


def test_unbounded_history_is_a_fixed_size_sketch_within_its_error_bound():
    clipper = gradclip.AutoClip(percentile=10.0)
    norms = _norms(600, seed=1)
    infos = _feed(clipper, norms)
    state = clipper.state_dict()["state"]
    assert len(state["bins"]) == SKETCH_SIZE and state["count"] == 600  # memory does not grow
    seen = np.asarray([float(i.norm) for i in infos], np.float32)
    for step in (0, 1, 5, 50, 599):
        exact = np.percentile(seen[: step + 1], 10.0)
        assert float(infos[step].threshold) == pytest.approx(exact, rel=SKETCH_RELATIVE_ERROR)
    # The first two steps and the extremes are exact.
    assert float(infos[1].threshold) == np.percentile(seen[:2], 10.0)
    low = _feed(gradclip.AutoClip(percentile=0.0), norms[:30])
    high = _feed(gradclip.AutoClip(percentile=100.0), norms[:30])
    assert float(low[-1].threshold) == float(seen[:30].min())
    assert float(high[-1].threshold) == float(seen[:30].max())


def test_sketch_handles_zero_and_extreme_norms():
    clipper = gradclip.AutoClip(percentile=50.0)
    # 18 decades either side of 1 (their squares are still normal fp32 numbers).
    infos = _feed(clipper, [0.0, 0.0, 0.0, 1e-18, 1e18])
    # Zero norms are not counted (a deviation, see the next test): no history, no bound yet.
    assert [float(i.threshold) for i in infos[:3]] == [math.inf] * 3
    assert clipper.state_dict()["state"]["count"] == 2
    assert float(infos[3].threshold) == float(infos[3].norm) == pytest.approx(1e-18, rel=1e-6)
    assert 1e-18 < float(infos[-1].threshold) < 1e18


@pytest.mark.parametrize("history", [None, 16])
def test_deviation_zero_norm_steps_cannot_zero_later_gradients(history):
    """With the paper's rule, 20 steps of zero gradients (a frozen start) make the 10th
    percentile 0, and every later gradient is scaled to 0: training stops. Zero norms are not
    counted here, so the threshold is that of the positive norms alone."""
    zeros = [0.0] * 20
    positive = [1.0, 2.0, 3.0, 4.0]
    infos = _feed(gradclip.AutoClip(percentile=10.0, history=history), zeros + positive)
    for step, info in enumerate(infos[20:]):
        expected = np.percentile(np.asarray(positive[: step + 1], np.float32), 10.0)
        assert float(info.threshold) == pytest.approx(expected, rel=SKETCH_RELATIVE_ERROR)
        assert float(info.norm) * float(info.coef) > 0.5  # not zeroed
    # The paper's rule on the same norms: the threshold is 0 from the first step on.
    assert np.percentile(np.asarray(zeros + positive[:1]), 10.0) == 0.0


def test_clipping_scales_to_the_threshold():
    clipper = gradclip.AutoClip(percentile=50.0, history=10)
    _feed(clipper, [1.0, 1.0, 1.0])
    (out,), info = clipper.clip([np.asarray([0.0, 10.0], np.float32)])
    assert float(info.threshold) == pytest.approx(1.0)
    assert np.linalg.norm(out) == pytest.approx(1.0, rel=1e-5)


def test_nonfinite_norms_never_enter_the_history():
    clipper = gradclip.AutoClip(percentile=50.0, history=4)
    _feed(clipper, [1.0, 2.0])
    before = clipper.state_dict()
    (out,), info = clipper.clip([np.asarray([np.nan, 1.0], np.float32)])
    assert not bool(info.finite) and np.isnan(out[0])
    assert clipper.state_dict() == before
    assert float(info.threshold) == pytest.approx(1.5)
    skip = gradclip.AutoClip(nonfinite="skip")
    _, info = skip.clip([np.asarray([np.inf, 1.0], np.float32)])
    assert bool(info.skip)
    zero = gradclip.AutoClip(nonfinite="zero", history=3)
    (out,), info = zero.clip([np.asarray([np.inf, 1.0], np.float32)])
    assert list(out) == [0.0, 1.0] and zero.state_dict()["state"]["count"] == 1
    before = zero.state_dict()
    with pytest.raises(gradclip.NonFiniteError):
        gradclip.AutoClip(nonfinite="raise").clip([np.asarray([np.nan], np.float32)])
    assert zero.state_dict() == before


def test_fp64_gradients_get_an_fp64_threshold():
    (out,), info = gradclip.AutoClip().clip([np.asarray([3.0, 4.0])])
    assert out.dtype == np.float64 and info.threshold.dtype == np.float64


def test_registry_default():
    clipper = gradclip.get("autoclip")
    assert clipper.percentile == 10.0 and clipper.history is None


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"percentile": -1}, r"percentile must be in \[0, 100\], got -1"),
        ({"percentile": 100.5}, r"percentile must be in \[0, 100\], got 100\.5"),
        ({"percentile": float("nan")}, r"percentile .* got nan"),
        ({"percentile": "10"}, r"percentile must be a real number, got '10'"),
        ({"percentile": True}, r"percentile must be a real number, got True"),
        ({"history": 0}, r"history must be an integer >= 1 or None, got 0"),
        ({"history": 2.5}, r"history must be an integer >= 1 or None, got 2\.5"),
        ({"history": True}, r"history .* got True"),
        ({"nonfinite": "nope"}, r"nonfinite must be one of .*; got 'nope'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.AutoClip(**kwargs)
    assert str(excinfo.value).startswith("AutoClip: ")
