"""ClippedOptimizer with a GradScaler on the paths torch's own AMP recipes take, its Monitor's
update records, and the skip-streak bound's warning.

Found by trying the wrapper as a new user would:

* ``torch.compile(opt.step)`` with a fused optimizer and a GradScaler applied neither the clip
  coefficient nor a skip: ``GradScaler.step`` hands a fused optimizer its ``grad_scale`` and
  ``found_inf`` as attribute writes, which dynamo drops inside a trace.
* ``scaler.unscale_(opt)`` (torch's recipe for inspecting gradients before the step) and
  ``scaler.step(opt)`` (code kept from before the wrapper), with ``opt`` the wrapper, unscaled the
  gradients twice: the scaler keeps its record by ``id(optimizer)``, and the wrapper asked about
  the optimizer inside it.
* ``Monitor(updates=True)`` recorded no update norms under ClippedOptimizer.
* ``max_consecutive_skips`` with a clipper that never skips did nothing, silently.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")

import gradclip
import gradclip.torch as gct
from gradclip.monitor import JsonlWriter

GRADIENT = torch.tensor([3.0, 4.0, 0.0])  # norm 5


def _wrapped(clipper, fused: bool, scale: float = 256.0):
    param = torch.nn.Parameter(torch.zeros(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    opt = gct.ClippedOptimizer(torch.optim.SGD([param], lr=1.0, fused=fused), clipper, scaler=scaler)
    return param, scaler, opt


def _backward(param, scaler, gradient=GRADIENT):
    scaler.scale((param * gradient).sum()).backward()


# -- compiled step, fused optimizer, GradScaler --------------------------------------------------
@pytest.mark.parametrize("fused", [True, False], ids=["fused_folded", "for_loop"])
def test_a_compiled_step_through_a_scaler_applies_the_clip(fused):
    torch._dynamo.reset()
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(1.0), fused)
    step = torch.compile(opt.step)
    for _ in range(3):
        before = param.detach().clone()
        _backward(param, scaler)
        step()
        scaler.update()
        assert opt.folded is fused  # the fused step took the coefficient: no pass of its own
        opt.zero_grad()
        # Unscaled (by 256) and clipped to norm 1: the update is the unit gradient.
        torch.testing.assert_close(before - param.detach(), torch.tensor([0.6, 0.8, 0.0]))


def test_a_compiled_step_through_a_scaler_honours_a_skip():
    torch._dynamo.reset()
    param, scaler, opt = _wrapped(gradclip.SkipAbove(max_norm=1.0), fused=True)
    step = torch.compile(opt.step)
    for _ in range(2):
        _backward(param, scaler)
        step()
        scaler.update()
        opt.zero_grad()
        assert bool(opt.last_info.skip)
        assert torch.equal(param.detach(), torch.zeros(3))


def test_a_compiled_step_through_a_scaler_skips_an_overflow():
    torch._dynamo.reset()
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(1.0), fused=True)
    step = torch.compile(opt.step)
    _backward(param, scaler, torch.tensor([3.0, float("inf"), 0.0]))
    step()
    scaler.update()
    assert torch.equal(param.detach(), torch.zeros(3))  # the scaler found the inf: no update
    assert scaler.get_scale() == 128.0  # and backed off


# -- scaler.unscale_(wrapper) and scaler.step(wrapper): one unscale ------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["for_loop", "fused"])
def test_unscaling_through_the_wrapper_unscales_once(fused):
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(100.0), fused, scale=1024.0)
    _backward(param, scaler, torch.tensor([1.0, 2.0, 3.0]))
    scaler.unscale_(opt)  # torch's recipe, to look at the true gradients before the step
    torch.testing.assert_close(param.grad, torch.tensor([1.0, 2.0, 3.0]))
    opt.step()
    scaler.update()
    torch.testing.assert_close(-param.detach(), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(opt.last_info.norm, torch.tensor(14.0).sqrt())
    # The next iteration starts clean: the shared record went with update().
    opt.zero_grad()
    _backward(param, scaler, torch.tensor([1.0, 2.0, 3.0]))
    opt.step()
    scaler.update()
    torch.testing.assert_close(-param.detach(), torch.tensor([2.0, 4.0, 6.0]))


@pytest.mark.parametrize("fused", [False, True], ids=["for_loop", "fused"])
def test_unscaling_through_the_wrapper_still_skips_an_overflow(fused):
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(1.0), fused, scale=1024.0)
    _backward(param, scaler, torch.tensor([1.0, float("inf"), 3.0]))
    scaler.unscale_(opt)
    opt.step()
    scaler.update()
    assert torch.equal(param.detach(), torch.zeros(3))
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("fused", [False, True], ids=["for_loop", "fused"])
def test_scaler_step_of_the_wrapper_unscales_once(fused):
    # Code migrated from a plain optimizer keeps scaler.step(optimizer).
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(1.0), fused, scale=1024.0)
    _backward(param, scaler, torch.tensor([3.0, 4.0, 0.0]))
    scaler.step(opt)
    scaler.update()
    torch.testing.assert_close(-param.detach(), torch.tensor([0.6, 0.8, 0.0]))
    torch.testing.assert_close(opt.last_info.norm, torch.tensor(5.0))


def test_a_second_step_before_update_is_still_refused_after_unscaling_the_wrapper():
    param, scaler, opt = _wrapped(gradclip.GlobalNorm(1.0), fused=False)
    _backward(param, scaler)
    scaler.unscale_(opt)
    opt.step()
    before = param.detach().clone()
    _backward(param, scaler)
    grad = param.grad.clone()
    with pytest.raises(gradclip.StateError, match="already stepped"):
        opt.step()
    assert torch.equal(param.detach(), before) and torch.equal(param.grad, grad)


# -- Monitor(updates=True) -------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["sgd", "fused_folded"])
def test_the_monitor_records_each_update_under_the_wrapper(tmp_path, fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    path = tmp_path / "log.jsonl"
    monitor = gradclip.Monitor(model, every=1, updates=True, writers=[JsonlWriter(str(path))])
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, fused=fused),
                               gradclip.GlobalNorm(0.1), monitor=monitor)
    expected = []
    for _ in range(3):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        expected.append([float((p.detach() - b).norm()) for p, b in zip(model.parameters(), before)])
        opt.zero_grad()
    monitor.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3
    for record, norms in zip(records, expected):
        names = [n for n, _ in model.named_parameters()]
        assert list(record["update_norms"]) == names
        assert [record["update_norms"][n] for n in names] == pytest.approx(norms, rel=1e-5)
        assert set(record["update_ratios"]) == set(names) and set(record["param_norms"]) == set(names)


def test_the_monitor_records_a_skipped_step_as_no_update(tmp_path):
    model = torch.nn.Linear(4, 1)
    path = tmp_path / "log.jsonl"
    monitor = gradclip.Monitor(model, every=1, updates=True, writers=[JsonlWriter(str(path))])
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.SkipAbove(max_norm=1e-9),
                               monitor=monitor)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    monitor.close()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["skip"] is True
    assert set(record["update_norms"].values()) == {0.0}


def test_accumulating_micro_batches_record_one_update_per_optimizer_step(tmp_path):
    model = torch.nn.Linear(4, 1)
    path = tmp_path / "log.jsonl"
    monitor = gradclip.Monitor(model, every=1, updates=True, writers=[JsonlWriter(str(path))])
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), gradclip.GlobalNorm(1.0),
                               monitor=monitor, accumulation_steps=2)
    for _ in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        if opt.stepped:
            opt.zero_grad()
    monitor.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 2 and all("update_norms" in r for r in records)


# -- the skip-streak bound with a clipper that never skips ----------------------------------------
def test_a_bound_a_clipper_can_never_reach_warns():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.warns(UserWarning, match="max_consecutive_skips=3 has no effect: GlobalNorm never skips"):
        gct.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), gradclip.GlobalNorm(1.0), max_consecutive_skips=3)


@pytest.mark.parametrize(
    "clipper",
    [gradclip.GlobalNorm(1.0, nonfinite="skip"), gradclip.SkipAbove(max_norm=1.0), gradclip.SkipOnSpike()],
    ids=["nonfinite_skip", "skip_above", "skip_on_spike"],
)
def test_a_bound_a_clipper_can_reach_does_not_warn(clipper):
    params = [torch.nn.Parameter(torch.zeros(2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gct.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), clipper, max_consecutive_skips=3)
        gct.ClippedOptimizer(torch.optim.SGD(params, lr=0.1), clipper)


def test_the_trainer_callbacks_warn_the_same():
    lightning = pytest.importorskip("gradclip.lightning")
    with pytest.warns(UserWarning, match="has no effect: GlobalNorm never skips"):
        lightning.GradClipCallback(gradclip.GlobalNorm(1.0), max_consecutive_skips=2)
    transformers = pytest.importorskip("gradclip.transformers")
    with pytest.warns(UserWarning, match="has no effect: ZClip never skips"):
        transformers.GradClipCallback(gradclip.ZClip(), max_consecutive_skips=2)
