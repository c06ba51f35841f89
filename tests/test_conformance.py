"""Conformance: every registered clipper x every backend x every float dtype.

Driven by the registry (``gradclip.available()``): a method registered later is picked up with no
change here. For each (clipper, backend, dtype) the same gradient sequence (with a spike, so the
adaptive methods leave their warm-up and clip) goes through the clipper on the backend and on the
NumPy reference backend with gradients of the same dtype, and must agree. The sequence also holds
a step with a NaN in one tensor and an inf in another, so every backend and compiled path runs the
non-finite handling of each clipper's default policy (``tests/test_nonfinite.py`` covers the
policies in depth on NumPy and torch; the other policies run on TensorFlow and JAX here):

* outputs within two units in the last place of the dtype, and of the same dtype as the inputs;
* ``ClipInfo``: the flags exactly, the numbers at fp32 precision (norms accumulate in fp32);
* the compiled paths (``tf.function``, ``tf.function(jit_compile=True)``, ``jax.jit``) equal the
  eager ones on the same backend, in every dtype;
* the non-finite policies ``zero`` and ``skip`` (and ``propagate`` where it is not the default)
  on TensorFlow and JAX, eager and compiled, and ``raise`` eagerly, equal the NumPy reference;
* bad input (frameworks mixed in one call) is a clear error that changes neither the gradients
  nor the clipper's state;
* the state survives ``state_dict`` -> JSON -> ``load_state_dict`` on a fresh clipper: the resumed
  run equals the uninterrupted one.

Every clipper is built with ``gradclip.get(name, **kwargs)``; ``KWARGS`` shortens warm-ups so the
adaptive phase is reached in a few steps, fixes the random stream of ``subset`` and gives AGC an
explicit unit axis (the default follows each framework's weight layout, which differs between
torch/NumPy and TensorFlow/JAX by design; ``tests/test_optax.py`` checks the JAX default against
optax).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest

import gradclip
from _frameworks import BACKENDS, DTYPES, convert, dtype_name, to64, tolerance

CLIPPERS = gradclip.available()

#: Arguments that make a short sequence exercise each method (only those a class accepts).
KWARGS = {
    "agc": {"axis": 0, "clip_factor": 0.05},
    "subset": {"seed": 1234},
    "zclip": {"warmup_steps": 3},
    "skip_on_spike": {"window": 8, "min_history": 3},
    "adagc": {"start_clip_steps": 3},
    "autoclip": {"history": 4},
    "quantile_norm": {"initial_norm": 2.0},
    "average_norm": {"max_norm": 0.1},
}

SHAPES = [(6, 4), (5,), (3, 2, 2, 2)]
STEPS = 7
SPIKE_AT = 4
#: A NaN in the first tensor and an inf in the last, after the spike (so the adaptive methods
#: have left their warm-up) and before a last finite step (which shows the state a non-finite
#: step left behind). The middle tensor stays finite: per-tensor methods still clip it.
NONFINITE_AT = 5


def _accepted(name: str):
    return inspect.signature(type(gradclip.get(name)).__init__).parameters


def make_clipper(name: str, **overrides):
    """``gradclip.get(name)`` with the ``KWARGS`` it accepts, then ``overrides``."""
    accepted = _accepted(name)
    kwargs = {k: v for k, v in KWARGS.get(name, {}).items() if k in accepted}
    return gradclip.get(name, **{**kwargs, **overrides})


def sequence(seed: int = 0):
    """STEPS lists of float64 gradients (the SPIKE_AT-th twenty times larger, the NONFINITE_AT-th
    with a NaN and an inf), and parameters."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(STEPS):
        scale = 20.0 if step == SPIKE_AT else 1.0 + 0.1 * step
        steps.append([rng.normal(size=s) * scale for s in SHAPES])
    steps[NONFINITE_AT][0].reshape(-1)[3] = np.nan
    steps[NONFINITE_AT][-1].reshape(-1)[0] = np.inf
    params = [rng.normal(size=s) for s in SHAPES]
    return steps, params


