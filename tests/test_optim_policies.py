"""``ClippedOptimizer``'s stability policies (issue 17): the loss signal (``step(loss=...)``),
skip streaks (``max_consecutive_skips`` → ``gradclip.DivergenceError``) and per-group clipping
(``{group index or name: clipper | None}``), their checkpoints and their bad input.

Per-group results are compared with ``torch.nn.utils.clip_grad_norm_`` run on each group alone.
"""

from __future__ import annotations

import copy
import io
import math

import pytest

torch = pytest.importorskip("torch")

from _host_reads import record_host_reads

import gradclip
import gradclip.torch as gct


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batches(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, generator=generator) for _ in range(n)]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _unchanged(model, before):
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


class LossRecorder(gradclip.GlobalNorm):
    """A GlobalNorm that records the loss its ``decide`` is given (host reads: a test only)."""

    name = "test_loss_recorder"

    def __init__(self, max_norm=1.0):
        super().__init__(max_norm)
        self.seen = []

    def decide(self, ops, measured, state, signals=None):
        loss = None if signals is None else signals.loss
        self.seen.append(None if loss is None else float(loss))
        return super().decide(ops, measured, state, signals)


# -- 1. the loss signal ---------------------------------------------------------------------------

SPIKE_SETUPS = {
    "sgd_in_place": (lambda p: torch.optim.SGD(p, lr=0.1), None),
    "adam_in_place": (lambda p: torch.optim.Adam(p, lr=0.01), None),
    "fused_adam_folded": (lambda p: torch.optim.Adam(p, lr=0.01, fused=True), True),
    "fused_adam_fold_off": (lambda p: torch.optim.Adam(p, lr=0.01, fused=True), False),
}


@pytest.mark.parametrize("setup", sorted(SPIKE_SETUPS))
def test_a_loss_spike_skips_the_step_through_clipped_optimizer(setup):
    make, fold = SPIKE_SETUPS[setup]
    model = _model()
    opt = gct.ClippedOptimizer(make(model.parameters()), gradclip.SkipOnSpike(window=8, min_history=4, signal="loss"),
                               fold=fold)
    assert opt.fold_active == (fold is True)
    losses = [1.0, 1.1, 0.9, 1.05, 0.95, 50.0, 1.0]
    for step, (x, given) in enumerate(zip(_batches(len(losses)), losses)):
        model(x).pow(2).mean().backward()
        before = _params(model)
        opt.step(loss=torch.tensor(given))
        info = opt.last_info.to_dict()
        spike = given == 50.0
        assert info["skip"] == spike, step
        assert _unchanged(model, before) == spike, step  # the spike's step left the parameters alone
        assert opt.folded == (fold is True)
        opt.zero_grad()
    # The loss reached decide: the threshold is in the loss's units (mean + 6 sigma of ~1).
    assert 1.0 < opt.last_info.to_dict()["threshold"] < 3.0


def test_the_closure_s_loss_is_the_signal():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               gradclip.SkipOnSpike(window=8, min_history=3, signal="loss"))
    for given in [1.0, 1.1, 0.9, 1.0, 40.0]:
        x = _batches(1)[0]
        before = _params(model)

        def closure(given=given, x=x):
            opt.zero_grad()
            out = model(x).pow(2).mean()
            out.backward()
            return out * 0 + given  # the loss the clipper must see (autograd history dropped)

        returned = opt.step(closure)
        assert float(returned.detach()) == pytest.approx(given)
        assert opt.last_info.to_dict()["skip"] == (given == 40.0)
        assert _unchanged(model, before) == (given == 40.0)
    assert opt.last_info.to_dict()["consecutive_skips"] == 1


def test_with_accumulation_the_clipper_sees_the_mean_of_the_losses_given():
    model = _model()
    recorder = LossRecorder()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), recorder, accumulation_steps=3)
    calls = [(1.0, 2.0, 6.0), (None, None, 5.0), (torch.tensor([4.0]), None, torch.tensor(2.0, dtype=torch.float16)),
             (None, None, None)]
    for losses in calls:
        for loss, x in zip(losses, _batches(3)):
            model(x).pow(2).mean().backward()
            opt.step(loss=loss)
            opt.zero_grad()
    assert recorder.seen == [3.0, 5.0, 3.0, None]  # the mean of those given; None when none was


