"""``clipper.as_optax()``: optax transformations from the one implementation of each clipper.

Covers ``optax.chain`` inside ``jax.jit``, the state as a pytree of fixed type (``lax.scan``
carries it) for every registered clipper, ``clip_info``, skipped steps, bad input, parity with
``optax.clip``, ``optax.clip_by_global_norm``, ``optax.clip_by_block_rms`` and
``optax.adaptive_grad_clip`` (every deviation a named test), and a real ``jax.jit`` training loop
on scikit-learn's digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="as_optax needs jax")
optax = pytest.importorskip("optax", reason="as_optax needs optax")
jnp = jax.numpy

import gradclip  # noqa: E402
import gradclip.optax as gco  # noqa: E402
from test_conformance import make_clipper  # noqa: E402


def tree(seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(6, 4)) * scale, jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(4,)) * scale, jnp.float32)},
        "conv": jnp.asarray(rng.normal(size=(3, 3, 2, 5)) * scale, jnp.float32),
    }


def leaves(x):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]


# -- the transformation ----------------------------------------------------------------------------
def test_chain_with_adam_under_jit_equals_clip_then_adam():
    params = tree(1, 1.0)
    clipper = gradclip.GlobalNorm(1.0)
    tx = optax.chain(clipper.as_optax(), optax.adam(1e-2))
    adam = optax.adam(1e-2)
    state, adam_state = tx.init(params), adam.init(params)
    step = jax.jit(tx.update)
    for seed in range(3):
        grads = tree(seed + 10)
        updates, state = step(grads, state, params)
        clipped, _ = gradclip.GlobalNorm(1.0).clip(grads)
        want, adam_state = adam.update(clipped, adam_state, params)
        for a, b in zip(leaves(updates), leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    info = gco.clip_info(state)
    assert bool(info.clipped) and info.to_dict()["threshold"] == 1.0
    np.testing.assert_allclose(float(info.norm), float(gradclip.global_norm(tree(12))), rtol=1e-6)


@pytest.mark.parametrize("name", gradclip.available())
def test_state_is_a_pytree_of_fixed_type_for_every_clipper(name):
    """``lax.scan`` carries the optax state: init and update must give one structure and dtype."""
    clipper = make_clipper(name)
    params = tree(2, 1.0)
    tx = clipper.as_optax()
    state = tx.init(params)
    scales = jnp.asarray([1.0, 1.1, 0.9, 1.2, 25.0, 1.0])
    base = tree(3)

    def body(carry, scale):
        grads = jax.tree_util.tree_map(lambda g: g * scale, base)
        updates, carry = tx.update(grads, carry, params)
        return carry, gco.clip_info(carry).norm

    final, norms = jax.jit(lambda s: jax.lax.scan(body, s, scales))(state)
    assert jax.tree_util.tree_structure(final) == jax.tree_util.tree_structure(state)
    assert [x.dtype for x in jax.tree_util.tree_leaves(final)] == [x.dtype for x in jax.tree_util.tree_leaves(state)]
    assert norms.shape == (6,) and np.isfinite(np.asarray(norms)).all()
    # the same steps eagerly, through clipper.clip, give the same last norm
    eager = make_clipper(name)
    for scale in np.asarray(scales):
        _, info = eager.clip(jax.tree_util.tree_map(lambda g, s=scale: g * s, base), params=params)
    np.testing.assert_allclose(float(norms[-1]), float(info.norm), rtol=1e-6)


def test_clip_info_before_any_step_and_of_several_clippers():
    params = tree()
    tx = optax.chain(gradclip.Value(clip_value=1.0).as_optax(), gradclip.GlobalNorm(2.0).as_optax())
    state = tx.init(params)
    first = gco.clip_info(state)
    assert first.to_dict() == {"norm": 0.0, "threshold": 0.0, "coef": 1.0, "clipped": False,
                               "finite": True, "skip": False}
    _, state = tx.update(tree(5), state)
    infos = gco.clip_info(state, all=True)
    assert len(infos) == 2 and bool(infos[0].clipped)
    with pytest.raises(gradclip.InvalidArgumentError, match="no gradclip clipper state"):
        gco.clip_info(optax.adam(1e-3).init(params))


def test_none_leaves_and_masked_updates_pass_through():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    tx = optax.masked(gradclip.GlobalNorm(1.0, eps=0.0).as_optax(), {"a": True, "b": False})
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)({"a": jnp.full(3, 4.0), "b": jnp.full(2, 4.0)}, state)
    np.testing.assert_allclose(np.asarray(updates["a"]), np.full(3, 1 / math.sqrt(3)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(updates["b"]), np.full(2, 4.0))
    tx = gradclip.GlobalNorm(1.0).as_optax()
    out, _ = tx.update({"a": jnp.ones(2), "b": None}, tx.init({"a": jnp.ones(2), "b": None}))
    assert out["b"] is None


def test_a_skipped_step_gives_zero_updates_and_clip_then_keeps_the_optimizer_state():
    params = {"w": jnp.ones(3)}
    bad = {"w": jnp.asarray([1.0, jnp.nan, 2.0])}
    good = {"w": jnp.asarray([0.1, 0.2, 0.3])}
    tx = gradclip.GlobalNorm(1.0, nonfinite="skip").as_optax()
    updates, state = tx.update(bad, tx.init(params))
    assert bool(gco.clip_info(state).skip)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.zeros(3))

    tx = gco.clip_then(gradclip.GlobalNorm(1.0, nonfinite="skip"), optax.adam(1e-1))
    state = tx.init(params)
    step = jax.jit(tx.update)
    _, state = step(good, state, params)
    before = state.inner
    updates, state = step(bad, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), np.zeros(3))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.inner)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # Adam's count and moments kept
    updates, state = step(good, state, params)
    assert np.isfinite(np.asarray(updates["w"])).all() and np.abs(np.asarray(updates["w"])).sum() > 0


def test_torch_and_tensorflow_arrays_are_a_clear_error():
    torch = pytest.importorskip("torch", reason="needs torch arrays")
    tx = gradclip.GlobalNorm(1.0).as_optax()
    with pytest.raises(gradclip.BackendError, match=r"JAX arrays.*torch\.Tensor.*clip_\(model\)"):
        tx.init({"w": torch.ones(3)})
    state = tx.init({"w": jnp.ones(3)})
    with pytest.raises(gradclip.BackendError, match=r"leaf \['w'\] is a torch"):
        tx.update({"w": torch.ones(3)}, state)
    tf = pytest.importorskip("tensorflow", reason="needs tf arrays")
    with pytest.raises(gradclip.BackendError, match="ClippingOptimizer"):
        tx.update({"w": tf.ones(3)}, state)
    # NumPy leaves are accepted, as optax accepts them
    updates, _ = tx.update({"w": np.full(3, 4.0, np.float32)}, state)
    assert isinstance(updates["w"], jax.Array)


def test_methods_that_need_params_say_so():
    if "agc" not in gradclip.available():
        pytest.skip("needs the agc clipper")
    tx = gradclip.get("agc").as_optax()
    state = tx.init(tree())
    with pytest.raises(gradclip.InvalidArgumentError, match="needs the parameters"):
        tx.update(tree(1), state)
    with pytest.raises(gradclip.InvalidArgumentError, match="expected a gradclip clipper"):
        gco.as_optax(optax.adam(1e-3))


# -- parity with optax ------------------------------------------------------------------------------
def _run(tx, grads, params=None):
    updates, _ = jax.jit(tx.update)(grads, tx.init(params if params is not None else grads), params)
    return leaves(updates)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("delta", [0.1, 1.0, 5.0])
def test_parity_optax_clip(dtype, delta):
    grads = jax.tree_util.tree_map(lambda g: g.astype(dtype), tree(4))
    for a, b in zip(_run(gradclip.Value(clip_value=delta).as_optax(), grads), _run(optax.clip(delta), grads)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e3])
def test_parity_optax_clip_by_global_norm(max_norm):
    grads = tree(5)
    ours = _run(gradclip.GlobalNorm(max_norm, eps=0.0).as_optax(), grads)
    for a, b in zip(ours, _run(optax.clip_by_global_norm(max_norm), grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert float(optax.tree.norm(grads)) == pytest.approx(float(gradclip.global_norm(grads)), rel=1e-6)


@pytest.mark.parametrize("threshold", [0.1, 1.0, 10.0])
def test_parity_optax_clip_by_block_rms(threshold):
    grads = tree(6)
    ours = _run(gradclip.BlockRMS(threshold).as_optax(), grads)
    for a, b in zip(ours, _run(optax.clip_by_block_rms(threshold), grads)):
        np.testing.assert_allclose(a, b, rtol=2e-6)


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_parity_optax_adaptive_grad_clip(clipping):
    """Default layouts agree: JAX weights are input-major (units on the last axis), as optax
    assumes, for vectors, ``(in, out)`` kernels and HWIO convolutions."""
    if "agc" not in gradclip.available():
        pytest.skip("needs the agc clipper")
    grads, params = tree(7), tree(8, 1.0)
    ours = _run(gradclip.get("agc", clip_factor=clipping, eps=1e-3).as_optax(), grads, params)
    for a, b in zip(ours, _run(optax.adaptive_grad_clip(clipping, eps=1e-3), grads, params)):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_deviation_optax_agc_treats_1_by_n_kernels_as_one_vector():
    """optax squeezes before testing ndim: a (1, n) kernel is one unit there, n units here."""
    if "agc" not in gradclip.available():
        pytest.skip("needs the agc clipper")
    grads, params = {"k": jnp.asarray([[1.0, 10.0]])}, {"k": jnp.asarray([[1.0, 1.0]])}
    theirs = _run(optax.adaptive_grad_clip(0.5), grads, params)[0]
    ours = _run(gradclip.get("agc", clip_factor=0.5).as_optax(), grads, params)[0]
    np.testing.assert_allclose(theirs, np.array([[1.0, 10.0]]) * (0.5 * math.sqrt(2) / math.sqrt(101)), rtol=1e-6)
    np.testing.assert_allclose(ours, [[0.5, 0.5]], rtol=1e-6)


def test_deviation_optax_agc_3d_kernels_reduce_axis_0_only():
    """optax takes a 3-D tensor as multi-head ``(in, heads, out)`` and reduces axis 0 only;
    here units are on the last axis (the norm runs over axes 0 and 1); ``axis=(1, 2)`` gives
    optax's units."""
    if "agc" not in gradclip.available():
        pytest.skip("needs the agc clipper")
    rng = np.random.default_rng(9)
    grads = {"k": jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)}
    params = {"k": jnp.asarray(rng.normal(size=(4, 3, 5)) * 0.1, jnp.float32)}
    theirs = _run(optax.adaptive_grad_clip(0.05), grads, params)[0]
    ours = _run(gradclip.get("agc", clip_factor=0.05).as_optax(), grads, params)[0]
    assert not np.allclose(ours, theirs, rtol=1e-3)
    g, p = np.asarray(grads["k"], np.float64), np.asarray(params["k"], np.float64)
    g_norm = np.sqrt((g**2).sum(axis=(0, 1), keepdims=True))
    limit = 0.05 * np.maximum(np.sqrt((p**2).sum(axis=(0, 1), keepdims=True)), 1e-3)
    np.testing.assert_allclose(ours, np.where(g_norm > limit, g * limit / g_norm, g), rtol=2e-6)
    as_optax_units = _run(gradclip.get("agc", clip_factor=0.05, axis=(1, 2)).as_optax(), grads, params)[0]
    np.testing.assert_allclose(as_optax_units, theirs, rtol=2e-6, atol=1e-7)