def need(backend: str):
    module = {"numpy": "numpy", "torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}[backend]
    pytest.importorskip(module, reason=f"the {backend} backend needs {module}")


class _x64:
    """Enable jax_enable_x64 for fp64 JAX runs (a no-op elsewhere)."""

    def __init__(self, backend: str, dtype: str):
        self.on = backend == "jax" and dtype == "float64"

    def __enter__(self):
        if self.on:
            import jax

            self._ctx = jax.enable_x64(True)
            self._ctx.__enter__()

    def __exit__(self, *exc):
        if self.on:
            self._ctx.__exit__(*exc)


def run_eager(name: str, backend: str, dtype: str, steps=None, params=None, clipper=None):
    """Clip the sequence with ``clipper.clip``; return [(outputs64, info, output dtypes)]."""
    if steps is None:
        steps, params = sequence()
    clipper = clipper or make_clipper(name)
    p = [convert(backend, x, dtype) for x in params]
    results = []
    for grads in steps:
        g = [convert(backend, x, dtype) for x in grads]
        out, info = clipper.clip(g, params=p)
        results.append(record(out, info))
    return results


def record(out, info):
    """One step's result as compared: float64 outputs, the info as numbers, the output dtypes."""
    return [to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]


def run_tf_function(clipper, dtype: str, steps, params, jit_compile: bool = False):
    """Clip the sequence with ``clipper.clip`` inside one ``tf.function``; return (results, fn)."""
    import tensorflow as tf

    p = [convert("tensorflow", x, dtype) for x in params]
    step = tf.function(lambda g: clipper.clip(g, params=p), jit_compile=jit_compile)
    results = [record(*step([convert("tensorflow", x, dtype) for x in grads])) for grads in steps]
    return results, step


def run_jax_jit(clipper, dtype: str, steps, params):
    """Run the sequence through the pure ``update`` under one ``jax.jit``; return the results."""
    import jax

    p = [convert("jax", x, dtype) for x in params]
    state = clipper.init([convert("jax", x, dtype) for x in steps[0]])
    update = jax.jit(lambda g, s: clipper.update(g, s, params=p))
    results = []
    for grads in steps:
        out, state, info = update([convert("jax", x, dtype) for x in grads], state)
        results.append(record(out, info))
    return results


def assert_same(results, expected, dtype: str, what: str, rtol: float | None = None):
    """Equal outputs (NaN and inf in the same places, the rest within ``rtol``, by default two
    units in the last place of ``dtype``), equal info flags, info numbers at fp32 precision."""
    rtol = tolerance(dtype) if rtol is None else rtol
    assert len(results) == len(expected), f"{what}: {len(results)} steps, expected {len(expected)}"
    for step, ((out, info, dtypes), (ref, ref_info, _)) in enumerate(zip(results, expected)):
        for position, (a, b) in enumerate(zip(out, ref)):
            # The scale of the finite values: an inf in b would make any difference pass.
            finite = np.abs(b[np.isfinite(b)])
            scale = max(float(np.max(finite)) if finite.size else 0.0, 1e-30)
            np.testing.assert_allclose(
                a, b, rtol=rtol, atol=rtol * scale, err_msg=f"{what}: step {step}, gradient #{position}"
            )
        for field in ("clipped", "finite", "skip"):
            assert info[field] == ref_info[field], f"{what}: step {step}, info.{field}"
        for field in ("norm", "threshold", "coef"):
            np.testing.assert_allclose(
                info[field], ref_info[field], rtol=max(rtol, 2e-6), err_msg=f"{what}: step {step}, info.{field}"
            )
        assert dtypes == [dtype] * len(out), f"{what}: dtypes {dtypes} != {dtype}"


_reference_cache: dict[tuple[str, str], list] = {}


def reference(name: str, dtype: str):
    key = (name, dtype)
    if key not in _reference_cache:
        _reference_cache[key] = run_eager(name, "numpy", dtype)
    return _reference_cache[key]


# -- backend x dtype against the NumPy reference -----------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
@pytest.mark.parametrize("name", CLIPPERS)
def test_backend_matches_numpy_reference(name, backend, dtype):
    need(backend)
    with _x64(backend, dtype):
        results = run_eager(name, backend, dtype)
    assert_same(results, reference(name, dtype), dtype, f"{name} on {backend} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CLIPPERS)
def test_numpy_reference_preserves_dtype(name, dtype):
    for _out, _info, dtypes in reference(name, dtype):
        assert dtypes == [dtype] * len(SHAPES)


# -- compiled paths equal eager -------------------------------------------------------------------
def _holds_fp32_state(name: str) -> bool:
    """Whether the clipper keeps float32 numbers in its state (its statistics, by design fp32
    whatever the gradient dtype: DESIGN.md, state with explicit dtypes)."""
    state = make_clipper(name).init([np.zeros(s) for s in SHAPES])

    def leaves(node):
        if isinstance(node, tuple):
            return [leaf for child in node for leaf in leaves(child)]
        return [node]

    return any(str(getattr(leaf, "dtype", "")) == "float32" for leaf in leaves(state))


def compiled_rtol(name: str, dtype: str) -> float:
    """How close a compiled fp64 run must be to the eager one.

    In fp64 the outputs of stateless methods agree to fp64 precision. Adaptive methods derive
    their threshold from fp32 state (AdaGC's ``gamma``, ZClip's ``mean``/``var``, AutoClip's
    history, ...); XLA evaluates those fp32 expressions fused and reordered, and the thresholds
    may then differ from the eager ones by a few fp32 units, which reach the fp64 outputs through
    the coefficient (AdaGC under ``jax.jit``: 8e-8 relative; the others happen to agree to 1e-12
    today, but nothing promises it). The fp32 tolerance applies to them; their eager fp64 runs
    are still held to fp64 precision against the NumPy reference.
    """
    if dtype == "float64" and _holds_fp32_state(name):
        return tolerance("float32")
    return tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CLIPPERS)
def test_tf_function_equals_eager(name, dtype):
    """``clipper.clip`` inside ``tf.function`` (state in tf.Variables) equals eager clipping."""
    pytest.importorskip("tensorflow", reason="tf.function needs tensorflow")
    steps, params = sequence()
    eager = run_eager(name, "tensorflow", dtype, steps, params)
    clipper = make_clipper(name)
    first, step = run_tf_function(clipper, dtype, steps[:1], params)
    traces = step.experimental_get_tracing_count()
    rest = [record(*step([convert("tensorflow", x, dtype) for x in grads])) for grads in steps[1:]]
    # Traced once (twice when the first trace creates the state variables, as tf.function
    # does for any variable created on its first call), never again per step.
    assert traces <= 2 and step.experimental_get_tracing_count() == traces
    assert_same(first + rest, eager, dtype, f"{name} tf.function vs eager", compiled_rtol(name, dtype))


@pytest.mark.parametrize("name", CLIPPERS)
def test_tf_xla_equals_eager(name):
    """The same under XLA (``jit_compile=True``), as Keras compiles ``model.fit``'s step."""
    pytest.importorskip("tensorflow", reason="tf.function needs tensorflow")
    steps, params = sequence()
    eager = run_eager(name, "tensorflow", "float32", steps, params)
    results, _ = run_tf_function(make_clipper(name), "float32", steps, params, jit_compile=True)
    assert_same(results, eager, "float32", f"{name} XLA vs eager")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", CLIPPERS)
def test_jax_jit_equals_eager(name, dtype):
    """The pure ``update`` under ``jax.jit`` equals eager ``clip``, step after step."""
    pytest.importorskip("jax", reason="jax.jit needs jax")
    steps, params = sequence()
    with _x64("jax", dtype):
        eager = run_eager(name, "jax", dtype, steps, params)
        results = run_jax_jit(make_clipper(name), dtype, steps, params)
    assert_same(results, eager, dtype, f"{name} jax.jit vs eager", compiled_rtol(name, dtype))


# -- non-finite policies on TensorFlow and JAX --------------------------------------------------------
def _policy_argument(name: str) -> str | None:
    accepted = _accepted(name)
    return "nonfinite" if "nonfinite" in accepted else "policy" if "policy" in accepted else None


#: Every clipper that takes a non-finite policy, with each policy that runs under jit/tf.function
#: but its default: the default runs in every test above (the sequence holds a NaN and an inf).
POLICY_CASES = [
    (name, policy)
    for name in CLIPPERS
    if _policy_argument(name)
    for policy in ("propagate", "zero", "skip")
    if policy != _accepted(name)[_policy_argument(name)].default
]
RAISING = [name for name in CLIPPERS if _policy_argument(name)]


def _with_policy(name: str, policy: str):
    return make_clipper(name, **{_policy_argument(name): policy})


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("name,policy", POLICY_CASES)
def test_nonfinite_policy_matches_numpy_eager_and_compiled(name, policy, backend):
    """``propagate``/``zero``/``skip`` on TensorFlow (eager, ``tf.function``) and JAX (eager,
    ``jax.jit``) equal the NumPy reference, the non-finite step and the state it leaves behind
    (the finite step after it) included."""
    need(backend)
    steps, params = sequence()
    expected = run_eager(name, "numpy", "float32", steps, params, clipper=_with_policy(name, policy))
    # The reference did what the policy says on the bad step, so the comparison means something.
    bad_out, bad_info, _ = expected[NONFINITE_AT]
    assert bad_info["skip"] == (policy == "skip")
    all_finite = all(np.isfinite(o).all() for o in bad_out)
    assert all_finite if policy == "zero" else not all_finite
    eager = run_eager(name, backend, "float32", steps, params, clipper=_with_policy(name, policy))
    assert_same(eager, expected, "float32", f"{name} nonfinite={policy} on {backend}")
    if backend == "tensorflow":
        compiled, _ = run_tf_function(_with_policy(name, policy), "float32", steps, params)
    else:
        compiled = run_jax_jit(_with_policy(name, policy), "float32", steps, params)
    assert_same(compiled, expected, "float32", f"{name} nonfinite={policy} on {backend}, compiled")


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.parametrize("name", RAISING)
def test_nonfinite_raise_on_tf_and_jax_names_the_tensors_and_changes_nothing(name, backend):
    """``raise`` (eager only: it reads a value on the host) names the same tensors as on NumPy,
    leaves the state as it was, and the next step goes on as the reference's does."""
    need(backend)
    steps, params = sequence()
    ours, reference = _with_policy(name, "raise"), _with_policy(name, "raise")
    head = run_eager(name, backend, "float32", steps[:NONFINITE_AT], params, clipper=ours)
    want = run_eager(name, "numpy", "float32", steps[:NONFINITE_AT], params, clipper=reference)
    assert_same(head, want, "float32", f"{name} nonfinite=raise on {backend}, before the bad step")
    saved = json.dumps(ours.state_dict())
    bad = steps[NONFINITE_AT]
    with pytest.raises(gradclip.NonFiniteError) as caught:
        ours.clip([convert(backend, x, "float32") for x in bad], params=[convert(backend, x, "float32") for x in params])
    with pytest.raises(gradclip.NonFiniteError) as expected:
        reference.clip([convert("numpy", x, "float32") for x in bad], params=[convert("numpy", x, "float32") for x in params])
    assert caught.value.offenders == expected.value.offenders == ["#0", f"#{len(SHAPES) - 1}"]
    assert json.dumps(ours.state_dict()) == saved
    tail = run_eager(name, backend, "float32", steps[NONFINITE_AT + 1 :], params, clipper=ours)
    want = run_eager(name, "numpy", "float32", steps[NONFINITE_AT + 1 :], params, clipper=reference)
    assert_same(tail, want, "float32", f"{name} nonfinite=raise on {backend}, after the bad step")


# -- state round trip -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CLIPPERS)
def test_state_round_trip(name, backend):
    """state_dict -> JSON -> load_state_dict on a fresh clipper resumes the same run."""
    need(backend)
    steps, params = sequence(seed=1)
    whole = run_eager(name, backend, "float32", steps, params)
    first = make_clipper(name)
    head = run_eager(name, backend, "float32", steps[:3], params, clipper=first)
    saved = json.loads(json.dumps(first.state_dict()))
    second = make_clipper(name)
    second.load_state_dict(saved)
    tail = run_eager(name, backend, "float32", steps[3:], params, clipper=second)
    assert_same(head + tail, whole, "float32", f"{name} on {backend}: resumed run")
    if backend != "numpy":  # checkpoints are portable between backends
        numpy_clipper = make_clipper(name)
        numpy_clipper.load_state_dict(saved)
        tail_np = run_eager(name, "numpy", "float32", steps[3:], params, clipper=numpy_clipper)
        assert_same(tail_np, whole[3:], "float32", f"{name}: {backend} checkpoint resumed on NumPy")


@pytest.mark.parametrize("name", CLIPPERS)
def test_tf_function_state_follows_reset_and_load_after_tracing(name):
    """A traced ``tf.function`` keeps reading the clipper's tf.Variables: ``reset()`` and
    ``load_state_dict()`` called afterwards reach it without retracing."""
    tf = pytest.importorskip("tensorflow", reason="tf.function needs tensorflow")
    steps, params = sequence(seed=2)
    whole = run_eager(name, "tensorflow", "float32", steps, params)
    clipper = make_clipper(name)
    p = [convert("tensorflow", x, "float32") for x in params]
    step = tf.function(lambda g: clipper.clip(g, params=p))

    def run(chunk):
        return [record(*step([convert("tensorflow", x, "float32") for x in grads])) for grads in chunk]

    head = run(steps[:3])
    saved = json.loads(json.dumps(clipper.state_dict()))
    clipper.reset()
    restarted = run(steps[:1])  # after reset: a first step again
    assert_same(restarted, whole[:1], "float32", f"{name}: first step after reset()")
    clipper.load_state_dict(saved)
    tail = run(steps[3:])
    assert_same(head + tail, whole, "float32", f"{name}: tf.function resumed after load_state_dict")
    if clipper.state_dict()["state"] is not None and "step" in (clipper.state_dict()["state"] or {}):
        assert clipper.state_dict()["state"]["step"] == whole_steps(name, len(steps))


def whole_steps(name: str, count: int) -> int:
    reference = make_clipper(name)
    steps, params = sequence(seed=2)
    run_eager(name, "numpy", "float32", steps[:count], params, clipper=reference)
    return reference.state_dict()["state"]["step"]


# -- bad input ----------------------------------------------------------------------------------------
def _in_place_target(backend: str, values):
    """What ``clip_`` clips in place on ``backend``: NumPy arrays themselves, a torch parameter's
    ``.grad``, a ``tf.Variable``; JAX arrays are immutable and passed as they are."""
    array = convert(backend, values, "float32")
    if backend == "torch":
        import torch

        param = torch.nn.Parameter(torch.zeros_like(array))
        param.grad = array
        return param
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.Variable(array)
    return array


def _values(target) -> np.ndarray:
    return to64(target.grad if getattr(target, "grad", None) is not None else target)


@pytest.mark.parametrize(
    "first,second", [(a, b) for i, a in enumerate(BACKENDS) for b in BACKENDS[i + 1 :]]
)
def test_mixing_frameworks_in_one_call_is_a_clear_error_that_changes_nothing(first, second):
    """``clip``, ``clip_``, ``update`` and ``init`` on gradients of two frameworks raise
    BackendError naming the entry point and both frameworks, before anything is modified: the
    gradients (those ``clip_`` would write in place included) and the clipper's state (past its
    warm-up, held in tf.Variables when the first framework is TensorFlow) stay as they were."""
    need(first)
    need(second)
    steps, params = sequence()
    values = np.array([30.0, 40.0, 0.0])  # large enough that a clip would change them
    for name in ("global_norm", "zclip"):
        clipper = make_clipper(name)
        run_eager(name, first, "float32", steps[:SPIKE_AT], params, clipper=clipper)
        saved = json.dumps(clipper.state_dict())
        grads = [convert(first, values, "float32"), convert(second, values, "float32")]
        targets = [_in_place_target(first, values), _in_place_target(second, values)]
        calls = {
            "clip": lambda: clipper.clip(grads),
            "clip_": lambda: clipper.clip_(targets),
            "update": lambda: clipper.update(grads, None),
            "init": lambda: clipper.init(grads),
        }
        for entry, call in calls.items():
            with pytest.raises(gradclip.BackendError, match="one framework") as caught:
                call()
            message = str(caught.value)
            assert message.startswith(f"{type(clipper).__name__}.{entry}:"), message
            assert first in message and second in message, message
            for array in grads + targets:
                np.testing.assert_array_equal(_values(array), values, err_msg=f"{name}.{entry}")
            assert json.dumps(clipper.state_dict()) == saved, f"{name}.{entry} changed the state"
