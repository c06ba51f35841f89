"""QuantileNorm under DPOptimizer with virtual steps: one bound per logical step, one noised count."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
import torch.nn.functional as F

import gradclip
import gradclip.torch as gct


def _run(noise, physical, steps=3, seed=0):
    """C used by every physical batch of each logical step (12 examples each), and C after."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    ps = gct.PerSample(model, gradclip.QuantileNorm(initial_norm=5.0, learning_rate=0.5, target_quantile=0.5))
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ps, noise, 12, sample_rate=0.1,
                          generator=torch.Generator().manual_seed(seed))
    draws = []
    normal = opt._normal
    opt._normal = lambda shape, std, device: draws.append(tuple(shape)) or normal(shape, std, device)
    g = torch.Generator().manual_seed(1)
    used, after = [], []
    for _ in range(steps):
        x, y = torch.randn(12, 6, generator=g) * 0.5, torch.randint(0, 3, (12,), generator=g)
        opt.zero_grad()
        size = 12 // physical
        for i in range(physical):
            part = slice(i * size, (i + 1) * size)
            info = opt.backward(F.cross_entropy(model(x[part]), y[part], reduction="none"))
            used.append(float(info.threshold))
            if i < physical - 1:
                opt.virtual_step()
        opt.step()
        after.append(float(ps.state.norm))
    return used, after, draws, opt


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_quantile_bound_moves_once_per_logical_step_as_without_virtual_steps(noise):
    # Before: C moved after every physical batch, each counted against the logical batch size
    # (b ~ 1/3 under a 0.5 target: C grew for ever), and the count was noised per physical batch.
    used, after, draws, opt = _run(noise, physical=3)
    whole_used, whole_after, whole_draws, whole = _run(noise, physical=1)
    assert after == whole_after  # the same C, from the same examples and the same noise
    assert used == [c for c in whole_used for _ in range(3)]  # one C for the step's physical batches
    assert len(set(after)) == len(after)  # and it moves
    if noise:
        # Exactly one count-noise draw per logical step (the gradient noise: one per parameter).
        assert draws.count(()) == 3 == whole_draws.count(())
        assert opt.accountant.steps == 3
    else:
        assert draws == []
    # C shrinks here (every norm is far below 5): it never grows past where it started.
    assert after[-1] < 5.0


def test_quantile_noise_is_sized_for_the_bound_that_clipped():
    # The gradient noise of a step is σ_Δ·C for the C its examples were clipped at, not the moved C.
    torch.manual_seed(0)
    model = torch.nn.Linear(200, 100, bias=False)
    ps = gct.PerSample(model, gradclip.QuantileNorm(initial_norm=2.0, learning_rate=1.0, target_quantile=0.0))
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ps, 1.0, 4,
                          generator=torch.Generator().manual_seed(0))
    opt.backward(model(torch.randn(4, 200)).sum(1) * 0)  # zero gradients: every example unclipped
    opt.virtual_step()
    opt.backward(model(torch.randn(4, 200)).sum(1) * 0)
    opt.step()
    assert float(ps.state.norm) < 2.0 * 0.5  # target 0, b = 1 (8 unclipped of 4 expected): C shrank by ~e^-1
    noise = model.weight.grad.flatten() * 4
    assert noise.std().item() == pytest.approx(opt.grad_noise_multiplier * 2.0, rel=0.03)
