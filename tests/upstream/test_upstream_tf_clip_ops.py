"""TensorFlow's own tests of its clip ops, run against gradclip on TensorFlow tensors.

Ported from tensorflow/tensorflow, ``tensorflow/python/kernel_tests/math_ops/clip_ops_test.py``
at commit 37b680c93bb61bcb9105edc577aafe9f3c312cee (Apache-2.0, Copyright 2015 The TensorFlow
Authors). Every test of ``ClipTest`` is here under its upstream name, with upstream's inputs and
expected values: ``clip_ops.clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm`` map to
``gradclip.clip_by_value``, ``clip_by_norm``, ``clip_by_global_norm`` (lists of tensors) and
``clip_by_average_norm`` to :class:`gradclip.AverageNorm`. Graph-mode sessions
(``run_deprecated_v1``) become eager calls plus, where upstream passes a tensor ``clip_norm``,
the same call inside ``tf.function``; ``assertAllClose`` keeps TensorFlow's tolerances (1e-6,
1e-3 for float16/bfloat16).

The deliberate differences, each asserted as gradclip's behaviour in the test that meets it:

* ``INTEGER_GRADIENTS``: integer arrays are refused (``BackendError``): clipping by a
  coefficient would truncate them, so gradclip never takes them (TensorFlow clamps integers).
* ``ELEMENTWISE_BOUNDS``: bounds are numbers, one range for every element; a tensor of bounds
  per element is refused (``InvalidArgumentError``, a ``ValueError``).
* ``INDEXED_SLICES``: sparse gradients are refused (``SparseGradientError``) rather than
  densified silently.
* ``NORM_AXES``: ``clip_by_norm`` clips whole tensors; there is no ``axes`` argument (the third
  positional argument is ``norm_type``).
* ``NONFINITE_NORM``: with an inf in the gradients the global norm is inf and gradclip leaves
  the gradients as they are (policy ``"propagate"``); TensorFlow scales everything to NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import gradclip  # noqa: E402

INTEGER_GRADIENTS = "integer gradients are refused"
ELEMENTWISE_BOUNDS = "element-wise tensor bounds are refused"
INDEXED_SLICES = "IndexedSlices are refused"
NORM_AXES = "clip_by_norm has no axes"
NONFINITE_NORM = "a non-finite global norm leaves the gradients unchanged"

FLOAT_DTYPES = [tf.float16, tf.float32, tf.float64, tf.bfloat16]
INTEGER_DTYPES = [tf.int16, tf.int32, tf.int64, tf.uint8]


def assert_all_close(expected, actual, dtype=tf.float32):
    """TensorFlow's ``assertAllClose`` tolerances: 1e-6, or 1e-3 for half precision."""
    tolerance = 1e-3 if dtype in (tf.float16, tf.bfloat16) else 1e-6
    actual = actual.numpy() if hasattr(actual, "numpy") else actual
    np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                               rtol=tolerance, atol=tolerance)


def clip_by_value(x, low, high):
    return gradclip.clip_by_value([x], low, high)[0]


def clip_by_norm(x, clip_norm):
    return gradclip.clip_by_norm([x], clip_norm)[0]


def clip_by_average_norm(x, clip_norm):
    return gradclip.AverageNorm(clip_norm).clip([x])[0][0]


# -- ClipByValue -----------------------------------------------------------------------------------


def testClipByValueGradient():
    inputs = tf.constant([1.0, 2.0, 3.0, 4.0], dtype=tf.float32)
    theoretical, numerical = tf.test.compute_gradient(lambda x: clip_by_value(x, 0.5, 3.5), [inputs])
    error_1 = np.max(np.abs(theoretical[0] - numerical[0]))
    assert error_1 < 1e-4
    # outputs_2 clips by tensors of bounds: ELEMENTWISE_BOUNDS.
    min_val = tf.constant([0.5, 0.5, 0.5, 0.5], dtype=tf.float32)
    max_val = tf.constant([3.5, 3.5, 3.5, 3.5], dtype=tf.float32)
    with pytest.raises(gradclip.InvalidArgumentError, match="min_value must be a real number"):
        clip_by_value(inputs, min_val, max_val)


