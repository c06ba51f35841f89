"""``torch.compile`` of every torch entry point: ``clipper.clip_`` of every registered clipper, the
drop-ins, ``ClippedOptimizer.step`` (fold on and off).

* ``fullgraph=True``: one graph, no graph break, for ``clip_`` and the drop-ins;
* the compiled call equals the eager one step for step (bit for bit under dynamo's graph
  replay; within fp32 rounding under inductor's fused kernels), stateful clippers included;
* no recompiles: after the first two steps (state created, then read back), 50 more steps with
  fresh gradient tensors every step (``zero_grad(set_to_none=True)``) compile nothing;
* bad input: invalid arguments are refused with gradclip's message before anything runs; a
  per-tensor state fed gradients laid out differently refuses them (``StateError``) and keeps its
  state; a scalar state follows the new layout after one retrace.

Most tests compile with dynamo's ``CompileCounter`` backend (the captured graph run as is: the
tracing, the guards and the recompiles are dynamo's, whatever the backend); a few run inductor
on CPU. Models are tiny and compiled functions few: compiling costs seconds each on CPU.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
dynamo = pytest.importorskip("torch._dynamo")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from torch._dynamo.testing import CompileCounter  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

STEPS = 52  # two to create and read back the state, then 50 that must compile nothing

#: Short warm-ups, so the adaptive phase is reached well within the steps.
KWARGS = {
    "zclip": {"warmup_steps": 3},
    "autoclip": {"history": 8},
    "adagc": {"start_clip_steps": 3},
    "skip_on_spike": {"window": 8, "min_history": 3},
    "spike_aware": {"warmup_steps": 3},
    "subset": {"seed": 0},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    dynamo.reset()
    counters.clear()
    yield
    dynamo.reset()


def _make(name, **extra):
    return gradclip.get(name, **{**KWARGS.get(name, {}), **extra})


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _set_grads(step, *models):
    """Fresh gradient tensors (as after zero_grad(set_to_none=True) and backward()), the same in
    every model; every seventh step a spike fifty times larger."""
    generator = torch.Generator().manual_seed(step)
    scale = 50.0 if step % 7 == 6 else 1.0 + 0.05 * step
    for params in zip(*(m.parameters() for m in models)):
        grad = torch.randn(params[0].shape, generator=generator) * scale
        for p in params:
            p.grad = grad.clone()


def _assert_equal(a, b, exact=True):
    for x, y in zip(a, b):
        tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 2e-6, "atol": 1e-6}
        torch.testing.assert_close(x, y, equal_nan=True, **tolerance)


def _assert_params_close(a, b):
    """Parameters after optimizer steps: dynamo replays torch's optimizer with its own
    decompositions, so the moments' last bits may differ after many steps."""
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _grads(model):
    return [p.grad for p in model.parameters()]


# -- clip_ of every registered clipper ------------------------------------------------------------


@pytest.mark.parametrize("name", gradclip.available())
def test_clip_compiles_into_one_graph_equals_eager_and_never_recompiles(name):
    eager, compiled = _make(name), _make(name)
    eager_model, model = _model(), _model()
    counter = CompileCounter()
    step = torch.compile(lambda: compiled.clip_(model), fullgraph=True, backend=counter)
    for i in range(STEPS):
        _set_grads(i, eager_model, model)
        expected, info = eager.clip_(eager_model), step()
        _assert_equal(info, expected)
        _assert_equal(_grads(model), _grads(eager_model))
        if i == 1:
            after_two = counter.frame_count
    assert 1 <= after_two <= 2
    assert counter.frame_count == after_two, f"{counter.frame_count - after_two} recompiles in 50 steps"
    assert compiled.state_dict() == eager.state_dict()  # the state advanced once per call


@pytest.mark.parametrize("name", ["global_norm", "zclip", "agc"])
def test_clip_under_inductor_matches_eager(name):
    eager, compiled = _make(name), _make(name)
    eager_model, model = _model(), _model()
    step = torch.compile(lambda: compiled.clip_(model), fullgraph=True)
    for i in range(12):
        _set_grads(i, eager_model, model)
        expected, info = eager.clip_(eager_model), step()
        _assert_equal(info, expected, exact=False)
        _assert_equal(_grads(model), _grads(eager_model), exact=False)


