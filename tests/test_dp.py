"""DPOptimizer, Poisson sampling and accounting (DP-SGD, Abadi et al. 2016)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
from torch import nn
from torch.utils.data import TensorDataset

import gradclip
import gradclip.torch as gct
from gradclip.torch.accounting import Accountant, noise_multiplier_for


def _setup(noise=0.0, batch=8, clipper=None, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    ps = gct.PerSample(model, clipper or gradclip.GlobalNorm(0.5))
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ps, noise, batch, **kw)
    return model, ps, opt


def _loss(model, x):
    return model(x).pow(2).sum(1)


def test_no_noise_is_clipped_sum_over_expected_batch():
    model, ps, opt = _setup(batch=10)
    x = torch.randn(8, 6)
    opt.backward(_loss(model, x))
    clipped = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for b, c, p in zip(before, clipped, model.parameters()):
        torch.testing.assert_close(p.detach(), b - c / 10)  # divided by the expected size, not 8


def test_noise_std_is_sigma_c_over_b_and_seedable():
    def noise_of(seed, secure=False):
        torch.manual_seed(0)
        model = nn.Linear(200, 100)
        ps = gct.PerSample(model, gradclip.GlobalNorm(2.0))
        gen = None if secure else torch.Generator().manual_seed(seed)
        opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ps, 1.5, 4, generator=gen, secure_mode=secure)
        opt.backward(model(torch.zeros(4, 200)).sum(1) * 0)  # zero gradients: only the noise is left
        opt.step()
        return torch.cat([(p.grad).flatten() for p in model.parameters()])

    a, b, c = noise_of(1), noise_of(1), noise_of(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    want = 1.5 * 2.0 / 4
    for noise in (a, noise_of(0, secure=True)):
        assert abs(noise.mean().item()) < 0.05 * want
        assert noise.std().item() == pytest.approx(want, rel=0.03)


def test_virtual_steps_equal_one_logical_batch():
    x = torch.randn(8, 6)
    model, _, opt = _setup(batch=8)
    opt.backward(_loss(model, x))
    opt.step()
    whole = [p.detach().clone() for p in model.parameters()]
    model, _, opt = _setup(batch=8)
    opt.backward(_loss(model, x[:3]))
    opt.virtual_step()
    assert all(p.grad is None for p in model.parameters())
    opt.backward(_loss(model, x[3:]))
    opt.step()
    for a, p in zip(whole, model.parameters()):
        torch.testing.assert_close(p.detach(), a)


def test_poisson_loader_samples_independently_and_handles_empty_batches():
    data = TensorDataset(torch.randn(50, 6), torch.arange(50))
    loader = gct.poisson_loader(data, sample_rate=0.02, steps=200, generator=torch.Generator().manual_seed(0))
    sizes = [len(batch[1]) for batch in loader]
    assert len(sizes) == 200 and 0 in sizes
    assert sum(sizes) / 200 == pytest.approx(1.0, abs=0.3)
    model, ps, opt = _setup(noise=1.0, batch=1)
    for x, _ in loader:
        if len(x) == 0:
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            info = opt.backward(_loss(model, x))
            assert info.norm.shape == (0,)
            opt.step()  # noise only, still a step
            assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
            break


def test_epsilon_equals_opacus_accountant():
    from opacus.accountants import PRVAccountant, RDPAccountant

    q, sigma, steps, delta = 0.01, 1.1, 30, 1e-5
    model, _, opt = _setup(noise=sigma, batch=4, sample_rate=q)
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(_loss(model, torch.randn(4, 6)))
        opt.step()
    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    assert opt.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    prv, ref_prv = Accountant("prv"), PRVAccountant()
    prv.step(sigma, q, steps)
    for _ in range(steps):
        ref_prv.step(noise_multiplier=sigma, sample_rate=q)
    assert prv.epsilon(delta) == pytest.approx(ref_prv.get_epsilon(delta), rel=1e-6)
    restored = Accountant("rdp")
    restored.load_state_dict(opt.accountant.state_dict())
    assert restored.steps == steps and restored.epsilon(delta) == opt.epsilon(delta)
    sigma_for = noise_multiplier_for(3.0, delta, q, 1000)
    eps = Accountant()
    eps.step(sigma_for, q, 1000)
    assert eps.epsilon(delta) <= 3.0 + 1e-6


def test_quantile_norm_under_dp_noises_its_count():
    model, ps, opt = _setup(
        noise=1.0, batch=8, clipper=gradclip.QuantileNorm(initial_norm=0.01, learning_rate=0.2), count_noise_multiplier=2.0
    )
    # The pair (σ_Δ on the sum, σ_b on the count) costs σ = 1 (Andrew et al. 2021).
    assert opt.grad_noise_multiplier == pytest.approx((1.0 - 1 / 16) ** -0.5)
    bounds = []
    for _ in range(5):
        opt.zero_grad()
        opt.backward(_loss(model, torch.randn(8, 6)))
        opt.step()
        bounds.append(float(ps.state.norm))
    assert bounds[-1] > 0.01  # every example clipped at 0.01: C grows despite the noise
    with pytest.raises(gradclip.InvalidArgumentError, match="count_noise_multiplier"):
        _setup(noise=1.0, clipper=gradclip.QuantileNorm(), count_noise_multiplier=0.4)


def _plain_params(x):
    """The parameters after one DP step on ``x`` without AMP: what every AMP path must give."""
    model, _, opt = _setup()
    opt.backward(_loss(model, x))
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_amp_scaler_scale_divided_out():
    x = torch.randn(8, 6)
    plain = _plain_params(x)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    model, _, opt = _setup(scaler=scaler)
    info = opt.backward(_loss(model, x))
    assert bool((info.coef < 1).any())
    opt.step()
    scaler.update()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.detach(), a)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"noise_multiplier": -0.1}, "noise_multiplier must be a finite number >= 0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier"),
        ({"expected_batch_size": 0}, "expected_batch_size must be an int > 0"),
        ({"expected_batch_size": -3}, "expected_batch_size"),
        ({"sample_rate": 1.5}, "sample_rate must be in"),
        ({"secure_mode": True, "generator": torch.Generator()}, "secure_mode"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    model = nn.Linear(3, 2)
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    args = {"noise_multiplier": 1.0, "expected_batch_size": 4, **kwargs}
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ps, **args)


def test_accountant_bad_input():
    acc = Accountant()
    assert acc.epsilon(1e-5) == 0.0
    with pytest.raises(gradclip.InvalidArgumentError, match="sample_rate"):
        acc.step(1.0, 0.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="delta"):
        acc.epsilon(0.0)
    acc.step(0.0, 0.5)
    assert math.isinf(acc.epsilon(1e-5))


def test_scheduled_bound_refused_under_dp():
    model = nn.Linear(3, 2)
    schedule = gradclip.schedules.CosineDecay(1.0, 100, 0.1)
    ps = gct.PerSample(model, gradclip.GlobalNorm(schedule))
    with pytest.raises(gradclip.InvalidArgumentError, match="schedule"):
        gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ps, 1.0, 4)


def test_poisson_sampler_secure_mode_and_bad_input():
    sampler = gct.PoissonBatchSampler(100, 0.1, steps=5, secure_mode=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 5
    assert all(all(0 <= i < 100 for i in b) for b in batches)
    with pytest.raises(gradclip.InvalidArgumentError, match="sample_rate"):
        gct.PoissonBatchSampler(100, 0.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="num_samples"):
        gct.PoissonBatchSampler(0, 0.1)


def test_state_dict_round_trip_keeps_accountant_and_quantile_bound(tmp_path):
    model, ps, opt = _setup(noise=1.0, batch=8, clipper=gradclip.QuantileNorm(initial_norm=0.01), sample_rate=0.1)
    for _ in range(3):
        opt.zero_grad()
        opt.backward(_loss(model, torch.randn(8, 6)))
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "dp.pt")
    state = torch.load(tmp_path / "dp.pt", weights_only=True)
    model2, ps2, opt2 = _setup(noise=1.0, batch=8, clipper=gradclip.QuantileNorm(initial_norm=0.01), sample_rate=0.1)
    opt2.load_state_dict(state)
    assert float(ps2.state.norm) == float(ps.state.norm) != 0.01
    assert opt2.accountant.steps == 3 and opt2.epsilon(1e-5) == opt.epsilon(1e-5)


def test_amp_scaler_unscaled_through_the_wrapper_unscales_once():
    # torch's AMP recipe calls scaler.unscale_(optimizer) before step() to look at the gradients;
    # the optimizer the user holds is the DPOptimizer, whose param_groups are the inner one's.
    x = torch.randn(8, 6)
    plain = _plain_params(x)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    model, _, opt = _setup(scaler=scaler)
    opt.backward(_loss(model, x))
    scaler.unscale_(opt)
    opt.step()
    scaler.update()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.detach(), a)


def _virtual_amp(x, unscale, trailing_virtual, poison=False):
    """Two physical batches (3 + 5 examples) through a GradScaler: the params after the step."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, _, opt = _setup(scaler=scaler)
    opt.backward(_loss(model, x[:3]))
    if poison:  # an overflow in an earlier physical batch
        next(model.parameters()).grad[0, 0] = float("inf")
    opt.virtual_step()
    opt.backward(_loss(model, x[3:]))
    if trailing_virtual:
        opt.virtual_step()  # every physical batch kept: p.grad is None at step()
    if unscale == "wrapper":
        scaler.unscale_(opt)
    elif unscale == "inner":
        scaler.unscale_(opt.optimizer)
    opt.step()
    scaler.update()
    return model, scaler


@pytest.mark.parametrize("trailing_virtual", [False, True])
@pytest.mark.parametrize("unscale", [None, "wrapper", "inner"])
def test_amp_scaler_with_virtual_steps_unscales_every_physical_batch_once(unscale, trailing_virtual):
    # The kept sums of earlier physical batches were merged after the unscale and stayed
    # multiplied by the loss scale (an update ~1000x the per-example bound allows).
    x = torch.randn(8, 6)
    plain = _plain_params(x)
    model, scaler = _virtual_amp(x, unscale, trailing_virtual)
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.detach(), a)
    assert scaler.get_scale() == 1024.0


@pytest.mark.parametrize("trailing_virtual", [False, True])
@pytest.mark.parametrize("unscale", [None, "wrapper", "inner"])
def test_amp_scaler_inf_in_an_earlier_physical_batch_skips_the_step(unscale, trailing_virtual):
    x = torch.randn(8, 6)
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in _setup()[0].parameters()]
    model, scaler = _virtual_amp(x, unscale, trailing_virtual, poison=True)
    for a, p in zip(initial, model.parameters()):
        assert torch.equal(p.detach(), a)  # skipped
    assert scaler.get_scale() == 512.0  # and the scaler backed off