def testClipByValue():
    x = tf.constant([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0], shape=[2, 3])
    np_ans = [[-4.4, 2.0, 3.0], [4.0, 4.4, 4.4]]
    clip_value = 4.4
    assert_all_close(np_ans, clip_by_value(x, -clip_value, clip_value))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + INTEGER_DTYPES, ids=lambda d: d.name)
def testClipByValue0Type(dtype):
    x = tf.constant([1, 2, 3, 4, 5, 6], shape=[2, 3], dtype=dtype)
    np_ans = [[2, 2, 3], [4, 4, 4]]
    if dtype in INTEGER_DTYPES:  # INTEGER_GRADIENTS
        with pytest.raises(gradclip.BackendError, match="not floating point"):
            clip_by_value(x, 2, 4)
        return
    assert_all_close(np_ans, clip_by_value(x, 2, 4), dtype)


@pytest.mark.parametrize("case", ["1Type", "2Type", "3Type"])
def testClipByValueTensorBounds(case):
    """testClipByValue1Type, 2Type and 3Type: [Tensor, Tensor, Scalar], [Tensor, Scalar, Tensor],
    [Tensor, Tensor, Tensor] -- ELEMENTWISE_BOUNDS, for every dtype upstream uses."""
    for dtype in FLOAT_DTYPES + INTEGER_DTYPES:
        x = tf.constant([1, 2, 3, 4, 5, 6], shape=[2, 3], dtype=dtype)
        low = {"1Type": tf.constant([2, 2, 2, 3, 3, 3], shape=[2, 3], dtype=dtype), "2Type": 4,
               "3Type": tf.constant([2, 2, 2, 5, 5, 5], shape=[2, 3], dtype=dtype)}[case]
        high = {"1Type": 4, "2Type": tf.constant([6, 6, 6, 6, 6, 6], shape=[2, 3], dtype=dtype),
                "3Type": tf.constant([5, 5, 5, 7, 7, 7], shape=[2, 3], dtype=dtype)}[case]
        with pytest.raises(gradclip.InvalidArgumentError, match=r"(min|max)_value must be a real number"):
            clip_by_value(x, low, high)


def testClipByValueBadShape():
    x = tf.constant([-5.0, 2.0, 3.0, 4.0, 5.0, 6.0], shape=[2, 3, 1])
    # Use a nonsensical shape.
    clip = tf.constant([1.0, 2.0])
    with pytest.raises(ValueError):
        _ = clip_by_value(x, -clip, clip)
    with pytest.raises(ValueError):
        _ = clip_by_value(x, 1.0, clip)


def testClipByValueNonFinite():
    x = tf.constant([float("NaN"), float("Inf"), -float("Inf")])
    np_ans = [float("NaN"), 4.0, -4.0]
    clip_value = 4.0
    assert_all_close(np_ans, clip_by_value(x, -clip_value, clip_value))


def testClipByValueWithIndexedSlicesClipped():
    """_testClipIndexedSlicesByValue's three ranges: INDEXED_SLICES."""
    values = [[[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]], [[0.0, 2.0, 0.0], [0.0, 0.0, -1.0]]]
    indexed_slices = tf.IndexedSlices(tf.constant(values), tf.constant([2, 6]), tf.constant([10, 2, 3]))
    for low, high in [(-2.0, 2.0), (1.0, 2.0), (-2.0, -1.0)]:
        with pytest.raises(gradclip.SparseGradientError, match="sparse gradients are not supported"):
            gradclip.clip_by_value([indexed_slices], low, high)


def testClipByValueEmptyTensor():
    zero = tf.zeros((7, 0))
    y = clip_by_value(zero, 1.0, 1.0)
    assert y.shape == (7, 0)
    # x, z and w clip by the empty tensor itself: ELEMENTWISE_BOUNDS.
    for low, high in [(zero, zero), (zero, 1.0), (1.0, zero)]:
        with pytest.raises(gradclip.InvalidArgumentError):
            clip_by_value(zero, low, high)