def test_a_chain_and_a_loss_signal_compile_without_recompiles():
    """Per-step values are tensors: the loss of every step goes in as a 0-d tensor (a Python
    float would be a constant of the graph and retrace), and a chain composes in one graph."""
    clipper = gradclip.chain(gradclip.NonFinite("skip"), _make("skip_on_spike", signal="both"))
    eager = gradclip.chain(gradclip.NonFinite("skip"), _make("skip_on_spike", signal="both"))
    eager_model, model = _model(), _model()
    counter = CompileCounter()
    step = torch.compile(lambda loss: clipper.clip_(model, loss=loss), fullgraph=True, backend=counter)
    for i in range(20):
        _set_grads(i, eager_model, model)
        loss = torch.tensor(2.0 - 0.05 * i + (30.0 if i == 15 else 0.0))
        _assert_equal(step(loss), eager.clip_(eager_model, loss=loss))
        if i == 1:
            after_two = counter.frame_count
    assert counter.frame_count == after_two
    assert clipper.state_dict() == eager.state_dict()


# -- the drop-ins ---------------------------------------------------------------------------------


DROP_INS = {
    "clip_grad_norm_": lambda m: gct.clip_grad_norm_(m.parameters(), 1.0),
    "clip_grad_norm_inf": lambda m: gct.clip_grad_norm_(m.parameters(), 1.0, norm_type="inf", foreach=True),
    "clip_grad_value_": lambda m: gct.clip_grad_value_(m.parameters(), 0.5),
    "get_total_norm": lambda m: gct.get_total_norm([p.grad for p in m.parameters()], norm_type=3.0),
    "get_total_norm_then_clip_grads_with_norm_": lambda m: gct.clip_grads_with_norm_(
        m.parameters(), 1.0, gct.get_total_norm([p.grad for p in m.parameters()])
    ),
}


@pytest.mark.parametrize("case", sorted(DROP_INS))
def test_drop_ins_compile_into_one_graph_and_never_recompile(case):
    fn = DROP_INS[case]
    eager_model, model = _model(), _model()
    counter = CompileCounter()
    compiled = torch.compile(lambda: fn(model), fullgraph=True, backend=counter)
    for i in range(STEPS):
        _set_grads(i, eager_model, model)
        expected, result = fn(eager_model), compiled()
        if expected is not None:
            assert torch.equal(result, expected)
        _assert_equal(_grads(model), _grads(eager_model))
        if i == 1:
            after_two = counter.frame_count
    assert after_two == 1 and counter.frame_count == 1


def test_clip_grad_norm_under_inductor_matches_torch():
    model, reference = _model(), _model()
    ours = torch.compile(lambda: gct.clip_grad_norm_(model.parameters(), 1.0), fullgraph=True)
    for i in range(6):
        _set_grads(i, model, reference)
        torch.testing.assert_close(ours(), torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0))
        _assert_equal(_grads(model), _grads(reference), exact=False)


def test_error_if_nonfinite_reads_the_host_so_it_breaks_the_graph_and_still_raises():
    """The one drop-in option that must read the norm on the host: under fullgraph=True dynamo
    refuses it (as it refuses torch's own); without fullgraph the graph breaks there and the
    call raises torch's error with gradclip's detail, before anything is changed."""
    model = _model()
    _set_grads(0, model)
    model[0].weight.grad[0, 0] = math.nan
    before = [g.clone() for g in _grads(model)]
    strict = torch.compile(lambda: gct.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True),
                           fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="data-dependent|item|Tensor.item|graph break"):
        strict()
    dynamo.reset()
    lenient = torch.compile(lambda: gct.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True),
                            backend="eager")
    with pytest.raises(gradclip.NonFiniteError, match=r"in #0;.*The total norm of order 2\.0 for gradients"):
        lenient()
    _assert_equal(_grads(model), before)


# -- ClippedOptimizer.step, compiled the way PyTorch compiles optimizer.step ----------------------


def _graph_break_reasons():
    return {reason.split("\n")[0] for reason in counters["graph_break"]}


def _bare_step_breaks(fused):
    dynamo.reset()
    counters.clear()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **({"fused": True} if fused else {"foreach": True}))
    step = torch.compile(opt.step, backend=CompileCounter())
    for i in range(2):
        _set_grads(i, model)
        step()
    reasons = _graph_break_reasons()
    dynamo.reset()
    counters.clear()
    return reasons


