"""PerSample's contract: hooks, state_dict, clippers, refusals and bad input (gradients unchanged)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn

import gradclip
import gradclip.torch as gct
from tests._per_sample_models import SmallCNN, clipped_sum, per_example_grads


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _losses(model: nn.Module, batch: int = 6) -> torch.Tensor:
    x = torch.randn(batch, 4)
    return model(x).pow(2).sum(1)


def test_hooks_leave_model_unchanged_and_are_removable():
    model = _mlp()
    keys = list(model.state_dict())
    forward_hooks = [len(m._forward_hooks) for m in model.modules()]
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    assert list(model.state_dict()) == keys
    ps.backward(_losses(model))
    ps.remove()
    assert [len(m._forward_hooks) for m in model.modules()] == forward_hooks
    model.zero_grad(set_to_none=True)
    model(torch.randn(2, 4)).sum().backward()  # plain training works again


def test_eval_under_no_grad_records_nothing():
    model = _mlp()
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    with torch.no_grad():
        model(torch.randn(3, 4))
    assert ps._recorder.calls == []


def test_sum_not_mean_and_coefficients():
    model = _mlp().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = per_example_grads(model, lambda out, x: out.pow(2).sum(1), x)
    norms, want = clipped_sum(ref, 0.5)
    info = gct.PerSample(model, gradclip.GlobalNorm(0.5)).backward(model(x).pow(2).sum(1))
    expected_coef = torch.where(norms > 0.5, 0.5 / (norms + 1e-6), torch.ones_like(norms))
    torch.testing.assert_close(info.coef, expected_coef)
    torch.testing.assert_close(info.clipped, norms > 0.5)
    assert bool(info.finite.all()) and not bool(info.skip)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name])


def test_quantile_norm_adapts_its_bound():
    model = _mlp()
    clipper = gradclip.QuantileNorm(target_quantile=0.5, learning_rate=0.5, initial_norm=1e-3)
    ps = gct.PerSample(model, clipper)
    info = ps.backward(_losses(model))
    assert float(info.threshold) == pytest.approx(1e-3)
    first = float(ps.state.norm)
    assert first > 1e-3  # every example was clipped: C grows (Andrew et al. 2021)
    assert first == pytest.approx(1e-3 * torch.exp(torch.tensor(0.5 * 0.5)).item(), rel=1e-5)
    model.zero_grad(set_to_none=True)
    info = ps.backward(_losses(model))
    assert float(info.threshold) == pytest.approx(first)


@pytest.mark.parametrize("name", ["ZClip", "AutoClip", "AdaGC"])
def test_adaptive_clippers_without_noise_are_refused(name):
    clipper = getattr(gradclip, name)()
    with pytest.raises(gradclip.InvalidArgumentError, match=f"{name}.*differential privacy"):
        gct.PerSample(_mlp(), clipper)


def test_other_clippers_and_modes_refused():
    with pytest.raises(gradclip.InvalidArgumentError, match="GlobalNorm"):
        gct.PerSample(_mlp(), gradclip.Value(clip_value=1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match="L2"):
        gct.PerSample(_mlp(), gradclip.GlobalNorm(1.0, norm_type=1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match="mode"):
        gct.PerSample(_mlp(), gradclip.GlobalNorm(1.0), mode="fast")


@pytest.mark.parametrize(
    "layer, pattern",
    [
        (nn.BatchNorm1d(4), r"1 \(BatchNorm1d\) mixes the examples"),
        (nn.LSTM(4, 4), r"1 \(LSTM\) is a fused recurrent layer"),
        (nn.GRU(4, 4), r"1 \(GRU\) is a fused recurrent layer"),
        (nn.Embedding(4, 4, max_norm=1.0), r"1 \(Embedding\) has max_norm"),
    ],
)
def test_unsupported_layers_named(layer, pattern):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        gct.PerSample(model, gradclip.GlobalNorm(1.0))
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "bad, pattern",
    [
        (lambda out: out.pow(2).sum(), "1-D tensor with one loss per example"),
        (lambda out: out.pow(2).sum(1)[:-1], "has 5 entries but 0 saw an input of shape"),
        (lambda out: out.pow(2), "1-D tensor"),
    ],
)
def test_losses_not_one_per_example(bad, pattern):
    model = _mlp()
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        ps.backward(bad(model(torch.randn(6, 4))))
    assert _grads(model) == [None] * 4


def test_backward_twice_without_zero_grad():
    model = _mlp()
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    ps.backward(_losses(model))
    before = _grads(model)
    with pytest.raises(gradclip.InvalidArgumentError, match="zero_grad"):
        ps.backward(_losses(model))
    for a, b in zip(before, _grads(model)):
        assert torch.equal(a, b)


class Outside(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.pos = nn.Parameter(torch.randn(4))

    def forward(self, x):
        # fc.weight used outside fc's call; pos added by the parent (a module with a
        # parameter: handled by torch.func in auto, so only fc.weight is refused).
        return self.fc(x) + x @ self.fc.weight.t() + self.pos


@pytest.mark.parametrize("mode", ["auto", "bk"])
def test_parameter_used_outside_its_module_is_named(mode):
    model = Outside()
    if mode == "bk":
        with pytest.raises(gradclip.InvalidArgumentError, match=r"the model \(Outside\) has trainable"):
            gct.PerSample(model, gradclip.GlobalNorm(1.0), mode=mode)
        return
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0), mode=mode)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"fc\.weight receive gradients outside"):
        ps.backward(model(torch.randn(3, 4)).sum(1))
    assert _grads(model) == [None] * 3


def test_empty_batch_gives_zero_sum():
    model = _mlp()
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    info = ps.backward(model(torch.randn(0, 4)).sum(1))
    assert info.norm.shape == (0,)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


def test_loss_scale_is_divided_out_of_the_norms():
    model = SmallCNN()
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    ps = gct.PerSample(model, gradclip.GlobalNorm(0.1))
    loss = nn.functional.cross_entropy(model(x), y, reduction="none")
    info = ps.backward(loss * 1024.0, loss_scale=1024.0)
    scaled = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = ps.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(info.norm, ref.norm, rtol=1e-5, atol=1e-7)
    for a, p in zip(scaled, model.parameters()):
        torch.testing.assert_close(a / 1024.0, p.grad, rtol=1e-4, atol=1e-7)


def test_forward_before_per_sample_is_explained():
    model = _mlp()
    losses = _losses(model)  # no hooks yet
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match="no module call was recorded"):
        ps.backward(losses)
    assert _grads(model) == [None] * 4


def test_vmap_chunks_give_the_same_result():
    torch.manual_seed(5)
    model = SmallCNN().double()
    x, y = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4])
    results = []
    for chunk in (None, 2):  # 2 does not divide 5: the last chunk is short
        model.zero_grad(set_to_none=True)
        ps = gct.PerSample(model, gradclip.GlobalNorm(0.1), mode="vmap", chunk_size=chunk)
        info = ps.backward(nn.functional.cross_entropy(model(x), y, reduction="none"))
        results.append((info.norm, [p.grad.clone() for p in model.parameters()]))
        ps.remove()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_an_evaluation_forward_with_gradients_enabled_is_ignored():
    model = _mlp().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = per_example_grads(model, lambda out, x: out.pow(2).sum(1), x)
    _, want = clipped_sum(ref, 0.5)
    ps = gct.PerSample(model, gradclip.GlobalNorm(0.5))
    model(torch.randn(9, 4, dtype=torch.float64))  # validation without no_grad, another batch size
    ps.backward(model(x).pow(2).sum(1))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name])


def test_outputs_that_autograd_does_not_save_are_not_kept_alive():
    # The recorder keeps each output's gradient edge, not the tensor: a Linear output that only
    # feeds tanh (which saves its own result) is freed after the forward, as in plain training.
    import weakref

    model = _mlp()
    ps = gct.PerSample(model, gradclip.GlobalNorm(1.0), mode="bk")
    seen = []
    handle = model[0].register_forward_hook(lambda m, a, out: seen.append(weakref.ref(out)))
    losses = _losses(model)
    handle.remove()
    assert seen and seen[0]() is None
    info = ps.backward(losses)
    assert info.norm.shape == (6,) and model[0].weight.grad is not None


def test_book_keeping_choice_per_layer():
    # The ghost norm where instantiating would hold more than the ghost path's input and output
    # gradient (pd > T(p + d)); instantiation, faster, elsewhere (ghost_cheaper(T, p, d)).
    from gradclip.torch.per_sample_rules import ghost_cheaper

    assert not ghost_cheaper(32, 64, 64)  # attention projection, T = 32: pd = T(p + d)
    assert ghost_cheaper(32, 256, 64)  # MLP: pd > T(p + d)
    assert not ghost_cheaper(1024, 16, 27)  # a convolution over 32x32 positions
    assert not ghost_cheaper(64, 32, 288)  # and over 8x8: the folded kernel instantiates
    assert ghost_cheaper(1, 4, 64)  # one position: the ghost norm is faster outright
    assert ghost_cheaper(128, 768, 768) and not ghost_cheaper(1024, 768, 768)  # GPT-2 width


def test_ghost_second_pass_holds_no_layer_input():
    # Ghost mode's first pass drops each recorded layer input once that layer's norm is taken:
    # the second pass then frees every activation as plain training does. The second layer's
    # weight is frozen, so autograd does not save its input: gradclip's record is its only holder.
    import weakref

    torch.manual_seed(0)
    first, second = nn.Linear(4, 8), nn.Linear(8, 3)
    second.weight.requires_grad_(False)
    model = nn.Sequential(first, second)
    ps = gct.PerSample(model, gradclip.GlobalNorm(0.5), mode="ghost")
    storage = {}
    handle = first.register_forward_hook(lambda m, a, out: storage.update(ref=weakref.ref(out.untyped_storage())))
    held = []  # a parameter's hook fires in the second pass only (the first computes no .grad)
    first.weight.register_hook(lambda g: held.append(storage["ref"]() is not None))
    x = torch.randn(6, 4)
    ps.backward(model(x).pow(2).sum(1))
    assert held == [False]
    handle.remove()
    _, expected = clipped_sum(per_example_grads(model, lambda out, x: out.pow(2).sum(), x), 0.5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-6)
