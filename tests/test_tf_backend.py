"""The TensorFlow backend: primitives, eager and ``tf.function`` use, state in ``tf.Variable``\\ s,
in-place clipping of variables, errors, seed 000's example, and parity with TensorFlow's own
``tf.clip_by_value``, ``tf.clip_by_norm``, ``tf.clip_by_global_norm`` and
``tf.compat.v1.clip_by_average_norm`` (each deviation is a named test).
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow", reason="the TensorFlow backend needs tensorflow")

import gradclip  # noqa: E402
from gradclip._core.clipper import make_info  # noqa: E402
from gradclip._core.contract import Decision  # noqa: E402
from gradclip._core.ops import get_ops  # noqa: E402
from gradclip.backends.tensorflow import TensorFlowOps  # noqa: E402
from _frameworks import convert, tolerance  # noqa: E402
from _ops_cases import CASES, case_ids, compare  # noqa: E402

CASE_PARAMS, CASE_IDS = case_ids()


def tfc(array, dtype="float32"):
    return convert("tensorflow", np.asarray(array, dtype=np.float64), dtype)


# -- primitives against the NumPy reference -------------------------------------------------------
@pytest.mark.parametrize("index,dtype", CASE_PARAMS, ids=CASE_IDS)
def test_primitive_matches_numpy(index, dtype):
    name, _dtypes, fn = CASES[index]
    # Ops bound to an array of the dtype, as a clipper's are (fp64 gradients accumulate in fp64).
    expected = fn(get_ops([convert("numpy", [0.0], dtype)]), lambda a, d: convert("numpy", a, d), dtype)
    result = fn(TensorFlowOps([tfc([0.0], dtype)]), lambda a, d: convert("tensorflow", a, d), dtype)
    compare(result, expected, tolerance(dtype), name)


# to_host/to_list ("scalar-math") read values on the host: eager only (tested below).
_GRAPH_PARAMS = [(p, i) for p, i in zip(CASE_PARAMS, CASE_IDS) if p[1] == "float32" and CASES[p[0]][0] != "scalar-math"]


@pytest.mark.parametrize("index,dtype", [p for p, _ in _GRAPH_PARAMS], ids=[i for _, i in _GRAPH_PARAMS])
def test_primitive_inside_tf_function(index, dtype):
    """The same primitives traced into a graph (everything but the host reads)."""
    name, _dtypes, fn = CASES[index]
    expected = fn(TensorFlowOps(), lambda a, d: convert("tensorflow", a, d), dtype)
    result = tf.function(lambda: fn(TensorFlowOps(), lambda a, d: convert("tensorflow", a, d), dtype))()
    compare(result, expected, 0.0, name)


def test_uniform_equals_numpy_for_64_bit_keys_and_counters():
    """The counter-based stream is bit-identical to NumPy's for keys and steps beyond 2**32."""
    shapes = [(3, 5), (7,)]
    for key, counter in [(0, 0), (2**40 + 5, 2**33 + 1), (2**62 - 1, 17)]:
        want = get_ops([], framework="numpy").uniform(np.asarray(key, np.int64), np.asarray(counter, np.int64), shapes)
        got = TensorFlowOps().uniform(tf.constant(key, tf.int64), tf.constant(counter, tf.int64), shapes)
        for w, g in zip(want, got):
            np.testing.assert_array_equal(g.numpy(), w)


# -- the clippers on tf.Tensor ----------------------------------------------------------------------
def test_fp16_gradient_of_300_is_clipped_to_one_not_zero():
    """DESIGN rule 2: the norm accumulates in fp32, so 300² does not overflow fp16."""
    grads, info = gradclip.GlobalNorm(1.0).clip([tfc([300.0, 0.0], "float16")])
    assert grads[0].dtype == tf.float16
    assert abs(float(grads[0][0]) - 1.0) < 1e-3
    assert info.norm.dtype == tf.float32 and float(info.norm) == 300.0


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_under_threshold_is_bit_for_bit_unchanged(dtype):
    g = [tfc(np.linspace(-0.1, 0.1, 11), dtype), tfc([[0.01, -0.02]], dtype)]
    for clipper in (gradclip.GlobalNorm(10.0), gradclip.Norm(10.0), gradclip.BlockRMS(10.0)):
        out, info = clipper.clip(g)
        assert not bool(info.clipped) and float(info.coef) == 1.0
        for a, b in zip(out, g):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_nested_structures_and_none_leaves():
    grads = {"dense": {"kernel": tfc(np.full((2, 2), 3.0)), "bias": None}, "out": (tfc([4.0]),)}
    out, info = gradclip.GlobalNorm(1.0, eps=0.0).clip(grads)
    assert out["dense"]["bias"] is None and isinstance(out["out"], tuple)
    assert float(info.norm) == pytest.approx(math.sqrt(4 * 9 + 16))
    total = math.sqrt(sum(float(tf.reduce_sum(t * t)) for t in [out["dense"]["kernel"], out["out"][0]]))
    assert total == pytest.approx(1.0, rel=1e-6)


