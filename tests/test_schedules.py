"""Scheduled thresholds (gradclip.schedules): values, every backend, compiled paths, checkpoints.

A threshold argument given a schedule is evaluated on the device at the step kept in the
clipper's state. Checked here: the schedule forms against optax's own schedules; every clipper
that takes a schedule, on torch, TensorFlow and JAX against the NumPy reference (the registry's
conformance helpers); ``tf.function`` and ``jax.jit`` traced once, ``torch.compile`` without
recompiles; a checkpoint that resumes the schedule at the right step (JSON, eager and inside a
traced ``tf.function``); ``step=``; plain callables (an optax schedule under ``jax.jit``); and
every bad input.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import test_conformance as conformance
from _frameworks import convert

import gradclip
from gradclip import schedules
from gradclip._core.ops import get_ops
from gradclip._core.registry import from_config


# -- the forms -------------------------------------------------------------------------------------
def _optax_pairs():
    optax = pytest.importorskip("optax")
    return [
        (schedules.Linear(0.1, 1.0, 30), optax.linear_schedule(0.1, 1.0, 30)),
        (schedules.Linear(2.0, 0.5, 40, transition_begin=10), optax.linear_schedule(2.0, 0.5, 40, 10)),
        (schedules.CosineDecay(1.0, 50, end_value=0.1), optax.cosine_decay_schedule(1.0, 50, alpha=0.1)),
        (schedules.CosineDecay(3.0, 7), optax.cosine_decay_schedule(3.0, 7)),
        (
            schedules.warmup_cosine(0.0, 1.0, 10, 60, end_value=0.05),
            optax.warmup_cosine_decay_schedule(0.0, 1.0, 10, 60, end_value=0.05),
        ),
        (
            schedules.Join([schedules.Constant(0.5), schedules.Linear(0.5, 2.0, 5)], [8]),
            optax.join_schedules([optax.constant_schedule(0.5), optax.linear_schedule(0.5, 2.0, 5)], [8]),
        ),
    ]


def test_forms_match_optax_on_the_host_and_on_the_device():
    """Host values (float64) and device values (fp32 under JAX, inside jax.jit) agree with
    optax's schedules, step by step, past the end of every transition."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    ops = get_ops([jnp.zeros(1)])
    for ours, theirs in _optax_pairs():
        device = jax.jit(lambda step, s=ours: s.value(ops, step))
        for step in range(80):
            expected = float(theirs(step))
            assert ours(step) == pytest.approx(expected, rel=1e-6, abs=1e-7), (ours, step)
            assert float(device(jnp.asarray(step))) == pytest.approx(expected, rel=2e-6, abs=1e-7), (ours, step)