def test_with_a_closure_and_accumulation_the_closures_losses_are_averaged():
    model = _model()
    recorder = LossRecorder()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), recorder, accumulation_steps=2)
    for given, x in zip((1.0, 3.0, 10.0, 20.0), _batches(4)):

        def closure(given=given, x=x):
            model(x).pow(2).mean().backward()
            return torch.tensor(given)

        opt.step(closure)
        opt.zero_grad()
    assert recorder.seen == [2.0, 15.0]


def test_a_failed_boundary_discarded_by_zero_grad_forgets_its_losses():
    model = _model()
    recorder = LossRecorder()
    recorder.nonfinite = "raise"
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), recorder, accumulation_steps=2)
    x1, x2 = _batches(2)
    model(x1).pow(2).mean().backward()
    opt.step(loss=100.0)
    (model(x2).pow(2).mean() * math.nan).backward()
    with pytest.raises(gradclip.NonFiniteError):
        opt.step(loss=100.0)
    opt.zero_grad()  # discards the accumulation, its losses with it
    for loss, x in zip((1.0, 3.0), _batches(2)):
        model(x).pow(2).mean().backward()
        opt.step(loss=loss)
        opt.zero_grad()
    assert recorder.seen[-1] == 2.0


@pytest.mark.parametrize(
    "loss, match",
    [
        ("1.0", r"loss must be a number or an array, got str"),
        (True, r"loss must be a number or an array, got bool"),
        (torch.ones(2), r"loss"),
    ],
)
def test_a_bad_loss_is_refused_before_anything_changes(loss, match):
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0),
                               accumulation_steps=2)
    model(_batches(1)[0]).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        opt.step(loss=loss)
    assert opt.will_step is False and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_a_loss_together_with_a_closure_is_refused():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match="either as loss= or as the closure's return value"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


# -- 2. skip streaks ------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adam_folded"])
def test_the_n_th_consecutive_skip_raises_divergence_error_after_skipping(fused):
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01, fused=True) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
    opt = gct.ClippedOptimizer(inner, gradclip.SkipAbove(1e-6), max_consecutive_skips=3)
    start = _params(model)
    norms = []
    for step, x in enumerate(_batches(3)):
        model(x).pow(2).mean().backward()
        norms.append(float(gradclip.global_norm([p.grad for p in model.parameters()])))
        if step < 2:
            opt.step(loss=float(step))
            assert opt.last_info.to_dict()["consecutive_skips"] == step + 1
        else:
            with pytest.raises(gradclip.DivergenceError, match=r"3 optimizer steps in a row were skipped") as raised:
                opt.step(loss=torch.tensor(7.0))
        opt.zero_grad()
    error = raised.value
    assert isinstance(error, RuntimeError) and error.streak == 3
    assert error.norms == pytest.approx(norms, rel=1e-5)
    assert error.losses == [0.0, 1.0, 7.0]
    assert "max_consecutive_skips=3" in str(error) and f"{norms[-1]:.6g}" in str(error)
    assert _unchanged(model, start)  # every step was skipped, the third one too
    assert opt.stepped and opt.folded == fused and opt.last_info.to_dict()["consecutive_skips"] == 3


def test_a_step_taken_resets_the_streak():
    model = _model()
    # Batches scaled so that the norm crosses the bound: skip, skip, take, skip, skip, take...
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), gradclip.SkipAbove(5.0),
                               max_consecutive_skips=3)
    counts = []
    for step, x in enumerate(_batches(7)):
        scale = 0.01 if step % 3 == 2 else 100.0
        (model(x).pow(2).mean() * scale).backward()
        opt.step()
        counts.append(opt.last_info.to_dict()["consecutive_skips"])
        opt.zero_grad()
    assert counts == [1, 2, 0, 1, 2, 0, 1]


