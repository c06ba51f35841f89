"""ClippedOptimizer with the optimizer's state (SPAM) and with update clipping.

SPAM parity: ``ClippedOptimizer(torch.optim.Adam, SpikeAware(θ, warmup, ΔT))`` against a loop
that follows SPAM's reference code around the same ``torch.optim.Adam``. The reference lines are
ported from TianjinYellow/SPAM-Optimizer ``galore_torch/SPAM.py`` at commit
e8185fbe695fdc449953b4a1f96121df5bf0d268 (``AdamW.step``: the momentum reset and the threshold
masking, verbatim, on the wrapped optimizer's ``exp_avg``/``exp_avg_sq``); the Adam update is
torch's in both loops. The deviations named in :mod:`gradclip.torch.optim_state_aware` are the
``test_deviation_*`` tests.

Update clipping: the parameters after a step equal ``p_before + clip(p_after − p_before)``
computed by hand around a plain Adam.
"""

from __future__ import annotations

import io
import math

import pytest

torch = pytest.importorskip("torch")

import gradclip
import gradclip.torch as gct
from gradclip.torch import optim_state_aware

TOL = 1e-6


# -- SPAM: the reference's clip and reset, ported ------------------------------------------------
class ReferenceSpam:
    """The settings and step counter of SPAM's ``AdamW`` that its clip and reset read."""

    def __init__(self, threshold, DeltaT, grad_accu_steps):
        self.thres, self.DeltaT, self.grad_accu_steps = threshold, DeltaT, grad_accu_steps
        self.state = {"total_step": 0}


def reference_clip_and_reset(spam: ReferenceSpam, adam: torch.optim.Optimizer) -> None:
    """SPAM.py ``AdamW.step``'s momentum reset and threshold masking (verbatim but for the names
    of the optimizer objects), applied to a torch Adam's state before its own step."""
    with torch.no_grad():
        for group in adam.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = adam.state[p]
                if "exp_avg" not in state:
                    # The reference creates zero moments here; torch's Adam creates them in its
                    # first step. With grad_accu_steps >= 1 the first step clips nothing either way.
                    continue
                # Reset momentum when total_step hits update_proj_gap
                if (spam.state["total_step"] + 1) % spam.DeltaT == 0:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg_sq = state["exp_avg_sq"]
                # Threshold-based gradient masking
                if spam.thres != 0:
                    current_step = spam.state["total_step"] + 1
                    if current_step >= spam.grad_accu_steps:
                        exp_avg_sq1 = exp_avg_sq
                        mask = (grad**2) > (spam.thres * exp_avg_sq1)
                        if spam.DeltaT != 0:
                            # Only apply after enough accumulation steps
                            if current_step % spam.DeltaT >= spam.grad_accu_steps:
                                grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq1[mask] * spam.thres)
                        else:
                            grad[mask] = grad[mask].sign() * torch.sqrt(exp_avg_sq1[mask] * spam.thres)
    spam.state["total_step"] += 1


class _Model(torch.nn.Module):
    """A weight, a frozen tensor between (no gradient: the moments must stay aligned) and a bias."""

    def __init__(self, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(6, 5, generator=generator))
        self.frozen = torch.nn.Parameter(torch.randn(3, generator=generator), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(6, generator=generator))

    def forward(self, x):
        return x @ self.weight.T + self.bias


def _batches(count, spikes=(), seed=1):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(count):
        x, y = torch.randn(8, 5, generator=generator), torch.randn(8, 6, generator=generator)
        out.append((x, y, 300.0 if step in spikes else 1.0))
    return out


def _backward(model, batch):
    x, y, scale = batch
    model.zero_grad(set_to_none=True)
    (((model(x) - y) ** 2).mean() * scale).backward()