# -- ClipByNorm -----------------------------------------------------------------------------------


def testClipByNormClipped():
    # Norm clipping when clip_norm < 5
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    # Norm of x = sqrt(3^2 + 4^2) = 5
    np_ans = [[-2.4, 0.0, 0.0], [3.2, 0.0, 0.0]]
    clip_norm = 4.0
    tf_ans = clip_by_norm(x, clip_norm)
    tf_ans_tensor = tf.function(lambda: clip_by_norm(x, tf.constant(clip_norm)))()
    assert_all_close(np_ans, tf_ans)
    assert_all_close(np_ans, tf_ans_tensor)


def testClipByNormGradientZeros():
    x = tf.zeros([3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        b = clip_by_norm(x, 1.0)
    grad = tape.gradient(b, x)
    np.testing.assert_array_equal(grad.numpy(), [1.0, 1.0, 1.0])


def testClipByNormBadShape():
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3, 1])
    # Use a nonsensical shape.
    clip = tf.constant([1.0, 2.0])
    with pytest.raises(ValueError):
        _ = clip_by_norm(x, clip)


def testClipByNormNotClipped():
    # No norm clipping when clip_norm >= 5
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    np_ans = [[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_norm(x, 6.0))


def testClipByNormZero():
    # No norm clipping when norm = 0
    x = tf.constant([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], shape=[2, 3])
    np_ans = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_norm(x, 6.0))


@pytest.mark.parametrize("name,axes,clip_norm", [
    ("testClipByNormClippedWithDim0", [0], 4.0),
    ("testClipByNormClippedWithDim1", [1], 4.0),
    ("testClipByNormNotClippedWithAxes", [1], 6.0),
])
def testClipByNormWithAxes(name, axes, clip_norm):
    """NORM_AXES: the axes upstream passes land on norm_type and are refused clearly."""
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 3.0], shape=[2, 3])
    with pytest.raises(gradclip.InvalidArgumentError, match=r"clip_by_norm: norm_type must be a real number"):
        gradclip.clip_by_norm([x], clip_norm, axes)


# -- ClipByGlobalNorm -----------------------------------------------------------------------------


