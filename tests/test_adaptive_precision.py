"""fp64 gradients through the adaptive clippers, whose statistics are fp32.

DESIGN rule 4: a norm under the threshold leaves the gradients bit for bit unchanged. The
statistics of every adaptive clipper are fp32 while fp64 gradients have an fp64 norm; comparing
that norm with its own fp32 rounding (ZClip's quiet-step bound, AutoClip's threshold at
percentile 100 or on the first step) used to clip fp64 gradients by an ulp, and report it. The
fp32 twin of each fp64 run is the reference for which steps are quiet.

An fp64 norm beyond fp32's range (~3.4e38) is finite, but would be inf in the fp32 state: it
must neither poison the state (strict-JSON checkpoints that load again) nor zero the gradients.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradclip
from adaptive_helpers import to_np

torch = pytest.importorskip("torch")

FRAMEWORKS = ["numpy", "torch"]
SHAPES = [(7,), (3, 4)]
SPIKES = (14, 22)

#: name -> (factory, whether the clipper takes params)
CLIPPERS = {
    "zclip": (lambda: gradclip.ZClip(warmup_steps=6), False),
    "zclip_percentile_cap": (lambda: gradclip.ZClip(warmup_steps=6, mode="percentile", max_grad_norm=7.0), False),
    "zclip_mean": (lambda: gradclip.ZClip(warmup_steps=6, clip_option="mean"), False),
    "autoclip_sketch": (lambda: gradclip.AutoClip(percentile=50.0), False),
    "autoclip_window_max": (lambda: gradclip.AutoClip(percentile=100.0, history=5), False),
    "autoclip_window_min": (lambda: gradclip.AutoClip(percentile=0.0, history=5), False),
    "adagc": (lambda: gradclip.AdaGC(clip_ratio=1.5, start_clip_steps=6, warmup_max_norm=4.5), False),
    "quantile_norm": (lambda: gradclip.QuantileNorm(initial_norm=1.3), False),
    "skip_on_spike": (lambda: gradclip.SkipOnSpike(window=8, min_history=4), False),
    "agc": (lambda: gradclip.AGC(clip_factor=0.5), True),
}


def _steps(n=30, seed=0):
    """fp64 gradients whose norms are not fp32 numbers, with spikes."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(n):
        scale = rng.lognormal(0.0, 0.25) * (12.0 if t in SPIKES else 1.0)
        out.append([rng.normal(size=s) * scale for s in SHAPES])
    return out


def _params():
    rng = np.random.default_rng(99)
    return [rng.normal(size=s) * 3.0 for s in SHAPES]


def _as(arrays, dtype, framework):
    arrays = [np.array(a, dtype=dtype) for a in arrays]
    return [torch.from_numpy(a) for a in arrays] if framework == "torch" else arrays


def _clip(clipper, grads, params, framework, dtype):
    if params is None:
        return clipper.clip(_as(grads, dtype, framework))
    return clipper.clip(_as(grads, dtype, framework), params=_as(params, dtype, framework))


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", list(CLIPPERS))
def test_fp64_quiet_steps_are_bit_for_bit_unchanged(name, framework):
    make, takes_params = CLIPPERS[name]
    params = _params() if takes_params else None
    fp32, fp64 = make(), make()
    quiet = clipped = 0
    for step, grads in enumerate(_steps()):
        _, info32 = _clip(fp32, grads, params, framework, np.float32)
        out, info64 = _clip(fp64, grads, params, framework, np.float64)
        out = [to_np(o) for o in out]
        assert all(o.dtype == np.float64 for o in out)
        if float(info32.coef) == 1.0 and not bool(info32.clipped):
            quiet += 1
            for o, g in zip(out, grads):
                assert np.array_equal(o, g), f"{name}: fp64 gradients changed on quiet step {step}"
            assert not bool(info64.clipped), f"{name}: quiet step {step} reported clipped"
            assert float(info64.coef) == 1.0
        else:
            clipped += 1
            # The same decision as in fp32, and a real clip, not an ulp.
            assert bool(info64.clipped) == bool(info32.clipped), step
            assert float(info64.coef) == pytest.approx(float(info32.coef), rel=1e-5), step
    assert quiet >= 8, f"{name}: too few quiet steps to test anything ({quiet})"
    if name not in ("skip_on_spike", "autoclip_window_max"):
        assert clipped >= 1, f"{name}: nothing was clipped"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fp64_first_step_and_running_maximum_are_not_clipped(framework):
    """The cases of the audit: AutoClip's first step (threshold = its own norm) and percentile
    100 on increasing norms (each norm is the maximum)."""
    rng = np.random.default_rng(1)
    for trial in range(10):
        g = [rng.normal(size=10)]
        (out,), info = gradclip.AutoClip().clip(_as(g, np.float64, framework))
        assert np.array_equal(to_np(out), g[0]) and not bool(info.clipped), trial
    clipper = gradclip.AutoClip(percentile=100.0, history=5)
    for i in range(15):
        g = [rng.normal(size=10) * (i + 1)]
        (out,), info = clipper.clip(_as(g, np.float64, framework))
        assert np.array_equal(to_np(out), g[0]) and not bool(info.clipped), i


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fp64_zclip_cap_is_compared_in_fp64(framework):
    """0.7 rounds down in fp32: an fp64 norm of exactly 0.7 is at the cap, not above it."""
    assert float(np.float32(0.7)) < 0.7
    clipper = gradclip.ZClip(max_grad_norm=0.7)
    (out,), info = clipper.clip(_as([np.array([0.7])], np.float64, framework))
    assert to_np(out)[0] == 0.7 and not bool(info.clipped)
    (out,), info = clipper.clip(_as([np.array([0.8])], np.float64, framework))
    assert to_np(out)[0] == pytest.approx(0.7, rel=1e-5) and bool(info.clipped)


