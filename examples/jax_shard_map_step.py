"""A data-parallel ``jax.shard_map`` training step whose clip sees the whole gradient.

    python examples/jax_shard_map_step.py --devices 4 --steps 50

Each device takes its share of the batch, reduce-scatters the gradient (``lax.psum_scatter``: it
then holds one slice of the mean gradient, as ZeRO does) and updates its slice of the weights.
``clipper.as_optax(axis_name="data")`` sums the local ``sum |g|^2`` over the axis, so every
device clips by the norm of the whole gradient and keeps the same adaptive state; without
``axis_name`` gradclip refuses the sharded gradient instead of clipping each slice on its own.
"""

from __future__ import annotations

import argparse
import os


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    # Host devices must be requested before jax starts (real accelerators need none of this).
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax import lax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import gradclip
    import gradclip.optax as gco

    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8 * n, 4)) * 0.1, jnp.float32)
    x = jnp.asarray(rng.normal(size=(64 * n, 8 * n)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64 * n, 4)), jnp.float32) + x[:, :4] * 5
    tx = optax.chain(gradclip.GlobalNorm(1.0).as_optax(axis_name="data"), optax.sgd(0.05))

    def loss(w, x, y):
        return jnp.mean(jnp.sum((x @ w - y) ** 2, axis=1))

    @jax.jit
    @jax.shard_map(mesh=mesh, in_specs=(P("data"), P("data"), P("data"), P()), out_specs=(P("data"), P(), P()))
    def step(w_slice, x, y, state):
        w_full = lax.all_gather(w_slice, "data", tiled=True)
        value, grads = jax.value_and_grad(loss)(w_full, x, y)
        grad_slice = lax.psum_scatter(grads, "data", tiled=True) / n  # this device's slice of the mean
        updates, state = tx.update(grad_slice, state)
        return w_slice + updates, state, lax.pmean(value, "data")

    state = tx.init(w)
    whole = float(gradclip.global_norm(jax.grad(loss)(w, x, y)))  # one device, the whole batch
    for i in range(args.steps):
        w, state, value = step(w, x, y, state)
        if i == 0:
            print(f"step 0: norm clipped on every device {float(gco.clip_info(state).norm):.4f}, "
                  f"one device on the whole batch {whole:.4f}")
    info = gco.clip_info(state).to_dict()
    print(f"{n} devices, step {args.steps}: loss {float(value):.3f}, norm {info['norm']:.3f}, clipped {info['clipped']}")


if __name__ == "__main__":
    main()
