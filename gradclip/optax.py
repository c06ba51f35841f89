"""optax adapter: any gradclip clipper as an ``optax.GradientTransformation``.

    import optax, gradclip
    tx = optax.chain(gradclip.ZClip().as_optax(), optax.adam(1e-3))
    opt_state = tx.init(params)
    updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
    info = gradclip.optax.clip_info(opt_state)       # ClipInfo of the last step, for logging

The transformation runs the clipper's one implementation (``gradclip/clippers``) on the JAX
backend; nothing here re-implements an algorithm. Its state, :class:`ClipperState`, is a pytree of
arrays (the clipper's own state and the last :class:`~gradclip.ClipInfo`), so it lives inside
``jax.jit``, ``lax.scan`` and checkpointing libraries like any optax state.

Inside ``jax.pmap`` and ``jax.shard_map`` each device holds a piece of the gradient; give the axis
the gradients are split over, ``clipper.as_optax(axis_name="data")``, and every statistic is
reduced over it (``psum`` of the local ``sum |g|^p``, ``pmax`` for ``inf``, AGC's unit sums), so
each device clips by the norm of the whole gradient and keeps the same state::

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=...)
    def step(grad_shards, param_shards, opt_state):    # e.g. after lax.psum_scatter(grads, "data")
        updates, opt_state = tx.update(grad_shards, opt_state, param_shards)

Data-parallel gradients (every device its own full gradient) are averaged first
(``lax.pmean``); they then need no ``axis_name``. Global arrays sharded under ``jax.jit`` need
none either: XLA reduces them. See :mod:`gradclip.backends._jax_axes` for what is refused.

When a clipper asks for the step to be skipped (``info.skip``: non-finite gradients under
``nonfinite="skip"``, a spike for :class:`~gradclip.SkipOnSpike`), the transformation outputs
zero updates. A stateful optimizer later in the chain (Adam) still advances its moments on a zero
update; :func:`clip_then` wraps the optimizer so that a skipped step leaves its state untouched,
as ``optax.apply_if_finite`` does.

Update clipping is the same transformation placed *after* the optimizer: in optax the optimizer's
output is the parameter update, so ``optax.chain(optax.adam(1e-3), gradclip.GlobalNorm(1e-2).as_optax())``
bounds the update's global norm by 0.01 (torch: ``ClippedOptimizer(..., update_clipper=...)``),
``gradclip.BlockRMS(1.0)`` there is Adafactor's per-tensor RMS update clipping, and a scheduled
bound (``GlobalNorm(optax.linear_schedule(...))``) counts the updates. ``clip_info`` then reports
the update's norm.

The transformations take optax's *extra arguments* (``optax.GradientTransformationExtraArgs``):
the step's loss reaches the clipper as ``update(updates, state, params, loss=loss)``, also through
``optax.chain`` (which hands every extra argument to every link; links that take none ignore
them), so :class:`~gradclip.SkipOnSpike` with ``signal="loss"`` or ``"both"`` skips on a loss
spike::

    tx = gradclip.optax.clip_then(gradclip.SkipOnSpike(signal="loss"), optax.adam(1e-3))
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params, loss=loss)

``value=`` (optax's name for the objective, used by ``reduce_on_plateau`` and the line searches)
is taken as the loss when ``loss=`` is not given; ``step=`` reaches scheduled thresholds. Under
``jax.jit`` pass the loss as an array (a Python float would be a constant of the trace).

optax and jax are imported when a transformation is built, not when gradclip is imported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper
from gradclip._core.contract import NO_SIGNALS, Signals, signals_from
from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip._core.ops import get_ops
from gradclip._core.types import ClipInfo

# optax's own clipping transformations with optax's semantics (drop-ins): see gradclip/optax_dropins.py.
from gradclip.optax_dropins import adaptive_grad_clip, clip, clip_by_block_rms, clip_by_global_norm, unitwise_norm

__all__ = [
    "ClipperState",
    "PerExampleState",
    "adaptive_grad_clip",
    "as_optax",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_info",
    "clip_then",
    "per_example",
    "unitwise_norm",
]


class ClipperState(NamedTuple):
    """The optax state of a clipper: a pytree of arrays.

    Attributes:
        clipper: The clipper's own state (a NamedTuple of arrays; empty for stateless methods).
        info: The :class:`~gradclip.ClipInfo` of the last update (before the first one: norm 0,
            threshold 0, coef 1, not clipped, finite, not skipped), with ``consecutive_skips``
            the updates skipped in a row (int32; 0 for a clipper that never skips).
    """

    clipper: Any
    info: ClipInfo


class ClipThenState(NamedTuple):
    """The state of :func:`clip_then`: the clipper's and the wrapped optimizer's."""

    clip: ClipperState
    inner: Any


def _leaves(tree: Any, where: str):
    """Flatten a pytree into JAX arrays with names; refuse arrays of other frameworks."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradclip._core.tree import path_name
    from gradclip.backends.jax import refuse_float0

    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves, names = [], []
    for path, leaf in with_path:
        name = path_name(path)  # as clip()/update() name it, so name patterns match alike
        if isinstance(leaf, (jax.Array, jax.core.Tracer, np.ndarray)) and leaf.dtype == jax.dtypes.float0:
            refuse_float0(where, [leaf.dtype], [name])
        if isinstance(leaf, (jax.Array, jax.core.Tracer)):
            leaves.append(leaf)
        elif isinstance(leaf, (np.ndarray, np.generic, int, float)):
            leaves.append(jnp.asarray(leaf))
        else:
            kind = f"{type(leaf).__module__}.{type(leaf).__qualname__}"
            hint = (
                "for PyTorch use clipper.clip_(model) or gradclip.torch.ClippedOptimizer"
                if kind.startswith("torch")
                else "for TensorFlow/Keras use clipper.clip(grads) or gradclip.keras.ClippingOptimizer"
                if kind.startswith(("tensorflow", "keras"))
                else "pass jax.Array leaves"
            )
            raise BackendError(
                f"{where}: clipper.as_optax() transforms JAX arrays, but leaf {name} is a {kind}; {hint}"
            )
        names.append(name)
    return leaves, names, treedef