# -- fp64 norms beyond fp32's range -------------------------------------------------------------
HUGE = 1e39  # finite in fp64, inf in fp32


def _strict_json_round_trip(name, clipper):
    state = clipper.state_dict()
    text = json.dumps(state, allow_nan=False)
    twin = CLIPPERS[name][0]()
    twin.load_state_dict(json.loads(text))
    assert twin.state_dict() == state


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("at", [2, 20], ids=["during-warm-up", "after-warm-up"])
@pytest.mark.parametrize("name", [n for n in CLIPPERS if n != "agc"])
def test_fp64_norm_beyond_fp32_range_keeps_the_state_finite(name, at, framework):
    make, _ = CLIPPERS[name]
    clipper = make()
    steps = _steps()
    huge = [g * (HUGE / math.sqrt(sum(float(np.sum(x * x)) for x in steps[at]))) for g in steps[at]]
    for step, grads in enumerate(steps[:at]):
        clipper.clip(_as(grads, np.float64, framework))
    out, info = clipper.clip(_as(huge, np.float64, framework))
    out = [to_np(o) for o in out]
    assert bool(info.finite) and math.isfinite(float(info.norm)) and float(info.norm) > 1e38
    assert all(np.isfinite(o).all() for o in out)
    if bool(info.clipped):
        # Scaled to a finite bound, not multiplied by bound / inf = 0.
        assert 0.0 < math.sqrt(sum(float(np.sum(o * o)) for o in out)) < 1e6
    elif name != "skip_on_spike":
        assert name.startswith("zclip") and at < 6  # warm-up without a cap: passes as it is
    if name == "skip_on_spike":
        assert bool(info.skip)  # as the same gradients in fp32 (their norm overflows)
    _strict_json_round_trip(name, clipper)
    for grads in steps[at + 1 : at + 8]:  # and the run goes on with finite statistics
        _, info = clipper.clip(_as(grads, np.float64, framework))
        assert math.isfinite(float(info.coef))
    _strict_json_round_trip(name, clipper)


def test_fp64_huge_norm_does_not_enter_the_history():
    """AutoClip and SkipOnSpike continue exactly as if the huge step had not happened."""
    steps = _steps()
    for make in (lambda: gradclip.AutoClip(percentile=30.0, history=6), lambda: gradclip.SkipOnSpike(window=8, min_history=4)):
        seen, twin = make(), make()
        for t, grads in enumerate(steps):
            if t == 10:
                seen.clip([g * 1e39 for g in grads])
            a = seen.clip([g.copy() for g in grads])[1]
            b = twin.clip([g.copy() for g in grads])[1]
            assert a.to_dict() == b.to_dict(), t
        assert seen.state_dict()["state"]["count"] == twin.state_dict()["state"]["count"]


def test_fp64_huge_tensor_under_adagc_is_scaled_to_its_bound():
    clipper = gradclip.AdaGC(start_clip_steps=2, warmup_max_norm=10.0)
    small = [np.full(4, 0.5), np.full(3, 0.2)]
    clipper.clip([g.copy() for g in small])
    clipper.clip([g.copy() for g in small])
    gamma = clipper.state_dict()["state"]["gamma"]
    out, info = clipper.clip([np.full(4, 1e39), np.full(3, 0.2)])
    assert np.linalg.norm(out[0]) == pytest.approx(1.04 * gamma[0], rel=1e-5)
    assert np.array_equal(out[1], np.full(3, 0.2)) and bool(info.clipped)
    assert all(math.isfinite(g) and g > 0 for g in clipper.state_dict()["state"]["gamma"])
