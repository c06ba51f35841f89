"""A flax ``nnx.Optimizer`` with a gradclip transformation in its optax chain.

    python examples/flax_nnx_optimizer.py --steps 200

Any clipper becomes an ``optax.GradientTransformation`` with ``clipper.as_optax()``; its state (the
clipper's and the last ClipInfo) lives in the optimizer's state, so ``nnx.jit`` carries it and
``gradclip.optax.clip_info`` reads what the last step measured.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import gradclip
    import gradclip.optax as gco

    class MLP(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.hidden = nnx.Linear(8, 32, rngs=rngs)
            self.out = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    model = MLP(nnx.Rngs(0))
    clipper = gradclip.chain(gradclip.NonFinite("skip"), gradclip.ZClip(warmup_steps=10, max_grad_norm=1.0))
    optimizer = nnx.Optimizer(model, gradclip.optax.clip_then(clipper, optax.adam(1e-2)), wrt=nnx.Param)

    x = jax.random.normal(jax.random.key(1), (256, 8))
    y = jnp.sin(x.sum(axis=1, keepdims=True)) * 3

    @nnx.jit
    def step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    first = None
    clipped = 0
    for _ in range(args.steps):
        loss = step(model, optimizer, x, y)
        first = float(loss) if first is None else first
        clipped += int(gco.clip_info(optimizer.opt_state).clipped)
    info = gco.clip_info(optimizer.opt_state).to_dict()
    print(f"loss {first:.4f} -> {float(loss):.4f} in {args.steps} steps, clipped on {clipped}")
    print(f"last step: norm {info['norm']:.4f}, threshold {info['threshold']:.4f}")


if __name__ == "__main__":
    main()