def test_clip_in_place_on_tf_variables():
    """``clip_`` writes into tf.Variables (and Keras variables) with assign."""
    keras = pytest.importorskip("keras", reason="Keras variables need keras")
    v1 = tf.Variable([3.0, 4.0])
    v2 = keras.Variable(np.array([[0.0, 10.0]], np.float32))
    info = gradclip.GlobalNorm(1.0, eps=0.0).clip_([v1, v2])
    assert float(info.norm) == pytest.approx(math.sqrt(125.0))
    np.testing.assert_allclose(v1.numpy(), np.array([3.0, 4.0]) / math.sqrt(125.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(v2.numpy()), np.array([[0.0, 10.0]]) / math.sqrt(125.0), rtol=1e-6)
    gradclip.Value(-0.1, 0.1).clip_([v1])
    np.testing.assert_allclose(v1.numpy(), [0.1, 0.1])
    gradclip.clip_weights_([v1], 0.0, 0.05)
    np.testing.assert_allclose(v1.numpy(), [0.05, 0.05])


def test_clip_in_place_on_tf_tensor_is_a_clear_error():
    with pytest.raises(gradclip.BackendError, match=r"immutable .*clipper\.clip\(grads\)"):
        gradclip.GlobalNorm(1.0).clip_([tfc([1.0, 2.0])])


def test_sparse_indexed_slices_are_refused():
    slices = tf.IndexedSlices(tf.ones((2, 3)), tf.constant([0, 4]), tf.constant([5, 3]))
    with pytest.raises(gradclip.SparseGradientError, match="IndexedSlices.*tf.convert_to_tensor"):
        gradclip.GlobalNorm(1.0).clip([slices])


def test_raise_policy_eager_and_inside_tf_function():
    bad = [tfc([1.0, np.nan]), tfc([2.0])]
    with pytest.raises(gradclip.NonFiniteError, match="#0"):
        gradclip.GlobalNorm(1.0, nonfinite="raise").clip(bad)
    step = tf.function(lambda g: gradclip.GlobalNorm(1.0, nonfinite="raise").clip(g), autograph=False)
    with pytest.raises(gradclip.BackendError, match="tf.function.*'skip' or 'zero'"):
        step(bad)
    # With autograph (the default) TensorFlow re-raises our error as its StagingError, whose
    # message still carries ours.
    step = tf.function(lambda g: gradclip.GlobalNorm(1.0, nonfinite="raise").clip(g))
    with pytest.raises(Exception, match="tf.function.*'skip' or 'zero'"):
        step(bad)


def test_skip_and_zero_policies_inside_tf_function():
    bad = [tfc([3.0, np.nan]), tfc([4.0])]
    out, info = tf.function(lambda g: gradclip.GlobalNorm(1.0, nonfinite="skip").clip(g))(bad)
    assert bool(info.skip) and not bool(info.finite)
    np.testing.assert_array_equal(out[1].numpy(), [4.0])
    out, info = tf.function(lambda g: gradclip.GlobalNorm(1.0, eps=0.0, nonfinite="zero").clip(g))(bad)
    np.testing.assert_allclose(out[0].numpy(), [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[1].numpy(), [0.8], rtol=1e-6)


def test_dynamic_shapes_in_tf_function():
    """Unknown dimensions work for the norm methods; per-size statistics ask for static shapes."""
    spec = [tf.TensorSpec([None, 3], tf.float32)]
    out, info = tf.function(lambda g: gradclip.GlobalNorm(1.0, eps=0.0).clip(g), input_signature=[spec])(
        [tfc(np.full((4, 3), 2.0))]
    )
    np.testing.assert_allclose(float(info.norm), math.sqrt(48.0), rtol=1e-6)
    with pytest.raises(gradclip.BackendError, match="static shapes"):
        tf.function(lambda g: gradclip.BlockRMS(1.0).clip(g), input_signature=[spec], autograph=False)(
            [tfc(np.ones((4, 3)))]
        )


# -- state kept in tf.Variables ---------------------------------------------------------------------
class PeakState(NamedTuple):
    step: Any
    peak: Any


class Peak(gradclip.Clipper):
    """A small stateful clipper for these tests: clip at twice the largest norm seen before."""

    name = "peak_test"
    state_type = PeakState
    state_dtypes = {"step": "int64", "peak": "float32"}

    def init_state(self, ops, grads):
        return PeakState(ops.scalar(0, "int64"), ops.scalar(0.0, "float32"))

    def decide(self, ops, measured, state, signals=None):
        norm = measured.norm
        threshold = ops.where(state.step > 0, state.peak * 2.0, ops.scalar(math.inf, "float32"))
        coef = ops.clip_coefficient(norm, threshold)
        new = PeakState(state.step + 1, ops.maximum(state.peak, norm))
        finite = ops.isfinite(norm)
        return Decision(coef, new, make_info(ops, norm, threshold, coef, coef < 1, finite))


NORMS = [1.0, 3.0, 2.0, 20.0, 4.0]


def _steps():
    return [[tfc([n, 0.0])] for n in NORMS]


def _expected_outputs():
    peak, out = 0.0, []
    for i, n in enumerate(NORMS):
        limit = 2 * peak if i else math.inf
        out.append(min(n, limit))
        peak = max(peak, n)
    return out


def test_stateful_clipper_in_tf_function_keeps_state_in_variables():
    clipper = Peak()
    step = tf.function(lambda g: clipper.clip(g))
    got = [float(step(g)[0][0][0]) for g in _steps()]
    np.testing.assert_allclose(got, _expected_outputs(), rtol=1e-6)
    assert step.experimental_get_tracing_count() <= 2  # variables are created on the first trace
    held = clipper._kept.held.variables
    assert len(held) == 2 and all(isinstance(v, tf.Variable) for v in held)
    state = clipper.state_dict()["state"]
    assert state == {"step": 5, "peak": 20.0}
    json.dumps(clipper.state_dict())


def test_eager_and_tf_function_share_one_state():
    clipper = Peak()
    steps = _steps()
    clipper.clip(steps[0])
    clipper.clip(steps[1])
    step = tf.function(lambda g: clipper.clip(g))
    got = [float(step(g)[0][0][0]) for g in steps[2:]]
    np.testing.assert_allclose(got, _expected_outputs()[2:], rtol=1e-6)
    assert clipper.state_dict()["state"]["step"] == 5


def test_reset_and_load_state_dict_reach_an_already_traced_function():
    clipper = Peak()
    step = tf.function(lambda g: clipper.clip(g))
    for g in _steps():
        step(g)
    saved = clipper.state_dict()
    clipper.reset()
    assert clipper.state_dict()["state"] is None
    out, info = step([tfc([50.0, 0.0])])  # a first step again: no threshold yet
    assert math.isinf(float(info.threshold)) and float(out[0][0]) == 50.0
    assert clipper.state_dict()["state"] == {"step": 1, "peak": 50.0}
    clipper.load_state_dict(saved)
    out, info = step([tfc([50.0, 0.0])])
    assert float(info.threshold) == 40.0 and float(out[0][0]) == pytest.approx(40.0)
    assert clipper.state_dict()["state"] == {"step": 6, "peak": 50.0}


def test_checkpoint_loaded_before_the_first_trace_is_used():
    clipper = Peak()
    clipper.load_state_dict({"format": "gradclip", "version": 1, "clipper": "peak_test", "config": {},
                             "state": {"step": 3, "peak": 1.5}})
    out, info = tf.function(lambda g: clipper.clip(g))([tfc([10.0, 0.0])])
    assert float(info.threshold) == 3.0 and float(out[0][0]) == pytest.approx(3.0)


def test_chain_with_a_stateful_link_in_tf_function_round_trips():
    chain = gradclip.chain(gradclip.Value(clip_value=100.0), Peak())
    step = tf.function(lambda g: chain.clip(g))
    for g in _steps()[:3]:
        step(g)
    saved = json.loads(json.dumps(chain.state_dict()))
    assert saved["state"]["links"][1]["state"] == {"step": 3, "peak": 3.0}
    fresh = gradclip.chain(gradclip.Value(clip_value=100.0), Peak())
    fresh.load_state_dict(saved)
    fresh_step = tf.function(lambda g: fresh.clip(g))
    got = [float(fresh_step(g)[0][0][0]) for g in _steps()[3:]]
    np.testing.assert_allclose(got, _expected_outputs()[3:], rtol=1e-6)
    chain.load_state_dict(saved)  # into the chain's existing variables
    got = [float(step(g)[0][0][0]) for g in _steps()[3:]]
    np.testing.assert_allclose(got, _expected_outputs()[3:], rtol=1e-6)


def test_pure_update_inside_tf_function_needs_no_variables():
    clipper = Peak()
    state = clipper.init([tfc([0.0, 0.0])])
    update = tf.function(lambda g, s: clipper.update(g, s))
    outs = []
    for g in _steps():
        out, state, _info = update(g, state)
        outs.append(float(out[0][0]))
    np.testing.assert_allclose(outs, _expected_outputs(), rtol=1e-6)
    assert clipper._kept.held is None


# -- seed 000 ---------------------------------------------------------------------------------------
def test_seed_000_tensorflow_example():
    """Seed 000's TensorFlow example, ported to TF2, with gradclip in place of tf.clip_by_value.

    The seed builds ``loss = (x - y)²`` with ``x = y = 0``, clips the gradient of ``x`` into
    ``(0.5, 1.5)`` and runs 1000 SGD steps at learning rate 0.01. (Its TF1 code does not run: it
    calls ``optimizer.clone``, which ``tf.train.GradientDescentOptimizer`` never had, and pairs the
    clipped gradient with the gradient tensor instead of the variable.) Because the range excludes
    0, every clipped gradient is at least 0.5: x moves away from y by 0.005 a step and ends at
    -5.0, where unclipped descent would stay at the optimum 0. Both clippers give the same
    trajectory step for step.
    """

    def train(clip):
        x = tf.Variable(0.0)
        y = tf.Variable(0.0)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.square(x - y)
            (grad,) = tape.gradient(loss, [x])
            (clipped,) = clip([grad])
            x.assign_sub(0.01 * clipped)
            return clipped

        trajectory = []
        for _ in range(1000):
            step()
            trajectory.append(float(x.numpy()))
        return np.array(trajectory), float(y.numpy())

    reference, y_ref = train(lambda g: [tf.clip_by_value(g[0], 0.5, 1.5)])
    clipper = gradclip.Value(0.5, 1.5)
    ours, y_ours = train(lambda g: clipper.clip(g)[0])
    np.testing.assert_array_equal(ours, reference)
    assert ours[-1] == pytest.approx(-5.0, abs=1e-3) and y_ref == y_ours == 0.0


# -- parity with TensorFlow's clipping functions ----------------------------------------------------
def _random(seed, dtype, shapes=((3, 4), (7,), (2, 3, 5))):
    rng = np.random.default_rng(seed)
    return [tfc(rng.normal(size=s) * 3.0, dtype) for s in shapes]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("bounds", [(-1.0, 1.0), (0.5, 1.5), (-0.25, 2.0)])
def test_parity_tf_clip_by_value(dtype, bounds):
    grads = _random(1, dtype)
    out, _ = gradclip.Value(*bounds).clip(grads)
    for a, g in zip(out, grads):
        np.testing.assert_array_equal(a.numpy(), tf.clip_by_value(g, *bounds).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_parity_tf_clip_by_norm(dtype, max_norm):
    grads = _random(2, dtype)
    out, _ = gradclip.Norm(max_norm).clip(grads)
    for a, g in zip(out, grads):
        np.testing.assert_allclose(a.numpy(), tf.clip_by_norm(g, max_norm).numpy(), rtol=tolerance(dtype))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_norm", [0.5, 3.0, 100.0])
def test_parity_tf_clip_by_global_norm(dtype, max_norm):
    grads = _random(3, dtype)
    want, want_norm = tf.clip_by_global_norm(grads, max_norm)
    out, info = gradclip.GlobalNorm(max_norm, eps=0.0).clip(grads)
    np.testing.assert_allclose(float(info.norm), float(want_norm), rtol=tolerance(dtype))
    np.testing.assert_allclose(float(info.norm), float(tf.linalg.global_norm(grads)), rtol=tolerance(dtype))
    for a, w in zip(out, want):
        np.testing.assert_allclose(a.numpy(), w.numpy(), rtol=tolerance(dtype))
    # the one-shot function returns the norm as tf.clip_by_global_norm does
    out2, norm = gradclip.clip_by_global_norm(grads, max_norm)
    np.testing.assert_allclose(float(norm), float(want_norm), rtol=tolerance(dtype))


@pytest.mark.parametrize("max_norm", [0.01, 0.5, 10.0])
def test_parity_tf_compat_v1_clip_by_average_norm(max_norm):
    grads = _random(4, "float32")
    out, _ = gradclip.AverageNorm(max_norm).clip(grads)
    for a, g in zip(out, grads):
        np.testing.assert_allclose(a.numpy(), tf.compat.v1.clip_by_average_norm(g, max_norm).numpy(), rtol=2e-6)


def test_deviation_tf_clip_by_norm_overflows_fp16():
    """tf.clip_by_norm sums squares in fp16: 300² = inf, and the clipped gradient is 0."""
    g = tfc([300.0, 0.0], "float16")
    assert float(tf.clip_by_norm(g, 1.0)[0]) == 0.0
    out, _ = gradclip.Norm(1.0).clip([g])
    assert float(out[0][0]) == pytest.approx(1.0, abs=1e-3)


def test_deviation_tf_clip_by_global_norm_overflows_fp16_to_nan():
    """tf.clip_by_global_norm's fp16 norm overflows to inf and every entry becomes NaN."""
    grads = [tfc([300.0, 0.0], "float16"), tfc([1.0], "float16")]
    want, norm = tf.clip_by_global_norm(grads, 1.0)
    assert math.isinf(float(norm)) and np.isnan(want[0].numpy()).all()
    out, info = gradclip.GlobalNorm(1.0).clip(grads)
    assert float(info.norm) == pytest.approx(math.sqrt(90001.0), rel=1e-6)
    assert float(out[0][0]) == pytest.approx(1.0, abs=1e-3)


def test_deviation_tf_clip_by_global_norm_rejects_mixed_dtypes():
    grads = [tfc([3.0], "float16"), tfc([4.0], "float32")]
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.clip_by_global_norm(grads, 1.0)
    out, info = gradclip.GlobalNorm(1.0, eps=0.0).clip(grads)
    assert float(info.norm) == 5.0 and [o.dtype for o in out] == [tf.float16, tf.float32]
    assert float(out[0][0]) == pytest.approx(0.6, rel=1e-3) and float(out[1][0]) == pytest.approx(0.8, rel=1e-6)


def test_deviation_tf_clip_by_global_norm_turns_an_inf_into_all_nan():
    """TF documents it: one inf makes every entry NaN. gradclip's default leaves them alone."""
    grads = [tfc([np.inf, 1.0]), tfc([2.0])]
    want, _ = tf.clip_by_global_norm(grads, 1.0)
    assert np.isnan(want[1].numpy()).all()
    out, info = gradclip.GlobalNorm(1.0).clip(grads)
    assert not bool(info.finite) and float(out[1][0]) == 2.0
    out, info = gradclip.GlobalNorm(1.0, nonfinite="zero").clip(grads)
    assert float(out[0][0]) == 0.0 and np.isfinite(out[1].numpy()).all()


@pytest.mark.parametrize("function", ["clip_by_norm", "clip_by_global_norm"])
def test_deviation_zero_threshold_with_zero_gradients_gives_nan_in_tf(function):
    zeros = tfc(np.zeros(3))
    want = tf.clip_by_norm(zeros, 0.0) if function == "clip_by_norm" else tf.clip_by_global_norm([zeros], 0.0)[0][0]
    assert np.isnan(want.numpy()).all()
    clipper = gradclip.Norm(0.0) if function == "clip_by_norm" else gradclip.GlobalNorm(0.0)
    out, info = clipper.clip([zeros])
    np.testing.assert_array_equal(out[0].numpy(), np.zeros(3))
    assert not bool(info.clipped)


# -- thresholds computed inside tf.function, and gradclip's errors out of it (issue 14) ------------


def test_a_threshold_computed_inside_tf_function_is_taken():
    """A schedule computed in the train step (here from a step tensor) gives a symbolic
    threshold: the norm clippers and the one-shot functions take it."""
    x0, x1 = tfc([[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]), tfc([1.0, -2.0])  # global norm 5

    @tf.function
    def step(step_count):
        max_norm = 4.0 * tf.cast(step_count, tf.float32)  # 4.0 at step 1
        clipped, norm = gradclip.clip_by_global_norm([x0, x1], max_norm)
        per_tensor = gradclip.clip_by_norm([x0], max_norm)
        info = gradclip.GlobalNorm(max_norm, eps=0.0).clip([x0, x1])[1]
        return clipped, norm, per_tensor, info.threshold

    clipped, norm, per_tensor, threshold = step(tf.constant(1))
    np.testing.assert_allclose(clipped[0].numpy(), [[-1.6, 0.0, 0.0], [3.2, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(clipped[1].numpy(), [0.8, -1.6], rtol=1e-6)
    assert float(norm) == 5.0 and float(threshold) == 4.0
    np.testing.assert_allclose(per_tensor[0].numpy(), np.array([[-2.0, 0, 0], [4.0, 0, 0]]) * 4.0 / math.sqrt(20), rtol=1e-6)
    # The same function at step 2: the threshold follows the step (8 > 5: nothing clipped).
    clipped, _, _, threshold = step(tf.constant(2))
    np.testing.assert_array_equal(clipped[1].numpy(), [1.0, -2.0])
    assert float(threshold) == 8.0


def test_only_thresholds_take_a_traced_tensor_and_others_say_so():
    grads = [tfc([3.0, 4.0])]

    @tf.function
    def bad_setting():
        return gradclip.ZClip(alpha=tf.constant(0.9) * 1.0).clip(grads)[0]

    with pytest.raises(gradclip.InvalidArgumentError, match=r"ZClip: alpha must be a real number, got a .*only known when the traced function runs"):
        bad_setting()

    @tf.function
    def bad_bounds():
        return gradclip.clip_by_value(grads, -tf.constant(1.0), tf.constant(1.0))

    with pytest.raises(gradclip.InvalidArgumentError, match=r"clip_by_value: min_value must be a real number"):
        bad_bounds()


ERRORS_INSIDE_TF_FUNCTION = {
    "bad argument": (lambda g: gradclip.clip_by_global_norm(g, -1.0), gradclip.InvalidArgumentError,
                     r"clip_by_global_norm: max_norm must be in \[0, inf\]"),
    "unknown signal": (lambda g: gradclip.GlobalNorm(1.0).clip(g, lr=1.0), gradclip.InvalidArgumentError,
                       r"unknown argument\(s\) \['lr'\]"),
    "unrepresentable threshold": (lambda g: gradclip.NormSign(1e6).clip([tf.cast(g[0], tf.float16)]),
                                  gradclip.InvalidArgumentError, r"NormSign: threshold=1000000\.0 is not representable"),
    "integer gradients": (lambda g: gradclip.GlobalNorm(1.0).clip([tf.cast(g[0], tf.int32)]), gradclip.BackendError,
                          r"not floating point"),
}


@pytest.mark.parametrize("case", sorted(ERRORS_INSIDE_TF_FUNCTION))
def test_gradclips_errors_reach_the_caller_of_a_tf_function_as_gradclips_types(case):
    """autograph re-raises an error from a traced function as its own type when that type is
    constructible from the message alone (every gradclip error is), else as StagingError."""
    call, error, match = ERRORS_INSIDE_TF_FUNCTION[case]
    grads = [tfc([3.0, 4.0])]
    with pytest.raises(error, match=match) as caught:
        tf.function(lambda: call(grads))()
    assert type(caught.value) is error
    assert "StagingError" not in type(caught.value).__name__


def test_every_gradclip_error_is_constructible_from_its_message_alone():
    errors = [getattr(gradclip, name) for name in gradclip.__all__ if name.endswith("Error")]
    assert len(errors) >= 7
    for error in errors:
        assert error.__init__ is Exception.__init__, error  # what autograph requires
        assert str(error("the message")) == "the message"
    nonfinite = gradclip.NonFiniteError("bad values", ["w"])
    assert str(nonfinite) == "bad values" and nonfinite.offenders == ["w"]
