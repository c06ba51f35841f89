"""Parity of the adaptive clippers with the real reference packages and published formulas.

Fixed gradient-norm sequences are replayed through each reference and through gradclip; every
intended difference is a test of its own (``test_difference_*``) asserting that it exists.

References: ``zclip`` 1.0.0, ``autoclip`` 0.2.1, the AutoClip paper's rule, timm's
``adaptive_clip_grad`` (loaded by file path), optax's ``adaptive_grad_clip`` (input-major
layout: replayed on the transposed kernels), Opacus' ``AdaClipDPOptimizer`` (driven with zero
noise) and TF-Privacy's quantile-estimator update (TF-Privacy cannot be installed beside this
TensorFlow; its update is transcribed below and agrees with Opacus'). Each real package is
pinned in requirements/ and its tests are skipped only where it is missing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from adaptive_helpers import load_timm_agc, load_zclip, to_np

torch = pytest.importorskip("torch")

DIM = 16


def _direction() -> np.ndarray:
    v = np.random.default_rng(3).normal(size=DIM)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _norm_sequence(n: int = 70, seed: int = 0, spikes=(30, 31, 47, 60), dips=(40,)) -> list[float]:
    rng = np.random.default_rng(seed)
    norms = np.abs(rng.normal(5.0, 0.5, size=n))
    for s in spikes:
        if s < n:
            norms[s] *= 4.0 if s % 2 else 12.0
    for d in dips:
        if d < n:
            norms[d] *= 0.3
    return [float(np.float32(x)) for x in norms]


class _OneParam(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(DIM))


def _replay_ours(clipper, norms):
    """Feed grad = direction * n through ``clipper.clip_`` on a one-parameter model."""
    direction = torch.from_numpy(_direction())
    model = _OneParam()
    out = []
    for n in norms:
        model.w.grad = direction * n
        info = clipper.clip_(model)
        out.append((float(model.w.grad.norm()), info.to_dict()))
    return out


# -- zclip 1.0.0 ------------------------------------------------------------------------------
PackageZClip = load_zclip()
needs_zclip = pytest.mark.skipif(PackageZClip is None, reason="the zclip package is not installed")

ZCLIP_CONFIGS = [
    {},
    {"clip_option": "mean"},
    {"mode": "percentile"},
    {"skip_update_on_spike": True},
    {"clip_factor": 0.7},
    {"max_grad_norm": 5.5},
    {"warmup_steps": 5, "alpha": 0.9, "z_thresh": 2.0},
]


def _replay_zclip_package(config, norms):
    direction = torch.from_numpy(_direction())
    model = _OneParam()
    clipper = PackageZClip(**{"max_grad_norm": None, **config})
    out = []
    for n in norms:
        model.w.grad = direction * n
        clipper.step(model)
        out.append((float(model.w.grad.norm()), clipper.mean, clipper.var))
    return out


@needs_zclip
@pytest.mark.parametrize("config", ZCLIP_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_zclip_matches_package(config):
    norms = _norm_sequence()
    reference = _replay_zclip_package(config, norms)
    ours_clipper = gradclip.ZClip(warmup="mean", **config)  # the package's warm-up
    ours = _replay_ours(ours_clipper, norms)
    clipped_somewhere = False
    for step, ((ref_norm, ref_mean, ref_var), (our_norm, info)) in enumerate(zip(reference, ours)):
        assert our_norm == pytest.approx(ref_norm, rel=2e-5), f"step {step}"
        clipped_somewhere |= info["clipped"]
    assert clipped_somewhere
    # The statistics after the run agree too.
    state = ours_clipper.state_dict()["state"]
    assert state["mean"] == pytest.approx(reference[-1][1], rel=1e-4)
    assert state["var"] == pytest.approx(reference[-1][2], rel=1e-3)


@needs_zclip
def test_difference_zclip_package_default_max_grad_norm_clips_everything_at_one():
    """zclip 1.0.0 defaults to max_grad_norm=1.0: norms of ~5 are all cut to 1. Ours: None."""
    norms = _norm_sequence(n=30, spikes=())
    direction = torch.from_numpy(_direction())
    model = _OneParam()
    package = PackageZClip()  # the package's own defaults
    package_out = []
    for n in norms:
        model.w.grad = direction * n
        package.step(model)
        package_out.append(float(model.w.grad.norm()))
    assert all(x == pytest.approx(1.0, rel=1e-5) for x in package_out)
    ours = _replay_ours(gradclip.ZClip(warmup="mean"), norms)
    assert [x for x, _ in ours] == pytest.approx(norms, rel=1e-6)  # warm-up: untouched
    # The default robust warm-up has no cap either: it clips only its own outliers.
    robust = _replay_ours(gradclip.ZClip(), norms)
    assert sum(x < n * (1 - 1e-6) for (x, _), n in zip(robust, norms)) <= 2


@needs_zclip
def test_difference_zclip_variance_floor():
    """Constant warm-up norms: the package's variance is 0 and a norm 1% higher is clipped to
    the mean (z = 0.02 / 1e-6); its variance then stays 0. Ours floors std at 1% of the mean."""
    norms = [2.0] * 25 + [2.02, 2.03, 2.02]
    reference = _replay_zclip_package({}, norms)
    assert reference[25][0] == pytest.approx(2.0, rel=1e-5)  # clipped to the mean
    assert reference[-1][2] < 1e-12  # stuck at zero variance
    ours = _replay_ours(gradclip.ZClip(), norms)
    assert [x for x, _ in ours[25:]] == pytest.approx(norms[25:], rel=1e-6)  # not spikes
    # With std_floor=0 ours reproduces the package's collapse.
    collapsed = _replay_ours(gradclip.ZClip(std_floor=0.0), norms)
    assert collapsed[25][0] == pytest.approx(2.0, rel=1e-5)


@needs_zclip
def test_difference_zclip_zero_warm_up_zeroes_the_package_for_ever():
    """After a warm-up of zero norms the package's mean and variance are 0: every positive norm
    is clipped to 0, and the EMA of those zeros stays 0. Zero norms do not count here."""
    norms = [0.0] * 25 + _norm_sequence(n=40, spikes=())
    reference = _replay_zclip_package({}, norms)
    assert all(n == 0.0 for n, _, _ in reference[25:])  # every gradient zeroed
    assert reference[-1][1] == 0.0
    ours = _replay_ours(gradclip.ZClip(warmup="mean"), norms)
    assert [x for x, _ in ours[25:50]] == pytest.approx(norms[25:50], rel=1e-6)  # warm-up
    assert all(x > 0 for x, _ in ours[25:])
    assert all(x > 0 for x, _ in _replay_ours(gradclip.ZClip(), norms)[25:])


@needs_zclip
def test_difference_zclip_robust_warm_up_by_default():
    """The package ends warm-up with the mean and variance of the warm-up norms, so one spike
    among them sets a detection limit far above the norms' level, and it clips nothing during
    warm-up. Ours by default: median and scaled MAD, and clipping from the third norm on;
    ``warmup="mean"`` gives the package's rule (test_zclip_matches_package)."""
    norms = _norm_sequence(n=60, spikes=(10,))  # a x12 spike inside the 25-step warm-up
    reference = _replay_zclip_package({}, norms)
    assert reference[10][0] == pytest.approx(norms[10], rel=1e-6)  # the package lets it through
    assert math.sqrt(reference[24][2]) > 5.0  # its std after warm-up: ~2.7x the norms' level
    ours_clipper = gradclip.ZClip()
    ours = _replay_ours(ours_clipper, norms)
    assert ours[10][0] < 0.2 * norms[10]  # clipped back near the level
    values = np.asarray(norms[:25], np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    state = ours_clipper.state_dict()["state"]
    assert state["step"] == 60
    # The EMA started from the robust statistics (checked at the end of warm-up).
    check = gradclip.ZClip()
    _replay_ours(check, norms[:25])
    assert check.state_dict()["state"]["mean"] == pytest.approx(median, rel=1e-6)
    assert math.sqrt(check.state_dict()["state"]["var"]) == pytest.approx(1.4826 * mad, rel=1e-5)


@needs_zclip
def test_difference_zclip_nonfinite_norm_poisons_package_statistics():
    norms = _norm_sequence(n=30, spikes=())
    norms[27] = float("nan")
    reference = _replay_zclip_package({}, norms)
    assert math.isnan(reference[-1][1])  # the package's mean is NaN for good
    clipper = gradclip.ZClip()
    _replay_ours(clipper, norms)
    state = clipper.state_dict()["state"]
    assert math.isfinite(state["mean"]) and state["mean"] > 0


# -- autoclip 0.2.1 and the AutoClip paper ------------------------------------------------------
autoclip_torch = pytest.importorskip("autoclip.torch")


def _paper_autoclip(norms, percentile):
    """The paper's code (Seetharaman et al. 2020): append, then np.percentile, then clip."""
    history, thresholds, clipped = [], [], []
    for n in norms:
        history.append(n)
        threshold = np.percentile(history, percentile)
        thresholds.append(float(threshold))
        clipped.append(n * min(1.0, threshold / (n + 1e-6)))
    return thresholds, clipped


@pytest.mark.parametrize("percentile", [10.0, 50.0, 90.0])
def test_autoclip_window_matches_numpy_percentile_exactly(percentile):
    norms = _norm_sequence()
    window = 12
    clipper = gradclip.AutoClip(percentile=percentile, history=window)
    ours = _replay_ours(clipper, norms)
    history = np.asarray([], np.float32)
    for step, (_, info) in enumerate(ours):
        history = np.append(history, np.float32(info["norm"]))[-window:]
        # The history holds the fp32 norms measured; the threshold is numpy's percentile of it,
        # bit for bit.
        assert np.float32(info["threshold"]) == np.percentile(history.astype(np.float32), percentile), step


@pytest.mark.parametrize("percentile", [10.0, 75.0])
def test_autoclip_matches_paper_rule(percentile):
    norms = _norm_sequence()
    thresholds, clipped = _paper_autoclip(norms, percentile)
    exact = _replay_ours(gradclip.AutoClip(percentile=percentile, history=len(norms)), norms)
    sketch = _replay_ours(gradclip.AutoClip(percentile=percentile), norms)
    for step in range(len(norms)):
        assert exact[step][1]["threshold"] == pytest.approx(thresholds[step], rel=1e-6)
        assert exact[step][0] == pytest.approx(clipped[step], rel=1e-5)
        # The unbounded default keeps a sketch: within its documented 0.54%.
        assert sketch[step][1]["threshold"] == pytest.approx(thresholds[step], rel=0.0055)


def _replay_autoclip_package(norms, quantile, history_length):
    direction = torch.from_numpy(_direction())
    param = torch.nn.Parameter(torch.zeros(DIM))
    clipper = autoclip_torch.QuantileClip(
        [param], quantile=quantile, history_length=history_length, global_threshold=True
    )
    out = []
    for n in norms:
        param.grad = direction * n
        clipper.step()
        out.append(float(param.grad.norm()))
    return out


@pytest.mark.parametrize("percentile", [10.0, 50.0])
def test_autoclip_package_is_our_rule_one_step_late(percentile):
    """autoclip 0.2.1 takes the quantile of the history *before* the current norm: its
    threshold at step t is ours at step t-1 (same window)."""
    norms = _norm_sequence()
    window = 20
    package = _replay_autoclip_package(norms, percentile / 100.0, window)
    ours = _replay_ours(gradclip.AutoClip(percentile=percentile, history=window), norms)
    assert package[0] == pytest.approx(norms[0], rel=1e-6)  # its first step: threshold inf
    for step in range(1, len(norms)):
        threshold = ours[step - 1][1]["threshold"]
        n = norms[step]
        expected = n * min(1.0, threshold / (n + 1e-6))
        assert package[step] == pytest.approx(expected, rel=1e-5), step


def test_difference_autoclip_history_before_current():
    """The paper (and gradclip) add the current norm before taking the percentile; autoclip
    0.2.1 does not, so at a spike its threshold ignores the spike and ours includes it."""
    norms = [1.0] * 5 + [100.0]
    package = _replay_autoclip_package(norms, 1.0, 1000)  # 100th percentile = max
    ours = _replay_ours(gradclip.AutoClip(percentile=100.0, history=1000), norms)
    assert package[-1] == pytest.approx(1.0, rel=1e-5)  # clipped to the previous max
    assert ours[-1][0] == pytest.approx(100.0, rel=1e-6)  # the spike is its own max


def test_difference_autoclip_zero_norms_zero_the_package_for_ever():
    """After 20 zero-gradient steps the package's 10% quantile is 0 and every later gradient is
    scaled to 0; zero norms do not count here, so the later gradients are clipped only by the
    percentile of the positive norms."""
    norms = [0.0] * 20 + _norm_sequence(n=20, spikes=())
    package = _replay_autoclip_package(norms, 0.1, 1000)
    assert all(n == 0.0 for n in package[20:])  # every positive gradient zeroed
    ours = _replay_ours(gradclip.AutoClip(percentile=10.0, history=1000), norms)
    assert all(x > 0 for x, _ in ours[20:])
    positive = np.asarray(norms[20:], np.float32)
    assert ours[-1][1]["threshold"] == pytest.approx(np.percentile(positive, 10.0), rel=1e-6)


# -- AGC: timm, and optax's formula --------------------------------------------------------------
timm_agc = load_timm_agc()


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.gain = torch.nn.Parameter(torch.ones(6))
        self.fc = torch.nn.Linear(24, 5)


def _net_with_grads(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = _Net()
    g = torch.Generator().manual_seed(seed + 1)
    for i, p in enumerate(net.parameters()):
        scale = [0.5, 0.001, 0.05, 0.2][i % 4]
        grad = torch.randn(p.shape, generator=g) * scale
        if p.dim() > 1:
            grad[0] *= 100.0  # one unit far above its limit
        p.grad = grad.to(dtype)
    return net


@pytest.mark.skipif(timm_agc is None, reason="timm's utils/agc.py is not installed")
@pytest.mark.parametrize("clip_factor,eps", [(0.01, 1e-3), (0.1, 1e-3), (0.05, 0.5)])
def test_agc_matches_timm(clip_factor, eps):
    reference, ours = _net_with_grads(), _net_with_grads()
    timm_agc.adaptive_clip_grad(list(reference.parameters()), clip_factor=clip_factor, eps=eps)
    info = gradclip.AGC(clip_factor=clip_factor, eps=eps).clip_(ours)
    assert bool(info.clipped)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)


@pytest.mark.skipif(timm_agc is None, reason="timm's utils/agc.py is not installed")
def test_difference_agc_exclude_by_name_not_by_position():
    """timm's train script leaves "the last two parameters" unclipped by position; here the
    head is named. On this model the head is the last two, so the results coincide."""
    reference, ours = _net_with_grads(), _net_with_grads()
    params = list(reference.parameters())
    timm_agc.adaptive_clip_grad(params[:-2], clip_factor=0.01)
    gradclip.AGC(exclude=("fc.*",)).clip_(ours)
    for p, q in zip(ours.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    # The head was not clipped although it is far above its limit.
    untouched = _net_with_grads()
    torch.testing.assert_close(ours.fc.weight.grad, untouched.fc.weight.grad, rtol=0, atol=0)


@pytest.mark.skipif(timm_agc is None, reason="timm's utils/agc.py is not installed")
def test_difference_agc_fp16_norms_accumulate_in_fp32():
    """timm takes unit norms in the gradient's dtype: fp16 norms above 65504 become inf and
    the gradient is multiplied by max/inf = 0. gradclip's fp32 norms clip it correctly."""
    def make():
        p = torch.nn.Parameter(torch.ones(2, 4096, dtype=torch.float16))
        p.grad = torch.full((2, 4096), 2000.0, dtype=torch.float16)  # unit norm ~128000
        return p

    reference, ours = make(), make()
    timm_agc.adaptive_clip_grad([reference], clip_factor=0.01)
    assert float(reference.grad.float().abs().max()) == 0.0  # zeroed
    gradclip.AGC(clip_factor=0.01).clip_([ours])
    unit = ours.grad.float().norm(dim=1)
    limit = 0.01 * math.sqrt(4096)
    torch.testing.assert_close(unit, torch.full((2,), limit), rtol=2e-3, atol=0)


try:
    import optax
except ImportError:  # pinned in requirements/dev.txt; skipped only where it is missing
    optax = None
needs_optax = pytest.mark.skipif(optax is None, reason="optax is not installed")


def optax_agc(grads, params, clipping, eps=1e-3):
    """The real ``optax.adaptive_grad_clip`` on fp32 JAX arrays (input-major layout)."""
    import jax.numpy as jnp

    transform = optax.adaptive_grad_clip(clipping, eps=eps)
    out, _ = transform.update([jnp.asarray(g) for g in grads], transform.init(None), [jnp.asarray(p) for p in params])
    return [np.asarray(o) for o in out]


def _input_major_case(seed=0):
    """optax's layout: conv kernels HWIO, linear (in, out), multi-head (in, heads, out)."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 3, 4, 8), (8,), (8, 5), (5,), (6, 2, 4)]
    params = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [(rng.normal(size=s) * 0.3).astype(np.float32) for s in shapes]
    grads[0][..., 0] *= 50.0
    grads[2][:, 1] *= 50.0
    return shapes, params, grads


#: optax's input-major layout -> torch's output-major one (conv HWIO -> OIHW, linear transposed).
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}


def _to_torch_layout(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, _TO_TORCH[x.ndim])))


def _from_torch_layout(t):
    return np.transpose(t.numpy(), np.argsort(_TO_TORCH[t.dim()]))


@needs_optax
@pytest.mark.parametrize("clipping,eps", [(0.05, 1e-3), (0.01, 1e-3), (0.2, 0.5)])
def test_agc_matches_optax_with_the_layout_transposed(clipping, eps):
    """The same kernels in torch's layout through gradclip's torch backend (units from the
    layout, no axis given) equal optax's result in its own layout, transposed back."""
    _, params, grads = _input_major_case()
    reference = optax_agc(grads, params, clipping, eps)
    four = range(4)  # the conv kernel, the linear layer and their biases
    torch_grads = [_to_torch_layout(grads[i]) for i in four]
    out, info = gradclip.AGC(clip_factor=clipping, eps=eps).clip(torch_grads, params=[_to_torch_layout(params[i]) for i in four])
    assert bool(info.clipped)
    for i, o in zip(four, out):
        np.testing.assert_allclose(_from_torch_layout(o), reference[i], rtol=2e-6, atol=1e-9, err_msg=f"#{i}")
    # The clipped units really moved: a no-op would not match.
    assert not np.allclose(reference[0], grads[0]) and not np.allclose(reference[2], grads[2])


@needs_optax
def test_agc_matches_optax_in_its_own_layout_with_an_explicit_axis():
    _, params, grads = _input_major_case()
    reference = optax_agc(grads, params, clipping=0.05)
    # optax's units are the last axis of 2-D and 4-D kernels; of 3-D ones, axes (1, 2).
    two_four = [0, 1, 2, 3]
    ours, _ = gradclip.AGC(clip_factor=0.05, axis=-1).clip([grads[i] for i in two_four], params=[params[i] for i in two_four])
    for i, o in zip(two_four, ours):
        np.testing.assert_allclose(o, reference[i], rtol=2e-6, atol=1e-9)
    (three,), _ = gradclip.AGC(clip_factor=0.05, axis=(1, 2)).clip([grads[4]], params=[params[4]])
    np.testing.assert_allclose(three, reference[4], rtol=2e-6, atol=1e-9)


@needs_optax
def test_difference_agc_optax_squeezes_single_row_kernels_into_vectors():
    """optax treats a (1, n) kernel as a vector (one unit); here ndim decides: with axis=-1 it
    is n units of one element each."""
    rng = np.random.default_rng(1)
    p = rng.normal(size=(1, 6)).astype(np.float32)
    g = (rng.normal(size=(1, 6)) * 5).astype(np.float32)
    reference = optax_agc([g], [p], clipping=0.05)[0]
    (ours,), _ = gradclip.AGC(clip_factor=0.05, axis=-1).clip([g], params=[p])
    assert not np.allclose(ours, reference)
    as_vector, _ = gradclip.AGC(clip_factor=0.05).clip([g.reshape(6)], params=[p.reshape(6)])
    np.testing.assert_allclose(as_vector[0], reference.reshape(6), rtol=2e-6)


# -- QuantileNorm: the Opacus AdaClip / TF-Privacy quantile-estimator update --------------------
try:
    from opacus.optimizers.adaclipoptimizer import AdaClipDPOptimizer
except ImportError:  # pinned in requirements/nodeps.txt; skipped only where it is missing
    AdaClipDPOptimizer = None
needs_opacus = pytest.mark.skipif(AdaClipDPOptimizer is None, reason="opacus is not installed")


def tf_privacy_quantile_update(bound, norms, target_quantile, learning_rate):
    """TF-Privacy QuantileEstimatorQuery, geometric_update=True, without noise:
    below = mean(record <= estimate); estimate *= exp(-lr * (below - target))."""
    below = float(np.mean(np.asarray(norms, np.float64) <= bound))
    return bound * math.exp(-learning_rate * (below - target_quantile))


def opacus_bounds(sample_norms, target_quantile, learning_rate, initial, min_bound=1e-12, max_bound=1e12):
    """The bound C before each step, and after the last, of Opacus' ``AdaClipDPOptimizer``.

    Each step's per-sample gradients are a fixed direction times the given norms
    (``p.grad_sample``, as ``GradSampleModule`` would leave them); the real ``step`` clips,
    counts the unclipped samples and updates ``max_grad_norm``. Without noise: the gradient
    noise multiplier is 0, and the count's noise (``unclipped_num_std``, which Opacus requires
    to be positive) is 1e-30, which cannot move an fp32 count.
    """
    dim = 8
    param = torch.nn.Parameter(torch.zeros(dim))
    optimizer = AdaClipDPOptimizer(
        torch.optim.SGD([param], lr=0.0),
        noise_multiplier=0.0,
        target_unclipped_quantile=target_quantile,
        clipbound_learning_rate=learning_rate,
        max_clipbound=max_bound,
        min_clipbound=min_bound,
        unclipped_num_std=1e-30,
        max_grad_norm=initial,
        expected_batch_size=len(sample_norms[0]),
    )
    direction = torch.ones(dim) / math.sqrt(dim)
    bounds = []
    for norms in sample_norms:
        bounds.append(float(optimizer.max_grad_norm))
        param.grad_sample = torch.from_numpy(np.asarray(norms, np.float32))[:, None] * direction
        param.grad = torch.zeros(dim)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    bounds.append(float(optimizer.max_grad_norm))
    return bounds


def _replay_quantile_norm(clipper, sample_norms):
    """gradclip's C before each step, and after the last (QuantileNorm keeps it in fp32)."""
    bounds = []
    for step, samples in enumerate(sample_norms):
        _, info = clipper.clip([torch.ones(4) * (step + 1)], sample_norms=torch.from_numpy(samples))
        bounds.append(info.threshold.item())
    bounds.append(clipper.state_dict()["state"]["norm"])
    return bounds


@needs_opacus
@pytest.mark.parametrize("target,lr,initial", [(0.5, 0.2, 0.3), (0.9, 0.5, 0.3), (0.1, 0.05, 2.0)])
def test_quantile_norm_matches_opacus_adaclip(target, lr, initial):
    rng = np.random.default_rng(5)
    samples = [rng.lognormal(0.0, 0.5, size=32).astype(np.float32) for _ in range(50)]
    reference = opacus_bounds(samples, target, lr, initial)
    ours = _replay_quantile_norm(gradclip.QuantileNorm(target_quantile=target, learning_rate=lr, initial_norm=initial), samples)
    # Both keep C in fp32 once it has moved (Opacus: a torch.float32 tensor): the same numbers.
    assert ours[1:] == reference[1:]
    assert ours[0] == pytest.approx(reference[0], rel=1e-7)  # the Python float given, in fp32
    assert len(set(reference)) > 20  # the bound moved (it oscillates around the quantile)


@needs_opacus
def test_quantile_norm_matches_opacus_at_its_clamps():
    samples = [np.full(16, 100.0, np.float32)] * 6 + [np.full(16, 1e-3, np.float32)] * 12
    reference = opacus_bounds(samples, 0.5, 1.0, 1.0, min_bound=0.5, max_bound=4.0)
    ours = _replay_quantile_norm(
        gradclip.QuantileNorm(learning_rate=1.0, initial_norm=1.0, min_norm=0.5, max_norm=4.0), samples
    )
    assert ours == pytest.approx(reference, rel=1e-6)
    assert max(reference) == 4.0 and min(reference) == 0.5


@pytest.mark.parametrize("target,lr", [(0.5, 0.2), (0.9, 0.5), (0.1, 0.05)])
def test_quantile_norm_matches_tf_privacy_update(target, lr):
    rng = np.random.default_rng(5)
    samples = [rng.lognormal(0.0, 0.5, size=32).astype(np.float32) for _ in range(50)]
    ours = _replay_quantile_norm(gradclip.QuantileNorm(target_quantile=target, learning_rate=lr, initial_norm=0.3), samples)
    bound = 0.3
    for step, norms in enumerate(samples):
        assert ours[step] == pytest.approx(bound, rel=2e-5), step
        bound = tf_privacy_quantile_update(bound, norms, target, lr)
    assert ours[-1] == pytest.approx(bound, rel=2e-5)


def test_quantile_norm_single_norm_update_matches_formula():
    norms = _norm_sequence(n=40)
    clipper = gradclip.QuantileNorm()
    bound = 1.0
    for (_, info), n in zip(_replay_ours(clipper, norms), norms):
        assert info["threshold"] == pytest.approx(bound, rel=1e-5)
        bound = tf_privacy_quantile_update(bound, [n], 0.5, 0.2)


@needs_opacus
def test_difference_quantile_norm_boundary_counts_as_unclipped():
    """A sample norm exactly at C: Opacus' 1e-6 makes it clipped (C/(C+1e-6) < 1), so its C
    grows; ours and TF-Privacy count it unclipped (norm <= C), so C shrinks."""
    samples = [np.asarray([1.0, 1.0, 1.0, 1.0], np.float32)]
    clipper = gradclip.QuantileNorm(initial_norm=1.0)
    ours = _replay_quantile_norm(clipper, samples)[-1]
    assert ours == pytest.approx(tf_privacy_quantile_update(1.0, samples[0], 0.5, 0.2), rel=1e-6)
    assert ours < 1.0  # everything unclipped: the bound shrinks
    assert opacus_bounds(samples, 0.5, 0.2, 1.0)[-1] == pytest.approx(math.exp(0.2 * 0.5), rel=1e-6)  # all "clipped"


def test_replay_helper_reports_what_it_applied():
    out = _replay_ours(gradclip.AutoClip(history=4), [1.0, 2.0])
    assert out[0][0] == pytest.approx(1.0, rel=1e-6)
    assert to_np(torch.tensor(1.0)) == 1.0