@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_adam_folded"])
def test_consecutive_skips_is_counted_without_a_bound_and_without_a_host_read(fused):
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01, fused=True) if fused else torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="max_consecutive_skips=2 has no effect: GlobalNorm never skips"):
        opt = gct.ClippedOptimizer(inner, gradclip.GlobalNorm(0.5), max_consecutive_skips=2)
    for x in _batches(3):
        model(x).pow(2).mean().backward()
        with record_host_reads() as reads:
            opt.step()
        assert reads == []  # the clipper cannot skip: nothing is read, the bound is never checked
        assert torch.is_tensor(opt.last_info.consecutive_skips)
        assert opt.last_info.to_dict()["consecutive_skips"] == 0
        opt.zero_grad()
    unbounded = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.SkipAbove(1e-6))
    for expected in (1, 2, 3, 4):
        model(_batches(1)[0]).pow(2).mean().backward()
        unbounded.step()
        unbounded.zero_grad()
        assert unbounded.last_info.to_dict()["consecutive_skips"] == expected  # counted; never raised


def _save_and_load(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_streak_survives_a_checkpoint():
    model = _model()
    make = lambda: gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                                        gradclip.SkipAbove(1e-6), max_consecutive_skips=3)
    opt = make()
    for x in _batches(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    saved = _save_and_load(opt.state_dict())
    assert saved["gradclip"]["consecutive_skips"] == 2
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["gradclip"]["consecutive_skips"] == 2
    model(_batches(1)[0]).pow(2).mean().backward()
    with pytest.raises(gradclip.DivergenceError) as raised:
        resumed.step()
    assert raised.value.streak == 3
    # An older checkpoint (no consecutive_skips field) and a plain torch one resume at 0.
    older = copy.deepcopy(saved)
    del older["gradclip"]["consecutive_skips"]
    resumed.load_state_dict(older)
    assert resumed.state_dict()["gradclip"]["consecutive_skips"] == 0


@pytest.mark.parametrize("bad", [-1, True, 1.0, "2", None])
def test_a_bad_consecutive_skips_field_is_refused_and_changes_nothing(bad):
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.SkipAbove(1e-6),
                               max_consecutive_skips=5)
    model(_batches(1)[0]).pow(2).mean().backward()
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    bad_state = copy.deepcopy(good)
    bad_state["gradclip"]["consecutive_skips"] = bad
    with pytest.raises(gradclip.StateError, match=r"consecutive_skips must be an int >= 0"):
        opt.load_state_dict(bad_state)
    assert opt.state_dict()["gradclip"] == good["gradclip"]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_a_bad_max_consecutive_skips_is_refused(bad):
    model = _model()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"ClippedOptimizer: max_consecutive_skips must be an integer >= 1"):
        gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0),
                             max_consecutive_skips=bad)


# -- 3. per-group clipping ------------------------------------------------------------------------


class Gan(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.G = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 6))
        self.D = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))

    def loss(self, z):
        return (self.D(self.G(z)).pow(2).mean() * 30) + self.G(z).pow(2).mean() * 3


def _gan_groups(gan, name=True):
    groups = [{"params": list(gan.G.parameters())}, {"params": list(gan.D.parameters()), "lr": 0.05}]
    if name:
        groups[0]["name"], groups[1]["name"] = "G", "D"
    return groups


GAN_OPTIMIZERS = {
    "sgd": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9),
    "fused_adam": lambda groups: torch.optim.Adam(groups, lr=0.01, fused=True),
}


