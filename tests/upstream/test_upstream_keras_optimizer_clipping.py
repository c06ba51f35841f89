"""Keras' own tests of optimizer gradient clipping, run against gradclip's clippers and Keras adapter.

Ported from keras-team/keras, ``keras/src/optimizers/optimizer_test.py`` at commit
04d8e60eac7c33e219782eeb879930eb58a44752 (Apache-2.0, Copyright The Keras authors): the
clipping tests of ``OptimizerTest``, ``test_clip_args``, ``test_clip_norm``,
``test_clip_value`` and ``test_global_clip_norm``, with upstream's inputs and expected values.
Keras clips with the ``clipnorm``, ``clipvalue`` and ``global_clipnorm`` options of an optimizer
(``optimizer._clip_gradients``); with gradclip the clipper is the option:
``ClippingOptimizer(SGD(...), gradclip.Norm(c) | gradclip.Value(clip_value=c) |
gradclip.GlobalNorm(c, eps=0))``. Each test checks the clipper on the gradient alone (Keras'
``_clip_gradients``) and through ``apply_gradients`` of the wrapped optimizer (a learning rate of
1 makes the variable's change the clipped gradient).

The one deliberate difference, asserted as gradclip's behaviour: ``ONE_CLIPPER``: upstream
refuses two of Keras' options at once ("Only one of `clipnorm`, `clipvalue` and
`global_clipnorm` can be set"); gradclip composes any clippers with ``gradclip.chain`` and
refuses an inner optimizer that clips on its own (two clippings of one step, one hidden).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("the Keras adapter's tests run on the TensorFlow backend here", allow_module_level=True)

import gradclip  # noqa: E402
from gradclip.keras import ClippingOptimizer  # noqa: E402

ONE_CLIPPER = "clippers compose with gradclip.chain; an inner optimizer that also clips is refused"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _applied(clipper, grad):
    """The clipped gradient as a learning rate 1 SGD step applies it: -(v_after - v_before)."""
    variable = keras.Variable(np.zeros(np.shape(grad), "float32"))
    optimizer = ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0), clipper)
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(grad), variable)])
    return -np.asarray(variable.numpy())


def test_clip_args():
    optimizer = ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0), gradclip.Norm(0.1))
    assert optimizer.clipper.max_norm == 0.1
    optimizer = ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0), gradclip.Value(clip_value=0.1))
    assert optimizer.clipper.max_value == 0.1
    optimizer = ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0), gradclip.GlobalNorm(0.1, eps=0.0))
    assert optimizer.clipper.max_norm == 0.1

    # Test invalid arguments -- ONE_CLIPPER: two clippings compose explicitly, ...
    both = gradclip.chain(gradclip.Norm(0.1), gradclip.Value(clip_value=0.1))
    assert ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0), both).clipper is both
    # ... and Keras' own option beside a gradclip clipper is refused.
    for option in ({"clipnorm": 0.1}, {"clipvalue": 0.1}, {"global_clipnorm": 0.1}):
        with pytest.raises(gradclip.InvalidArgumentError, match=r"the inner optimizer also clips"):
            ClippingOptimizer(keras.optimizers.SGD(learning_rate=1.0, **option), gradclip.Norm(0.1))


def test_clip_norm():
    clipper = gradclip.Norm(1)
    grad = keras.ops.convert_to_tensor([100.0, 100.0])
    clipped_grad = clipper.clip([grad])[0]
    np.testing.assert_allclose(clipped_grad[0], [2**0.5 / 2, 2**0.5 / 2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_applied(clipper, [100.0, 100.0]), [2**0.5 / 2, 2**0.5 / 2], rtol=1e-6, atol=1e-6)


def test_clip_value():
    clipper = gradclip.Value(clip_value=1)
    grad = keras.ops.convert_to_tensor([100.0, 100.0])
    clipped_grad = clipper.clip([grad])[0]
    np.testing.assert_allclose(clipped_grad[0], [1.0, 1.0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_applied(clipper, [100.0, 100.0]), [1.0, 1.0], rtol=1e-6, atol=1e-6)


def test_global_clip_norm():
    clipper = gradclip.GlobalNorm(1, eps=0.0)  # Keras' global_clipnorm has no eps
    grad = np.array([50.0, 100.0], dtype="float32")
    global_norm = np.linalg.norm(grad)
    clipped_grad = clipper.clip([keras.ops.convert_to_tensor(grad)])[0]
    np.testing.assert_allclose(clipped_grad[0], grad / global_norm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_applied(clipper, grad), grad / global_norm, rtol=1e-6, atol=1e-6)