def as_optax(clipper: Clipper, axis_name: Any = None):
    """Wrap ``clipper`` as an ``optax.GradientTransformation``.

    ``init(params)`` builds the clipper's state for gradients shaped like ``params``;
    ``update(updates, state, params=None, **extra_args)`` clips ``updates`` (any pytree; ``None``
    leaves pass through) and returns ``(clipped_updates, new_state)``. Methods that need the
    parameters (AGC) take them from ``params``, which must then be given. The extra arguments
    ``loss=`` (or optax's ``value=``) and ``step=`` are the clipper's signals (module
    documentation); other extra arguments, meant for other links of a chain, are ignored.
    Everything runs under ``jax.jit``.

    Args:
        clipper: Any gradclip clipper (stateless or adaptive, or a chain).
        axis_name: For ``update`` inside ``jax.pmap``/``jax.shard_map``: the axis name, or a
            tuple of names, the updates are split over (module documentation). ``init`` may run
            inside or outside the mapped function.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`ClipperState`.

    Raises:
        InvalidArgumentError: ``clipper`` is not a gradclip clipper, or ``axis_name`` is not an
            axis name or tuple of names; (when ``update`` is called) an axis not bound there, a
            leaf that varies along a mapped axis not named (it would be clipped per device), or a
            ``loss``/``step`` that is not a number or a one-element JAX array.
        BackendError: (when called) leaves that are torch or TensorFlow arrays, or not floating
            point (the ``float0`` gradients of ``jax.grad(..., allow_int=True)`` included).
    """
    import jax
    import jax.numpy as jnp
    import optax

    if not isinstance(clipper, Clipper):
        raise InvalidArgumentError(
            f"as_optax: expected a gradclip clipper, got {type(clipper).__name__}"
        )
    name = type(clipper).__name__
    needs_params = clipper.needs_params
    _check_axis_name(f"{name}.as_optax", axis_name)

    def step(leaves, names, state, param_leaves, signals=NO_SIGNALS, axis=axis_name):
        ops = get_ops(leaves, framework="jax", where=f"{name}.as_optax().update", axis_name=axis)
        new, state, info = clipper.run(ops, leaves, state, param_leaves, names, signals)
        return new, state, ops.finish_info(info)

    def init_fn(params):
        leaves, names, _ = _leaves(params, f"{name}.as_optax().init")
        ops = get_ops(leaves, framework="jax", where=f"{name}.as_optax().init")
        state = clipper.init_state(ops, leaves)
        # The info's dtypes must be those update() produces, so the state has one fixed type
        # (lax.scan and while loops carry it): take them from an abstract evaluation, of whole
        # arrays (dtypes do not depend on the axes; init may run outside the mapped function),
        # given a loss (a loss-watching clipper needs one; the others ignore it).
        whole = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
        shapes = jax.eval_shape(
            lambda g, p, s, loss: step(g, names, s, p if needs_params else None, Signals(loss=loss), None)[2],
            whole, whole, jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
            jax.ShapeDtypeStruct((), jnp.float32),
        )
        info = ClipInfo(
            norm=jnp.zeros(shapes.norm.shape, shapes.norm.dtype),
            threshold=jnp.zeros(shapes.threshold.shape, shapes.threshold.dtype),
            coef=jnp.ones(shapes.coef.shape, shapes.coef.dtype),
            clipped=jnp.zeros(shapes.clipped.shape, shapes.clipped.dtype),
            finite=jnp.ones(shapes.finite.shape, shapes.finite.dtype),
            skip=jnp.zeros(shapes.skip.shape, shapes.skip.dtype),
            consecutive_skips=jnp.zeros((), jnp.int32),
        )
        return ClipperState(clipper=state, info=info)

    def update_fn(updates, state, params=None, **extra_args):
        where = f"{name}.as_optax().update"
        signals = _signals(where, extra_args)
        if not isinstance(state, ClipperState):
            raise InvalidArgumentError(
                f"{where}: state must be the ClipperState from init(), got {type(state).__name__}"
            )
        leaves, names, treedef = _leaves(updates, where)
        param_leaves = None
        if needs_params:
            if params is None:
                raise InvalidArgumentError(
                    f"{where}: {name} needs the parameters; call update(updates, state, params)"
                )
            param_leaves, _, _ = _leaves(treedef.flatten_up_to(params), where)
        new, inner, info = step(leaves, names, state.clipper, param_leaves, signals)
        # A skipped step changes nothing: zero updates (where, not a Python branch). This
        # transformation skips the step, so it counts the skips in a row (a state of an earlier
        # version, without the count, starts at 0).
        new = [jnp.where(info.skip, jnp.zeros_like(n), n) for n in new]
        previous = state.info.consecutive_skips
        previous = jnp.zeros((), jnp.int32) if previous is None else previous
        skipped = info.skip if clipper.may_skip else False
        info = info._replace(consecutive_skips=jnp.where(skipped, previous + 1, 0).astype(jnp.int32))
        return jax.tree_util.tree_unflatten(treedef, new), ClipperState(clipper=inner, info=info)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _signals(where: str, extra_args: dict[str, Any]) -> Signals:
    """The clipper's signals among optax's extra arguments (``loss``, else ``value``; ``step``),
    validated; the others belong to other links of a chain."""
    import jax.numpy as jnp
    import numpy as np

    given = {key: extra_args[key] for key in ("loss", "step") if extra_args.get(key) is not None}
    if "loss" not in given and extra_args.get("value") is not None:
        given["loss"] = extra_args["value"]  # optax's name for the objective
    # NumPy scalars and arrays are JAX's inputs as much as jax.Arrays are.
    given = {key: jnp.asarray(v) if isinstance(v, (np.ndarray, np.generic)) else v for key, v in given.items()}
    return signals_from(where, given, "jax")