@pytest.mark.parametrize("optimizer", sorted(GAN_OPTIMIZERS))
@pytest.mark.parametrize("keys", ["names", "indices"])
def test_each_group_is_clipped_alone_like_clip_grad_norm_on_that_group(optimizer, keys):
    gan, reference = Gan(), Gan()
    g, d = ("G", "D") if keys == "names" else (0, 1)
    opt = gct.ClippedOptimizer(GAN_OPTIMIZERS[optimizer](_gan_groups(gan)),
                               {g: gradclip.GlobalNorm(0.5), d: gradclip.GlobalNorm(0.05)})
    ref_opt = GAN_OPTIMIZERS[optimizer](_gan_groups(reference))
    assert not opt.fold_active  # two groups clipped apart: in place
    for z in _batches(4, seed=3):
        z = z[:, :4]
        gan.loss(z).backward()
        reference.loss(z).backward()
        opt.step()
        ref_g = torch.nn.utils.clip_grad_norm_(reference.G.parameters(), 0.5)
        ref_d = torch.nn.utils.clip_grad_norm_(reference.D.parameters(), 0.05)
        ref_opt.step()
        infos = opt.last_infos
        assert list(infos) == [g, d]
        torch.testing.assert_close(infos[g].norm, ref_g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(infos[d].norm, ref_d, rtol=1e-5, atol=1e-7)
        # The combined info: the clipped groups' norms (all of them here) and the bound on them.
        torch.testing.assert_close(opt.last_info.norm, torch.sqrt(ref_g**2 + ref_d**2), rtol=1e-5, atol=1e-7)
        assert opt.last_info.to_dict()["threshold"] == pytest.approx(math.hypot(0.5, 0.05), rel=1e-6)
        assert opt.last_info.to_dict()["consecutive_skips"] == 0
        for a, b in zip(gan.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        opt.zero_grad()
        ref_opt.zero_grad()


def test_a_group_mapped_to_none_is_not_clipped_and_measure_all_reports_every_group():
    gan = Gan()
    clipper = gradclip.GlobalNorm(0.01)
    opt = gct.ClippedOptimizer(torch.optim.SGD(_gan_groups(gan), lr=0.1), {"G": None, "D": clipper}, measure="all")
    gan.loss(_batches(1, seed=3)[0][:, :4]).backward()
    g_grads = [p.grad.clone() for p in gan.G.parameters()]
    every = [p.grad.clone() for p in gan.parameters()]
    total = torch.nn.utils.get_total_norm(every)
    d_norm = torch.nn.utils.get_total_norm([p.grad for p in gan.D.parameters()])
    opt.step()
    for p, before in zip(gan.G.parameters(), g_grads):
        assert torch.equal(p.grad, before)  # G's gradients untouched
    d_after = torch.nn.utils.get_total_norm([p.grad for p in gan.D.parameters()])
    torch.testing.assert_close(d_after, torch.tensor(0.01), rtol=1e-4, atol=0)
    info = opt.last_info
    torch.testing.assert_close(info.norm, total, rtol=1e-5, atol=0)  # every group, before clipping
    g_norm = torch.nn.utils.get_total_norm(g_grads)
    torch.testing.assert_close(info.coef, torch.sqrt(g_norm**2 + d_after**2) / total, rtol=1e-4, atol=0)
    assert list(opt.last_infos) == ["D"]
    torch.testing.assert_close(opt.last_infos["D"].norm, d_norm, rtol=1e-5, atol=0)
    assert opt.clipper["G"] is None and opt.clipper["D"] is clipper and list(opt.clipper) == ["G", "D"]


def test_each_group_s_clipper_keeps_its_own_state():
    gan = Gan()
    g_clip, d_clip = gradclip.AutoClip(percentile=50.0), gradclip.AutoClip(percentile=50.0)
    opt = gct.ClippedOptimizer(torch.optim.SGD(_gan_groups(gan), lr=0.01), {0: g_clip, 1: d_clip})
    alone_g, alone_d = gradclip.AutoClip(percentile=50.0), gradclip.AutoClip(percentile=50.0)
    for z in _batches(4, seed=5):
        gan.loss(z[:, :4]).backward()
        # What each clipper would do on its group alone (on copies of the gradients).
        expect_g = alone_g.clip([p.grad.clone() for p in gan.G.parameters()])[1]
        expect_d = alone_d.clip([p.grad.clone() for p in gan.D.parameters()])[1]
        opt.step()
        for got, expected in ((opt.last_infos[0], expect_g), (opt.last_infos[1], expect_d)):
            torch.testing.assert_close(got.threshold, expected.threshold, rtol=1e-6, atol=0)
            torch.testing.assert_close(got.norm, expected.norm, rtol=1e-6, atol=0)
        opt.zero_grad()
    assert g_clip.state_dict()["state"] != d_clip.state_dict()["state"]


@pytest.mark.parametrize("optimizer", sorted(GAN_OPTIMIZERS))
def test_a_skip_asked_by_one_group_skips_the_whole_step(optimizer):
    gan = Gan()
    opt = gct.ClippedOptimizer(GAN_OPTIMIZERS[optimizer](_gan_groups(gan)),
                               {"G": gradclip.GlobalNorm(1.0), "D": gradclip.SkipAbove(1e-6)}, max_consecutive_skips=2)
    before = _params(gan)
    gan.loss(_batches(1)[0][:, :4]).backward()
    opt.step(loss=1.0)
    assert opt.last_info.to_dict()["skip"] and not opt.last_infos["G"].to_dict()["skip"]
    assert _unchanged(gan, before)  # neither group stepped
    opt.zero_grad()
    gan.loss(_batches(1)[0][:, :4]).backward()
    with pytest.raises(gradclip.DivergenceError, match="2 optimizer steps in a row"):
        opt.step(loss=2.0)
    assert _unchanged(gan, before)


def test_a_loss_signal_reaches_every_group_s_clipper():
    gan = Gan()
    g_rec, d_rec = LossRecorder(), LossRecorder()
    opt = gct.ClippedOptimizer(torch.optim.SGD(_gan_groups(gan), lr=0.1), {"G": g_rec, "D": d_rec})
    gan.loss(_batches(1)[0][:, :4]).backward()
    opt.step(loss=torch.tensor(2.5))
    assert g_rec.seen == d_rec.seen == [2.5]


def test_a_group_without_gradients_does_not_advance_its_clipper():
    gan = Gan()
    d_clip = gradclip.AutoClip(percentile=50.0)
    opt = gct.ClippedOptimizer(torch.optim.SGD(_gan_groups(gan), lr=0.1), {"G": gradclip.AutoClip(), "D": d_clip})
    for p in gan.D.parameters():
        p.requires_grad_(False)  # a frozen discriminator
    gan.loss(_batches(1)[0][:, :4]).backward()
    opt.step()
    assert list(opt.last_infos) == ["G"] and d_clip.state_dict()["state"] is None


def test_a_single_clipped_group_covering_every_parameter_folds():
    model, reference = _model(), _model()
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, fused=True),
                               {0: gradclip.GlobalNorm(0.5)}, fold=True)
    ref_opt = gct.ClippedOptimizer(torch.optim.Adam(reference.parameters(), lr=0.01, fused=True), gradclip.GlobalNorm(0.5))
    for x in _batches(3):
        model(x).pow(2).mean().mul(20).backward()
        reference(x).pow(2).mean().mul(20).backward()
        opt.step()
        ref_opt.step()
        assert opt.folded and list(opt.last_infos) == [0]
        torch.testing.assert_close(opt.last_info.norm, ref_opt.last_info.norm)
        opt.zero_grad()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


