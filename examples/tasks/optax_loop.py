"""A JAX/optax training loop as a ``gradclip compare`` task.

The clipper becomes an optax transformation; ``gradclip.optax.clip_then`` also honours a
clipper's request to skip a step, and ``gradclip.optax.clip_info`` reads what it did::

    gradclip compare --task examples/tasks/optax_loop.py:task --clipper none \\
        --sweep "global_norm:max_norm=logspace(0.1,10,5)" --clipper zclip
"""

from __future__ import annotations

import numpy as np

from gradclip.experiments import TrainTask


def train(clipper, seed: int, steps: int, report) -> dict[str, float]:
    """Adam on a 2-layer MLP regression for ``steps`` steps under ``clipper``."""
    import jax
    import jax.numpy as jnp
    import optax

    import gradclip.optax

    rng = np.random.default_rng(seed)
    w_true = np.random.default_rng(7).normal(size=(8, 1)).astype("float32")  # one problem for every seed

    def sample(generator, count):
        x = generator.normal(size=(count, 8)).astype("float32")
        return x, np.sin(x @ w_true).astype("float32")

    x_test, y_test = sample(np.random.default_rng(10_000 + seed), 500)
    key1, key2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {
        "w1": jax.random.normal(key1, (8, 64)) / jnp.sqrt(8.0), "b1": jnp.zeros(64),
        "w2": jax.random.normal(key2, (64, 1)) / 8.0, "b2": jnp.zeros(1),
    }

    def loss_fn(p, x, y):
        hidden = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

    tx = gradclip.optax.clip_then(clipper, optax.adam(3e-2))
    opt_state = tx.init(params)

    @jax.jit
    def step_fn(p, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, state = tx.update(grads, state, p, loss=loss)  # loss: a signal for SkipOnSpike
        return optax.apply_updates(p, updates), state, loss

    for step in range(steps):
        x, y = sample(rng, 32)
        params, opt_state, loss = step_fn(params, opt_state, x, y)
        report(step, loss, gradclip.optax.clip_info(opt_state))
    test_loss = float(loss_fn(params, x_test, y_test))
    return {"r2": 1.0 - test_loss / float(np.var(y_test)), "loss": test_loss}


task = TrainTask(
    train,
    name="optax-loop",
    metric_name="r2",
    steps=200,
    quick_steps=10,
    reference_loss=0.5,                  # about the targets' variance: predicting 0
    reference_text="predicting 0 (MSE about 0.5)",
    solved_at=0.9,
    description="JAX MLP regression, optax.adam with the clipper in front",
)