def _run_reference(batches, theta, warmup, interval, **adam):
    model = _Model(0)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, **adam)
    spam = ReferenceSpam(theta, interval or 0, warmup)
    history = []
    for batch in batches:
        _backward(model, batch)
        reference_clip_and_reset(spam, inner)
        inner.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def _run_ours(batches, theta, warmup, interval, clipper=None, reset_momentum=True, **adam):
    model = _Model(0)
    clipper = clipper or gradclip.SpikeAware(theta, warmup, interval)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2, **adam)
    opt = gct.ClippedOptimizer(inner, clipper, reset_momentum=reset_momentum)
    history, clipped = [], 0
    for batch in batches:
        _backward(model, batch)
        opt.step()
        clipped += bool(opt.last_info.clipped)
        history.append([p.detach().clone() for p in model.parameters()])
    return history, clipped, opt


def _max_difference(a, b):
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("adam", [{"foreach": False}, {"fused": True}], ids=["for-loop", "fused"])
def test_spike_aware_through_clipped_optimizer_follows_the_spam_reference(adam):
    """θ = 50 (quiet steps clip too), 3 warm-up steps, resets every 10 steps, spikes at 7, 15
    and 24: 30 steps of ClippedOptimizer(Adam, SpikeAware) end where the reference's clip and
    reset around the same Adam end, and the resets really happened (moments zeroed)."""
    batches = _batches(30, spikes={7, 15, 24})
    reference = _run_reference(batches, 50.0, 3, 10, **adam)
    ours, clipped, opt = _run_ours(batches, 50.0, 3, 10, **adam)
    for step, (a, b) in enumerate(zip(reference, ours), start=1):
        assert _max_difference(a, b) <= TOL, f"step {step}"
    assert clipped >= 10
    assert opt.clipper.state_dict()["state"] == {"step": 30}
    # Without the reset the parameters part ways from step 10 on: the reset is part of the match.
    kept, _, _ = _run_ours(batches, 50.0, 3, 10, reset_momentum=False, **adam)
    assert _max_difference(reference[8], kept[8]) <= TOL
    assert _max_difference(reference[9], kept[9]) > 1e-4


def test_deviation_the_reset_comes_after_the_clip_so_no_warm_up_keeps_the_gradient():
    """warmup_steps=0, resets every 5 steps: the reference resets before its clip, which then
    compares against v = 0 and zeroes every gradient element, so its step 5 leaves the
    parameters where step 4 left them; here the clip of step 5 sees the moments before the
    reset and Adam moves. Steps 1-4 agree."""
    batches = _batches(5, spikes={2})
    reference = _run_reference(batches, 50.0, 0, 5)
    ours, _, _ = _run_ours(batches, 50.0, 0, 5)
    for step in range(4):
        assert _max_difference(reference[step], ours[step]) <= TOL
    assert _max_difference(reference[4], reference[3]) == 0.0
    assert _max_difference(ours[4], ours[3]) > 1e-4


@pytest.mark.parametrize(
    "wrap",
    [
        lambda spam: gradclip.chain(gradclip.GlobalNorm(1e6), spam),
        lambda spam: gradclip.Subset(spam, 1.0, seed=0),
    ],
    ids=["chain", "subset"],
)
def test_a_spam_clipper_inside_a_chain_or_subset_gets_the_state_and_the_resets(wrap):
    batches = _batches(12, spikes={3, 8})
    plain, plain_clipped, _ = _run_ours(batches, 50.0, 2, 5)
    wrapped_clipper = wrap(gradclip.SpikeAware(50.0, 2, 5))
    assert wrapped_clipper.needs_optimizer_state
    wrapped, wrapped_clipped, _ = _run_ours(batches, 50.0, 2, 5, clipper=wrapped_clipper)
    assert plain_clipped == wrapped_clipped > 0
    for a, b in zip(plain, wrapped):
        assert _max_difference(a, b) <= TOL