def test_fold_true_with_groups_clipped_apart_is_refused():
    gan = Gan()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"fold=True, but the clip cannot be folded: the parameter groups are clipped apart"):
        gct.ClippedOptimizer(torch.optim.Adam(_gan_groups(gan), fused=True),
                             {"G": gradclip.GlobalNorm(1.0), "D": None}, fold=True)


def _gan_run(make, steps, seed=5):
    gan = Gan()
    opt = make(gan)
    for z in _batches(steps, seed=seed):
        gan.loss(z[:, :4]).backward()
        opt.step()
        opt.zero_grad()
    return gan, opt


def _per_group(gan):
    return gct.ClippedOptimizer(torch.optim.Adam(_gan_groups(gan), lr=0.01),
                                {"G": gradclip.AutoClip(percentile=50.0), "D": gradclip.ZClip(), })


def test_every_group_s_clipper_state_round_trips_through_a_checkpoint():
    source_gan, source = _gan_run(_per_group, 4)
    saved = _save_and_load(source.state_dict())
    part = saved["gradclip"]
    assert part["clipper"] is None and list(part["clippers"]) == ["G", "D"]
    gan, opt = _gan_run(_per_group, 2, seed=9)
    gan.load_state_dict(source_gan.state_dict())
    opt.load_state_dict(saved)
    for key in ("G", "D"):
        assert _same(opt.clipper[key].state_dict(), source.clipper[key].state_dict())
    # ... and it continues exactly like the uninterrupted run.
    for model, o in ((source_gan, source), (gan, opt)):
        for z in _batches(2, seed=11):
            model.loss(z[:, :4]).backward()
            o.step()
            o.zero_grad()
    assert _same({k: opt.clipper[k].state_dict() for k in ("G", "D")}, {k: source.clipper[k].state_dict() for k in ("G", "D")})
    assert _same(_params(gan), _params(source_gan))


