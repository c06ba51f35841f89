"""Per-example clipping in JAX: optax parity, clipped_grad (vmap, microbatched scan) under jit."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp

import gradclip
import gradclip.jax as gjax
import gradclip.optax as gopt


def _grads(b=6, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"w": jax.random.normal(k[0], (b, 4, 3)), "b": jax.random.normal(k[1], (b, 3)), "s": jax.random.normal(k[2], (b,))}


def test_parity_with_optax_per_example_global_norm_clip():
    grads = _grads()
    want, clipped = optax.per_example_global_norm_clip(jax.tree_util.tree_leaves(grads), 4.6)
    assert 0 < int(clipped) < 6
    tx = gopt.per_example(gradclip.GlobalNorm(4.6, eps=0.0))
    got, _ = jax.jit(tx.update)(grads, tx.init({k: v[0] for k, v in grads.items()}))
    for a, b in zip(jax.tree_util.tree_leaves(got), want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_parity_with_optax_per_example_layer_norm_clip():
    grads = _grads(seed=1)
    want, _ = optax.per_example_layer_norm_clip(jax.tree_util.tree_leaves(grads), 2.0, uniform=True)
    tx = gopt.per_example(gradclip.Norm(2.0 / np.sqrt(3)))
    got, _ = tx.update(grads, tx.init({k: v[0] for k, v in grads.items()}))
    for a, b in zip(jax.tree_util.tree_leaves(got), want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _loss(params, x, y):
    pred = jnp.tanh(x @ params["w"] + params["b"])
    return jnp.sum((pred - y) ** 2)


def _data(b=8):
    k = jax.random.split(jax.random.PRNGKey(2), 4)
    params = {"w": jax.random.normal(k[0], (5, 3)), "b": jax.random.normal(k[1], (3,))}
    return params, jax.random.normal(k[2], (b, 5)), jax.random.normal(k[3], (b, 3))


@pytest.mark.parametrize("micro", [None, 2, 4])
def test_clipped_grad_matches_manual_per_example_clip(micro):
    params, x, y = _data()
    per = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))(params, x, y)
    flat_want, _ = optax.per_example_global_norm_clip(jax.tree_util.tree_leaves(per), 1.0)
    want = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(per), flat_want)
    fn = jax.jit(gjax.clipped_grad(_loss, gradclip.GlobalNorm(1.0, eps=0.0), microbatch_size=micro))
    got, info = fn(params, x, y)
    for k in params:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)
    flat = jnp.concatenate([v.reshape(8, -1) for v in jax.tree_util.tree_leaves(per)], 1)
    np.testing.assert_allclose(info.norm, jnp.linalg.norm(flat, axis=1), rtol=1e-5)
    assert info.coef.shape == (8,)


def test_clipped_grad_has_aux_and_quantile_state():
    params, x, y = _data()

    def loss_aux(p, x, y):
        value = _loss(p, x, y)
        return value, value * 2

    clipper = gradclip.QuantileNorm(initial_norm=1e-3, learning_rate=0.5)
    fn = jax.jit(gjax.clipped_grad(loss_aux, clipper, microbatch_size=4, has_aux=True))
    state = gradclip.jax_per_example.init_state(clipper, [jnp.zeros((1, 3))])
    (grads, aux), info, state2 = fn(params, x, y, state=state)
    assert aux.shape == (8,)
    np.testing.assert_allclose(aux, 2 * jax.vmap(_loss, in_axes=(None, 0, 0))(params, x, y), rtol=1e-5)
    assert float(state2.norm) == pytest.approx(1e-3 * np.exp(0.25), rel=1e-5)  # every example clipped
    np.testing.assert_allclose(info.threshold, 1e-3, rtol=1e-6)


def test_refusals():
    with pytest.raises(gradclip.InvalidArgumentError, match="differential privacy"):
        gopt.per_example(gradclip.ZClip())
    with pytest.raises(gradclip.InvalidArgumentError, match="microbatch_size"):
        gjax.clipped_grad(_loss, gradclip.GlobalNorm(1.0), microbatch_size=0)
    params, x, y = _data()
    with pytest.raises(gradclip.InvalidArgumentError, match="does not divide"):
        gjax.clipped_grad(_loss, gradclip.GlobalNorm(1.0), microbatch_size=3)(params, x, y)
    with pytest.raises(gradclip.InvalidArgumentError, match="leading example axis"):
        gjax.clip_per_example(gradclip.GlobalNorm(1.0), {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))})