def test_needs_optimizer_state_is_declared():
    assert gradclip.SpikeAware.needs_optimizer_state
    for clipper in (gradclip.GlobalNorm(1.0), gradclip.AdaClip(), gradclip.chain(gradclip.GlobalNorm(1.0))):
        assert not clipper.needs_optimizer_state
    assert not gradclip.Subset(gradclip.Value(clip_value=0.1), 0.5).needs_optimizer_state


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad, torch.optim.RMSprop])
def test_an_optimizer_without_a_second_moment_is_refused_when_built(optimizer):
    model = _Model(0)
    for clipper in (gradclip.SpikeAware(), gradclip.chain(gradclip.GlobalNorm(1.0), gradclip.SpikeAware())):
        with pytest.raises(gradclip.InvalidArgumentError, match=rf"SpikeAware.*exp_avg_sq.*{optimizer.__name__} keeps none"):
            gct.ClippedOptimizer(optimizer(model.parameters(), lr=0.1), clipper)
    gct.ClippedOptimizer(optimizer(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0))  # no state needed


class _SquareAverage(torch.optim.Optimizer):
    """A third-party optimizer (RMSprop-like) whose state has no exp_avg_sq."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    state.setdefault("square_avg", torch.zeros_like(p)).mul_(0.9).addcmul_(p.grad, p.grad, value=0.1)
                    p.addcdiv_(p.grad, state["square_avg"].sqrt().add_(1e-8), value=-group["lr"])


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "grad-scaler"])
def test_a_third_party_optimizer_without_exp_avg_sq_is_refused_at_the_step_before_anything_changes(with_scaler):
    """Refused before the clip and, with a GradScaler, before the gradients are unscaled."""
    model = _Model(0)
    clipper = gradclip.SpikeAware(50.0, 1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if with_scaler else None
    opt = gct.ClippedOptimizer(_SquareAverage(model.parameters()), clipper, scaler=scaler)
    for step, (x, y, _) in enumerate(_batches(2)):
        model.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        if step == 0:
            opt.step()  # no state yet: nothing to compare against, as before Adam's first step
            if scaler:
                scaler.update()
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    saved = clipper.state_dict()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"_SquareAverage keeps no 'exp_avg_sq'.*square_avg.*Nothing was changed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))
    assert clipper.state_dict() == saved


@pytest.mark.parametrize("value", [1, "yes", None])
def test_reset_momentum_must_be_a_bool(value):
    model = _Model(0)
    with pytest.raises(gradclip.InvalidArgumentError, match=rf"reset_momentum must be True or False, got {value!r}"):
        gct.ClippedOptimizer(torch.optim.Adam(model.parameters()), gradclip.SpikeAware(), reset_momentum=value)


# -- update clipping -------------------------------------------------------------------------------
def _global_norm_bound(deltas, bound):
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in deltas))
    return [d * min(1.0, bound / norm) for d in deltas]


def _block_rms_bound(deltas, bound):
    return [d / max(1.0, float(d.double().pow(2).mean().sqrt()) / bound) for d in deltas]


@pytest.mark.parametrize(
    "make, by_hand",
    [
        (lambda: gradclip.GlobalNorm(0.02), lambda d: _global_norm_bound(d, 0.02)),
        (lambda: gradclip.BlockRMS(0.004), lambda d: _block_rms_bound(d, 0.004)),
    ],
    ids=["global-norm", "adafactor-rms"],
)
def test_update_clipping_equals_the_update_clipped_by_hand(make, by_hand):
    """Adam (lr 0.05) on the tiny model: each step's parameters are p_before + clip(Δ) with Δ
    from the same Adam, clipped by the formula (global norm, or Adafactor's per-tensor RMS)."""
    batches = _batches(6, spikes={3})
    model, reference = _Model(0), _Model(0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), gradclip.NoClip(), update_clipper=make())
    plain = torch.optim.Adam(reference.parameters(), lr=0.05)
    trainable = [p for p in reference.parameters() if p.requires_grad]
    clipped = 0
    for batch in batches:
        _backward(model, batch)
        opt.step()
        _backward(reference, batch)
        before = [p.detach().clone() for p in trainable]
        plain.step()
        with torch.no_grad():
            for p, b, d in zip(trainable, before, by_hand([p - b for p, b in zip(trainable, before)])):
                p.copy_(b + d)
        assert _max_difference(list(model.parameters()), list(reference.parameters())) <= TOL
        clipped += bool(opt.last_update_info.clipped)
    assert clipped >= 4


