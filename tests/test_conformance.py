"""Conformance: every registered clipper x every backend x every float dtype.

Driven by the registry (``gradclip.available()``): a method registered later is picked up with no
change here. For each (clipper, backend, dtype) the same gradient sequence (with a spike, so the
adaptive methods leave their warm-up and clip) goes through the clipper on the backend and on the
NumPy reference backend with gradients of the same dtype, and must agree:

* outputs within two units in the last place of the dtype, and of the same dtype as the inputs;
* ``ClipInfo``: the flags exactly, the numbers at fp32 precision (norms accumulate in fp32);
* the compiled paths (``tf.function``, ``tf.function(jit_compile=True)``, ``jax.jit``) equal the
  eager ones on the same backend;
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
STEPS = 6
SPIKE_AT = 4


def make_clipper(name: str):
    cls = type(gradclip.get(name))
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in KWARGS.get(name, {}).items() if k in accepted}
    return gradclip.get(name, **kwargs)


def sequence(seed: int = 0):
    """STEPS lists of float64 gradients, the SPIKE_AT-th twenty times larger, and parameters."""
    rng = np.random.default_rng(seed)
    steps = []
    for step in range(STEPS):
        scale = 20.0 if step == SPIKE_AT else 1.0 + 0.1 * step
        steps.append([rng.normal(size=s) * scale for s in SHAPES])
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
        results.append(([to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]))
    return results


def assert_same(results, expected, dtype: str, what: str):
    rtol = tolerance(dtype)
    for step, ((out, info, dtypes), (ref, ref_info, _)) in enumerate(zip(results, expected)):
        for position, (a, b) in enumerate(zip(out, ref)):
            scale = max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30)
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
COMPILED_DTYPES = ["bfloat16", "float32"]


@pytest.mark.parametrize("dtype", COMPILED_DTYPES)
@pytest.mark.parametrize("name", CLIPPERS)
def test_tf_function_equals_eager(name, dtype):
    """``clipper.clip`` inside ``tf.function`` (state in tf.Variables) equals eager clipping."""
    tf = pytest.importorskip("tensorflow", reason="tf.function needs tensorflow")
    steps, params = sequence()
    eager = run_eager(name, "tensorflow", dtype, steps, params)
    clipper = make_clipper(name)
    p = [convert("tensorflow", x, dtype) for x in params]
    step = tf.function(lambda g: clipper.clip(g, params=p))
    results = []
    for grads in steps:
        out, info = step([convert("tensorflow", x, dtype) for x in grads])
        results.append(([to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]))
        if len(results) == 1:
            traces = step.experimental_get_tracing_count()
    # Traced once (twice when the first trace creates the state variables, as tf.function
    # does for any variable created on its first call), never again per step.
    assert traces <= 2 and step.experimental_get_tracing_count() == traces
    assert_same(results, eager, dtype, f"{name} tf.function vs eager")


@pytest.mark.parametrize("name", CLIPPERS)
def test_tf_xla_equals_eager(name):
    """The same under XLA (``jit_compile=True``), as Keras compiles ``model.fit``'s step."""
    tf = pytest.importorskip("tensorflow", reason="tf.function needs tensorflow")
    steps, params = sequence()
    eager = run_eager(name, "tensorflow", "float32", steps, params)
    clipper = make_clipper(name)
    p = [convert("tensorflow", x, "float32") for x in params]
    step = tf.function(lambda g: clipper.clip(g, params=p), jit_compile=True)
    results = []
    for grads in steps:
        out, info = step([convert("tensorflow", x, "float32") for x in grads])
        results.append(([to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]))
    assert_same(results, eager, "float32", f"{name} XLA vs eager")


@pytest.mark.parametrize("dtype", COMPILED_DTYPES)
@pytest.mark.parametrize("name", CLIPPERS)
def test_jax_jit_equals_eager(name, dtype):
    """The pure ``update`` under ``jax.jit`` equals eager ``clip``, step after step."""
    jax = pytest.importorskip("jax", reason="jax.jit needs jax")
    steps, params = sequence()
    eager = run_eager(name, "jax", dtype, steps, params)
    clipper = make_clipper(name)
    p = [convert("jax", x, dtype) for x in params]
    state = clipper.init([convert("jax", x, dtype) for x in steps[0]])
    update = jax.jit(lambda g, s: clipper.update(g, s, params=p))
    results = []
    for grads in steps:
        out, state, info = update([convert("jax", x, dtype) for x in grads], state)
        results.append(([to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]))
    assert_same(results, eager, dtype, f"{name} jax.jit vs eager")


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
        results = []
        for grads in chunk:
            out, info = step([convert("tensorflow", x, "float32") for x in grads])
            results.append(([to64(o) for o in out], info.to_dict(), [dtype_name(o) for o in out]))
        return results

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
@pytest.mark.parametrize(
    "first,second", [(a, b) for i, a in enumerate(BACKENDS) for b in BACKENDS[i + 1 :]]
)
def test_mixing_frameworks_in_one_call_is_a_clear_error(first, second):
    need(first)
    need(second)
    grads = [convert(first, np.ones(3), "float32"), convert(second, np.ones(3), "float32")]
    for name in ("global_norm", "zclip"):
        if name not in CLIPPERS:
            continue
        with pytest.raises(gradclip.BackendError, match="one framework") as caught:
            make_clipper(name).clip(grads)
        assert first in str(caught.value) and second in str(caught.value)
