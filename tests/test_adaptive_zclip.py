"""ZClip: EMA z-score spike clipping (the zclip 1.0.0 rule, with the documented differences).

The tests of the package's warm-up (mean and variance, nothing clipped) pass ``warmup="mean"``;
those of the default robust warm-up (median and MAD, clipping from the third norm) are below them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")


def _feed(clipper, norms, framework="numpy"):
    out = []
    for n in norms:
        g = np.asarray([0.0, np.float32(n)], np.float32)
        if framework == "torch":
            g = torch.from_numpy(g)
        (clipped,), info = clipper.clip([g])
        out.append((float(np.linalg.norm(np.asarray(clipped, np.float64))), info))
    return out


WARM = [4.0, 5.0, 6.0, 5.0, 4.5]


def test_warm_up_collects_without_clipping_then_uses_population_statistics():
    clipper = gradclip.ZClip(warmup_steps=5, warmup="mean")
    results = _feed(clipper, WARM)
    assert [n for n, _ in results] == pytest.approx(WARM)
    assert all(not bool(i.clipped) and math.isinf(float(i.threshold)) for _, i in results)
    state = clipper.state_dict()["state"]
    assert state["mean"] == pytest.approx(np.mean(WARM), rel=1e-6)
    assert state["var"] == pytest.approx(np.var(WARM), rel=1e-5)  # population variance


def test_warm_up_with_max_grad_norm_clips_at_it():
    results = _feed(gradclip.ZClip(warmup_steps=5, max_grad_norm=4.5, warmup="mean"), WARM)
    assert [n for n, _ in results] == pytest.approx([min(x, 4.5) for x in WARM], rel=1e-6)


def _expected_adaptive(norm, mean, var, z_thresh=2.5, clip_factor=1.0):
    std = math.sqrt(var)
    z = (norm - mean) / std
    return (mean + (z_thresh * std) / (z / z_thresh)) * clip_factor


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_spike_is_clipped_to_the_reciprocal_threshold(framework):
    clipper = gradclip.ZClip(warmup_steps=5, clip_factor=0.9, warmup="mean")
    _feed(clipper, WARM, framework)
    mean, var = np.mean(WARM), np.var(WARM)
    (norm, info), = _feed(clipper, [50.0], framework)
    expected = _expected_adaptive(50.0, mean, var, clip_factor=0.9)
    assert norm == pytest.approx(expected, rel=1e-5)
    assert float(info.threshold) == pytest.approx(expected, rel=1e-5) and bool(info.clipped)
    # The EMA takes the clipped value, and the variance uses the updated mean.
    new_mean = 0.97 * mean + 0.03 * expected
    new_var = 0.97 * var + 0.03 * (expected - new_mean) ** 2
    state = clipper.state_dict()["state"]
    assert state["mean"] == pytest.approx(new_mean, rel=1e-5)
    assert state["var"] == pytest.approx(new_var, rel=1e-4)


def test_quiet_step_is_untouched_and_reports_the_detection_limit():
    clipper = gradclip.ZClip(warmup_steps=5, warmup="mean")
    _feed(clipper, WARM)
    (norm, info), = _feed(clipper, [5.5])
    assert norm == pytest.approx(5.5) and float(info.coef) == 1.0
    limit = np.mean(WARM) + 2.5 * np.std(WARM)
    assert float(info.threshold) == pytest.approx(limit, rel=1e-5)


def test_mean_option_and_percentile_mode():
    mean, std = np.mean(WARM), np.std(WARM)
    c = gradclip.ZClip(warmup_steps=5, clip_option="mean", warmup="mean")
    _feed(c, WARM)
    assert _feed(c, [50.0])[0][0] == pytest.approx(mean, rel=1e-5)
    c = gradclip.ZClip(warmup_steps=5, mode="percentile", warmup="mean")
    _feed(c, WARM)
    assert _feed(c, [50.0])[0][0] == pytest.approx(mean + 2.5 * std, rel=1e-5)
    assert _feed(c, [mean + 2.0 * std])[0][1].clipped.item() is False


def test_skip_update_on_spike_keeps_the_statistics():
    c = gradclip.ZClip(warmup_steps=5, skip_update_on_spike=True)
    _feed(c, WARM)
    before = c.state_dict()["state"]
    _feed(c, [80.0])
    after = c.state_dict()["state"]
    assert (after["mean"], after["var"]) == (before["mean"], before["var"])
    assert after["step"] == before["step"] + 1


def test_std_floor_keeps_constant_warm_up_usable():
    c = gradclip.ZClip(warmup_steps=5)
    _feed(c, [3.0] * 5)
    (norm, info), = _feed(c, [3.05])  # z = 0.05 / (0.01 * 3) < 2.5
    assert norm == pytest.approx(3.05) and not bool(info.clipped)
    (norm, info), = _feed(c, [30.0])
    assert bool(info.clipped) and norm < 30.0


def test_deviation_zero_norms_do_not_enter_the_statistics():
    """zclip 1.0.0 after a warm-up of zero norms (frozen or masked start): mean = var = 0, every
    positive norm has z = inf and is clipped to mean + 0 = 0, and the EMA of those zeros stays 0
    — every gradient is zeroed for ever. Here zero norms pass through and are not counted."""
    c = gradclip.ZClip(warmup_steps=5, warmup="mean")
    zeros = _feed(c, [0.0] * 8)
    assert all(n == 0.0 and not bool(i.clipped) for n, i in zeros)
    assert c.state_dict()["state"] == {"step": 0, "warmup": [0.0] * 5, "mean": 0.0, "var": 0.0}
    results = _feed(c, WARM)  # the warm-up starts with the first positive norm
    assert [n for n, _ in results] == pytest.approx(WARM)
    state = c.state_dict()["state"]
    assert state["step"] == 5 and state["mean"] == pytest.approx(np.mean(WARM), rel=1e-6)
    assert state["var"] == pytest.approx(np.var(WARM), rel=1e-5)
    # After warm-up: a zero norm passes, leaves the statistics alone, and training goes on.
    (norm, info), = _feed(c, [0.0])
    assert norm == 0.0 and not bool(info.clipped) and c.state_dict()["state"] == state
    (norm, info), = _feed(c, [5.2])
    assert norm == pytest.approx(5.2) and not bool(info.clipped)
    (norm, info), = _feed(c, [60.0])
    assert bool(info.clipped) and 0.0 < norm < 60.0


def test_zero_mean_after_warm_up_is_refused_by_load_state_dict():
    c = gradclip.ZClip(warmup_steps=3)
    _feed(c, [1.0, 2.0, 3.0])
    good = c.state_dict()
    broken = {**good, "state": {**good["state"], "mean": 0.0, "var": 0.0}}
    with pytest.raises(gradclip.StateError, match="mean must be positive once warm-up is over"):
        c.load_state_dict(broken)
    zeros = {**good, "state": {**good["state"], "warmup": [0.0, 0.0, 0.0]}}
    with pytest.raises(gradclip.StateError, match="3 positive norm"):
        c.load_state_dict(zeros)
    assert c.state_dict() == good
    partial = gradclip.ZClip(warmup_steps=3)
    _feed(partial, [1.0])
    sd = partial.state_dict()
    for warmup in ([1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]):
        with pytest.raises(gradclip.StateError, match="1 positive norm"):
            partial.load_state_dict({**sd, "state": {**sd["state"], "warmup": warmup}})
    assert partial.state_dict() == sd


def test_nonfinite_steps_leave_the_statistics_alone():
    c = gradclip.ZClip(warmup_steps=3)
    _feed(c, [1.0, 2.0])
    before = c.state_dict()
    (_, info), = _feed(c, [float("nan")])
    assert not bool(info.finite)
    assert c.state_dict() == before  # not even the step count moved
    c2 = gradclip.ZClip(warmup_steps=3, nonfinite="skip")
    _feed(c2, [1.0])
    assert bool(_feed(c2, [float("inf")])[0][1].skip)


def test_numpy_and_torch_agree():
    norms = list(np.random.default_rng(0).lognormal(1.0, 0.2, 40)) + [40.0, 5.0, 60.0]
    a = [n for n, _ in _feed(gradclip.ZClip(warmup_steps=10), norms, "numpy")]
    b = [n for n, _ in _feed(gradclip.ZClip(warmup_steps=10), norms, "torch")]
    assert a == pytest.approx(b, rel=1e-6)


def test_registry_default_has_no_absolute_cap():
    clipper = gradclip.get("zclip")
    assert clipper.max_grad_norm is None and clipper.warmup_steps == 25 and clipper.warmup == "robust"


# -- the robust warm-up (the default) -----------------------------------------------------------
def _robust(values):
    """Median and 1.4826·MAD of ``values`` in float64 (the reference of the warm-up rule)."""
    values = np.asarray(values, np.float64)
    median = float(np.median(values))
    return median, 1.4826 * float(np.median(np.abs(values - median)))


def test_robust_warm_up_ends_with_median_and_mad():
    clipper = gradclip.ZClip(warmup_steps=5)
    results = _feed(clipper, WARM)
    assert [n for n, _ in results] == pytest.approx(WARM)  # quiet warm-up: nothing clipped
    median, std = _robust(WARM)
    state = clipper.state_dict()["state"]
    assert state["mean"] == pytest.approx(median, rel=1e-6)
    assert state["var"] == pytest.approx(std**2, rel=1e-5)


def test_robust_warm_up_clips_from_the_third_norm_against_the_buffer():
    """Steps 1-2: no statistics, untouched (threshold inf). From the third norm on, a norm is
    clipped by the z-score rule against the median and scaled MAD of the buffer, itself
    included."""
    clipper = gradclip.ZClip(warmup_steps=25)
    first = _feed(clipper, [4.0, 50.0])
    assert [n for n, _ in first] == pytest.approx([4.0, 50.0])
    assert all(math.isinf(float(i.threshold)) and not bool(i.clipped) for _, i in first)
    (norm, info), = _feed(clipper, [5.0])  # buffer 4, 50, 5: median 5, MAD 1
    median, std = _robust([4.0, 50.0, 5.0])
    assert float(info.threshold) == pytest.approx(median + 2.5 * std, rel=1e-6)
    assert norm == pytest.approx(5.0) and not bool(info.clipped)
    _feed(clipper, [4.5])
    (norm, info), = _feed(clipper, [60.0])  # buffer 4, 50, 5, 4.5, 60: median 5, MAD 1
    median, std = _robust([4.0, 50.0, 5.0, 4.5, 60.0])
    assert bool(info.clipped) and norm == pytest.approx(_expected_adaptive(60.0, median, std**2), rel=1e-5)
    # The warm-up norms are recorded as given (the median and MAD ignore the outliers), and
    # the EMA statistics stay 0 until warm-up ends.
    state = clipper.state_dict()["state"]
    assert state["warmup"][:5] == pytest.approx([4.0, 50.0, 5.0, 4.5, 60.0]) and state["mean"] == 0.0


def test_robust_warm_up_a_spike_does_not_set_the_threshold():
    """Issue 17's nanoGPT run: one norm of 50.8 among norms near 1 in a 25-step warm-up. The
    package's mean/variance rule then sets the detection limit near 27 and nothing is clipped
    for hundreds of steps; the robust rule ends warm-up with a limit near the norms' level, and
    clips the spike itself when it comes."""
    rng = np.random.default_rng(7)
    norms = list(np.float32(1.0 + 0.1 * rng.standard_normal(25)))
    norms[12] = 50.8
    later = list(np.float32(1.0 + 0.1 * rng.standard_normal(300)))
    later[30] = 10.0  # a real spike, 10x the level, after warm-up
    package = gradclip.ZClip(warmup="mean")
    packaged = _feed(package, norms + later)
    limits = [float(i.threshold) for _, i in packaged[25:]]
    assert 20.0 < limits[0] < 35.0  # the warm-up spike dominates the package's variance...
    assert min(limits[:60]) > 5.0  # ...for many steps (the EMA forgets it slowly)...
    assert not bool(packaged[25 + 30][1].clipped)  # ...so the 10x spike passes
    assert not any(bool(i.clipped) for _, i in packaged[:25])  # and nothing in warm-up
    robust = gradclip.ZClip()
    results = _feed(robust, norms + later)
    assert bool(results[12][1].clipped) and results[12][0] < 3.0  # the warm-up spike is clipped
    assert float(results[25][1].threshold) < 2.0  # a limit at the norms' level
    assert bool(results[25 + 30][1].clipped) and results[25 + 30][0] < 3.0
    assert np.mean([bool(i.clipped) for _, i in results[25:]]) < 0.05  # quiet steps pass


def test_robust_warm_up_with_identical_norms_uses_the_floor():
    """MAD 0 (most warm-up norms equal): the spread is floored at std_floor·median, as the EMA's."""
    c = gradclip.ZClip(warmup_steps=5)
    results = _feed(c, [3.0] * 5)
    assert not any(bool(i.clipped) for _, i in results)
    state = c.state_dict()["state"]
    assert state["mean"] == pytest.approx(3.0) and state["var"] == 0.0
    (norm, info), = _feed(c, [3.05])  # z = 0.05 / (0.01 · 3) < 2.5
    assert norm == pytest.approx(3.05) and not bool(info.clipped)
    (norm, info), = _feed(c, [30.0])
    assert bool(info.clipped) and norm < 30.0