def _same(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _single(gan):
    return gct.ClippedOptimizer(torch.optim.Adam(_gan_groups(gan), lr=0.01), gradclip.AutoClip(percentile=50.0))


def _renamed(good):
    out = copy.deepcopy(good)
    out["gradclip"]["clippers"] = {0: out["gradclip"]["clippers"]["G"], "D": out["gradclip"]["clippers"]["D"]}
    return out


def _unclipped_d(good):
    out = copy.deepcopy(good)
    out["gradclip"]["clippers"]["D"] = None
    return out


def _d_of_another_kind(good):
    out = copy.deepcopy(good)
    out["gradclip"]["clippers"]["D"] = gradclip.GlobalNorm(1.0).state_dict()
    return out


BAD_GROUP_CHECKPOINTS = {
    "single_into_per_group": (lambda: _gan_run(_single, 2)[1].state_dict(), "written by a ClippedOptimizer with one clipper"),
    "other_keys": (lambda: _renamed(_gan_run(_per_group, 2)[1].state_dict()), r"the keys must match"),
    "clipped_then_not": (lambda: _unclipped_d(_gan_run(_per_group, 2)[1].state_dict()),
                         r"group 'D' is clipped by ZClip here but was not clipped"),
    "another_kind": (lambda: _d_of_another_kind(_gan_run(_per_group, 2)[1].state_dict()), r"belongs to clipper 'global_norm'"),
}


@pytest.mark.parametrize("case", sorted(BAD_GROUP_CHECKPOINTS))
def test_a_per_group_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(case):
    make, match = BAD_GROUP_CHECKPOINTS[case]
    bad = make()
    _, opt = _gan_run(_per_group, 3, seed=9)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(gradclip.StateError, match=match):
        opt.load_state_dict(bad)
    assert _same(copy.deepcopy(opt.state_dict()), before)


def test_a_per_group_checkpoint_does_not_load_into_a_single_clipper():
    _, per_group = _gan_run(_per_group, 2)
    _, single = _gan_run(_single, 2)
    before = copy.deepcopy(single.state_dict())
    with pytest.raises(gradclip.StateError, match=r"clips per parameter group \(\['D', 'G'\]\); this one has one clipper"):
        single.load_state_dict(per_group.state_dict())
    assert _same(copy.deepcopy(single.state_dict()), before)


def _reused():
    clipper = gradclip.GlobalNorm(1.0)
    return {"G": clipper, "D": clipper}


BAD_MAPPINGS = {
    "empty": (dict, r"the clipper mapping is empty"),
    "index_out_of_range": (lambda: {0: gradclip.GlobalNorm(1.0), 2: None}, r"index 2 is out of range; the optimizer has 2 group"),
    "negative_index": (lambda: {-1: gradclip.GlobalNorm(1.0), 0: None}, r"index -1 is out of range"),
    "unknown_name": (lambda: {"G": gradclip.GlobalNorm(1.0), "disc": None}, r"no parameter group is named 'disc'; .*\['G', 'D'\]"),
    "same_clipper_twice": (_reused, r"same GlobalNorm object is mapped to parameter groups 'G' and 'D'"),
    "float_key": (lambda: {0.0: gradclip.GlobalNorm(1.0)}, r"key must be .* got 0.0 of type float"),
    "bool_key": (lambda: {True: gradclip.GlobalNorm(1.0)}, r"got True of type bool"),
    "tuple_key": (lambda: {(0, 1): gradclip.GlobalNorm(1.0)}, r"got \(0, 1\) of type tuple"),
    "value_not_a_clipper": (lambda: {"G": torch.nn.utils.clip_grad_norm_, "D": None},
                            r"clipper for parameter group 'G' must be a gradclip clipper or None"),
    "value_a_number": (lambda: {"G": 1.0, "D": None}, r"must be a gradclip clipper or None \(not clipped\), got float"),
    "group_named_twice": (lambda: {0: gradclip.GlobalNorm(1.0), "G": None}, r"keys 0 and 'G' both name parameter group 0"),
    "group_left_out": (lambda: {"G": gradclip.GlobalNorm(1.0)}, r"names no clipper for parameter group\(s\) 1 \('D'\); .*or to None"),
    "every_group_none": (lambda: {"G": None, "D": None}, r"maps every parameter group to None"),
}


@pytest.mark.parametrize("case", sorted(BAD_MAPPINGS))
def test_a_bad_group_mapping_is_refused_and_changes_nothing(case):
    make, match = BAD_MAPPINGS[case]
    gan = Gan()
    inner = torch.optim.SGD(_gan_groups(gan), lr=0.1, momentum=0.9)
    gan.loss(_batches(1)[0][:, :4]).backward()
    inner.step()
    mapping = make()
    before = copy.deepcopy((inner.state_dict(), _params(gan), [p.grad for p in gan.parameters()]))
    clippers_before = [c.state_dict() for c in mapping.values() if isinstance(c, gradclip.Clipper)]
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        gct.ClippedOptimizer(inner, mapping)
    assert _same(copy.deepcopy((inner.state_dict(), _params(gan), [p.grad for p in gan.parameters()])), before)
    assert [c.state_dict() for c in mapping.values() if isinstance(c, gradclip.Clipper)] == clippers_before


def test_an_ambiguous_group_name_and_a_bad_measure_are_refused():
    gan = Gan()
    groups = _gan_groups(gan)
    groups[1]["name"] = "G"
    inner = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"parameter groups \[0, 1\] are all named 'G'; key them by index"):
        gct.ClippedOptimizer(inner, {"G": gradclip.GlobalNorm(1.0)})
    with pytest.raises(gradclip.InvalidArgumentError, match=r"measure must be one of \['clipped', 'all'\], got 'every'"):
        gct.ClippedOptimizer(inner, {0: gradclip.GlobalNorm(1.0), 1: None}, measure="every")


