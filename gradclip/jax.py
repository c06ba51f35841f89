"""JAX front end: per-example clipping (``clipped_grad``), see :mod:`gradclip.jax_per_example`.

``gradclip.jax.clipped_grad(loss_fn, clipper, microbatch_size=None, has_aux=False)`` returns the
clipped sum of per-example gradients of ``loss_fn`` under ``jax.jit`` (DP-SGD's clipping step).
"""

from gradclip.jax_per_example import clip_per_example, clipped_grad

__all__ = ["clip_per_example", "clipped_grad"]
