"""Folding the clip coefficient into a fused optimizer's step (``ClippedOptimizer(fold=...)``).

The folded path never rewrites a gradient: it measures the norm (divided by the AMP scale when the
gradients are still scaled) and passes ``grad_scale = S / coef`` to the fused step. These tests
prove that after N steps the parameters equal the unfolded path (unscale, clip in place, step) to
fp32 tolerance, with and without a GradScaler, for Adam, AdamW, SGD and Adagrad, with constant,
chained and adaptive (stateful) global clippers; that overflow and skip steps behave the same;
that per-tensor clippers fall back (``fold=None``) or raise (``fold=True``); and that the folded
path adds no host read of a tensor value.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import pytest

torch = pytest.importorskip("torch")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from _host_reads import record_host_reads  # noqa: E402
from gradclip._core.clipper import Clipper, make_info  # noqa: E402
from gradclip._core.contract import Decision  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6


class EmaState(NamedTuple):
    ema: object
    count: object


class EmaGlobalClip(Clipper):
    """A small adaptive clipper for these tests: threshold = 1.5 x the EMA of past norms.

    Written against the Ops protocol like the library's adaptive methods, with one global
    coefficient and device-side state, so folding must carry its state exactly as clip_ does.
    """

    name = "test_ema_global_clip"
    state_type = EmaState
    state_dtypes = {"ema": "float32", "count": "float32"}

    def init_state(self, ops, grads):
        return EmaState(ops.scalar(0.0), ops.scalar(0.0))

    def decide(self, ops, measured, state, signals=None):
        norm = measured.norm
        finite = ops.isfinite(norm)
        threshold = ops.where(state.count > 0, 1.5 * state.ema, norm)
        coef = ops.where(norm > threshold, threshold / (norm + 1e-6), ops.scalar(1.0))
        ema = ops.where(state.count > 0, 0.9 * state.ema + 0.1 * norm, norm)
        new = EmaState(ops.where(finite, ema, state.ema), state.count + 1.0)
        return Decision(coef, new, make_info(ops, norm, threshold, coef, coef < 1, finite))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, fused=True),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, fused=True),
}

CLIPPERS = {
    "global_norm": lambda: gradclip.GlobalNorm(0.5),
    "global_norm_never_clips": lambda: gradclip.GlobalNorm(1e6),
    "chain_of_global_norms": lambda: gradclip.chain(gradclip.GlobalNorm(2.0), gradclip.GlobalNorm(0.7)),
    "adaptive_ema": EmaGlobalClip,
    "global_norm_skip_policy": lambda: gradclip.GlobalNorm(0.5, nonfinite="skip"),
}


def _train(optimizer_name, clipper_factory, fold, scaler, steps=6, inject=None, pre_unscale=False,
           accumulation_steps=1):
    """Train a tiny model for ``steps`` micro-batches; return (parameters, ClippedOptimizer, scales seen)."""
    model = _model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if scaler else None
    opt = gct.ClippedOptimizer(optimizer, clipper_factory(), scaler=grad_scaler, fold=fold,
                               accumulation_steps=accumulation_steps)
    generator = torch.Generator().manual_seed(1)
    scales = []
    for step in range(steps):
        x = torch.randn(16, 6, generator=generator) * (1.0 + 4.0 * (step % 3 == 1))
        loss = model(x).pow(2).mean() * 10 / accumulation_steps
        (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        if inject is not None and step == inject[0]:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = inject[1]
        if pre_unscale and grad_scaler is not None and opt.will_step:
            grad_scaler.unscale_(optimizer)
        opt.step()
        if grad_scaler is not None and opt.stepped:
            scales.append(grad_scaler.get_scale())
            grad_scaler.update()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt, scales


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("clipper", sorted(CLIPPERS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_folded_equals_unfolded_after_n_steps(optimizer, clipper, scaler):
    folded, opt_folded, scales_folded = _train(optimizer, CLIPPERS[clipper], True, scaler)
    unfolded, opt_unfolded, scales_unfolded = _train(optimizer, CLIPPERS[clipper], False, scaler)
    assert opt_folded.folded and not opt_unfolded.folded
    _assert_same(folded, unfolded)
    assert scales_folded == scales_unfolded
    # The ClipInfo reports the same (unscaled) norm and coefficient on both paths.
    a, b = opt_folded.last_info.to_dict(), opt_unfolded.last_info.to_dict()
    assert a["norm"] == pytest.approx(b["norm"], rel=1e-5)
    assert a["coef"] == pytest.approx(b["coef"], rel=1e-5)


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("clipper", ["global_norm", "adaptive_ema", "global_norm_skip_policy"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd_momentum"])
def test_folded_equals_unfolded_with_gradient_accumulation(optimizer, clipper, scaler):
    """3 micro-batches per optimizer step: the folded step clips the accumulated (still scaled)
    gradient once, as the unfolded path does; a NaN in a micro-batch skips that whole step."""
    inject = (4, math.nan) if clipper == "global_norm_skip_policy" else None
    runs = {fold: _train(optimizer, CLIPPERS[clipper], fold, scaler, steps=12, inject=inject, accumulation_steps=3)
            for fold in (True, False)}
    (folded, opt_folded, scales_folded), (unfolded, opt_unfolded, scales_unfolded) = runs[True], runs[False]
    assert opt_folded.folded and not opt_unfolded.folded
    _assert_same(folded, unfolded)
    assert scales_folded == scales_unfolded and len(scales_folded) == (4 if scaler else 0)
    assert opt_folded.last_info.to_dict()["clipped"] == opt_unfolded.last_info.to_dict()["clipped"]
    steps = 3 if inject else 4  # optimizer steps taken, skipped ones not counted
    if optimizer == "adamw":
        for opt in (opt_folded, opt_unfolded):
            assert {int(s["step"]) for s in opt.optimizer.state.values()} == {steps}
    # The accumulated step moved the parameters (the comparison is not of two untouched models).
    assert not torch.equal(folded[0], _model()[0].weight)


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
def test_folded_equals_plain_torch_reference(scaler):
    """Against torch alone: GradScaler.unscale_ + clip_grad_norm_ + fused AdamW step."""
    folded, _, _ = _train("adamw", lambda: gradclip.GlobalNorm(0.5), True, scaler)
    model = _model()
    optimizer = OPTIMIZERS["adamw"](model.parameters())
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if scaler else None
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        x = torch.randn(16, 6, generator=generator) * (1.0 + 4.0 * (step % 3 == 1))
        loss = model(x).pow(2).mean() * 10
        if grad_scaler:
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
        optimizer.zero_grad()
    _assert_same(folded, [p.detach() for p in model.parameters()])


def test_fold_none_folds_automatically_with_a_fused_optimizer():
    _, opt, _ = _train("adam", CLIPPERS["global_norm"], None, False, steps=2)
    assert opt.fold_active and opt.folded


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
def test_folded_step_does_not_write_gradients_before_the_fused_kernel(scaler):
    """ClippedOptimizer makes no pass of its own over the gradients.

    A step pre-hook registered by the test runs right before the fused step: the gradients are
    still exactly what backward() produced (scaled, unclipped). The fused kernel divides each
    gradient by ``grad_scale`` as it reads it and, as torch's fused kernels do, stores the result
    in the same pass, so after the step ``.grad`` matches the unfolded path.
    """
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), fused=True)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=64.0) if scaler else None
    opt = gct.ClippedOptimizer(inner, gradclip.GlobalNorm(1e-3), scaler=grad_scaler, fold=True)
    loss = model(torch.randn(4, 6)).pow(2).sum().mul(100)
    (grad_scaler.scale(loss) if grad_scaler else loss).backward()
    from_backward = [p.grad.clone() for p in model.parameters()]
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in model.parameters()]))
    opt.step()
    assert opt.folded and opt.last_info.to_dict()["clipped"]
    assert len(seen) == 1
    for grad, at_step in zip(from_backward, seen[0]):
        assert torch.equal(grad, at_step)
    # After the step: the clipped, unscaled gradient, as the unfolded path leaves it.
    unscale = grad_scaler.get_scale() if grad_scaler else 1.0
    expected = gradclip.GlobalNorm(1e-3).clip([g / unscale for g in from_backward])[0]
    for grad, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, grad, rtol=RTOL, atol=1e-9)


def test_user_already_unscaled_is_not_unscaled_twice():
    """fold with a GradScaler on which the user already called unscale_ (stage UNSCALED)."""
    a, opt_a, scales_a = _train("adamw", CLIPPERS["global_norm"], True, True, pre_unscale=True)
    b, _, scales_b = _train("adamw", CLIPPERS["global_norm"], False, True)
    assert opt_a.folded
    _assert_same(a, b)
    assert scales_a == scales_b


@pytest.mark.parametrize("fold", [True, False])
def test_scaler_overflow_skips_the_step_and_backs_off(fold):
    params, opt, scales = _train("adam", CLIPPERS["global_norm"], fold, True, inject=(2, math.inf))
    reference, _, reference_scales = _train("adam", CLIPPERS["global_norm"], not fold, True, inject=(2, math.inf))
    _assert_same(params, reference)
    assert scales == reference_scales
    assert scales[3] == scales[2] / 2  # the scaler saw the inf and backed off
    # The overflow step did not count as an Adam step.
    assert all(int(s["step"]) == 5 for s in opt.optimizer.state.values())


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
def test_skip_policy_skips_the_fused_step_on_the_device(scaler):
    clipper = lambda: gradclip.GlobalNorm(0.5, nonfinite="skip")  # noqa: E731
    folded, opt, _ = _train("adamw", clipper, True, scaler, inject=(3, math.nan))
    unfolded, _, _ = _train("adamw", clipper, False, scaler, inject=(3, math.nan))
    assert opt.folded
    _assert_same(folded, unfolded)
    assert all(torch.isfinite(p).all() for p in folded)
    assert all(int(s["step"]) == 5 for s in opt.optimizer.state.values())


PER_TENSOR = {
    "norm": lambda: gradclip.Norm(0.5),
    "value": lambda: gradclip.Value(clip_value=0.1),
    "norm_sign": lambda: gradclip.NormSign(0.5),
    "zero_outliers": lambda: gradclip.ZeroOutliers(0.1),
    "average_norm": lambda: gradclip.AverageNorm(0.01),
    "block_rms": lambda: gradclip.BlockRMS(0.01),
    "global_norm_zero_policy": lambda: gradclip.GlobalNorm(0.5, nonfinite="zero"),
    "chain_global_then_value": lambda: gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.Value(clip_value=0.1)),
}
if "agc" in gradclip.available():
    PER_TENSOR["agc"] = lambda: gradclip.get("agc")


@pytest.mark.parametrize("clipper", sorted(PER_TENSOR))
def test_fold_true_raises_for_clippers_without_one_coefficient(clipper):
    with pytest.raises(gradclip.InvalidArgumentError, match="cannot be folded"):
        gct.ClippedOptimizer(torch.optim.Adam(_model().parameters(), fused=True), PER_TENSOR[clipper](), fold=True)


@pytest.mark.parametrize("clipper", sorted(PER_TENSOR))
def test_fold_none_falls_back_silently_for_clippers_without_one_coefficient(clipper):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto, opt_auto, _ = _train("adam", PER_TENSOR[clipper], None, True, steps=3)
    explicit, _, _ = _train("adam", PER_TENSOR[clipper], False, True, steps=3)
    assert not opt_auto.folded and not opt_auto.fold_active
    _assert_same(auto, explicit)


def test_fold_true_raises_for_a_non_fused_optimizer():
    with pytest.raises(gradclip.InvalidArgumentError, match="fused=True"):
        gct.ClippedOptimizer(torch.optim.Adam(_model().parameters()), gradclip.GlobalNorm(1.0), fold=True)
    opt = gct.ClippedOptimizer(torch.optim.Adam(_model().parameters()), gradclip.GlobalNorm(1.0))
    assert not opt.fold_active
    assert "fused=True" in gct.fold_unsupported_reason(torch.optim.SGD(_model().parameters(), lr=0.1))
    assert gct.fold_unsupported_reason(torch.optim.SGD(_model().parameters(), lr=0.1, fused=True)) is None


@pytest.mark.skipif(
    not any(n in gradclip.available() for n in ("autoclip", "zclip", "quantile_norm", "skip_on_spike")),
    reason="no adaptive library clipper registered yet",
)
@pytest.mark.parametrize("name", ["autoclip", "zclip", "quantile_norm", "skip_on_spike", "adagc"])
def test_library_adaptive_clippers_fold_or_fall_back_consistently(name):
    if name not in gradclip.available():
        pytest.skip(f"{name} is not registered")
    factory = lambda: gradclip.get(name)  # noqa: E731
    auto, opt, _ = _train("adamw", factory, None, True, steps=8)
    explicit, _, _ = _train("adamw", factory, False, True, steps=8)
    _assert_same(auto, explicit)
    if name in GLOBAL_ADAPTIVE:  # one global coefficient: these must fold
        assert opt.folded


GLOBAL_ADAPTIVE = ("autoclip", "zclip", "quantile_norm", "skip_on_spike")


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("clipper", ["global_norm", "adaptive_ema", "global_norm_skip_policy", *GLOBAL_ADAPTIVE])
def test_folded_step_reads_no_tensor_value_on_the_host(clipper, scaler):
    if clipper in GLOBAL_ADAPTIVE and clipper not in gradclip.available():
        pytest.skip(f"{clipper} is not registered")
    factory = CLIPPERS.get(clipper) or (lambda: gradclip.get(clipper))
    model = _model()
    grad_scaler = torch.amp.GradScaler("cpu") if scaler else None
    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), factory(), scaler=grad_scaler, fold=True)
    for _ in range(3):  # later steps run with state
        loss = model(torch.randn(4, 6)).pow(2).sum()
        (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        with record_host_reads() as calls:
            opt.step()
        assert calls == []
        if grad_scaler:
            grad_scaler.update()
        opt.zero_grad()
    assert opt.folded
