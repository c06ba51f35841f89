"""``gradclip.torch.ClippedOptimizer``: unscale once, clip once per optimizer step, skip, step.

Compared step for step with the loop a user would write by hand (GradScaler.unscale_,
clip in place, GradScaler.step / optimizer.step), for every torch optimizer; accumulation,
skipping, checkpoints, closures, LR schedulers, the monitor hook and bad arguments.
"""

from __future__ import annotations

import copy
import io
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
    """An adaptive clipper with device state: threshold = 1.5 x the EMA of past norms."""

    name = "test_ema_global_clip"
    state_type = EmaState
    state_dtypes = {"ema": "float32", "count": "float32"}

    def init_state(self, ops, grads):
        return EmaState(ops.scalar(0.0), ops.scalar(0.0))

    def decide(self, ops, measured, state, signals=None):
        norm = measured.norm
        threshold = ops.where(state.count > 0, 1.5 * state.ema, norm)
        coef = ops.where(norm > threshold, threshold / (norm + 1e-6), ops.scalar(1.0))
        ema = ops.where(state.count > 0, 0.9 * state.ema + 0.1 * norm, norm)
        return Decision(coef, EmaState(ema, state.count + 1.0), make_info(ops, norm, threshold, coef, coef < 1, ops.isfinite(norm)))


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _batches(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 5, generator=generator) * (1.0 + 3.0 * (i % 2)) for i in range(n)]


def _loss(model, x):
    return model(x).pow(2).mean() * 20


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, foreach=True),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1),
    "adadelta": lambda p: torch.optim.Adadelta(p),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
}


def _by_hand(optimizer_name, max_norm, steps, scaler=False):
    model = _model()
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    for x in _batches(steps):
        loss = _loss(model, x)
        if grad_scaler:
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            optimizer.step()
        optimizer.zero_grad()
    return _params(model)


def _with_clipped_optimizer(optimizer_name, clipper, steps, scaler=False, **kwargs):
    model = _model()
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    opt = gct.ClippedOptimizer(OPTIMIZERS[optimizer_name](model.parameters()), clipper, scaler=grad_scaler, **kwargs)
    for x in _batches(steps):
        loss = _loss(model, x)
        (grad_scaler.scale(loss) if grad_scaler else loss).backward()
        opt.step()
        if grad_scaler:
            grad_scaler.update()
        opt.zero_grad()
    return _params(model), opt


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_matches_the_hand_written_loop_for_every_torch_optimizer(optimizer):
    ours, opt = _with_clipped_optimizer(optimizer, gradclip.GlobalNorm(0.5), steps=4)
    _assert_same(ours, _by_hand(optimizer, 0.5, steps=4))
    assert opt.stepped and not opt.folded
    assert opt.last_info.to_dict()["clipped"]


@pytest.mark.parametrize("optimizer", ["sgd_momentum_nesterov", "adam", "rmsprop"])
def test_matches_the_hand_written_loop_with_a_grad_scaler(optimizer):
    ours, _ = _with_clipped_optimizer(optimizer, gradclip.GlobalNorm(0.5), steps=4, scaler=True)
    _assert_same(ours, _by_hand(optimizer, 0.5, steps=4, scaler=True))


def test_unscales_exactly_once_even_when_the_user_already_did():
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = gct.ClippedOptimizer(optimizer, gradclip.GlobalNorm(0.5), scaler=scaler)
    for x in _batches(4):
        scaler.scale(_loss(model, x)).backward()
        scaler.unscale_(optimizer)  # to look at the gradients: step() must not unscale again
        opt.step()
        scaler.update()
        opt.zero_grad()
    _assert_same(_params(model), _by_hand("adam", 0.5, steps=4, scaler=True))


def test_scaler_overflow_skips_the_step_and_the_scale_backs_off():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = gct.ClippedOptimizer(optimizer, gradclip.GlobalNorm(0.5), scaler=scaler)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    model[0].weight.grad[0, 0] = math.inf
    before = _params(model)
    opt.step()
    scaler.update()
    _assert_same(_params(model), before)
    assert scaler.get_scale() == 128.0
    assert not opt.last_info.to_dict()["finite"]