def test_deviation_optax_global_norm_overflows_fp16_to_zero_updates():
    grads = {"w": jnp.asarray([300.0, 0.0], jnp.float16)}
    theirs = _run(optax.clip_by_global_norm(1.0), grads)[0]
    assert (theirs == 0).all()  # the fp16 norm is inf, and t / inf = 0
    ours = _run(gradclip.GlobalNorm(1.0).as_optax(), grads)[0]
    assert ours.dtype == np.float16 and abs(float(ours[0]) - 1.0) < 1e-3


def test_deviation_optax_max_norm_zero_with_zero_gradients_is_nan():
    grads = {"w": jnp.zeros(3)}
    assert np.isnan(_run(optax.clip_by_global_norm(0.0), grads)[0]).all()
    np.testing.assert_array_equal(_run(gradclip.GlobalNorm(0.0).as_optax(), grads)[0], np.zeros(3))


def test_deviation_optax_block_rms_overflows_fp16_and_returns_no_norm():
    """optax computes the RMS in the gradient dtype (fp16 300² overflows: zero update) and keeps
    no record of the norm; gradclip's state holds it."""
    grads = {"w": jnp.asarray([300.0, 0.0], jnp.float16)}
    assert (_run(optax.clip_by_block_rms(1.0), grads)[0] == 0).all()
    tx = gradclip.BlockRMS(1.0).as_optax()
    updates, state = tx.update(grads, tx.init(grads))
    assert abs(float(updates["w"][0]) - math.sqrt(2.0)) < 2e-3
    assert float(gco.clip_info(state).norm) == 300.0