def _distance(params, before):
    """The global norm of the parameters' change since ``before``."""
    return math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in zip(params, before)))


def test_the_update_norm_after_the_step_is_within_the_bound():
    model = _Model(0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0), update_clipper=gradclip.GlobalNorm(0.01))
    assert opt.last_update_info is None
    for batch in _batches(4):
        before = [p.detach().clone() for p in model.parameters()]
        _backward(model, batch)
        opt.step()
        update = _distance(model.parameters(), before)
        info = opt.last_update_info
        assert bool(info.clipped) and float(info.norm) > 0.01
        assert update <= 0.01 * (1 + 1e-5)
        assert update == pytest.approx(0.01, rel=1e-4)


def test_a_folded_fused_step_clips_its_update_too():
    model = _Model(0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1, fused=True), gradclip.GlobalNorm(0.5), update_clipper=gradclip.GlobalNorm(0.01))
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model, _batches(1)[0])
    opt.step()
    assert opt.folded
    assert _distance(model.parameters(), before) <= 0.01 * (1 + 1e-5)


def _state_of(clipper):
    return clipper.state_dict()["state"]


def test_a_step_skipped_by_the_clipper_leaves_parameters_and_update_clipper_alone():
    model = _Model(0)
    updates = gradclip.ZClip(warmup_steps=2)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0, nonfinite="skip"), update_clipper=updates)
    for batch in _batches(3):
        _backward(model, batch)
        opt.step()
    params, saved, info = [p.detach().clone() for p in model.parameters()], _state_of(updates), opt.last_update_info
    _backward(model, _batches(1)[0])
    model.weight.grad[0, 0] = float("nan")
    opt.step()
    assert bool(opt.last_info.skip)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert _state_of(updates) == saved and opt.last_update_info is info


def test_a_step_the_grad_scaler_skips_leaves_parameters_and_update_clipper_alone():
    model = _Model(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    updates = gradclip.ZClip(warmup_steps=2)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0), scaler=scaler, update_clipper=updates)
    for step, (x, y, _) in enumerate(_batches(3)):
        model.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean() * (float("inf") if step == 2 else 1.0)
        params, saved = [p.detach().clone() for p in model.parameters()], _state_of(updates)
        scaler.scale(loss).backward()
        opt.step()
        scaler.update()
        unchanged = all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
        assert unchanged == (step == 2)
        assert (_state_of(updates) == saved) == (step == 2)


@pytest.mark.parametrize("bad", [0.01, "global_norm", lambda d: d, [gradclip.GlobalNorm(1.0)]])
def test_an_update_clipper_that_is_not_a_clipper_is_refused(bad):
    model = _Model(0)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"ClippedOptimizer: update_clipper must be a gradclip clipper .* got "):
        gct.ClippedOptimizer(torch.optim.Adam(model.parameters()), gradclip.GlobalNorm(1.0), update_clipper=bad)


def test_update_clippers_that_cannot_work_after_the_step_are_refused():
    model = _Model(0)
    clipper = gradclip.GlobalNorm(1.0)
    cases = [
        (clipper, r"update_clipper is the gradient clipper itself"),
        (gradclip.GlobalNorm(1.0, nonfinite="skip"), r"may ask to skip.*skip with the gradient clipper"),
        (gradclip.SpikeAware(), r"reads the optimizer's state"),
    ]
    for update_clipper, pattern in cases:
        with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
            gct.ClippedOptimizer(torch.optim.Adam(model.parameters()), clipper, update_clipper=update_clipper)