@pytest.mark.parametrize("optimizer", ["sgd_momentum_nesterov", "adam"])
def test_info_skip_skips_the_step(optimizer):
    model = _model()
    inner = OPTIMIZERS[optimizer](model.parameters())
    opt = gct.ClippedOptimizer(inner, gradclip.GlobalNorm(0.5, nonfinite="skip"))
    x1, x2 = _batches(2)
    _loss(model, x1).backward()
    opt.step()
    opt.zero_grad()
    state_before = {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in inner.state.items()}
    params_before = _params(model)
    _loss(model, x2).backward()
    model[2].bias.grad[0] = math.nan
    opt.step()
    assert opt.stepped and opt.last_info.to_dict()["skip"]
    _assert_same(_params(model), params_before)
    for key, state in inner.state.items():
        for name, value in state.items():
            if torch.is_tensor(value):
                assert torch.equal(value, state_before[key][name])


def test_accumulation_clips_once_per_optimizer_step():
    """k micro-batches accumulate, then one clip (of the accumulated gradient) and one step."""
    calls = []

    class Counting(gradclip.GlobalNorm):
        def decide(self, ops, measured, state, signals=None):
            calls.append(1)
            return super().decide(ops, measured, state)

    k = 3
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Counting(0.5), accumulation_steps=k)
    micro = _batches(2 * k)
    stepped = []
    for i, x in enumerate(micro):
        assert opt.will_step == ((i + 1) % k == 0)
        (_loss(model, x) / k).backward()
        opt.step()
        stepped.append(opt.stepped)
        opt.zero_grad()
    assert len(calls) == 2
    assert stepped == [False, False, True, False, False, True]

    # The same by hand: accumulate, clip the sum once, step.
    reference = _model()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    for i, x in enumerate(micro):
        (_loss(reference, x) / k).backward()
        if (i + 1) % k == 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad()
    _assert_same(_params(model), _params(reference))


def test_state_dict_holds_optimizer_and_clipper_state_and_resumes_exactly():
    batches = _batches(8)

    def train(opt, model, xs):
        for x in xs:
            _loss(model, x).backward()
            opt.step()
            opt.zero_grad()

    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), EmaGlobalClip())
    train(opt, model, batches)
    uninterrupted = _params(model)

    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), EmaGlobalClip())
    train(opt, model, batches[:4])
    state = opt.state_dict()
    # torch's layout at the top level, gradclip's part under one more key
    assert set(state) == {"state", "param_groups", "gradclip"}
    assert state["gradclip"]["clipper"]["state"] is not None and state["state"]
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    resumed = _model(seed=123)
    resumed.load_state_dict(loaded["model"])
    opt2 = gct.ClippedOptimizer(torch.optim.Adam(resumed.parameters(), lr=0.01), EmaGlobalClip())
    opt2.load_state_dict(loaded["opt"])
    train(opt2, resumed, batches[4:])
    _assert_same(_params(resumed), uninterrupted)


def test_load_state_dict_rejects_bad_input_and_changes_nothing():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), gradclip.GlobalNorm(1.0))
    _loss(model, _batches(1)[0]).backward()
    opt.step()
    good = copy.deepcopy(opt.state_dict())  # torch's state_dict shares the state tensors
    with pytest.raises(gradclip.StateError, match="expected a torch optimizer state_dict"):
        opt.load_state_dict({"model": {}})
    wrong_clipper = dict(good, gradclip=dict(good["gradclip"], clipper=gradclip.Norm(1.0).state_dict()))
    before = opt.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    opt.optimizer.state[next(iter(model.parameters()))]["exp_avg"].zero_()
    with pytest.raises(gradclip.StateError):
        opt.load_state_dict(wrong_clipper)
    # The optimizer was not touched by the failed load.
    assert torch.count_nonzero(opt.optimizer.state_dict()["state"][0]["exp_avg"]) == 0
    opt.load_state_dict(good)
    torch.testing.assert_close(opt.optimizer.state_dict()["state"][0]["exp_avg"], before)


def test_lr_schedulers_accept_it_and_it_forwards_the_optimizer_view():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), gradclip.GlobalNorm(1.0))
    assert isinstance(opt, torch.optim.Optimizer)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "scheduler.step() before optimizer.step()" warning
        for x in _batches(2):
            _loss(model, x).backward()
            opt.step()
            opt.zero_grad()
            scheduler.step()
    assert opt.param_groups[0]["lr"] == 0.25
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert "ClippedOptimizer(" in repr(opt)


