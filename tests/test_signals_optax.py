"""The step's loss through optax: ``as_optax()`` and ``clip_then`` take optax's extra arguments.

``update(updates, state, params, loss=...)`` reaches the clipper's ``decide``, eagerly, under
``jax.jit`` and through ``optax.chain`` (which hands extra arguments to every link); a loss spike
makes ``SkipOnSpike(signal="loss")`` zero the update, exactly as the same clipper does through
``clipper.update``. Bad losses are refused before anything is computed.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="as_optax needs jax")
optax = pytest.importorskip("optax", reason="as_optax needs optax")
jnp = jax.numpy

import gradclip
import gradclip.optax as gco


def params_and_grads(seed):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3, jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=3), jnp.float32)}
    return params, grads


def spike_clipper():
    return gradclip.SkipOnSpike(window=8, min_history=4, sigma=3.0, signal="loss")


# Calm losses, then a spike at step 6 (index 6), then calm again.
LOSSES = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0, 50.0, 1.0]


def test_transforms_take_extra_args():
    tx = spike_clipper().as_optax()
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    assert isinstance(gco.clip_then(spike_clipper(), optax.sgd(0.1)), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_loss_through_chain_skips_the_spike_like_clipper_update(jit):
    """Through ``optax.chain`` (a plain ``optax.sgd`` after it, which takes no extra argument),
    the step with the loss spike gives zero updates and ``info.skip``; every step's info and
    the final clipper state equal ``clipper.update`` given the same losses."""
    params, grads = params_and_grads(0)
    tx = optax.chain(spike_clipper().as_optax(), optax.sgd(0.1))
    state = tx.init(params)
    reference = spike_clipper()
    ref_state = reference.init(grads)
    update = jax.jit(tx.update) if jit else tx.update
    skips = []
    for loss in LOSSES:
        updates, state = update(grads, state, params, loss=jnp.float32(loss))
        _, ref_state, ref_info = reference.update(grads, ref_state, loss=jnp.float32(loss))
        info = gco.clip_info(state)
        skips.append(bool(info.skip))
        assert bool(info.skip) == bool(ref_info.skip)
        np.testing.assert_allclose(float(info.threshold), float(ref_info.threshold), rtol=1e-6)
        moved = any(bool(jnp.any(u != 0)) for u in jax.tree_util.tree_leaves(updates))
        assert moved != bool(info.skip)
    assert skips == [False] * 6 + [True, False]
    for a, b in zip(jax.tree_util.tree_leaves(state[0].clipper), jax.tree_util.tree_leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clip_then_keeps_adam_state_on_a_loss_spike():
    params, grads = params_and_grads(1)
    tx = gco.clip_then(spike_clipper(), optax.adam(1e-2))
    state = tx.init(params)
    update = jax.jit(tx.update)
    for loss in LOSSES[:6]:
        _, state = update(grads, state, params, loss=jnp.float32(loss))
    before = jax.tree_util.tree_leaves(state.inner)
    updates, state = update(grads, state, params, loss=jnp.float32(LOSSES[6]))
    assert bool(gco.clip_info(state).skip)
    for a, b in zip(before, jax.tree_util.tree_leaves(state.inner)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not bool(jnp.any(u != 0)) for u in jax.tree_util.tree_leaves(updates))


def test_value_is_the_loss_and_other_extra_args_are_ignored():
    """optax names the objective ``value=`` (reduce_on_plateau, line searches): it is taken as
    the loss; an extra argument meant for another link is ignored."""
    params, grads = params_and_grads(2)
    by_loss, by_value = spike_clipper().as_optax(), spike_clipper().as_optax()
    s1, s2 = by_loss.init(params), by_value.init(params)
    for loss in LOSSES:
        _, s1 = by_loss.update(grads, s1, params, loss=jnp.float32(loss))
        _, s2 = by_value.update(grads, s2, params, value=jnp.float32(loss), grad=grads)
        assert bool(s1.info.skip) == bool(s2.info.skip)
    assert bool(s1.info.skip) is False and int(s1.clipper.skipped) == 1


def test_numpy_and_python_losses_are_accepted():
    params, grads = params_and_grads(3)
    tx = spike_clipper().as_optax()
    state = tx.init(params)
    for i, loss in enumerate(LOSSES[:7]):
        given = np.float32(loss) if i % 2 else float(loss)
        _, state = tx.update(grads, state, params, loss=given)
    assert bool(state.info.skip)


def test_a_loss_watching_clipper_without_loss_is_refused():
    params, grads = params_and_grads(4)
    tx = spike_clipper().as_optax()
    state = tx.init(params)
    with pytest.raises(gradclip.InvalidArgumentError, match="loss"):
        tx.update(grads, state, params)


@pytest.mark.parametrize(
    "loss, match",
    [
        (jnp.ones(3), r"loss must be a scalar \(one element\), got an array of shape \(3,\)"),
        ("1.0", "loss must be a number or an array, got str"),
        (True, "loss must be a number or an array, got bool"),
    ],
    ids=["shape", "str", "bool"],
)
def test_bad_losses_are_refused(loss, match):
    params, grads = params_and_grads(5)
    tx = optax.chain(spike_clipper().as_optax(), optax.sgd(0.1))
    state = tx.init(params)
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        tx.update(grads, state, params, loss=loss)


def test_a_loss_of_the_wrong_shape_is_refused_under_jit():
    params, grads = params_and_grads(5)
    tx = optax.chain(spike_clipper().as_optax(), optax.sgd(0.1))
    state = tx.init(params)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"SkipOnSpike.as_optax\(\).update: loss must be a scalar"):
        jax.jit(tx.update)(grads, state, params, loss=jnp.ones((2, 1)))


def test_a_torch_loss_is_refused():
    torch = pytest.importorskip("torch")
    params, grads = params_and_grads(6)
    tx = spike_clipper().as_optax()
    state = tx.init(params)
    with pytest.raises(gradclip.InvalidArgumentError, match="loss is a torch array but the gradients are jax arrays"):
        tx.update(grads, state, params, loss=torch.tensor(1.0))
