"""Per-example clipping for JAX: clipped sums of per-example gradients, under ``jit``.

* :func:`clip_per_example` — gradients with a leading example axis → ``Σ_i c_i g_i`` with the
  clipper deciding ``c_i`` from example ``i``'s norms (the measure → decide → apply contract of
  ``docs/architecture.md``, decide run on per-example measurements). ``GlobalNorm(C)`` gives
  DP-SGD's flat clipping (Abadi et al. 2016), ``Norm(C)`` per-layer clipping (McMahan et al.
  2018), ``QuantileNorm`` adapts C (Andrew et al. 2021).
* :func:`clipped_grad` — ``vmap`` of ``grad`` of a per-example loss, clipped and summed; with
  ``microbatch_size`` the examples go through a ``lax.scan`` of microbatches, so at most
  ``microbatch_size`` per-example gradients exist at once.

``gradclip.optax.per_example(clipper)`` is the optax transformation over the same function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from gradclip._core.contract import NO_SIGNALS, Measured, Signals
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.ops import get_ops
from gradclip._core.types import ClipInfo
from gradclip.clippers import AdaGC, AutoClip, GlobalNorm, Norm, QuantileNorm, ZClip

__all__ = ["check_per_example_clipper", "clip_per_example", "clipped_grad", "init_state"]


def check_per_example_clipper(where: str, clipper: Any) -> str:
    """``"global"`` (GlobalNorm, QuantileNorm) or ``"layer"`` (Norm); refuses other clippers.

    Raises:
        InvalidArgumentError: ZClip/AutoClip/AdaGC (threshold from private data without noise),
            any other clipper, an L2 order other than 2, a policy other than propagate/skip.
    """
    if isinstance(clipper, (ZClip, AutoClip, AdaGC)):
        raise InvalidArgumentError(
            f"{where}: {type(clipper).__name__} sets its threshold from the (private) gradient norms without "
            "noise, which breaks differential privacy; use GlobalNorm(C), Norm(C) or QuantileNorm"
        )
    if not isinstance(clipper, (GlobalNorm, Norm, QuantileNorm)):
        raise InvalidArgumentError(
            f"{where}: clipper must be GlobalNorm(C), Norm(C) or QuantileNorm(...) for per-example clipping, "
            f"got {type(clipper).__name__}"
        )
    if getattr(clipper, "norm_type", 2.0) != 2.0 or clipper.nonfinite not in ("propagate", "skip"):
        raise InvalidArgumentError(
            f"{where}: per-example clipping bounds L2 norms (norm_type=2) under nonfinite 'propagate' or 'skip'"
        )
    return "layer" if isinstance(clipper, Norm) else "global"


def init_state(clipper: Any, leaves: list[Any]) -> Any:
    """The clipper's initial state for these (per-example) gradient leaves."""
    ops = get_ops(leaves, framework="jax", where="gradclip.jax")
    return clipper.init_state(ops, leaves)


def _norms(leaves: list[Any]) -> Any:
    import jax.numpy as jnp

    # fp32 accumulation whatever the gradients' dtype (DESIGN rule 2); fp64 stays fp64.
    cols = []
    for leaf in leaves:
        wide = leaf.astype(jnp.float64 if leaf.dtype == jnp.float64 else jnp.float32)
        cols.append(jnp.sqrt(jnp.sum(wide.reshape(wide.shape[0], -1) ** 2, axis=1)))
    return jnp.stack(cols, axis=1)


def _decide(clipper: Any, kind: str, leaves: list[Any], norms: Any, state: Any) -> tuple[Any, Any, ClipInfo]:
    """The clipper's decide on per-example measurements: coefficients ``(B,)`` or ``(B, P)``."""
    import jax.numpy as jnp

    ops = get_ops(leaves, framework="jax", where="gradclip.jax")
    total = jnp.sqrt(jnp.sum(norms**2, axis=1))
    finite = jnp.isfinite(total)
    quantile = isinstance(clipper, QuantileNorm)
    gate = jnp.all(finite) if quantile else finite  # QuantileNorm's state moves once per step
    measured = Measured(
        grads=list(leaves) if kind == "layer" else [],
        norms=norms if kind == "layer" else None,
        norm=total,
        finite=gate,
        given_finite=gate,
        norm_type=2.0,
    )
    signals = Signals(sample_norms=total.astype(jnp.float32)) if quantile else NO_SIGNALS
    decision = clipper.decide(ops, measured, state, signals)
    coef, info = decision.coef, decision.info
    if kind == "layer":
        after = jnp.sqrt(jnp.sum((coef * norms) ** 2, axis=1))
        usable = (total > 0) & finite
        effective = jnp.where(usable, after / jnp.where(usable, total, 1.0), 1.0)
        info = ClipInfo(total, info.threshold, effective, jnp.any(coef < 1, axis=1), finite, info.skip)
    else:
        info = info._replace(clipped=coef < 1, finite=finite)
    return coef, decision.state, info


def _weighted_sum(leaves: list[Any], coef: Any) -> list[Any]:
    import jax.numpy as jnp

    out = []
    for j, leaf in enumerate(leaves):
        c = coef[:, j] if coef.ndim == 2 else coef
        out.append(jnp.tensordot(c.astype(leaf.dtype), leaf, axes=1))
    return out