def test_closure_clips_every_evaluation_and_matches_the_plain_step():
    batches = _batches(3)
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), gradclip.GlobalNorm(0.5))
    for x in batches:
        def closure(x=x):
            opt.zero_grad()
            loss = _loss(model, x)
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert torch.is_tensor(loss)
    plain = _model()
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for x in batches:
        _loss(plain, x).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        optimizer.step()
        optimizer.zero_grad()
    _assert_same(_params(model), _params(plain))


def test_lbfgs_runs_with_a_closure_and_sees_clipped_gradients():
    model = _model()
    seen = []
    inner = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)
    opt = gct.ClippedOptimizer(inner, gradclip.GlobalNorm(0.1))
    x = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        return loss

    original = opt._clipping_closure

    def spying(user_closure):
        clipped = original(user_closure)

        def run():
            loss = clipped()
            seen.append(float(gradclip.global_norm([p.grad for p in model.parameters()])))
            return loss

        return run

    opt._clipping_closure = spying
    for _ in range(2):
        opt.step(closure)
    assert len(seen) >= 2
    assert max(seen) <= 0.1 + 1e-6
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_closure_with_a_grad_scaler_is_refused():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0),
                               scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(gradclip.InvalidArgumentError, match="closures"):
        opt.step(lambda: _loss(model, _batches(1)[0]))


@pytest.mark.parametrize("fused", [False, True])
def test_monitor_is_observed_once_per_optimizer_step(fused):
    model = _model()
    monitor = gradclip.Monitor(model, every=2)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, fused=fused), gradclip.GlobalNorm(0.5),
                               monitor=monitor, accumulation_steps=2)
    for x in _batches(6):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    summary = monitor.summary()
    assert summary["steps"] == 3
    assert set(summary["layers"]) == {n for n, _ in model.named_parameters()}
    assert opt.folded == fused


@pytest.mark.parametrize("fold", [False, True])
def test_warns_when_there_are_no_gradients(fold):
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), fused=True), gradclip.GlobalNorm(1.0), fold=fold)
    with pytest.warns(RuntimeWarning, match="before backward"):
        opt.step()


def test_bad_arguments_are_rejected_with_clear_errors():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    clipper = gradclip.GlobalNorm(1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="optimizer must be a torch.optim.Optimizer"):
        gct.ClippedOptimizer(object(), clipper)
    with pytest.raises(gradclip.InvalidArgumentError, match="clipper must be a gradclip clipper"):
        gct.ClippedOptimizer(sgd, torch.nn.utils.clip_grad_norm_)
    with pytest.raises(gradclip.InvalidArgumentError, match="accumulation_steps must be an integer >= 1, got 0"):
        gct.ClippedOptimizer(sgd, clipper, accumulation_steps=0)
    with pytest.raises(gradclip.InvalidArgumentError, match="fold must be None, True or False"):
        gct.ClippedOptimizer(sgd, clipper, fold="yes")
    with pytest.raises(gradclip.InvalidArgumentError, match="scaler must be"):
        gct.ClippedOptimizer(sgd, clipper, scaler=1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="monitor must have an observe"):
        gct.ClippedOptimizer(sgd, clipper, monitor=object())
    with pytest.raises(gradclip.InvalidArgumentError, match="already a ClippedOptimizer"):
        gct.ClippedOptimizer(gct.ClippedOptimizer(sgd, clipper), clipper)


def test_calling_step_twice_without_scaler_update_is_a_clear_error():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    opt = gct.ClippedOptimizer(optimizer, gradclip.GlobalNorm(1.0), scaler=scaler)
    scaler.scale(_loss(model, _batches(1)[0])).backward()
    opt.step()
    with pytest.raises(gradclip.StateError, match="scaler.update"):
        opt.step()


def _host_reads_of(fn):
    with record_host_reads() as calls:
        fn()
    return calls


@pytest.mark.parametrize("optimizer", ["sgd_momentum_nesterov", "adam", "rmsprop"])
def test_clipping_adds_no_host_read_to_the_optimizer_step(optimizer):
    """Clippers that never skip add nothing to whatever the torch optimizer reads itself."""
    reads = {}
    for wrapped in (False, True):
        model = _model()
        inner = OPTIMIZERS[optimizer](model.parameters())
        opt = gct.ClippedOptimizer(inner, gradclip.GlobalNorm(0.5)) if wrapped else inner
        for x in _batches(2):
            _loss(model, x).backward()
            reads[wrapped] = _host_reads_of(opt.step)
            opt.zero_grad()
    assert reads[True] == reads[False]