@pytest.mark.parametrize("name", ["global_norm", "zclip"])
@pytest.mark.parametrize("fused", [False, True], ids=["fold_off", "fold_on"])
def test_clipped_optimizer_step_compiles_adds_no_graph_break_and_never_recompiles(fused, name):
    """torch's optimizers break the graph inside their step by design (so fullgraph=True is
    impossible for any optimizer.step): the clip adds no break of its own, the result equals the
    eager ClippedOptimizer, and 50 more steps compile nothing."""
    bare = _bare_step_breaks(fused)
    options = {"fused": True} if fused else {"foreach": True}
    models = _model(), _model()
    eager = gct.ClippedOptimizer(torch.optim.AdamW(models[0].parameters(), lr=1e-2, **options), _make(name))
    opt = gct.ClippedOptimizer(torch.optim.AdamW(models[1].parameters(), lr=1e-2, **options), _make(name))
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    for i in range(STEPS):
        _set_grads(i, *models)
        eager.step()
        step()
        assert opt.stepped and opt.folded == fused and eager.folded == fused
        _assert_equal(opt.last_info, eager.last_info)
        _assert_params_close(models[1], models[0])
        if i == 1:
            after_two = counter.frame_count
    assert counter.frame_count == after_two
    assert _graph_break_reasons() <= bare, _graph_break_reasons() - bare
    assert opt.clipper.state_dict() == eager.clipper.state_dict()


def test_clipped_optimizer_step_under_inductor_folded():
    models = _model(), _model()
    eager = gct.ClippedOptimizer(torch.optim.AdamW(models[0].parameters(), lr=1e-2, fused=True), _make("zclip"))
    opt = gct.ClippedOptimizer(torch.optim.AdamW(models[1].parameters(), lr=1e-2, fused=True), _make("zclip"))
    step = torch.compile(opt.step)
    for i in range(8):
        _set_grads(i, *models)
        eager.step()
        step()
        _assert_equal(opt.last_info, eager.last_info, exact=False)
        _assert_params_close(models[1], models[0])


@pytest.mark.parametrize("clipper", ["global_norm", "skip_above"])
def test_compiled_fold_and_skip_reach_the_fused_kernel(clipper):
    """Regression: dynamo drops attribute writes on optimizers inside a traced frame, so a
    compiled folded step once applied no clip coefficient (Adam's scale invariance hid it) and a
    compiled skip stepped anyway. With plain fused SGD the update is lr * the folded gradient:
    its norm is exactly lr * max_norm after a clip, and 0 after a skip."""
    model = _model()
    make = gradclip.GlobalNorm(1.0) if clipper == "global_norm" else gradclip.SkipAbove(1.0)
    opt = gct.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, fused=True), make, fold=True)
    step = torch.compile(opt.step, backend=CompileCounter())
    for i in range(4):
        _set_grads(i, model)
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert opt.folded and float(opt.last_info.norm) > 1.0
        moved = torch.linalg.vector_norm(torch.cat([(p - b).reshape(-1) for p, b in zip(model.parameters(), before)]))
        expected = 0.0 if clipper == "skip_above" else 0.1
        assert float(moved) == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["fold_off", "fold_on"])
def test_clipped_optimizer_step_with_loss_and_streak_compiles_once(fused):
    """Issue 17's signals inside a compiled step: ``step(loss=...)`` reaching a loss-watching
    SkipOnSpike, and the skip streak of ``max_consecutive_skips``, give the eager results (the
    same skips and counts), and after two steps the other 50 compile nothing. The streak's bound
    is one host read per step (a graph break, not a recompile)."""
    options = {"fused": True} if fused else {"foreach": True}
    models = _model(), _model()

    def wrap(model):
        clipper = gradclip.SkipOnSpike(signal="loss", min_history=3)
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2, **options)
        return gct.ClippedOptimizer(inner, clipper, max_consecutive_skips=STEPS)

    eager, opt = wrap(models[0]), wrap(models[1])
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    skips = 0
    for i in range(STEPS):
        _set_grads(i, *models)
        loss = torch.tensor(100.0 if i % 7 == 6 else 1.0 + 0.01 * i)  # a loss spike every 7th step
        eager.step(loss=loss)
        step(loss=loss.clone())
        _assert_equal(opt.last_info, eager.last_info)
        _assert_params_close(models[1], models[0])
        skips += int(opt.last_info.skip)
        if i == 1:
            after_two = counter.frame_count
    assert skips >= 5  # the spikes after the window filled were skipped
    assert counter.frame_count == after_two


# -- bad input inside a compiled region -----------------------------------------------------------


