"""optax's own clipping tests, run against gradclip's optax drop-ins.

Ported from google-deepmind/optax, ``optax/transforms/_clipping_test.py`` at commit
1eae4e8daf2c5f0cbb8ec90e7525a6dce594c899 (Apache-2.0, Copyright 2019 DeepMind Technologies
Limited). Every test of ``ClippingTest`` is here under its upstream name with upstream's inputs
and assertions: ``_clipping.clip``, ``clip_by_block_rms``, ``clip_by_global_norm``,
``adaptive_grad_clip`` and ``unitwise_norm`` map to ``gradclip.optax``'s drop-ins of the same
names; ``per_example_global_norm_clip`` and ``per_example_layer_norm_clip`` to
``gradclip.optax.per_example`` (through its per-example core, which reports the info).
``chex.assert_trees_all_close`` becomes :func:`assert_trees_all_close` with chex's default
tolerances (rtol 1e-6, atol 0).

Deliberate differences, each asserted as gradclip's behaviour:

* ``NO_PER_LAYER_COUNTS``: per-example layer clipping reports whether each *example* was
  clipped (any layer), not a count per layer; the clipped sums are upstream's.
* ``NO_SCALED_LAYER_CLIP``: the "scaled" variant of per-example layer clipping (each layer's
  bound proportional to its size) is not offered; the uniform one is ``per_example(Norm(C/√L))``.
* ``UPSTREAM_ULP`` (not gradclip's): with JAX 0.10 on CPU, optax's own ``clip_by_block_rms``
  leaves a block RMS of 0.99999988 for a threshold of 1, one fp32 ulp short of
  ``assertAlmostEqual``'s 7 places; the drop-in gives the same bits, and the assertion accepts
  one ulp there.

The drop-ins' own deviations from optax (fp32 accumulation for fp16/bf16, no 0/0, non-finite
norms leaving updates alone, bad numbers refused) are named tests at the end of this file.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
import optax.tree  # noqa: E402

import gradclip  # noqa: E402
import gradclip.optax as _clipping  # noqa: E402 - upstream's name for the module under test
from gradclip.jax_per_example import clip_per_example  # noqa: E402

STEPS = 50
LR = 1e-2
NO_PER_LAYER_COUNTS = "per-example layer clipping counts clipped examples, not clips per layer"
NO_SCALED_LAYER_CLIP = "the size-scaled per-example layer clip is not offered"
UPSTREAM_ULP = "optax itself misses assertAlmostEqual(places=7) by one fp32 ulp here"


def assert_trees_all_close(actual, expected, rtol=1e-6, atol=0.0):
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def assert_almost_equal(actual, expected, places=7):
    """``assertAlmostEqual``: ``round(|actual - expected|, places) == 0``. Under this JAX the
    block RMS of the first clip in ``test_clip_by_block_rms`` comes out one fp32 ulp below 1.0,
    0.99999988, for optax itself as for the drop-in (bit for bit: see the drop-in tests below),
    and fails that rounding: ``UPSTREAM_ULP`` then accepts one fp32 unit in the last place."""
    actual = float(actual)
    if round(abs(actual - expected), places) == 0:
        return
    assert abs(actual - expected) <= np.spacing(np.float32(expected)), (actual, expected)  # UPSTREAM_ULP


@pytest.fixture
def setup():
    init_params = (jnp.array([1.0, 2.0]), jnp.array([3.0, 4.0]))
    per_step_updates = (jnp.array([500.0, 5.0]), jnp.array([300.0, 3.0]))
    return init_params, per_step_updates


def test_clip(setup):
    _, updates = setup
    # For a sufficiently high delta the update should not be changed.
    clipper = _clipping.clip(1e6)
    clipped_updates, _ = clipper.update(updates, None)
    assert_trees_all_close(clipped_updates, updates)

    # Clipping at delta=1 should make all updates exactly 1.
    clipper = _clipping.clip(1.0)
    clipped_updates, _ = clipper.update(updates, None)
    assert_trees_all_close(clipped_updates, jax.tree.map(jnp.ones_like, updates))


def test_clip_by_block_rms(setup):
    _, per_step_updates = setup
    rmf_fn = lambda t: jnp.sqrt(jnp.mean(t**2))  # noqa: E731
    updates = per_step_updates
    for i in range(1, STEPS + 1):
        clipper = _clipping.clip_by_block_rms(1.0 / i)
        # Check that the clipper actually works and block rms is <= threshold
        updates, _ = clipper.update(updates, None)
        assert_almost_equal(rmf_fn(updates[0]), 1.0 / i)
        assert_almost_equal(rmf_fn(updates[1]), 1.0 / i)
        # Check that continuously clipping won't cause numerical issues.
        updates_step, _ = clipper.update(per_step_updates, None)
        assert_trees_all_close(updates, updates_step)


def test_clip_by_global_norm(setup):
    _, per_step_updates = setup
    updates = per_step_updates
    for i in range(1, STEPS + 1):
        clipper = _clipping.clip_by_global_norm(1.0 / i)
        # Check that the clipper actually works and global norm is <= max_norm
        updates, _ = clipper.update(updates, None)
        assert float(optax.tree.norm(updates)) == pytest.approx(1.0 / i, abs=1e-6)
        # Check that continuously clipping won't cause numerical issues.
        updates_step, _ = clipper.update(per_step_updates, None)
        assert_trees_all_close(updates, updates_step)


def test_adaptive_grad_clip_with_axis():
    """Test adaptive_grad_clip with custom axis parameter."""
    # Test case 1: 5D Conv3D kernel (H, W, D, in_channels, out_channels)
    conv3d_grad = jnp.ones((2, 2, 2, 3, 4)) * 2.0
    conv3d_param = jnp.ones((2, 2, 2, 3, 4))
    # Test case 2: Regular 2D weight matrix for comparison
    linear_grad = jnp.ones((5, 6)) * 3.0
    linear_param = jnp.ones((5, 6))
    # For Conv3D, we want to compute norms over spatial dimensions (0,1,2)
    agc_conv3d = _clipping.adaptive_grad_clip(clipping=0.5, axis=(0, 1, 2))
    # For linear layer, use default behavior (should work with 2D)
    agc_linear = _clipping.adaptive_grad_clip(clipping=0.5)

    clipped_conv3d, _ = agc_conv3d.update([conv3d_grad], None, [conv3d_param])
    clipped_conv3d = clipped_conv3d[0]
    clipped_linear, _ = agc_linear.update([linear_grad], None, [linear_param])
    clipped_linear = clipped_linear[0]

    # Verify shapes are preserved
    assert clipped_conv3d.shape == conv3d_grad.shape
    assert clipped_linear.shape == linear_grad.shape

    # Verify AGC constraint: ||clipped_grad|| <= clipping * ||param|| (unitwise)
    conv3d_grad_norm = _clipping.unitwise_norm(clipped_conv3d, axis=(0, 1, 2))
    conv3d_param_norm = _clipping.unitwise_norm(conv3d_param, axis=(0, 1, 2))
    linear_grad_norm = _clipping.unitwise_norm(clipped_linear)
    linear_param_norm = _clipping.unitwise_norm(linear_param)
    max_allowed_conv3d = 0.5 * conv3d_param_norm + 1e-6
    max_allowed_linear = 0.5 * linear_param_norm + 1e-6
    assert bool(jnp.all(conv3d_grad_norm <= max_allowed_conv3d))
    assert bool(jnp.all(linear_grad_norm <= max_allowed_linear))

    # Test that without clipping needed, gradients are unchanged
    small_conv3d_grad = jnp.ones((2, 2, 2, 3, 4)) * 0.1
    small_conv3d_param = jnp.ones((2, 2, 2, 3, 4))
    agc_no_clip = _clipping.adaptive_grad_clip(clipping=2.0, axis=(0, 1, 2))
    unclipped, _ = agc_no_clip.update([small_conv3d_grad], None, [small_conv3d_param])
    assert_trees_all_close(unclipped[0], small_conv3d_grad, rtol=1e-6)


def test_unitwise_norm_with_axis():
    """Test unitwise_norm function with custom axis parameter."""
    x = jnp.arange(2 * 2 * 2 * 3 * 4).reshape(2, 2, 2, 3, 4).astype(jnp.float32)
    norm_spatial = _clipping.unitwise_norm(x, axis=(0, 1, 2))
    norm_channels = _clipping.unitwise_norm(x, axis=(3, 4))
    norm_last = _clipping.unitwise_norm(x, axis=-1)
    assert norm_spatial.shape == x.shape
    assert norm_channels.shape == x.shape
    assert norm_last.shape == x.shape

    # Test that default behavior still works for supported shapes
    x_2d = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    norm_default = _clipping.unitwise_norm(x_2d)
    norm_explicit = _clipping.unitwise_norm(x_2d, axis=None)
    assert_trees_all_close(norm_default, norm_explicit)

    # Test error case: unsupported shape without axis
    x_6d = jnp.ones((2, 2, 2, 2, 2, 2))
    with pytest.raises(ValueError):
        _clipping.unitwise_norm(x_6d)

    # But should work with axis specified
    norm_6d = _clipping.unitwise_norm(x_6d, axis=(0, 1, 2))
    assert norm_6d.shape == x_6d.shape


def test_adaptive_grad_clip(setup):
    params, per_step_updates = setup
    updates = per_step_updates
    for i in range(1, STEPS + 1):
        clip_r = 1.0 / i
        clipper = _clipping.adaptive_grad_clip(clipping=clip_r)
        # Check that the clipper works and upd_norm is < clip_r * param_norm.
        updates, _ = clipper.update(updates, None, params)
        u_norm, p_norm = jax.tree.map(_clipping.unitwise_norm, (updates, params))
        cmp = jax.tree.map(lambda u, p, c=clip_r: (u - c * p < 1e-6).all(), u_norm, p_norm)
        for leaf in jax.tree.leaves(cmp):
            assert bool(leaf)
        # Check that continuously clipping won't cause numerical issues.
        updates_step, _ = clipper.update(per_step_updates, None, params)
        assert_trees_all_close(updates, updates_step)

    # Simple 2D tensor case for default behavior
    grads_small = [jnp.array([[1.0, 2.0], [3.0, 4.0]])]
    params_small = [jnp.ones_like(grads_small[0])]
    agc_default = _clipping.adaptive_grad_clip(clipping=1.0)
    clipped_small, _ = agc_default.update(grads_small, None, params_small)
    clipped_norm_small = _clipping.unitwise_norm(clipped_small[0])
    param_norm_small = _clipping.unitwise_norm(params_small[0])
    assert bool(jnp.all(clipped_norm_small <= 1.0 * param_norm_small + 1e-6))


def test_per_example_global_norm_clip():
    grads = [  # 3 users, 2 components
        jnp.array([
            [0, -0.5],  # norm = sqrt(0^2 + 0.5^2 + 0^2)
            [3, 4],  # norm = sqrt(3^2 + 4^2 + 5^2)
            [5, 6],  # norm = sqrt(5^2 + 6^2 + 3^2)
            [0, 0],  # norm = 0
        ]),
        jnp.array([[0], [5], [-3], [0]]),
    ]
    answer = [
        jnp.array([0, -0.5]) + jnp.array([3, 4]) / jnp.sqrt(50) + jnp.array([5, 6]) / jnp.sqrt(70),
        jnp.array([0]) + jnp.array([5]) / jnp.sqrt(50) + jnp.array([-3]) / jnp.sqrt(70),
    ]
    grads = [g.astype(jnp.float32) for g in grads]
    clipper = gradclip.GlobalNorm(1.0, eps=0.0)  # optax's per-example clip has no eps
    sum_clipped_grads, _, info = clip_per_example(clipper, grads)
    num_clipped = int(jnp.sum(info.clipped))
    for actual, expected in zip(sum_clipped_grads, answer):
        np.testing.assert_allclose(actual, expected, atol=1e-6)
    assert num_clipped == 2
    # The same sums through the optax transformation.
    transformation = gradclip.optax.per_example(clipper)
    summed, _ = transformation.update(grads, transformation.init([g[0] for g in grads]))
    for actual, expected in zip(summed, answer):
        np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_per_example_layer_norm_clip():
    # Test data for a model with two layers and a batch size of 4. The 0th layer has one
    # parameter (shape (1)), and the 1st layer has shape (3, 3, 2).
    grads_flat = [jnp.array([[0.5], [1.5], [-2.0], [3.0]]), jnp.ones([4, 3, 3, 2], dtype=jnp.float32)]

    # Uniform Variant: with global_l2_norm_clip=sqrt(2), the per-layer clip norm is 1.0.
    global_l2_norm_clip = math.sqrt(2)
    per_layer = gradclip.Norm(global_l2_norm_clip / math.sqrt(len(grads_flat)))
    sum_clipped_grads, _, info = clip_per_example(per_layer, grads_flat)
    assert float(sum_clipped_grads[0][0]) == pytest.approx(1.5, abs=1e-7)
    for element in np.asarray(sum_clipped_grads[1]).flatten():
        assert element == pytest.approx(4 / math.sqrt(18), abs=1e-4)
    # NO_PER_LAYER_COUNTS: upstream counts 3 clips in layer 0 and 4 in layer 1; every example
    # here has a clipped layer.
    assert np.asarray(info.clipped).tolist() == [True, True, True, True]

    # NO_SCALED_LAYER_CLIP: Scaled Variant (global_l2_norm_clip=sqrt(19), uniform=False).
    assert not hasattr(gradclip.optax, "per_example_layer_norm_clip")


# -- the drop-ins against optax itself, and their named deviations --------------------------------


DROP_INS = {
    "clip_by_global_norm": lambda v: (optax.clip_by_global_norm(v), _clipping.clip_by_global_norm(v)),
    "clip": lambda v: (optax.clip(v), _clipping.clip(v)),
    "clip_by_block_rms": lambda v: (optax.clip_by_block_rms(v), _clipping.clip_by_block_rms(v)),
    "adaptive_grad_clip": lambda v: (optax.adaptive_grad_clip(v), _clipping.adaptive_grad_clip(v)),
}


@pytest.mark.parametrize("name", sorted(DROP_INS))
@pytest.mark.parametrize("value", [1e-3, 1.0 / 3.0, 0.7, 3.0, 1e4])
def test_drop_ins_equal_optax_bit_for_bit_under_jit_with_the_same_state(name, value, setup):
    params, updates = setup
    updates = jax.tree.map(lambda u: u * jnp.array([1.0, -0.01]), updates)
    theirs, ours = DROP_INS[name](value)
    state = ours.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(theirs.init(params))  # checkpoints keep their shape
    expected, _ = jax.jit(theirs.update)(updates, theirs.init(params), params)
    got, _ = jax.jit(ours.update)(updates, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_clip_by_global_norm_is_optaxs_not_gradclips_global_norm():
    """The issue this answers: GlobalNorm(1/3).as_optax() scales by max_norm / (norm + 1e-6)
    (torch's eps), the drop-in by optax's max_norm / norm."""
    updates = {"w": jnp.array([1.0])}
    drop_in, _ = _clipping.clip_by_global_norm(1 / 3).update(updates, None)
    theirs, _ = optax.clip_by_global_norm(1 / 3).update(updates, None)
    as_optax = gradclip.GlobalNorm(1 / 3).as_optax()
    ours, _ = as_optax.update(updates, as_optax.init(updates))
    assert float(drop_in["w"][0]) == float(theirs["w"][0]) == np.float32(1 / 3)
    assert float(ours["w"][0]) == float(np.float32(1 / 3) * (np.float32(1.0) / np.float32(1.0 + 1e-6)))
    assert float(ours["w"][0]) < float(theirs["w"][0])


def test_inject_hyperparams_schedules_the_drop_ins():
    tx = optax.inject_hyperparams(_clipping.clip_by_global_norm)(max_norm=0.5)
    reference = optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=0.5)
    updates = {"w": jnp.array([3.0, 4.0])}
    got, _ = jax.jit(tx.update)(updates, tx.init(updates))
    expected, _ = reference.update(updates, reference.init(updates))
    np.testing.assert_array_equal(got["w"], expected["w"])


def test_deviation_fp16_norms_accumulate_in_fp32():
    updates = {"w": jnp.full((4,), 300.0, jnp.float16)}  # squares overflow fp16 (max 65504)
    got, _ = _clipping.clip_by_global_norm(1.0).update(updates, None)
    theirs, _ = optax.clip_by_global_norm(1.0).update(updates, None)
    np.testing.assert_allclose(np.asarray(got["w"], np.float32), 0.5, rtol=1e-3)  # norm 600 -> 1
    assert not np.any(np.asarray(theirs["w"], np.float32))  # optax: norm inf, update zeroed
    rms, _ = _clipping.clip_by_block_rms(1.0).update(updates, None)
    np.testing.assert_allclose(np.asarray(rms["w"], np.float32), 1.0, rtol=1e-3)
    agc, _ = _clipping.adaptive_grad_clip(0.01).update(updates, None, {"w": jnp.full((4,), 100.0, jnp.float16)})
    np.testing.assert_allclose(np.asarray(agc["w"], np.float32), 1.0, rtol=1e-3)  # 300 * (0.01 * 200) / 600


def test_deviation_no_zero_over_zero():
    zeros = {"w": jnp.zeros((3,))}
    got, _ = _clipping.clip_by_global_norm(0.0).update(zeros, None)
    theirs, _ = optax.clip_by_global_norm(0.0).update(zeros, None)
    np.testing.assert_array_equal(got["w"], 0.0)
    assert np.all(np.isnan(theirs["w"]))
    got, _ = _clipping.clip_by_block_rms(0.0).update(zeros, None)
    np.testing.assert_array_equal(got["w"], 0.0)


def test_deviation_a_non_finite_norm_leaves_the_updates_alone():
    updates = {"a": jnp.array([1.0, jnp.inf]), "b": jnp.array([2.0, 3.0])}
    got, _ = _clipping.clip_by_global_norm(1.0).update(updates, None)
    theirs, _ = optax.clip_by_global_norm(1.0).update(updates, None)
    np.testing.assert_array_equal(got["a"], updates["a"])
    np.testing.assert_array_equal(got["b"], updates["b"])
    assert float(theirs["b"][0]) == 0.0  # optax scales everything by 1/inf
    got, _ = _clipping.clip_by_block_rms(1.0).update(updates, None)
    np.testing.assert_array_equal(got["a"], updates["a"])
    np.testing.assert_allclose(got["b"], np.array([2.0, 3.0]) / math.sqrt(6.5), rtol=1e-6)
    params = {"a": jnp.ones((2,)), "b": jnp.ones((2,))}
    got, _ = _clipping.adaptive_grad_clip(0.01).update(updates, None, params)
    np.testing.assert_array_equal(got["a"], updates["a"])


@pytest.mark.parametrize(("build", "match"), [
    (lambda: _clipping.clip_by_global_norm(-1.0), r"clip_by_global_norm: max_norm must be in \[0, inf\], got -1\.0"),
    (lambda: _clipping.clip(math.nan), r"clip: max_delta must not be NaN"),
    (lambda: _clipping.clip_by_block_rms(True), r"clip_by_block_rms: threshold must be a real number, got True"),
    (lambda: _clipping.adaptive_grad_clip(0.01, eps=-1e-3), r"adaptive_grad_clip: eps must be in \[0, inf\]"),
])
def test_deviation_bad_numbers_are_refused_when_built(build, match):
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        build()


def test_adaptive_grad_clip_needs_params():
    with pytest.raises(ValueError, match="needs params"):
        _clipping.adaptive_grad_clip(0.01).update({"w": jnp.ones(2)}, None)