def test_a_clipper_that_can_skip_reads_one_bool_with_a_non_fused_optimizer():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(0.5, nonfinite="skip"))
    _loss(model, _batches(1)[0]).backward()
    assert _host_reads_of(opt.step) == ["__bool__"]


def _same(a, b):
    """Deep equality of state dicts holding tensors (bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _everything(opt, model):
    """What a failed call must leave alone: parameters, gradients, optimizer and clipper state, counters."""
    return copy.deepcopy({
        "params": _params(model),
        "grads": [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        "optimizer": opt.optimizer.state_dict(),
        "clipper": opt.clipper.state_dict(),
        "counters": (opt.state_dict()["gradclip"]["micro_step"], opt.stepped, opt.folded, opt.will_step),
    })


@pytest.mark.parametrize("fused", [False, True], ids=["clip_in_place", "folded"])
def test_a_step_refused_for_a_missing_scaler_update_changes_nothing(fused):
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01, fused=fused), EmaGlobalClip(),
                               scaler=scaler, accumulation_steps=2)
    batches = _batches(4)
    for x in batches[:2]:
        scaler.scale(_loss(model, x) / 2).backward()
        opt.step()
        opt.zero_grad()
    assert opt.stepped and opt.folded == fused  # ... and the user forgets scaler.update()
    scaler.scale(_loss(model, batches[2]) / 2).backward()
    opt.step()  # micro-batch 1 of 2: nothing to check yet
    assert not opt.stepped and opt.will_step
    scaler.scale(_loss(model, batches[3]) / 2).backward()
    before, scale = _everything(opt, model), scaler.get_scale()
    with pytest.raises(gradclip.StateError, match=r"scaler.update\(\).*nothing was changed"):
        opt.step()
    assert _same(_everything(opt, model), before)  # gradients still scaled, counters as they were
    assert scaler.get_scale() == scale
    scaler.update()
    opt.step()  # the same call again, now that the scaler is ready: it steps
    assert opt.stepped and not _same(_params(model), before["params"])
    assert _same(opt.clipper.state_dict()["state"]["count"], before["clipper"]["state"]["count"] + 1.0)


def test_a_step_the_clipper_refuses_leaves_the_counters_as_they_were():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                               gradclip.GlobalNorm(0.5, nonfinite="raise"), accumulation_steps=2)
    x1, x2 = _batches(2)
    _loss(model, x1).backward()
    opt.step()
    _loss(model, x2).backward()
    model[2].bias.grad[0] = math.nan
    before = _everything(opt, model)
    with pytest.raises(gradclip.NonFiniteError):
        opt.step()
    after = _everything(opt, model)
    assert _same([g.nan_to_num() for g in after["grads"]], [g.nan_to_num() for g in before["grads"]])
    after["grads"] = before["grads"] = None
    assert _same(after, before)
    model[2].bias.grad[0] = 0.0
    opt.step()
    assert opt.stepped and opt.will_step is False


def test_catching_a_refused_step_and_carrying_on_discards_its_gradients():
    """The loop of docs/reliability.md with accumulation: catch NonFiniteError, zero_grad(),
    continue. zero_grad() after a refused boundary step clears the poisoned accumulation, so
    one bad micro-batch costs one optimizer step, not every later one."""
    model = _model()
    reference = _model()
    reference.load_state_dict(model.state_dict())
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                               gradclip.GlobalNorm(0.5, nonfinite="raise"), accumulation_steps=2)
    ref_opt = gct.ClippedOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), gradclip.GlobalNorm(0.5),
                                   accumulation_steps=2)
    batches = _batches(8)
    raised = []
    for index, x in enumerate(batches):
        loss = _loss(model, x) * (math.nan if index == 3 else 1.0)  # the second step's last micro-batch
        loss.backward()
        try:
            opt.step()
        except gradclip.NonFiniteError:
            raised.append(index)
            assert not opt.stepped and opt.will_step  # nothing stepped, the counters as they were
        opt.zero_grad()
        if index not in (2, 3):  # the reference skips the poisoned accumulation altogether
            _loss(reference, x).backward()
            ref_opt.step()
            ref_opt.zero_grad()
    assert raised == [3]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def _trained_with_accumulation(seed=0, steps=5):
    model = _model(seed)
    opt = gct.ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), EmaGlobalClip(), accumulation_steps=2)
    for x in _batches(steps, seed=seed + 1):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _with(state, **changes):
    out = dict(state)
    for key, value in changes.items():
        if value is _DROP:
            del out[key]
        else:
            out[key] = value
    return out


def _part(state, **changes):
    """The checkpoint with gradclip's part changed."""
    return _with(state, gradclip=_with(state["gradclip"], **changes))