def test_piecewise_is_a_step_function():
    schedule = schedules.Piecewise([3, 5], [1.0, 0.5, 0.25])
    assert [schedule(s) for s in range(7)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert schedule.bounds() == (0.25, 1.0)
    assert schedules.Piecewise([], [2.0])(100) == 2.0


def test_ramps_start_and_end_exactly_at_the_values_given():
    """fp32 values on the device: the first and last values are the arguments themselves, not an
    fp32 rounding of ``(a - b) + b``."""
    ops = get_ops([np.zeros(1, np.float32)])
    step = lambda s: ops.scalar(s, "int64")  # noqa: E731
    for schedule, first, last in [
        (schedules.Linear(0.1, 1.0, 3), 0.1, 1.0),
        (schedules.Linear(1.0, 0.1, 3), 1.0, 0.1),
        (schedules.CosineDecay(1.0, 4, end_value=0.1), 1.0, 0.1),
        (schedules.CosineDecay(0.3, 9, end_value=0.7), 0.3, 0.7),
    ]:
        assert schedule.value(ops, step(0)) == np.float32(first)
        assert schedule.value(ops, step(10**6)) == np.float32(last)


def test_a_schedule_is_its_config():
    """A schedule is a read-only mapping of its settings: plain data in configs and checkpoints,
    equal to its config, rebuilt by from_config (nested ones too)."""
    schedule = schedules.warmup_cosine(0.1, 1.0, 10, 100, end_value=0.2)
    config = json.loads(json.dumps(schedule.config()))
    assert schedule == config and dict(schedule) == config and config["schedule"] == "join"
    assert schedules.schedule_from_config(config) == schedule
    assert [schedules.schedule_from_config(config)(s) for s in (0, 10, 50, 100)] == [schedule(s) for s in (0, 10, 50, 100)]
    clipper = gradclip.GlobalNorm(max_norm=schedule)
    saved = json.loads(json.dumps(clipper.state_dict()))  # the config as plain data
    rebuilt = from_config({"clipper": "global_norm", "config": saved["config"]})
    assert rebuilt.max_norm == schedule and isinstance(rebuilt.max_norm, schedules.Schedule)
    assert repr(clipper).startswith("GlobalNorm(max_norm=Join([Linear(init_value=0.1")


# -- every clipper that takes a schedule, on every backend -----------------------------------------------
CASES = {
    "global_norm": lambda: gradclip.GlobalNorm(max_norm=schedules.CosineDecay(40.0, 6, end_value=5.0)),
    "norm": lambda: gradclip.Norm(max_norm=schedules.Linear(1.0, 20.0, 4)),
    "average_norm": lambda: gradclip.AverageNorm(max_norm=schedules.Piecewise([2, 5], [0.5, 0.1, 0.3])),
    "block_rms": lambda: gradclip.BlockRMS(threshold=schedules.warmup_cosine(0.5, 2.0, 2, 6, end_value=0.8)),
    "agc": lambda: gradclip.AGC(clip_factor=schedules.Linear(0.01, 0.2, 5), axis=0),
    "zclip": lambda: gradclip.ZClip(warmup_steps=3, max_grad_norm=schedules.Piecewise([3], [50.0, 8.0])),
    "skip_above": lambda: gradclip.SkipAbove(max_norm=schedules.Linear(200.0, 30.0, 6)),
}


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_scheduled_clippers_match_the_numpy_reference(name, backend):
    conformance.need(backend)
    steps, params = conformance.sequence()
    expected = conformance.run_eager(name, "numpy", "float32", steps, params, clipper=CASES[name]())
    got = conformance.run_eager(name, backend, "float32", steps, params, clipper=CASES[name]())
    conformance.assert_same(got, expected, "float32", f"scheduled {name} on {backend}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_threshold_follows_the_schedule(name):
    clipper = CASES[name]()
    schedule = getattr(clipper, {"agc": "clip_factor", "zclip": "max_grad_norm", "block_rms": "threshold"}.get(name, "max_norm"))
    steps, params = conformance.sequence()
    results = conformance.run_eager(name, "numpy", "float32", steps, params, clipper=clipper)
    for step, (_, info, _) in enumerate(results):
        if name == "zclip":  # the cap bounds the reported threshold
            assert info["threshold"] <= schedule(step) * (1 + 1e-6)
        else:
            assert info["threshold"] == pytest.approx(schedule(step), rel=1e-6), step
    assert clipper.state_dict()["state"]["clock"] == len(steps)


def test_scheduled_clipping_changes_the_gradients_as_the_schedule_says():
    clipper = gradclip.GlobalNorm(schedules.Linear(1.0, 4.0, 3))
    for step, limit in enumerate([1.0, 2.0, 3.0, 4.0, 4.0]):
        (out,), info = clipper.clip([np.array([30.0, 40.0], np.float32)])
        assert float(np.linalg.norm(out)) == pytest.approx(limit, rel=1e-5), step


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_tf_function_traces_once_and_equals_eager(name, dtype):
    pytest.importorskip("tensorflow")
    steps, params = conformance.sequence()
    eager = conformance.run_eager(name, "tensorflow", dtype, steps, params, clipper=CASES[name]())
    results, step = conformance.run_tf_function(CASES[name](), dtype, steps, params)
    # Traced on the first call (twice when it creates the state variables), never again: the
    # step is a variable, not a Python number.
    assert step.experimental_get_tracing_count() <= 2
    conformance.assert_same(results, eager, dtype, f"scheduled {name}: tf.function vs eager", 2e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_jax_jit_traces_once_and_equals_eager(name):
    jax = pytest.importorskip("jax")
    steps, params = conformance.sequence()
    eager = conformance.run_eager(name, "jax", "float32", steps, params, clipper=CASES[name]())
    clipper, traces = CASES[name](), []
    p = [convert("jax", x, "float32") for x in params]

    def update(g, s):
        traces.append(1)
        return clipper.update(g, s, params=p)

    compiled = jax.jit(update)
    state = clipper.init([convert("jax", x, "float32") for x in steps[0]])
    results = []
    for grads in steps:
        out, state, info = compiled([convert("jax", x, "float32") for x in grads], state)
        results.append(conformance.record(out, info))
    assert len(traces) == 1
    conformance.assert_same(results, eager, "float32", f"scheduled {name}: jax.jit vs eager")
    assert int(state.clock) == len(steps)


def test_torch_compile_does_not_recompile_per_step():
    """The step is a device tensor in the state: after the call that creates the state, the
    compiled function runs every later step without recompiling (graph capture is checked with
    the cheap ``aot_eager`` backend)."""
    torch = pytest.importorskip("torch")
    import torch._dynamo

    clipper = gradclip.GlobalNorm(schedules.CosineDecay(1.0, 10, end_value=0.1))

    def step(g):
        out, info = clipper.clip([g])
        return out[0], info.threshold

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    thresholds = []
    with torch._dynamo.config.patch(error_on_recompile=False):
        for i in range(2):
            thresholds.append(float(compiled(torch.full((4,), float(i + 1)))[1]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 8):
            thresholds.append(float(compiled(torch.full((4,), float(i + 1)))[1]))
    expected = [clipper.max_norm(s) for s in range(8)]
    assert thresholds == pytest.approx(expected, rel=1e-6)
    torch._dynamo.reset()


# -- checkpoints ---------------------------------------------------------------------------------
def test_a_checkpoint_resumes_the_schedule_at_the_right_step():
    steps = [[np.full(3, 10.0 * (s + 1), np.float32)] for s in range(9)]
    make = lambda: gradclip.chain(  # noqa: E731
        gradclip.ZClip(warmup_steps=2, max_grad_norm=schedules.Linear(50.0, 5.0, 6)),
        gradclip.GlobalNorm(schedules.CosineDecay(30.0, 8, end_value=2.0)),
    )
    whole = make()
    expected = [whole.clip(g)[1].to_dict() for g in steps]
    first = make()
    for g in steps[:4]:
        first.clip(g)
    saved = json.loads(json.dumps(first.state_dict()))
    assert [link["state"]["clock"] for link in saved["state"]["links"]] == [4, 4]
    resumed = make()
    resumed.load_state_dict(saved)
    assert [resumed.clip(g)[1].to_dict() for g in steps[4:]] == expected[4:]
    # Loading into a clipper with another schedule is refused (the config differs).
    other = gradclip.GlobalNorm(schedules.CosineDecay(30.0, 9, end_value=2.0))
    with pytest.raises(gradclip.StateError, match="config"):
        other.load_state_dict(saved["state"]["links"][1])


def test_a_checkpoint_loaded_after_tracing_reaches_the_tf_function():
    tf = pytest.importorskip("tensorflow")
    clipper = gradclip.GlobalNorm(schedules.Linear(1.0, 9.0, 8))
    step = tf.function(lambda g: clipper.clip([g])[1].threshold)
    values = [float(step(tf.constant([100.0]))) for _ in range(3)]
    assert values == pytest.approx([1.0, 2.0, 3.0])
    saved = clipper.state_dict()
    assert saved["state"] == {"clock": 3}
    float(step(tf.constant([100.0])))
    clipper.load_state_dict({**saved, "state": {"clock": 6}})
    assert float(step(tf.constant([100.0]))) == pytest.approx(7.0)
    assert clipper.state_dict()["state"] == {"clock": 7}


def test_the_clock_is_validated_on_load():
    clipper = gradclip.GlobalNorm(schedules.Linear(1.0, 2.0, 4))
    clipper.clip([np.ones(2, np.float32)])
    good = clipper.state_dict()
    for state, pattern in [({"clock": -1}, r"'clock' holds -1"), ({"clock": 1.5}, "clock"), ({}, "state fields")]:
        with pytest.raises(gradclip.StateError, match=pattern):
            clipper.load_state_dict({**good, "state": state})
    assert clipper.state_dict() == good


def test_plain_numbers_keep_the_stateless_form():
    """A number is a number: no clock, no state, the config and checkpoint of earlier versions."""
    for clipper in (gradclip.GlobalNorm(1.0), gradclip.Norm(2.0), gradclip.SkipAbove(5.0), gradclip.AGC()):
        assert not clipper.keeps_state and not clipper.scheduled
    assert gradclip.GlobalNorm(1.0).state_dict()["state"] == {}
    assert gradclip.ZClip().state_type._fields == ("step", "warmup", "mean", "var")
    assert gradclip.ZClip(max_grad_norm=schedules.Constant(2.0)).state_type._fields[-1] == "clock"


# -- step= -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_the_step_signal_is_used_and_counted_on(backend):
    conformance.need(backend)
    clipper = gradclip.GlobalNorm(schedules.Linear(0.0, 10.0, 10))
    g = [convert(backend, np.array([1000.0]), "float32")]
    given = {"numpy": np.int64(7), "torch": None, "jax": None}[backend]
    if backend == "torch":
        import torch

        given = torch.tensor(7)
    elif backend == "jax":
        import jax.numpy as jnp

        given = jnp.asarray(7)
    _, info = clipper.clip(g, step=given)
    assert float(info.threshold) == pytest.approx(7.0)
    _, info = clipper.clip([convert(backend, np.array([1000.0]), "float32")])
    assert float(info.threshold) == pytest.approx(8.0)  # counted on from the step given
    _, info = clipper.clip([convert(backend, np.array([1000.0]), "float32")], step=2)
    assert float(info.threshold) == pytest.approx(2.0)


# -- plain callables -------------------------------------------------------------------------------
def test_a_plain_callable_is_called_with_the_device_step():
    seen = []

    def halving(step):
        seen.append(step)
        return 8.0 * 0.5 ** step.astype(np.float32)

    clipper = gradclip.GlobalNorm(halving)
    thresholds = [float(clipper.clip([np.array([100.0], np.float32)])[1].threshold) for _ in range(4)]
    assert thresholds == [8.0, 4.0, 2.0, 1.0]
    assert all(np.asarray(s).dtype == np.int64 and np.shape(s) == () for s in seen)
    # Its config names it; the checkpoint saves the step and loads into the same function.
    saved = json.loads(json.dumps(clipper.state_dict()))
    assert saved["config"]["max_norm"] == {"schedule": "callable", "function": f"{__name__}.{halving.__qualname__}"}
    again = gradclip.GlobalNorm(halving)
    again.load_state_dict(saved)
    assert float(again.clip([np.array([100.0], np.float32)])[1].threshold) == 0.5
    with pytest.raises(gradclip.InvalidArgumentError, match="plain callable, which a config cannot rebuild"):
        from_config({"clipper": "global_norm", "config": saved["config"]})


def test_a_torch_callable_and_its_values_below_the_range():
    torch = pytest.importorskip("torch")
    clipper = gradclip.GlobalNorm(lambda step: 3.0 - step.to(torch.float32))  # negative from step 4
    values = [float(clipper.clip([torch.tensor([100.0])])[1].threshold) for _ in range(6)]
    # Unchecked values are raised to max_norm's lower bound, 0: never a negative threshold.
    assert values == [3.0, 2.0, 1.0, 0.0, 0.0, 0.0]


def test_an_optax_schedule_under_jax_jit():
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    optax = pytest.importorskip("optax")
    clipper = gradclip.GlobalNorm(optax.cosine_decay_schedule(4.0, 5, alpha=0.25))
    grads = {"w": jnp.full((2,), 100.0)}
    state = clipper.init(grads)
    update = jax.jit(clipper.update)
    thresholds = []
    for _ in range(7):
        _, state, info = update(grads, state)
        thresholds.append(float(info.threshold))
    expected = [float(optax.cosine_decay_schedule(4.0, 5, alpha=0.25)(s)) for s in range(7)]
    assert thresholds == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "function,pattern",
    [
        (lambda step: np.ones(2, np.float32), r"returned an array of shape \(2,\)"),
        (lambda step: "1.0", r"returned '1.0'"),
        (lambda step: True, r"returned True"),
    ],
)
def test_a_callable_returning_something_else_is_a_clear_error(function, pattern):
    clipper = gradclip.GlobalNorm(function)
    g = np.array([3.0, 4.0], np.float32)
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        clipper.clip([g])
    np.testing.assert_array_equal(g, [3.0, 4.0])
    assert clipper.state_dict()["state"] in (None, {"clock": 0})  # nothing advanced


def test_a_callable_returning_another_framework_is_refused():
    torch = pytest.importorskip("torch")
    clipper = gradclip.GlobalNorm(lambda step: np.float32(1.0) + np.zeros(1, np.float32))
    with pytest.raises(gradclip.InvalidArgumentError, match="returned a numpy array for torch gradients"):
        clipper.clip([torch.ones(2)])


# -- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "build,pattern",
    [
        (lambda: schedules.Linear(1.0, 2.0, 0), r"Linear: transition_steps must be an integer >= 1, got 0"),
        (lambda: schedules.Linear(float("nan"), 2.0, 3), r"Linear: init_value must not be NaN"),
        (lambda: schedules.Linear(1.0, float("inf"), 3), r"Linear: end_value must be in"),
        (lambda: schedules.Linear(1.0, 2.0, 3, transition_begin=-1), r"transition_begin must be an integer >= 0"),
        (lambda: schedules.CosineDecay(1.0, 2.5), r"CosineDecay: decay_steps must be an integer >= 1, got 2.5"),
        (lambda: schedules.Piecewise([5, 5], [1.0, 2.0, 3.0]), r"Piecewise: boundaries must be strictly increasing"),
        (lambda: schedules.Piecewise([5], [1.0]), r"Piecewise: values must hold one more entry than boundaries \(2\), got 1"),
        (lambda: schedules.Piecewise([0], [1.0, 2.0]), r"boundaries\[0\] must be an integer >= 1, got 0"),
        (lambda: schedules.Piecewise(5, [1.0]), r"boundaries and values must be lists"),
        (lambda: schedules.Join([schedules.Constant(1.0), "cosine"], [3]), r"Join: schedules\[1\] must be a schedule object"),
        (lambda: schedules.Join([schedules.Constant(1.0)], [3]), r"Join: boundaries must hold one entry fewer"),
        (lambda: schedules.Join([schedules.FromCallable(abs), schedules.Constant(1.0)], [2]), r"schedules\[0\]"),
        (lambda: schedules.warmup_cosine(0.0, 1.0, 10, 10), r"decay_steps \(warm-up included\) must be > warmup_steps=10"),
        (lambda: schedules.schedule_from_config({"schedule": "exponential"}), r"unknown schedule 'exponential'.*valid kinds"),
        (lambda: schedules.schedule_from_config({"schedule": "linear", "init": 1.0}), r"bad settings for schedule 'linear'"),
        (lambda: gradclip.GlobalNorm(max_norm=schedules.Linear(-1.0, 1.0, 5)), r"GlobalNorm: max_norm must stay in \[0, inf\], but the schedule .* reaches -1.0"),
        (lambda: gradclip.ZClip(max_grad_norm=schedules.Linear(0.0, 1.0, 5)), r"ZClip: max_grad_norm must stay in \(0, inf\], .* reaches 0.0"),
        (lambda: gradclip.AGC(clip_factor=schedules.Constant(math.inf)), r"Constant: value must be in"),
        (lambda: gradclip.SkipAbove(max_norm={"schedule": "cosine", "init_value": 1.0}), r"SkipAbove: max_norm: unknown schedule 'cosine'"),
        (lambda: gradclip.Norm(max_norm="1.0"), r"Norm: max_norm must be a real number, got '1.0'"),
        (lambda: schedules.FromCallable(3.0), r"FromCallable: function must be callable, got 3.0"),
    ],
)
def test_bad_schedules_are_clear_errors(build, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        build()


def test_a_bad_step_signal_is_refused_before_anything_changes():
    clipper = gradclip.GlobalNorm(schedules.Linear(1.0, 2.0, 4))
    g = np.array([3.0, 4.0], np.float32)
    for step, pattern in [(-1, r"step must be an integer in \[0, 2\*\*63\)"), (2**70, r"step must be an integer in \[0, 2\*\*63\)"), (1.5, "step must be an integer"), (np.float32(2.0), "step must be an integer array"), (np.arange(2), "step must be a scalar")]:
        with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
            clipper.clip([g], step=step)
    assert clipper.state_dict()["state"] is None  # refused before the state was even made
    np.testing.assert_array_equal(g, [3.0, 4.0])
