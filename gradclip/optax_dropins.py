"""optax's own clipping transformations with optax's semantics, as drop-ins:
``gradclip.optax.clip_by_global_norm``, ``clip``, ``clip_by_block_rms``, ``adaptive_grad_clip``
(and ``unitwise_norm``) replace ``optax.clip_by_global_norm``, ``optax.clip``,
``optax.clip_by_block_rms``, ``optax.adaptive_grad_clip`` (and ``unitwise_norm``).

Same arguments (numbers or arrays, so ``optax.inject_hyperparams`` works), the same empty state
(an optax checkpoint keeps its structure) and optax's formulas operation for operation: on
finite fp32/fp64 updates the results are optax's bit for bit. ``clipper.as_optax()`` is the other
way in: gradclip's own rules (a torch-style ``eps`` in ``GlobalNorm``, so ``max_norm / (norm +
1e-6)``: 1/3 becomes 0.33333269 where optax gives 0.33333334), the last step's
:class:`~gradclip.ClipInfo`, and every adaptive clipper.

Deviations, each deliberate (DESIGN.md, "known deviations of the references") and each a named
expectation in ``tests/upstream/test_upstream_optax_clipping.py``:

* **fp16/bf16 in fp32.** Norms and RMS accumulate in fp32 and the scale is applied in fp32,
  rounded once into the update's dtype: optax squares fp16 updates in fp16, which overflows
  from 256, and an infinite norm scales the whole update to 0.
* **No 0/0.** A zero norm or RMS never divides: ``clip_by_global_norm(0.0)`` of zero updates is
  zeros (optax: NaN), ``clip_by_block_rms(0.0)`` of a zero block is zeros (optax: NaN).
* **Non-finite norms leave the updates alone**, as gradclip's ``nonfinite="propagate"``: an inf
  or NaN global norm (or block RMS, or unit norm for AGC) returns those updates as they are,
  where optax scales them to 0, NaN for the non-finite elements.
* **Bad arguments are refused** when the transformation is built, with gradclip's
  ``InvalidArgumentError`` naming the argument: a negative or NaN ``max_norm``, ``max_delta``,
  ``threshold``, ``clipping``, ``eps`` (a number, a NumPy or a concrete JAX scalar or array), and
  anything that is not a number or a real numeric array (a string, None, a bool, a schedule
  function: optax takes none of these either, and fails only at ``update``). A traced array (the
  hyperparameters ``optax.inject_hyperparams`` passes under ``jax.jit``) is taken as given.
* **Only floating-point (or complex) updates.** A leaf of integer or bool dtype, or the
  ``float0`` gradient ``jax.grad(..., allow_int=True)`` gives for an integer input, is refused
  with gradclip's ``BackendError`` (a ``TypeError``) naming the leaf's path and dtype, when
  ``update`` runs or is traced (inside ``jax.jit`` too), by all four transformations.
  ``optax.clip_by_global_norm`` raises a ``TypeError`` there too (and all of optax's on
  ``float0``), but ``optax.clip``, ``clip_by_block_rms`` and ``adaptive_grad_clip`` silently
  turn an integer leaf into a float one (a step counter 5 becomes 1.0): gradclip refuses integer
  gradients on every entry point (docs/reliability.md). Leave such leaves out with
  ``optax.masked``.

optax and jax are imported when a transformation is built, not when gradclip is imported.
"""

from __future__ import annotations

import numbers
from typing import Any

from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip._core.validation import check_number

__all__ = ["adaptive_grad_clip", "clip", "clip_by_block_rms", "clip_by_global_norm", "unitwise_norm"]

#: optax's ``unitwise_clip`` guard: "prevents division by zero; should be impossible to engage".
_DIV_EPS = 1e-6


def _checked(where: str, name: str, value: Any) -> Any:
    """Refuse what optax would fail on only at ``update``, and negative or NaN values.

    A number (not a bool) must be ``>= 0`` and not NaN. A NumPy or concrete JAX array (a
    ``jnp.float32(1.0)`` included) must have a real numeric dtype and hold such values. A traced
    array (``optax.inject_hyperparams`` under ``jax.jit``) is taken as given: its value is not
    known yet. Anything else (a string, None, a bool, a callable) is refused.

    Raises:
        InvalidArgumentError: Naming the argument, the value and what is valid.
    """
    import jax
    import numpy as np

    valid = "(valid: a number >= 0, not NaN, or a JAX/NumPy array of them, as optax takes)"
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return check_number(where, name, value)
    if isinstance(value, jax.core.Tracer):
        return value
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        dtype = np.dtype(value.dtype)
        if dtype.kind not in "iuf" and not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise InvalidArgumentError(f"{where}: {name} must be a real number, got an array of dtype {dtype} {valid}")
        try:
            host = np.asarray(value, dtype=np.float64)
        except Exception:  # noqa: BLE001 - an array this process cannot read whole: as given
            return value
        if np.isnan(host).any() or (host < 0).any():
            raise InvalidArgumentError(f"{where}: {name} must be >= 0 and not NaN, got {value!r} {valid}")
        return value
    hint = (
        "; optax's clipping transformations take no schedule: wrap them in optax.inject_hyperparams, "
        "or use a gradclip clipper with a schedule threshold and .as_optax()"
        if callable(value)
        else ""
    )
    raise InvalidArgumentError(
        f"{where}: {name} must be a real number, got {value!r} of type {type(value).__name__} {valid}{hint}"
    )