def clip_then(clipper: Clipper, inner, axis_name: Any = None):
    """Clip with ``clipper``, then apply the optax transformation ``inner``, skipping whole steps.

    Like ``optax.chain(clipper.as_optax(), inner)``, except that a step the clipper asks to skip
    (``info.skip``) outputs zero updates *and* leaves ``inner``'s state (Adam's moments, its step
    count) as it was, in the manner of ``optax.apply_if_finite``. Selection uses ``jnp.where``,
    so it works under ``jax.jit``. Extra arguments (``loss=``...) reach both the clipper and
    ``inner`` (which ignores them unless it takes extra arguments itself).

    Args:
        clipper: Any gradclip clipper.
        inner: An ``optax.GradientTransformation`` (e.g. ``optax.adam(1e-3)``).
        axis_name: As for :func:`as_optax`.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a ``ClipThenState``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    clip_tx = as_optax(clipper, axis_name=axis_name)
    inner_tx = optax.with_extra_args_support(inner)

    def init_fn(params):
        return ClipThenState(clip=clip_tx.init(params), inner=inner_tx.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        clipped, clip_state = clip_tx.update(updates, state.clip, params, **extra_args)
        new_updates, new_inner = inner_tx.update(clipped, state.inner, params, **extra_args)
        skip = clip_state.info.skip
        keep = lambda old, new: jnp.where(skip, old, new)  # noqa: E731
        inner_state = jax.tree_util.tree_map(keep, state.inner, new_inner)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        return new_updates, ClipThenState(clip=clip_state, inner=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_axis_name(where: str, axis_name: Any) -> None:
    """Refuse, when the transformation is built, an ``axis_name`` that is not a name or a tuple
    of names (whether it is bound is known only inside the mapped function)."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_name is not None and (not names or any(not isinstance(n, str) or not n for n in names)):
        raise InvalidArgumentError(
            f"{where}: axis_name must be None, an axis name (str) or a tuple of names, got {axis_name!r}"
        )