_DROP = object()
BAD_CHECKPOINTS = {
    "not_a_mapping": (lambda good: [good], "expected a torch optimizer state_dict"),
    "no_param_groups": (lambda good: _with(good, param_groups=_DROP), "expected a torch optimizer state_dict"),
    "part_not_a_mapping": (lambda good: _with(good, gradclip=[1]), r"'gradclip' entry must be the mapping"),
    "format": (lambda good: _part(good, format="gradclip"), "format 'gradclip.ClippedOptimizer'"),
    "extra_key": (lambda good: _part(good, scaler={}), r"unexpected: 'scaler'; missing: none"),
    "missing_clipper": (lambda good: _part(good, clipper=_DROP), r"missing: clipper"),
    "missing_micro_step": (lambda good: _part(good, micro_step=_DROP), r"missing: micro_step"),
    "missing_version": (lambda good: _part(good, version=_DROP), r"missing: version"),
    "version_true": (lambda good: _part(good, version=True), r"version True of type bool .*expected the int 2"),
    "version_float": (lambda good: _part(good, version=2.0), r"version 2.0 of type float"),
    "version_3": (lambda good: _part(good, version=3), r"version 3 of type int"),
    "version_str": (lambda good: _part(good, version="2"), r"version '2' of type str"),
    "micro_step_bool": (lambda good: _part(good, micro_step=True), r"micro_step must be an int in \[0, 2\).*got True"),
    "micro_step_negative": (lambda good: _part(good, micro_step=-1), r"micro_step .* got -1"),
    "micro_step_too_large": (lambda good: _part(good, micro_step=2), r"micro_step .* got 2"),
    "micro_step_float": (lambda good: _part(good, micro_step=1.0), r"micro_step .* got 1.0 of type float"),
    "optimizer_of_another_model": (
        lambda good: _with(torch.optim.Adam(torch.nn.Linear(2, 2).parameters()).state_dict(), gradclip=good["gradclip"]),
        r"optimizer's part does not fit Adam: it has parameter groups of sizes \[2\], this optimizer \[4\]",
    ),
    "optimizer_groups_not_a_list": (lambda good: _with(good, param_groups=3), r"parameter groups of sizes None"),
    "clipper_of_another_kind": (lambda good: _part(good, clipper=gradclip.GlobalNorm(1.0).state_dict()),
                                r"belongs to clipper 'global_norm'"),
    "clipper_not_a_mapping": (lambda good: _part(good, clipper=None), r"expected a mapping"),
    # the layout of gradclip before this format (version 1) still loads, checked as strictly
    "v1_optimizer_not_a_mapping": (lambda good: _v1(good, optimizer=[1]), r"'optimizer' must be a torch optimizer state_dict"),
    "v1_optimizer_without_param_groups": (lambda good: _v1(good, optimizer={"state": {}}),
                                          r"'optimizer' must be .* got a mapping with keys \['state'\]"),
    "v1_version_2": (lambda good: _v1(good, version=2), r"version 2 of type int; expected the int 1"),
    "v1_extra_key": (lambda good: _v1(good, scaler={}), r"unexpected: 'scaler'; missing: none"),
}