# -- a real training loop ---------------------------------------------------------------------------
def _digits():
    datasets = pytest.importorskip("sklearn.datasets", reason="the digits data ships with scikit-learn")
    x, y = datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))  # the file is sorted by writer
    x, y = x[order], y[order]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def _init_mlp(key, sizes=(64, 64, 10)):
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (fan_in, fan_out)) * math.sqrt(2.0 / fan_in),
                       "b": jnp.zeros(fan_out)})
    return params


def _logits(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


@pytest.mark.parametrize("name", ["global_norm", "zclip"])
def test_jit_training_loop_on_digits_reaches_95_percent(name):
    """A two-layer MLP trained for 300 jitted Adam steps (batch 128) with the clipper first in
    the chain reaches >= 95% test accuracy on 397 held-out digits (98.0% here, for both)."""
    if name not in gradclip.available():
        pytest.skip(f"needs the {name} clipper")
    (x, y), (x_test, y_test) = _digits()
    clipper = gradclip.get(name, max_norm=1.0) if name == "global_norm" else gradclip.get(name, warmup_steps=10)
    tx = optax.chain(clipper.as_optax(), optax.adam(1e-2))
    params = _init_mlp(jax.random.PRNGKey(0))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, xb, yb):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(_logits(p, xb), yb).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    rng = np.random.default_rng(0)
    for _ in range(300):
        batch = rng.choice(len(x), 128, replace=False)
        params, opt_state, _loss = step(params, opt_state, x[batch], y[batch])
    accuracy = float(np.mean(np.asarray(jnp.argmax(_logits(params, x_test), -1)) == y_test))
    assert accuracy >= 0.95, accuracy
    info = gco.clip_info(opt_state).to_dict()
    assert info["finite"] and info["norm"] > 0