def clip_info(opt_state: Any, *, all: bool = False):  # noqa: A002 - mirrors optax naming
    """The :class:`~gradclip.ClipInfo` of the last step, found in an optax state.

    Args:
        opt_state: A state containing one or more :class:`ClipperState` (any nesting:
            ``optax.chain``, ``inject_hyperparams``, :func:`clip_then`).
        all: Return a list with the info of every clipper found, in order.

    Returns:
        The first clipper's ClipInfo (arrays; ``info.to_dict()`` reads them), or a list.

    Raises:
        InvalidArgumentError: No gradclip clipper state in ``opt_state``.
    """
    import jax

    found = [
        leaf.info
        for leaf in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, ClipperState))
        if isinstance(leaf, ClipperState)
    ]
    if not found:
        raise InvalidArgumentError("clip_info: opt_state holds no gradclip clipper state (from as_optax())")
    return found if all else found[0]


class PerExampleState(NamedTuple):
    """The optax state of :func:`per_example`: the clipper's state and the last step's
    per-example :class:`~gradclip.ClipInfo` (None before the first update)."""

    clipper: Any


def per_example(clipper: Clipper):
    """Per-example clipping as an ``optax.GradientTransformation``: updates whose leaves have a
    leading example axis become the clipped sum ``Σ_i c_i g_i`` (not the mean, as
    ``optax.per_example_global_norm_clip``; divide by the batch size and add noise after it
    for DP-SGD, Abadi et al. 2016).

    ``per_example(GlobalNorm(C, eps=0))`` equals ``optax.per_example_global_norm_clip(C)`` and
    ``per_example(Norm(C / √L))`` equals ``optax.per_example_layer_norm_clip(C, uniform=True)``
    for ``L`` leaves; ``QuantileNorm`` adapts C (Andrew et al. 2021).

    Args:
        clipper: ``GlobalNorm(C)``, ``Norm(C)`` or ``QuantileNorm(...)``.

    Returns:
        An ``optax.GradientTransformation`` (works under ``jax.jit``).

    Raises:
        InvalidArgumentError: Another clipper (ZClip/AutoClip/AdaGC: their threshold follows
            private data without noise).
    """
    import optax

    from gradclip.jax_per_example import check_per_example_clipper, clip_per_example, init_state

    check_per_example_clipper("gradclip.optax.per_example", clipper)

    def init(params):
        import jax
        import jax.numpy as jnp

        shapes = [jnp.zeros((1, *jnp.shape(x)), jnp.result_type(x)) for x in jax.tree_util.tree_leaves(params)]
        return PerExampleState(init_state(clipper, shapes))

    def update(updates, state, params=None):
        del params
        summed, new_state, _info = clip_per_example(clipper, updates, state.clipper)
        return summed, PerExampleState(new_state)

    return optax.GradientTransformation(init, update)