def _v1(good, **changes):
    """``good`` in the layout gradclip wrote before (version 1), with ``changes``."""
    optimizer = {k: v for k, v in good.items() if k != "gradclip"}
    old = {"format": "gradclip.ClippedOptimizer", "version": 1, "optimizer": optimizer,
           "clipper": good["gradclip"]["clipper"], "micro_step": good["gradclip"]["micro_step"]}
    return _with(old, **changes)


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_load_state_dict_refuses_a_bad_checkpoint_with_a_state_error_and_changes_nothing(case):
    _, source = _trained_with_accumulation(seed=0, steps=3)
    good = copy.deepcopy(source.state_dict())
    assert good["gradclip"]["micro_step"] == 1 and good["gradclip"]["clipper"]["state"] is not None
    model, opt = _trained_with_accumulation(seed=5, steps=4)  # a different state, micro_step 0
    before = _everything(opt, model)
    make, match = BAD_CHECKPOINTS[case]
    with pytest.raises(gradclip.StateError, match=match):
        opt.load_state_dict(make(good))
    assert _same(_everything(opt, model), before)
    opt.load_state_dict(good)  # the good one still loads, completely
    assert _same(copy.deepcopy(opt.state_dict()), good)


def test_load_state_dict_puts_the_clipper_back_when_the_optimizer_refuses_its_part():
    """Everything of ours and the clipper's passes; a load hook on the optimizer refuses (after
    the clipper loaded): the clipper's previous state goes back."""
    _, source = _trained_with_accumulation(seed=0, steps=3)
    good = copy.deepcopy(source.state_dict())
    model, opt = _trained_with_accumulation(seed=5, steps=4)
    before = _everything(opt, model)

    def refuse(optimizer, state_dict):
        raise RuntimeError("refused by a load hook")

    handle = opt.optimizer.register_load_state_dict_pre_hook(refuse)
    with pytest.raises(gradclip.StateError, match=r"does not fit Adam: refused by a load hook"):
        opt.load_state_dict(good)
    assert _same(_everything(opt, model), before)
    handle.remove()
    opt.load_state_dict(good)
    assert _same(copy.deepcopy(opt.state_dict()), good)


# -- a drop-in torch.optim.Optimizer checkpoint (nanoGPT's save and resume) -----------------------


def _nanogpt_run(steps, make_opt, checkpoint=None, resume_with=None):
    """nanoGPT's train.py in small: AdamW, a warmup+cosine LR set by hand every iteration (its
    get_lr), and a scheduler beside it; ``checkpoint`` saves {model, optimizer, scheduler,
    iter_num} at that iteration through torch.save/torch.load(weights_only=True), and
    ``resume_with`` rebuilds everything from it with that optimizer factory and carries on."""

    def lr_at(it):
        return 0.01 * min(1.0, (it + 1) / 3) * (0.5 + 0.5 * math.cos(math.pi * it / steps))

    batches = _batches(steps, seed=7)
    model = _model()
    opt = make_opt(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - 0.02 * it)
    saved = None
    for it in range(steps):
        if checkpoint is not None and it == checkpoint:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": scheduler.state_dict(), "iter_num": it}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            if resume_with is not None:
                model = _model(seed=99)
                model.load_state_dict(saved["model"])
                opt = resume_with(model)
                opt.load_state_dict(saved["optimizer"])
                scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0 - 0.02 * it)
                scheduler.load_state_dict(saved["scheduler"])
        for group in opt.param_groups:
            group["lr"] = lr_at(it) * scheduler.get_last_lr()[0] / 0.01
        _loss(model, batches[it]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler.step()
    return model, opt, saved


def _clipped(clipper_factory=EmaGlobalClip):
    return lambda model: gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), clipper_factory())


def test_nanogpt_resume_from_a_clipped_optimizer_checkpoint_continues_exactly():
    uninterrupted, _, _ = _nanogpt_run(8, _clipped())
    resumed, opt, saved = _nanogpt_run(8, _clipped(), checkpoint=4, resume_with=_clipped())
    _assert_same(_params(resumed), _params(uninterrupted))
    assert saved["optimizer"]["gradclip"]["clipper"]["state"]["count"] == 4.0  # the EMA's history came along
    assert opt.clipper.state_dict()["state"]["count"] == 8.0


def test_a_plain_optimizer_loads_a_clipped_optimizer_checkpoint():
    """Switching clipping off on resume: the optimizer's moments carry over, gradclip's key is
    ignored by torch (it reads state and param_groups only)."""
    _, _, saved = _nanogpt_run(6, _clipped(), checkpoint=3)
    model = _model()
    plain = torch.optim.AdamW(model.parameters(), lr=0.01)
    plain.load_state_dict(saved["optimizer"])
    reference = torch.optim.AdamW(_model().parameters(), lr=0.01)
    reference.load_state_dict({k: v for k, v in saved["optimizer"].items() if k != "gradclip"})
    assert _same(plain.state_dict(), reference.state_dict())
    assert plain.state_dict()["state"][0]["step"] == 3.0