def _check_updates(where: str, updates: Any) -> None:
    """Refuse update leaves that are not floating point (or complex), naming the leaf: integer
    and bool leaves, and the ``float0`` leaves of ``jax.grad(..., allow_int=True)``. Dtypes are
    static, so this runs once per trace under ``jax.jit`` and raises there.

    Raises:
        BackendError: A ``TypeError``, as optax's own error on such a leaf.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gradclip._core.tree import path_name

    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = getattr(leaf, "dtype", None)
        dtype = np.result_type(leaf) if dtype is None else np.dtype(dtype)
        if dtype != jax.dtypes.float0 and jnp.issubdtype(dtype, jnp.inexact):
            continue
        label = path_name(path)  # as clip() and as_optax() name leaves
        if dtype == jax.dtypes.float0:
            dtype = "float0"  # numpy prints it as [('float0', 'V')]
            why = (
                "the empty gradient jax.grad(..., allow_int=True) gives for an integer input (it "
                "holds no values)"
            )
        else:
            why = (
                "not floating point (clipping would count it in the norm and scale, truncate or "
                "cast it)"
            )
        raise BackendError(
            f"{where}: update leaf {label} has dtype {dtype}, {why}; updates must be floating point. "
            "Leave such leaves out of the transformation with optax.masked(tx, mask) (mask False "
            "there), or differentiate only the floating-point parameters. Nothing was changed."
        )


def _wide(x: Any) -> Any:
    """``x`` in fp32 when it is fp16/bf16 (so squares do not overflow), else as it is."""
    import jax.numpy as jnp

    return x.astype(jnp.float32) if jnp.dtype(x.dtype).itemsize < 4 and jnp.issubdtype(x.dtype, jnp.floating) else x


def _abs_sq(x: Any) -> Any:
    # optax's numerics.abs_sq, the same operations.
    return (x.conj() * x).real


def clip_by_global_norm(max_norm: Any):
    """``optax.clip_by_global_norm``: scale all updates together when their global L2 norm
    reaches ``max_norm``: ``t / norm * max_norm`` per element (no eps), else ``t``.

    Args:
        max_norm: The largest global norm, a number ``>= 0`` or an array.

    Returns:
        An ``optax.GradientTransformation`` with an empty state.

    Raises:
        InvalidArgumentError: A negative or NaN ``max_norm``, or not a number or numeric array.
        BackendError: (at ``update``, traced or not) an update leaf that is not floating point.
    """
    import jax
    import jax.numpy as jnp
    import optax

    max_norm = _checked("clip_by_global_norm", "max_norm", max_norm)

    def update_fn(updates, state, params=None):
        del params
        _check_updates("clip_by_global_norm", updates)
        g_norm = optax.tree.norm(jax.tree.map(_wide, updates))
        # optax's trigger, plus a zero or non-finite norm: nothing to divide by (see the module).
        trigger = jnp.squeeze((g_norm < max_norm) | (g_norm == 0) | ~jnp.isfinite(g_norm))

        def clip_fn(t):
            wide = _wide(t)
            return jax.lax.select(trigger, t, ((wide / g_norm.astype(wide.dtype)) * max_norm).astype(t.dtype))

        return jax.tree.map(clip_fn, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip(max_delta: Any):
    """``optax.clip``: clamp every element into ``[-max_delta, max_delta]`` (NaN stays NaN).

    Raises:
        InvalidArgumentError: A negative or NaN ``max_delta``, or not a number or numeric array.
        BackendError: (at ``update``, traced or not) an update leaf that is not floating point.
    """
    import jax
    import jax.numpy as jnp
    import optax

    max_delta = _checked("clip", "max_delta", max_delta)

    def update_fn(updates, state, params=None):
        del params
        _check_updates("clip", updates)
        return jax.tree.map(lambda t: jnp.clip(t, -max_delta, max_delta), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def clip_by_block_rms(threshold: Any):
    """``optax.clip_by_block_rms``: divide each leaf by ``max(1, rms / threshold)``.

    Raises:
        InvalidArgumentError: A negative or NaN ``threshold``, or not a number or numeric array.
        BackendError: (at ``update``, traced or not) an update leaf that is not floating point.
    """
    import jax
    import jax.numpy as jnp
    import optax

    threshold = _checked("clip_by_block_rms", "threshold", threshold)

    def clip_fn(u):
        wide = _wide(u)
        rms = jnp.sqrt(jnp.mean(_abs_sq(wide)))
        denominator = jnp.maximum(1.0, rms / threshold)
        # A zero or non-finite RMS divides nothing (no 0/0 for threshold 0; see the module).
        denominator = jnp.where((rms == 0) | ~jnp.isfinite(rms), 1.0, denominator)
        return (wide / denominator).astype(u.dtype)

    def update_fn(updates, state, params=None):
        del params
        _check_updates("clip_by_block_rms", updates)
        return jax.tree.map(clip_fn, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def unitwise_norm(x: Any, axis: Any = None):
    """``optax.unitwise_norm``: the L2 norm of each unit, broadcast to ``x``'s shape (fp32 for
    fp16/bf16). Without ``axis`` the units follow optax's layouts: the whole of a vector, axis 0
    of a 2-D or 3-D array (``IO``, multi-head), axes 0-2 of a 4-D (``HWIO``), 0-3 of a 5-D array.

    Raises:
        ValueError: ``axis=None`` for an array of 6 or more dimensions (optax's error).
    """
    import jax.numpy as jnp

    x = jnp.asarray(x)
    wide = _wide(x)
    if axis is not None:
        squared = jnp.sum(_abs_sq(wide), axis=axis, keepdims=True)
    elif jnp.squeeze(x).ndim <= 1:
        squared = jnp.sum(_abs_sq(wide), keepdims=True)
    elif x.ndim in (2, 3):
        squared = jnp.sum(_abs_sq(wide), axis=0, keepdims=True)
    elif x.ndim == 4:
        squared = jnp.sum(_abs_sq(wide), axis=(0, 1, 2), keepdims=True)
    elif x.ndim == 5:
        squared = jnp.sum(_abs_sq(wide), axis=(0, 1, 2, 3), keepdims=True)
    else:
        raise ValueError(
            f"unitwise_norm: expected a parameter with 1 to 5 dimensions, got shape {x.shape}; give "
            "axis= (the axes to reduce over) for other shapes"
        )
    return jnp.broadcast_to(jnp.sqrt(squared), x.shape)


def adaptive_grad_clip(clipping: Any, eps: Any = 1e-3, axis: Any = None):
    """``optax.adaptive_grad_clip`` (Brock et al. 2021): each unit's update scaled so that its
    norm is at most ``clipping * max(‖param unit‖, eps)``; optax's units (:func:`unitwise_norm`,
    HWIO weights) and formula ``grad * (max_norm / max(g_norm, 1e-6))`` where ``g_norm >=
    max_norm``.

    Args:
        clipping: The largest ratio of update norm to parameter norm, ``>= 0``.
        eps: The floor of the parameter norm (zero-initialised parameters), ``>= 0``.
        axis: The axes a unit's norm is taken over (None: optax's defaults).

    Returns:
        An ``optax.GradientTransformation``; ``update`` needs ``params``.

    Raises:
        InvalidArgumentError: A negative or NaN ``clipping`` or ``eps``, or not a number or numeric array.
        BackendError: (at ``update``, traced or not) an update leaf that is not floating point.
        ValueError: ``update`` without ``params`` (optax's message).
    """
    import jax
    import jax.numpy as jnp
    import optax

    clipping = _checked("adaptive_grad_clip", "clipping", clipping)
    eps = _checked("adaptive_grad_clip", "eps", eps)

    def unitwise_clip(g_norm, max_norm, grad):
        wide = _wide(grad)
        clipped = (wide * (max_norm / jnp.maximum(g_norm, _DIV_EPS))).astype(grad.dtype)
        return jnp.where((g_norm < max_norm) | ~jnp.isfinite(g_norm), grad, clipped)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                "adaptive_grad_clip: update() needs params (the units' norms are measured against the "
                "parameters' own)"
            )
        _check_updates("adaptive_grad_clip", updates)
        g_norm, p_norm = jax.tree.map(lambda x: unitwise_norm(x, axis=axis), (updates, params))
        max_norm = jax.tree.map(lambda x: clipping * jnp.maximum(x, eps), p_norm)
        return jax.tree.map(unitwise_clip, g_norm, max_norm, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)