def _global_norm_case(clip_norm, in_function=False):
    x0 = tf.constant([-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([1.0, -2.0])
    # Global norm of x0 and x1 = sqrt(1 + 4^2 + 2^2 + 2^2) = 5
    if in_function:
        return tf.function(lambda: gradclip.clip_by_global_norm((x0, x1), clip_norm()))()
    return gradclip.clip_by_global_norm((x0, x1), clip_norm)


def testClipByGlobalNormClipped():
    # Norm clipping when clip_norm < 5; answers are the original tensors scaled by 4.0/5.0
    np_ans_0 = [[-1.6, 0.0, 0.0], [3.2, 0.0, 0.0]]
    np_ans_1 = [0.8, -1.6]
    ans, norm = _global_norm_case(4.0)
    assert_all_close(5.0, norm)
    assert_all_close(np_ans_0, ans[0])
    assert_all_close(np_ans_1, ans[1])


def testClipByGlobalNormClippedTensor():
    np_ans_0 = [[-1.6, 0.0, 0.0], [3.2, 0.0, 0.0]]
    np_ans_1 = [0.8, -1.6]
    for ans, norm in (_global_norm_case(tf.constant(4.0)), _global_norm_case(lambda: tf.constant(4.0), True)):
        assert_all_close(5.0, norm)
        assert_all_close(np_ans_0, ans[0])
        assert_all_close(np_ans_1, ans[1])


def testClipByGlobalNormSupportsNone():
    x0 = tf.constant([-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([1.0, -2.0])
    np_ans_0 = [[-1.6, 0.0, 0.0], [3.2, 0.0, 0.0]]
    np_ans_1 = [0.8, -1.6]
    ans, norm = gradclip.clip_by_global_norm((x0, None, x1, None), 4.0)
    assert ans[1] is None
    assert ans[3] is None
    assert_all_close(5.0, norm)
    assert_all_close(np_ans_0, ans[0])
    assert_all_close(np_ans_1, ans[2])


def testClipByGlobalNormWithIndexedSlicesClipped():
    """And testClipByGlobalNormPreservesDenseShape: INDEXED_SLICES."""
    x0 = tf.constant([-2.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.IndexedSlices(tf.constant([1.0, -2.0]), tf.constant([3, 4]))
    with pytest.raises(gradclip.SparseGradientError):
        gradclip.clip_by_global_norm([x0, x1], 4.0)
    slices = tf.IndexedSlices(tf.constant([1.0]), tf.constant([0]), dense_shape=(1,))
    with pytest.raises(gradclip.SparseGradientError):
        gradclip.clip_by_global_norm([slices], 1.0)


def testClipByGlobalNormNotClipped():
    # No norm clipping when clip_norm >= 5
    np_ans_0 = [[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    np_ans_1 = [1.0, -2.0]
    ans, norm = _global_norm_case(6.0)
    assert_all_close(5.0, norm)
    assert_all_close(np_ans_0, ans[0])
    assert_all_close(np_ans_1, ans[1])


def testClipByGlobalNormZero():
    # No norm clipping when norm = 0
    x0 = tf.constant([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([0.0, 0.0])
    ans, norm = gradclip.clip_by_global_norm([x0, x1], 6.0)
    assert_all_close(0.0, norm)
    assert_all_close([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], ans[0])
    assert_all_close([0.0, 0.0], ans[1])


def testClipByGlobalNormInf():
    """NONFINITE_NORM: TensorFlow expects all NaNs; gradclip leaves the gradients as they were
    (and reports the inf norm), so one bad step does not poison every parameter."""
    x0 = tf.constant([-2.0, 0.0, np.inf, 4.0, 0.0, 0.0], shape=[2, 3])
    x1 = tf.constant([1.0, -2.0])
    ans, norm = gradclip.clip_by_global_norm([x0, x1], 6.0)
    np.testing.assert_array_equal(norm.numpy(), float("inf"))
    np.testing.assert_array_equal(ans[0].numpy(), x0.numpy())
    np.testing.assert_array_equal(ans[1].numpy(), x1.numpy())


# -- ClipByAverageNorm ----------------------------------------------------------------------------


def testClipByAverageNormClipped():
    # Norm clipping when average clip_norm < 0.83333333
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    # Average norm of x = sqrt(3^2 + 4^2) / 6 = 0.83333333
    np_ans = [[-2.88, 0.0, 0.0], [3.84, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_average_norm(x, 0.8))


def testClipByAverageNormClippedTensor():
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    np_ans = [[-2.88, 0.0, 0.0], [3.84, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_average_norm(x, tf.constant(0.8)))
    assert_all_close(np_ans, tf.function(lambda: clip_by_average_norm(x, tf.constant(0.8)))())


def testClipByAverageNormNotClipped():
    # No norm clipping when average clip_norm >= 0.83333333
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    np_ans = [[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_average_norm(x, 0.9))


def testClipByAverageNormZero():
    # No norm clipping when average clip_norm = 0
    x = tf.constant([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], shape=[2, 3])
    np_ans = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert_all_close(np_ans, clip_by_average_norm(x, 0.9))


def testClipByAverageNormReplacedWithClipByNorm():
    # Check clip_by_average_norm(t) is the same as clip_by_norm(t, clip_norm * size(t))
    x = tf.constant([-3.0, 0.0, 0.0, 4.0, 0.0, 0.0], shape=[2, 3])
    # expected answer [[-2.88, 0.0, 0.0], [3.84, 0.0, 0.0]]
    clip_norm = tf.constant(0.8)
    with_norm = clip_by_average_norm(x, clip_norm)
    without_norm = clip_by_norm(x, clip_norm * tf.cast(tf.size(x), tf.float32))
    assert_all_close(with_norm, without_norm)