def clip_per_example(clipper: Any, grads: Any, state: Any = None) -> tuple[Any, Any, ClipInfo]:
    """Clip each example's gradient and sum: ``Σ_i c_i g_i``.

    Args:
        clipper: ``GlobalNorm(C)``, ``Norm(C)`` or ``QuantileNorm(...)``.
        grads: A pytree whose leaves all have the same leading example axis ``B``.
        state: The clipper's state (None: the initial one).

    Returns:
        ``(summed grads, new state, info)``; ``info.norm`` etc. hold one entry per example.

    Raises:
        InvalidArgumentError: An unsupported clipper; leaves without a common leading axis.
    """
    import jax

    kind = check_per_example_clipper("clip_per_example", clipper)
    leaves, treedef = jax.tree_util.tree_flatten(grads)
    _check_leading(leaves)
    if state is None:
        state = init_state(clipper, leaves)
    coef, state, info = _decide(clipper, kind, leaves, _norms(leaves), state)
    return jax.tree_util.tree_unflatten(treedef, _weighted_sum(leaves, coef)), state, info


def _check_leading(leaves: list[Any]) -> None:
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if not leaves or None in sizes or len(sizes) != 1:
        raise InvalidArgumentError(
            "clip_per_example: every gradient leaf needs the same leading example axis, got leading sizes "
            f"{sorted(str(s) for s in sizes)}"
        )


class _Carry(NamedTuple):
    summed: list[Any]


def clipped_grad(
    loss_fn: Callable[..., Any], clipper: Any, microbatch_size: int | None = None, has_aux: bool = False
) -> Callable[..., Any]:
    """A function returning the clipped sum of per-example gradients of ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(params, *example)`` → a scalar loss (``(loss, aux)`` with ``has_aux``)
            for ONE example (no batch axis).
        clipper: ``GlobalNorm(C)``, ``Norm(C)`` or ``QuantileNorm(...)``.
        microbatch_size: Examples per ``lax.scan`` step (must divide the batch), bounding memory
            to that many per-example gradients; None vectorizes over the whole batch.
        has_aux: ``loss_fn`` returns ``(loss, aux)``; the aux values come back stacked.

    Returns:
        ``fn(params, *batch, state=None)`` → ``(grads, info)`` — ``((grads, aux), info)`` with
        ``has_aux`` — plus the new state as a third element when ``state`` is given (adaptive
        clippers). ``batch`` arrays have a leading example axis. Works under ``jax.jit``.

    Raises:
        InvalidArgumentError: An unsupported clipper, ``microbatch_size`` not a positive int, or
            (at call time) a batch it does not divide.
    """
    import jax
    import jax.numpy as jnp

    kind = check_per_example_clipper("clipped_grad", clipper)
    if microbatch_size is not None and (
        isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1
    ):
        raise InvalidArgumentError(f"clipped_grad: microbatch_size must be an int >= 1 or None, got {microbatch_size!r}")
    grad_fn = jax.grad(loss_fn, has_aux=has_aux)
    per_example = jax.vmap(lambda params, example: grad_fn(params, *example), in_axes=(None, 0))

    def run(params: Any, *batch: Any, state: Any = None) -> Any:
        keep_state = state is not None
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if state is None:
            shapes = [jnp.zeros((1, *x.shape), x.dtype) for x in jax.tree_util.tree_leaves(params)]
            state = init_state(clipper, shapes)
        if microbatch_size is None or microbatch_size >= size:
            grads, aux = _split(per_example(params, batch), has_aux)
            leaves, treedef = jax.tree_util.tree_flatten(grads)
            norms = _norms(leaves)
            coef, new_state, info = _decide(clipper, kind, leaves, norms, state)
            summed = jax.tree_util.tree_unflatten(treedef, _weighted_sum(leaves, coef))
        else:
            if size % microbatch_size:
                raise InvalidArgumentError(
                    f"clipped_grad: microbatch_size={microbatch_size} does not divide the batch of {size} examples"
                )
            chunks = jax.tree_util.tree_map(lambda x: x.reshape(size // microbatch_size, microbatch_size, *x.shape[1:]), batch)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, params)

            def body(carry: Any, chunk: Any) -> Any:
                grads, aux = _split(per_example(params, chunk), has_aux)
                leaves, treedef = jax.tree_util.tree_flatten(grads)
                norms = _norms(leaves)
                # The coefficient of an example depends on its own norms and the state at the
                # start of the step only, so each microbatch decides its own; the state moves
                # once, below, from every example's norms.
                coef, _, _ = _decide(clipper, kind, leaves, norms, state)
                part = jax.tree_util.tree_unflatten(treedef, _weighted_sum(leaves, coef))
                return jax.tree_util.tree_map(jnp.add, carry, part), (norms, aux)

            summed, (norms, aux) = jax.lax.scan(body, zeros, chunks)
            norms = norms.reshape(size, norms.shape[-1])
            if has_aux:
                aux = jax.tree_util.tree_map(lambda x: x.reshape(size, *x.shape[2:]), aux)
            leaves = jax.tree_util.tree_leaves(summed)
            _, new_state, info = _decide(clipper, kind, [x[None] for x in leaves], norms, state)
        out = (summed, aux) if has_aux else summed
        return (out, info, new_state) if keep_state else (out, info)

    return run


def _split(result: Any, has_aux: bool) -> tuple[Any, Any]:
    return result if has_aux else (result, None)