BAD_CALLS = {
    "max_norm": (lambda m: gct.clip_grad_norm_(m.parameters(), -1.0), r"clip_grad_norm_: max_norm must be"),
    "norm_type": (lambda m: gct.get_total_norm([p.grad for p in m.parameters()], norm_type=0.0),
                  r"get_total_norm: norm_type"),
    "clip_value": (lambda m: gct.clip_grad_value_(m.parameters(), math.nan), r"clip_grad_value_: clip_value"),
    "total_norm": (lambda m: gct.clip_grads_with_norm_(m.parameters(), 1.0, torch.ones(3)),
                   r"clip_grads_with_norm_: total_norm must be a one-element"),
    "loss_signal": (lambda m: gradclip.GlobalNorm(1.0).clip_(m, loss=torch.ones(3)), r"loss must be a scalar"),
    "unknown_signal": (lambda m: gradclip.GlobalNorm(1.0).clip_(m, lr=1.0), r"unknown argument\(s\) \['lr'\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
def test_invalid_arguments_are_refused_with_gradclips_message_and_change_nothing(case, fullgraph):
    """The check runs at trace time, before the graph exists: nothing has run. With
    fullgraph=True dynamo reports it as its own error carrying gradclip's message; without, the
    call raises gradclip's error itself."""
    call, message = BAD_CALLS[case]
    model = _model()
    _set_grads(0, model)
    before = [g.clone() for g in _grads(model)]
    compiled = torch.compile(lambda: call(model), fullgraph=fullgraph, backend="eager")
    expected = dynamo.exc.Unsupported if fullgraph else gradclip.InvalidArgumentError
    with pytest.raises(expected, match=message):
        compiled()
    _assert_equal(_grads(model), before)


def _drop_bias_grad(model):
    model[2].bias.grad = None


def test_a_changed_layout_is_refused_by_a_per_tensor_state_which_it_leaves_alone():
    """AdaGC keeps one threshold per tensor. A parameter without a gradient this step would shift
    its neighbours onto the wrong thresholds: the changed layout fails dynamo's guards, the
    retrace runs the layout check, and it refuses the call before anything changes."""
    clipper, model = _make("adagc"), _model()
    for fullgraph in (True, False):
        dynamo.reset()
        step = torch.compile(lambda: clipper.clip_(model), fullgraph=fullgraph, backend="eager")
        for i in range(4):
            _set_grads(i, model)
            step()
        state = clipper.state_dict()
        _set_grads(4, model)
        _drop_bias_grad(model)
        before = [g.clone() for g in _grads(model) if g is not None]
        expected = dynamo.exc.Unsupported if fullgraph else gradclip.StateError
        with pytest.raises(expected, match="keeps one threshold per tensor"):
            step()
        assert clipper.state_dict() == state
        _assert_equal([g for g in _grads(model) if g is not None], before)
        clipper.reset()


def test_a_changed_layout_retraces_once_for_a_scalar_state_and_stays_exact():
    eager, compiled = _make("zclip"), _make("zclip")
    eager_model, model = _model(), _model()
    counter = CompileCounter()
    step = torch.compile(lambda: compiled.clip_(model), fullgraph=True, backend=counter)
    for i in range(12):
        _set_grads(i, eager_model, model)
        if i >= 6:  # the last bias gets no gradient any more
            _drop_bias_grad(eager_model)
            _drop_bias_grad(model)
        _assert_equal(step(), eager.clip_(eager_model))
        if i == 1:
            after_two = counter.frame_count
    assert counter.frame_count == after_two + 1
    assert compiled.state_dict() == eager.state_dict()


def test_clipped_optimizer_with_accumulation_compiles_one_graph_per_micro_step():
    """With accumulation_steps=k the micro-batch count is a Python int the step branches on:
    one compiled variant per count (then the state's second trace), and nothing after."""
    models = _model(), _model()
    make = lambda m: gct.ClippedOptimizer(  # noqa: E731
        torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=True), _make("zclip"), accumulation_steps=2)
    eager, opt = make(models[0]), make(models[1])
    counter = CompileCounter()
    step = torch.compile(opt.step, backend=counter)
    frames = []
    for i in range(16):
        _set_grads(i, *models)
        eager.step()
        step()
        assert opt.stepped == eager.stepped == (i % 2 == 1)
        eager.zero_grad()
        opt.zero_grad()
        frames.append(counter.frame_count)
    assert frames[-1] == frames[5], frames
    _assert_params_close(models[1], models[0])
    assert opt.clipper.state_dict() == eager.clipper.state_dict()


@pytest.mark.parametrize("build", [
    lambda: gradclip.GlobalNorm(1.0), lambda: gradclip.ZClip(), lambda: gradclip.AGC(),
    lambda: gradclip.AutoClip(), lambda: gradclip.Value(clip_value=0.5), lambda: gradclip.Norm(1.0),
], ids=["GlobalNorm", "ZClip", "AGC", "AutoClip", "Value", "Norm"])
def test_the_issues_reproduction_a_clipper_built_inside_the_compiled_function(build):
    """Issue 14's first report, as a new user writes it: the clipper made inside the function."""
    eager_model, model = _model(), _model()
    _set_grads(3, eager_model, model)
    norm = torch.compile(lambda: build().clip_(model).norm, fullgraph=True, backend="eager")()
    assert torch.equal(norm, build().clip_(eager_model).norm)
    _assert_equal(_grads(model), _grads(eager_model))