def test_a_clipped_optimizer_loads_a_plain_checkpoint_with_a_fresh_clipper_and_a_warning():
    """Switching clipping on on resume (the issue: a bare KeyError: 'param_groups' before)."""
    plain = lambda model: torch.optim.AdamW(model.parameters(), lr=0.01)  # noqa: E731
    _, _, saved = _nanogpt_run(6, plain, checkpoint=3)
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), EmaGlobalClip(), accumulation_steps=2)
    opt.clipper.load_state_dict(_trained_with_accumulation()[1].clipper.state_dict())  # some history to forget
    with pytest.warns(UserWarning, match=r"plain torch optimizer state_dict.*EmaGlobalClip starts fresh"):
        opt.load_state_dict(saved["optimizer"])
    assert _same(opt.optimizer.state_dict(), saved["optimizer"])
    assert opt.clipper.state_dict()["state"] is None and opt.state_dict()["gradclip"]["micro_step"] == 0
    # ... and training resumes from it as a new ClippedOptimizer whose inner AdamW loaded the
    # checkpoint itself would: the same moments, a clipper without history.
    with pytest.warns(UserWarning, match="starts fresh"):
        resumed, _, _ = _nanogpt_run(6, plain, checkpoint=3, resume_with=_clipped())
    by_hand, _, _ = _nanogpt_run(6, plain, checkpoint=3, resume_with=_InnerLoads.build)
    _assert_same(_params(resumed), _params(by_hand))


class _InnerLoads(gct.ClippedOptimizer):
    """A ClippedOptimizer whose checkpoint goes to the inner optimizer alone (the reference)."""

    @classmethod
    def build(cls, model):
        return cls(torch.optim.AdamW(model.parameters(), lr=0.01), EmaGlobalClip())

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)


def test_a_version_1_checkpoint_of_an_older_gradclip_still_loads():
    _, source = _trained_with_accumulation(seed=0, steps=3)
    good = copy.deepcopy(source.state_dict())
    model, opt = _trained_with_accumulation(seed=5, steps=4)
    opt.load_state_dict(_v1(good))
    assert _same(copy.deepcopy(opt.state_dict()), good)


def test_lr_scheduler_state_round_trips_beside_it():
    model = _model()
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), EmaGlobalClip())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for x in _batches(3):
        _loss(model, x).backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
    saved = copy.deepcopy({"opt": opt.state_dict(), "sched": scheduler.state_dict()})
    model2 = _model()
    opt2 = gct.ClippedOptimizer(torch.optim.SGD(model2.parameters(), lr=1.0), EmaGlobalClip())
    scheduler2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    opt2.load_state_dict(saved["opt"])
    scheduler2.load_state_dict(saved["sched"])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert _same(opt2.state_dict(), opt.state_dict())


# -- GradScaler.update(): after every optimizer step, gated on opt.stepped ------------------------


@pytest.mark.parametrize("accumulation_steps", [1, 3])
def test_scaler_update_after_the_steps_that_stepped_is_the_one_loop(accumulation_steps):
    """The loop of the README and of the module docstring: ``if opt.stepped: scaler.update()``.
    With accumulation_steps=1 every call steps, so it is every iteration; with accumulation the
    calls in between step nothing, and GradScaler.update() refuses to run without a step."""
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), gradclip.GlobalNorm(1.0),
                               scaler=scaler, accumulation_steps=accumulation_steps)
    updates = 0
    for x in _batches(6):
        scaler.scale(_loss(model, x) / accumulation_steps).backward()
        opt.step()
        if opt.stepped:
            scaler.update()
            updates += 1
        opt.zero_grad()
    assert updates == 6 // accumulation_steps
    assert opt.optimizer.state_dict()["state"][0]["step"] == 6 // accumulation_steps
    if accumulation_steps > 1:  # why the gate: an update without a step is torch's error
        scaler.scale(_loss(model, _batches(1)[0])).backward()
        opt.step()
        assert not opt.stepped
        with pytest.raises(AssertionError, match="No inf checks were recorded"):
            scaler.update()
