"""A clipper's state belongs to one clipper and one framework.

Found by a new user: ``ZClip().update(grads, AutoClip().init(grads))`` failed with
``AttributeError: 'AutoClipSketchState' object has no attribute 'step'``, and a clipper used
with TensorFlow tensors, then JAX arrays (or torch, then NumPy), failed deep in its arithmetic
with an error about array types. Each is now refused by name before anything changes.
"""

from __future__ import annotations

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")
jnp = pytest.importorskip("jax.numpy")

MAKERS = {
    "numpy": lambda value: [np.full(3, value, np.float32)],
    "torch": lambda value: [torch.full((3,), value)],
    "jax": lambda value: [jnp.full(3, value, jnp.float32)],
}


def _tf_maker():
    tf = pytest.importorskip("tensorflow")
    return lambda value: [tf.fill([3], tf.constant(value, tf.float32))]


def _maker(name):
    return _tf_maker() if name == "tensorflow" else MAKERS[name]


def test_update_refuses_another_clipper_s_state():
    grads = MAKERS["numpy"](1.0)
    for state in (gradclip.AutoClip().init(grads), {"step": 0}, (1, 2)):
        with pytest.raises(gradclip.InvalidArgumentError,
                           match=r"ZClip.update: state must be the ZClipState that ZClip.init .* got "):
            gradclip.ZClip().update(grads, state)


def test_update_refuses_a_state_of_another_framework():
    state = gradclip.ZClip().init(MAKERS["numpy"](1.0))
    grads = MAKERS["torch"](1.0)
    before = grads[0].clone()
    with pytest.raises(gradclip.InvalidArgumentError, match="state holds numpy arrays but the gradients are torch"):
        gradclip.ZClip().update(grads, state)
    assert torch.equal(grads[0], before)


def test_update_takes_a_numpy_state_with_jax_gradients():
    # What flax.serialization restores is NumPy: JAX reads host arrays as constants.
    clipper = gradclip.ZClip()
    numpy_state = clipper.init(MAKERS["numpy"](1.0))
    jax_state = clipper.init(MAKERS["jax"](1.0))
    for value in (1.0, 2.0, 3.0):
        out_numpy, numpy_state, _ = clipper.update(MAKERS["jax"](value), numpy_state)
        out_jax, jax_state, _ = clipper.update(MAKERS["jax"](value), jax_state)
        np.testing.assert_array_equal(np.asarray(out_numpy[0]), np.asarray(out_jax[0]))


@pytest.mark.parametrize(
    "first, second",
    [("torch", "numpy"), ("numpy", "torch"), ("torch", "jax"), ("jax", "numpy"), ("tensorflow", "jax"), ("jax", "tensorflow")],
)
def test_a_kept_state_refuses_gradients_of_another_framework(first, second):
    clipper = gradclip.ZClip()
    for value in (1.0, 2.0, 3.0):
        clipper.clip(_maker(first)(value))
    saved = clipper.state_dict()
    with pytest.raises(gradclip.StateError, match=f"keeps its state in {first} arrays .* these gradients are {second}"):
        clipper.clip(_maker(second)(4.0))
    assert clipper.state_dict() == saved  # nothing changed
    # The way across: a new clipper loads the checkpoint and builds it for its gradients, and
    # continues exactly as the first would have.
    moved = gradclip.ZClip()
    moved.load_state_dict(saved)
    stayed = gradclip.ZClip()
    stayed.load_state_dict(saved)
    _, moved_info = moved.clip(_maker(second)(4.0))
    _, stayed_info = stayed.clip(_maker(first)(4.0))
    assert moved_info.to_dict() == pytest.approx(stayed_info.to_dict())
    assert moved.state_dict() == stayed.state_dict()


def test_clip_in_place_refuses_too():
    clipper = gradclip.ZClip()
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    clipper.clip_([param])
    array = np.ones(3, np.float32)
    with pytest.raises(gradclip.StateError, match="keeps its state in torch arrays"):
        clipper.clip_([array])
    np.testing.assert_array_equal(array, np.ones(3, np.float32))
