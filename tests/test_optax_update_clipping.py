"""Update clipping with optax: a gradclip clipper chained after the optimizer.

In optax the optimizer's output *is* the parameter update, so
``optax.chain(optax.adam(lr), gradclip.GlobalNorm(c).as_optax())`` bounds the update's norm by
``c`` (what ``ClippedOptimizer(..., update_clipper=...)`` does in torch), and ``BlockRMS(d)`` there
is Adafactor's update clipping. Checked against optax's own clipping transformations in the same
place, with a fixed and a scheduled bound, under ``jax.jit``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

optax = pytest.importorskip("optax")
jax = pytest.importorskip("jax")
jnp = jax.numpy

import gradclip
import gradclip.optax
from gradclip import schedules


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
    batches = [(jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)) for _ in range(6)]
    return params, batches


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _norm(tree):
    return math.sqrt(sum(float(np.sum(np.asarray(leaf, np.float64) ** 2)) for leaf in jax.tree_util.tree_leaves(tree)))


def _run(tx, steps=6):
    """Train with ``tx``; return every step's updates and the states after each, and the
    unclipped Adam updates for the same gradients (Adam's state does not see the clip after it)."""
    params, batches = _problem()
    adam = optax.adam(0.1)
    state, adam_state = tx.init(params), adam.init(params)
    update = jax.jit(tx.update)
    out = []
    for x, y in batches[:steps]:
        grads = jax.grad(_loss)(params, x, y)
        raw, adam_state = adam.update(grads, adam_state, params)
        updates, state = update(grads, state, params)
        out.append((updates, raw, state))
        params = optax.apply_updates(params, updates)
    return out


def test_global_norm_after_adam_bounds_the_update_as_optax_does():
    bound = 0.05
    ours = _run(optax.chain(optax.adam(0.1), gradclip.GlobalNorm(bound).as_optax()))
    theirs = _run(optax.chain(optax.adam(0.1), optax.clip_by_global_norm(bound)))
    for (updates, raw, state), (reference, _, _) in zip(ours, theirs):
        info = gradclip.optax.clip_info(state)
        assert float(info.norm) == pytest.approx(_norm(raw), rel=1e-5)  # the update's norm, not the gradient's
        assert bool(info.clipped) and _norm(updates) <= bound * (1 + 1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(reference)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_block_rms_after_adam_is_adafactors_update_clipping():
    ours = _run(optax.chain(optax.adam(0.1), gradclip.BlockRMS(0.02).as_optax()))
    theirs = _run(optax.chain(optax.adam(0.1), optax.clip_by_block_rms(0.02)))
    for (updates, _, _), (reference, _, _) in zip(ours, theirs):
        for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(reference)):
            assert float(jnp.sqrt(jnp.mean(a**2))) <= 0.02 * (1 + 1e-5)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "schedule",
    [optax.linear_schedule(0.08, 0.01, 5), schedules.Linear(0.08, 0.01, 5)],
    ids=["optax-schedule", "gradclip-schedule"],
)
def test_a_scheduled_update_bound_follows_its_schedule_under_jit(schedule):
    """The bound at the k-th update (counted from 0) is schedule(k); every Adam update here is
    above it, so each clipped update has exactly the scheduled norm."""
    steps = _run(optax.chain(optax.adam(0.1), gradclip.GlobalNorm(schedule).as_optax()))
    for k, (updates, raw, state) in enumerate(steps):
        bound = float(optax.linear_schedule(0.08, 0.01, 5)(k))
        info = gradclip.optax.clip_info(state)
        assert float(info.threshold) == pytest.approx(bound, rel=1e-6)
        assert _norm(raw) > bound
        assert _norm(updates) == pytest.approx(bound, rel=1e-5)


def test_the_documentation_shows_update_clipping_by_chaining_after_the_optimizer():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for text in (readme, gradclip.optax.__doc__):
        assert "optax.chain(optax.adam(1e-3), gradclip.GlobalNorm(1e-2).as_optax())" in text