def test_a_closure_with_an_update_clipper_is_refused_before_anything_changes():
    model = _Model(0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0), update_clipper=gradclip.GlobalNorm(0.01))
    batch = _batches(1)[0]
    _backward(model, batch)
    params = [p.detach().clone() for p in model.parameters()]

    def closure():
        _backward(model, batch)
        return torch.zeros(())

    with pytest.raises(gradclip.InvalidArgumentError, match=r"closures are not supported together with update_clipper"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert opt.last_info is None and not opt.state


def test_the_module_documents_the_memory_of_update_clipping():
    assert "one copy of the parameters" in optim_state_aware.__doc__


def _trained_with_update_clipping(steps=3):
    model = _Model(0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0), update_clipper=gradclip.ZClip(warmup_steps=2))
    for batch in _batches(steps):
        _backward(model, batch)
        opt.step()
    return model, opt


def test_the_update_clippers_state_is_checkpointed_and_resumes():
    _, opt = _trained_with_update_clipping()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["gradclip"]["update_clipper"] == opt.update_clipper.state_dict()
    resumed = gct.ClippedOptimizer(torch.optim.Adam(_Model(0).parameters(), lr=0.1), gradclip.GlobalNorm(1.0), update_clipper=gradclip.ZClip(warmup_steps=2))
    resumed.load_state_dict(checkpoint)
    assert resumed.update_clipper.state_dict() == opt.update_clipper.state_dict()


def test_update_clipper_checkpoints_that_do_not_fit_are_refused_and_change_nothing():
    _, opt = _trained_with_update_clipping()
    checkpoint = opt.state_dict()
    plain_model = _Model(0)
    plain = gct.ClippedOptimizer(torch.optim.Adam(plain_model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.StateError, match=r"holds an update clipper's state .* has no update_clipper"):
        plain.load_state_dict(checkpoint)
    assert not plain.state
    other = gct.ClippedOptimizer(torch.optim.Adam(_Model(0).parameters(), lr=0.1), gradclip.GlobalNorm(1.0), update_clipper=gradclip.AutoClip())
    with pytest.raises(gradclip.StateError, match=r"AutoClip\.load_state_dict"):
        other.load_state_dict(checkpoint)  # a ZClip's state for an AutoClip
    assert not other.state and other.update_clipper.state_dict()["state"] is None
    # A checkpoint written without update clipping: the update clipper starts fresh, with a warning.
    _, fresh = _trained_with_update_clipping()
    without = {**checkpoint, "gradclip": {k: v for k, v in checkpoint["gradclip"].items() if k != "update_clipper"}}
    with pytest.warns(UserWarning, match=r"no update clipper state; the update clipper ZClip starts fresh"):
        fresh.load_state_dict(without)
    assert fresh.update_clipper.state_dict()["state"] is None


def test_per_group_clipping_resets_the_moments_of_the_spam_group_only():
    """{weight group: SpikeAware resetting every 5 steps, bias group: GlobalNorm}: at step 5 the
    weight's moments restart from the step's gradient ((1 − β₂)·g², the clip pauses at a reset
    step), the bias's keep their history; each group's clipper sees its own moments."""
    model = _Model(0)
    inner = torch.optim.Adam([{"params": [model.weight]}, {"params": [model.bias]}], lr=1e-2)
    opt = gct.ClippedOptimizer(inner, {0: gradclip.SpikeAware(50.0, 2, 5), 1: gradclip.GlobalNorm(1e6)})
    for batch in _batches(5):
        _backward(model, batch)
        opt.step()
    for param, fresh in ((model.weight, True), (model.bias, False)):
        restarted = (1 - 0.999) * param.grad**2
        assert torch.allclose(inner.state[param]["exp_avg_sq"], restarted, rtol=1e-6, atol=0) == fresh


def test_deviation_amsgrads_maximum_is_not_reset():
    """The reference has no AMSGrad: a reset zeroes exp_avg and exp_avg_sq, not max_exp_avg_sq."""
    batches = _batches(5)
    _, _, opt = _run_ours(batches, 50.0, 2, 5, amsgrad=True)
    state = opt.state[opt.param_groups[0]["params"][0]]
    # Reset too, the maximum would restart at step 5's exp_avg_sq and equal it everywhere.
    assert torch.all(state["max_exp_avg_sq"] >= state["exp_avg_sq"])
    assert torch.any(state["max_exp_avg_sq"] > state["exp_avg_sq"])
