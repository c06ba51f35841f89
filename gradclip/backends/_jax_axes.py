"""Gradients split over mapped axes (``jax.pmap``, ``jax.shard_map``): their statistics, reduced.

Inside ``pmap`` and ``shard_map`` every device traces its own piece of each gradient, so a norm
taken over the arrays it sees is the norm of that piece. :class:`MappedAxes` holds the axis
names the gradients are split over (``axis_name=`` of ``clipper.update`` and
``clipper.as_optax``) and reduces each statistic over them, once, so that every device measures
the whole gradient, decides the same coefficient and advances the same state:

* every tensor's local ``sum |g|^p`` is ``psum``-med (``pmax`` of ``max |g|`` for ``inf``), then
  the root is taken: per-tensor norms are those of the whole tensors, and the global norm follows;
* AGC's unit-wise sums of squares are ``psum``-med the same way, as are the parameters';
* the extrema (``Value``) are ``pmax``-ed, element counts (``AverageNorm``, ``BlockRMS``)
  multiplied by the axis sizes;
* ``Subset(by="element")`` draws each element at its position in the whole tensor (exact for
  tensors split along their first dimension in device order, as ``P(axis)`` and a tiled
  ``lax.psum_scatter`` split them).

Which leaves are split. Under ``shard_map`` with ``check_vma=True`` (its default) JAX types every
value with the mesh axes along which it varies: a leaf that varies along a named axis is a piece
of a larger tensor and is reduced over it; a leaf that does not (a replicated bias, gradients
already averaged with ``lax.pmean``) is whole on every device and counted once. A leaf that varies
along a mapped axis that is *not* named is refused: clipping it alone would clip each device's
piece, or each data-parallel replica's own gradient, on its own. Under ``pmap`` (and
``shard_map(check_vma=False)``) JAX does not track this: every leaf is taken to be split over
every named axis.

Unit-wise statistics (AGC) assume each split leaf is split along a dimension its unit norms
reduce over (any but the last for JAX's input-major kernels; vectors are one unit), so that
every device holds a part of every unit. A kernel split along its unit axis (column-parallel) is
measured exactly as a global array sharded under ``jit`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip.backends._hashing import Words

try:  # shard_map(check_vma=True) sets this state while it traces; JAX has no public reader.
    from jax._src.config import _check_vma as _CHECK_VMA
except ImportError:  # pragma: no cover - older JAX: nothing is known to be tracked
    _CHECK_VMA = None

__all__ = ["MappedAxes", "OffsetWords"]


def _tracked() -> bool:
    """Whether JAX is tracking which mesh axes each value varies along (shard_map, check_vma)."""
    return _CHECK_VMA is not None and bool(_CHECK_VMA.value)


def _varying(x: Any) -> frozenset:
    """The manual mesh axes along which ``x`` differs between devices (empty when untracked)."""
    aval = jax.typeof(x)
    kind = getattr(aval, "manual_axis_type", None)
    if kind is not None:
        return frozenset(kind.varying)
    return frozenset(getattr(aval, "vma", ()))


def _bound_axes() -> tuple:
    mesh = jax.sharding.get_abstract_mesh()
    return tuple(getattr(mesh, "manual_axes", ()) or ())


def _names(axis_name: Any, where: str) -> tuple:
    if axis_name is None:
        return ()
    names = tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if not names or any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise InvalidArgumentError(
            f"{where}: axis_name must be a non-empty axis name (str) or a tuple of distinct names, "
            f"got {axis_name!r}; nothing was changed"
        )
    for name in names:
        try:
            lax.axis_size(name)
        except NameError:
            bound = _bound_axes()
            raise InvalidArgumentError(
                f"{where}: axis_name={axis_name!r}: the axis {name!r} is not bound here (bound: "
                f"{', '.join(map(repr, bound)) if bound else 'none, this is not inside jax.pmap or jax.shard_map'}); "
                f"call it inside jax.pmap(..., axis_name={name!r}) or jax.shard_map over a mesh with "
                "that axis; nothing was changed"
            ) from None
    return names


class MappedAxes:
    """The mapped axes a JAX Ops reduces over (see the module documentation).

    Args:
        axis_name: None (nothing to reduce), an axis name, or a tuple of names.
        where: The public entry point, for messages.

    Raises:
        InvalidArgumentError: ``axis_name`` is not a name or tuple of names, or one of them is
            not bound where the Ops is built.
    """

    def __init__(self, axis_name: Any, where: str):
        self.caller = where
        self.given = axis_name
        self.names = _names(axis_name, where)
        self.sizes = {name: lax.axis_size(name) for name in self.names}

    # -- which leaves are split ---------------------------------------------------------------
    def axes_of(self, x: Any, index: int = 0) -> tuple:
        """The named axes ``x`` is split over ((): whole on every device).

        Raises:
            InvalidArgumentError: ``x`` varies along a mapped axis that is not named.
        """
        if not _tracked():
            return self.names
        varying = _varying(x)
        stray = sorted(varying.difference(self.names), key=str)
        if stray:
            hint = repr(stray[0] if len(stray) == 1 and not self.names else tuple(self.names) + tuple(stray))
            raise InvalidArgumentError(
                f"{self.caller}: gradient #{index} varies along the mapped axis {stray} (each device "
                f"holds a different value), but axis_name={self.given!r}: clipping it alone would clip "
                f"each device's part on its own. If the devices hold pieces (shards) of the gradient, "
                f"pass axis_name={hint}; if each holds its own data-parallel gradient, average it first "
                f"(lax.pmean(grads, {stray[0]!r})). Nothing was changed."
            )
        return tuple(n for n in self.names if n in varying)

    def reduces(self, arrays: Sequence[Any]) -> bool:
        """Whether any of ``arrays`` is split (checks every leaf, see :meth:`axes_of`)."""
        if not self.names and not _tracked():
            return False  # eager and plain jit: the common path costs one config read
        return any([bool(self.axes_of(a, i)) for i, a in enumerate(arrays)])

    def size_of(self, x: Any) -> int:
        """How many pieces ``x`` is split into (1: whole)."""
        if not self.names:
            return 1
        return math.prod(self.sizes[n] for n in self.axes_of(x))

    def agree(self, flag: Any) -> Any:
        """A device bool made the same on every device: True when it is True on any."""
        axes = self.names if not _tracked() else tuple(n for n in self.names if n in _varying(flag))
        return lax.pmax(flag.astype(jnp.int32), axes) > 0 if axes else flag

    def _groups(self, arrays: Sequence[Any]) -> dict[tuple, list[int]]:
        groups: dict[tuple, list[int]] = {}
        for i, a in enumerate(arrays):
            groups.setdefault(self.axes_of(a, i), []).append(i)
        return groups

    def _reduce(self, partials: list[Any], arrays: Sequence[Any], largest: bool) -> list[Any]:
        """Each partial reduced over its array's axes: one collective per set of axes."""
        out = list(partials)
        for axes, indices in self._groups(arrays).items():
            if not axes:
                continue
            vector = jnp.stack([partials[i] for i in indices])
            vector = lax.pmax(vector, axes) if largest else lax.psum(vector, axes)
            for k, i in enumerate(indices):
                out[i] = vector[k]
        return out

    # -- the statistics ---------------------------------------------------------------------------
    def norms(self, ops: Any, grads: Sequence[Any], norm_type: float) -> Any:
        """Per-tensor ``norm_type`` norms of the whole tensors, in ``ops.acc``."""
        if not grads:
            return jnp.zeros((0,), ops.acc)
        infinite = norm_type == math.inf
        partials = []
        for g in grads:
            acc = jnp.float64 if g.dtype == jnp.float64 else jnp.float32
            values = jnp.abs(g.astype(acc).reshape(-1))
            if g.size == 0:
                partial = jnp.zeros((), acc)
            elif infinite:
                partial = jnp.max(values)
            elif norm_type == 2.0:
                partial = jnp.sum(jnp.square(values))
            elif norm_type == 1.0:
                partial = jnp.sum(values)
            else:
                partial = jnp.sum(values**norm_type)
            partials.append(partial.astype(ops.acc))
        totals = jnp.stack(self._reduce(partials, grads, largest=infinite))
        if infinite or norm_type == 1.0:
            return totals
        return jnp.sqrt(totals) if norm_type == 2.0 else totals ** (1.0 / norm_type)

    def unit_norms(self, local: Callable, arrays: Sequence[Any], axes: Sequence[Any]) -> list[Any]:
        """AGC's unit norms of the whole units (``local(arrays, axes)``: the unreduced ones).

        Raises:
            BackendError: A split tensor whose every axis indexes units (each device would hold
                different units, which a sum over the axis would mix).
        """
        out = []
        for i, (array, kept) in enumerate(zip(arrays, axes)):
            names = self.axes_of(array, i)
            if not names:
                out.extend(local([array], [kept]))
                continue
            reduce = tuple(range(array.ndim)) if kept is None else tuple(d for d in range(array.ndim) if d not in kept)
            if not reduce:
                raise BackendError(
                    f"{self.caller}: tensor #{i} of shape {tuple(array.shape)} is split over "
                    f"{names} and every one of its axes indexes units (axis={kept}); unit norms of "
                    "tensors split into different units per device are not supported, pass whole "
                    "tensors or a global array sharded under jax.jit"
                )
            acc = jnp.float64 if array.dtype == jnp.float64 else jnp.float32
            values = array.astype(acc)
            squares = jnp.sum(values * values, axis=reduce, keepdims=True)
            out.append(jnp.sqrt(lax.psum(squares, names)))
        return out

    def extrema(self, local: Callable, grads: Sequence[Any]) -> tuple[Any, Any]:
        """Per-tensor largest and smallest elements of the whole tensors."""
        highs, lows = local(grads)
        if not grads:
            return highs, lows
        top = self._reduce(list(highs), grads, largest=True)
        bottom = self._reduce(list(-lows), grads, largest=True)
        return jnp.stack(top), -jnp.stack(bottom)

    def element_offsets(self, arrays: Sequence[Any], shapes: Sequence[tuple]) -> list[Any] | None:
        """The position of each split tensor's first local element in the whole tensor (split
        along its first dimension in device order), when ``shapes`` are those of ``arrays``; None
        when nothing is split or the shapes are not the gradients' (a per-tensor draw)."""
        if not self.names or [tuple(s) for s in shapes] != [tuple(a.shape) for a in arrays]:
            return None
        offsets = []
        for i, a in enumerate(arrays):
            device = jnp.zeros((), jnp.uint32)
            for name in self.axes_of(a, i):
                device = device * jnp.uint32(self.sizes[name]) + lax.axis_index(name).astype(jnp.uint32)
            offsets.append(device * jnp.uint32(math.prod(a.shape)))
        return offsets


class OffsetWords(Words):
    """:class:`Words` whose ``index(n)`` calls give ``[o_k, o_k + n)`` for the k-th offset, so
    :func:`~gradclip.backends._hashing.hash_streams` numbers each tensor's elements from its
    offset (it asks for each shape's index exactly once, in order)."""

    def __init__(self, words: Words, offsets: Sequence[Any]):
        self._words = words
        self._offsets = list(offsets)

    def xor(self, a, b):
        return self._words.xor(a, b)

    def shr(self, x, bits):
        return self._words.shr(x, bits)

    def mul(self, x, constant):
        return self._words.mul(x, constant)

    def const(self, value, like):
        return self._words.const(value, like)

    def halves(self, x):
        return self._words.halves(x)

    def index(self, n):
        return self._words.index(n) + self._offsets.pop(0)