def test_add_param_group_asks_for_the_new_group_s_clipper():
    gan = Gan()
    extra = torch.nn.Linear(3, 3)
    opt = gct.ClippedOptimizer(torch.optim.SGD(_gan_groups(gan), lr=0.1), {"G": gradclip.GlobalNorm(1.0), "D": None})
    taken = opt.clipper["G"]
    for kwargs, match in (({}, r"say how the new group is clipped"),
                          ({"clipper": taken}, r"same GlobalNorm object is mapped to parameter groups 'G' and 'head'"),
                          ({"clipper": "global_norm"}, r"must be a gradclip clipper or None")):
        with pytest.raises(gradclip.InvalidArgumentError, match=match):
            opt.add_param_group({"params": list(extra.parameters()), "name": "head"}, **kwargs)
        assert len(opt.param_groups) == 2 and list(opt.clipper) == ["G", "D"]
    opt.add_param_group({"params": list(extra.parameters()), "name": "head"}, clipper=gradclip.GlobalNorm(0.01))
    assert list(opt.clipper) == ["G", "D", "head"]
    (gan.loss(_batches(1)[0][:, :4]) + extra(torch.ones(2, 3)).pow(2).sum() * 100).backward()
    opt.step()
    torch.testing.assert_close(torch.nn.utils.get_total_norm([p.grad for p in extra.parameters()]), torch.tensor(0.01),
                               rtol=1e-4, atol=0)
    # With one clipper for every group, clipper= is refused.
    single = gct.ClippedOptimizer(torch.optim.SGD(gan.G.parameters(), lr=0.1), gradclip.GlobalNorm(1.0))
    with pytest.raises(gradclip.InvalidArgumentError, match=r"only with per-group clipping"):
        single.add_param_group({"params": list(gan.D.parameters())}, clipper=None)
    assert len(single.param_groups) == 1


def test_a_group_appended_behind_its_back_is_refused_at_the_step_and_changes_nothing():
    gan = Gan()
    opt = gct.ClippedOptimizer(torch.optim.SGD([{"params": list(gan.G.parameters())}], lr=0.1), {0: gradclip.GlobalNorm(0.1)})
    opt.optimizer.add_param_group({"params": list(gan.D.parameters())})  # not through ClippedOptimizer
    gan.loss(_batches(1)[0][:, :4]).backward()
    before = copy.deepcopy((_params(gan), [p.grad for p in gan.parameters()]))
    with pytest.raises(gradclip.StateError, match=r"has 2 parameter groups but clippers were given for 1"):
        opt.step()
    assert _same(copy.deepcopy((_params(gan), [p.grad for p in gan.parameters()])), before)
    assert opt.will_step