def test_robust_warm_up_skips_zero_and_nonfinite_norms():
    """Zero and non-finite norms are not recorded: the buffer (and the start of clipping) wait
    for positive finite norms."""
    c = gradclip.ZClip(warmup_steps=4)
    _feed(c, [0.0, 2.0, float("nan"), 0.0, 2.2])
    assert c.state_dict()["state"]["step"] == 2
    (_, info), = _feed(c, [float("inf")])
    assert not bool(info.clipped) and c.state_dict()["state"]["step"] == 2
    (norm, info), = _feed(c, [40.0])  # the third norm: clipped against 2, 2.2, 40
    assert bool(info.clipped) and norm < 5.0


def test_old_checkpoints_without_the_warmup_setting_load():
    """The config leaves out ``warmup`` at its default: a checkpoint of an earlier version (no
    such key) loads into ``ZClip()``; one saved with ``warmup="mean"`` does not."""
    c = gradclip.ZClip(warmup_steps=3)
    _feed(c, [1.0, 2.0, 3.0, 2.5])
    saved = c.state_dict()
    assert "warmup" not in saved["config"]
    fresh = gradclip.ZClip(warmup_steps=3)
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved
    mean = gradclip.ZClip(warmup_steps=3, warmup="mean")
    assert mean.config()["warmup"] == "mean"
    with pytest.raises(gradclip.StateError, match="config"):
        mean.load_state_dict(saved)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\), got 0\.0"),
        ({"alpha": 1.0}, r"alpha must be in \(0, 1\), got 1\.0"),
        ({"alpha": "0.9"}, r"alpha must be a real number, got '0\.9'"),
        ({"z_thresh": 0}, r"z_thresh must be in \(0, inf\), got 0"),
        ({"z_thresh": -2.5}, r"z_thresh .* got -2\.5"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm must be in \(0, inf\], got 0\.0"),
        ({"max_grad_norm": float("nan")}, r"max_grad_norm .* got nan"),
        ({"warmup_steps": 0}, r"warmup_steps must be an integer >= 1, got 0"),
        ({"warmup_steps": 2.0}, r"warmup_steps must be an integer >= 1, got 2\.0"),
        ({"mode": "zcore"}, r"mode must be one of 'zscore', 'percentile'; got 'zcore'"),
        ({"clip_option": "max"}, r"clip_option must be one of 'adaptive_scaling', 'mean'; got 'max'"),
        ({"clip_factor": 0.0}, r"clip_factor must be in \(0, inf\), got 0\.0"),
        ({"skip_update_on_spike": 1}, r"skip_update_on_spike must be True or False, got 1"),
        ({"std_floor": -0.1}, r"std_floor must be in \[0, inf\), got -0\.1"),
        ({"std_floor": float("inf")}, r"std_floor .* got inf"),
        ({"nonfinite": "drop"}, r"nonfinite must be one of .*; got 'drop'"),
        ({"warmup": "median"}, r"warmup must be one of 'robust', 'mean'; got 'median'"),
        ({"warmup": None}, r"warmup must be one of 'robust', 'mean'; got None"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.ZClip(**kwargs)
    assert str(excinfo.value).startswith("ZClip: ")
