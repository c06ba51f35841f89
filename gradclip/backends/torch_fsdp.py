"""FSDP1 (``FullyShardedDataParallel``): the reduction its flat parameters imply.

FSDP1 keeps each wrapped unit's parameters as one ``FlatParameter``, cut evenly (padding at the
end) over the unit's process group. After ``backward()`` every rank holds its own slice of the
averaged gradient, so a global norm is the sum over the *shard group* of the local slices'
``Σ|g|^p`` (FSDP1's own ``clip_grad_norm_`` does the same). Under HSDP (``HYBRID_SHARD``) the
handle's group is the shard group; the replica groups hold identical slices and are counted
once by not reducing over them. ``NO_SHARD`` units and parameters FSDP does not manage are whole
on every rank and counted locally.

* ``use_orig_params=False``: the gradients are the flat slices (``flat=True``): the global norm
  and element-wise methods work; per-tensor and per-unit methods are refused (a slice mixes
  pieces of many parameters).
* ``use_orig_params=True``: each original parameter's gradient is a 1-D view of its part of the
  slice (empty, or None, where the rank holds none of it). Its whole norm is the sum of its
  pieces over the shard group: each gets a *slot* in the group's per-tensor vector (see
  :mod:`gradclip.backends.torch_groups`), so ``Norm``, ``AdaGC`` and ``BlockRMS`` see the whole
  tensors' norms on every rank. A piece may cut rows: unit-wise ``AGC`` gets each row's norm
  from per-row partial sums over the shard group (:mod:`gradclip.backends.torch_fsdp_units`).

:func:`implied_group` is called by ``Clipper.clip_``-style entry points with the target they
were given; it costs one ``sys.modules`` lookup when FSDP is not imported.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from itertools import repeat
from typing import Any

import torch

from gradclip._core.contract import Coefficient
from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip.backends.torch_dtensor import _sum_, _unit_count, is_dtensor
from gradclip.backends.torch_fsdp_units import (
    Piece,
    owned_sums,
    per_element,
    piece_of,
    unit_sums,
    units_of,
)
from gradclip.backends.torch_groups import (
    Assign,
    Assigner,
    assigned_totals,
    group_label,
    local_assign,
)

__all__ = ["FSDPLayout", "fsdp_layout", "implied_group", "needs_whole_tensors"]

#: Coefficient kinds that need whole tensors (or rows): refused on flat slices.
_PER_TENSOR = (Coefficient.PER_TENSOR, Coefficient.PER_UNIT)


class FSDPLayout(Assigner):
    """The assignment of an FSDP1 model's gradients (see the module docstring).

    Args:
        module: A module holding ``FullyShardedDataParallel`` instances (the root, usually).

    Raises:
        InvalidArgumentError: ``module`` holds no FSDP1 unit.
    """

    def __init__(self, module: torch.nn.Module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        units = [m for m in FSDP.fsdp_modules(module) if getattr(m, "_handle", None) is not None]
        if not units:
            raise InvalidArgumentError(
                f"gradclip.torch.fsdp: {type(module).__qualname__} holds no FullyShardedDataParallel unit with parameters"
            )
        self._module = weakref.ref(module)
        self.handles = [m._handle for m in units]
        self.total_groups, self.shard_groups, self.slots = [], [], {}
        self.has_flat = False
        #: (handle, first slot): original parameters' slots in their group's vector.
        self._first: list[int] = []
        #: Per shard group, how many units (AGC's rows) its original parameters have, and per
        #: handle the index of its first unit in that group's unit vector (-1: not views).
        self.units: dict[Any, int] = {}
        self._first_unit: list[int] = []
        #: A (name, shape) of an original parameter with rows whose view is 1-D, else None.
        self.cut_shape: tuple[str, tuple] | None = None
        for handle in self.handles:
            group = handle.process_group if handle.uses_sharded_strategy else None
            if group is not None and group not in self.total_groups:
                self.total_groups.append(group)
            if handle._use_orig_params and group is not None:
                if group not in self.slots:
                    self.shard_groups.append(group)
                    self.slots[group] = 0
                self._first.append(self.slots[group])
                self.slots[group] += len(handle.flat_param._params)
                self._first_unit.append(self.units.get(group, 0))
                self.units[group] = self._first_unit[-1] + sum(map(units_of, handle.flat_param._shapes))
                shaped = [(n, tuple(s)) for n, s in zip(handle.flat_param._fqns, handle.flat_param._shapes) if len(s) >= 2]
                self.cut_shape = self.cut_shape or (shaped[0] if shaped else None)
            else:
                self.has_flat = self.has_flat or not handle._use_orig_params
                self._first.append(-1)
                self._first_unit.append(-1)
        # Unit-wise statistics of views are formed here (unit_norms, unit_totals).
        self.forms_units = bool(self.shard_groups)

    def _table(self) -> dict[int, Assign]:
        table: dict[int, Assign] = {}
        for handle, first in zip(self.handles, self._first):
            flat = handle.flat_param
            group = handle.process_group if handle.uses_sharded_strategy else None
            if not handle._use_orig_params:
                if flat.grad is not None:
                    name = ", ".join(flat._fqns[:3]) + (", ..." if len(flat._fqns) > 3 else "")
                    table[id(flat.grad)] = Assign(group, 1, None, -1, True, f"FlatParameter({name})")
                continue
            for k, (param, fqn, numel) in enumerate(zip(flat._params, flat._fqns, flat._numels)):
                if param.grad is not None:
                    table[id(param.grad)] = (
                        Assign(group, 1, group, first + k, False, fqn, numel) if group is not None else local_assign(fqn)
                    )
        return table

    def assign(self, grads: Sequence[torch.Tensor], where: str) -> list[Assign]:
        table = self._table()
        # Gradients FSDP does not manage (ignored modules) are whole on every rank: local.
        return [table.get(id(g)) or local_assign(f"#{i}") for i, g in enumerate(grads)]

    def refuse_per_tensor(self, clipper: Any, grads: Sequence[torch.Tensor], where: str) -> None:
        """Raise before anything is clipped when ``clipper`` needs whole tensors and a gradient
        is a flat slice, or forms units other than rows from views that lost their shapes.

        Raises:
            InvalidArgumentError: Naming the flat parameter, its group and the clipper (or the
                unit axis that views cannot give).
        """
        needs = needs_whole_tensors(clipper)
        if needs is None:
            return
        if self.cut_shape is not None:
            for found in _walk(needs):
                axis = found.config().get("axis") if found.coefficient == Coefficient.PER_UNIT else None
                if axis not in (None, 0, (0,)):
                    name, shape = self.cut_shape
                    raise InvalidArgumentError(
                        f"{where}: {found!r} forms units along axis={axis!r}, but {name} (shape "
                        f"{shape}), like every parameter of an FSDP1 unit with use_orig_params=True, "
                        "is held as a 1-D piece of its rows flattened one after another: only rows "
                        "(axis=None, the default) can be formed from such pieces. Nothing was clipped."
                    )
        if not self.has_flat:
            return
        for a in self.assign(grads, where):
            if a.flat:
                kind = "per unit (rows)" if needs.coefficient == Coefficient.PER_UNIT else "per tensor"
                raise InvalidArgumentError(
                    f"{where}: {needs!r} works {kind}, but {a.name} is an FSDP1 flat parameter "
                    f"({'sharded over the ' + group_label(a.total) if a.total is not None else 'NO_SHARD, whole on this rank'}; "
                    "use_orig_params=False): it concatenates pieces of several parameters. Wrap with "
                    "FullyShardedDataParallel(..., use_orig_params=True), use FSDP2 (fully_shard), "
                    "or a global-norm clipper. Nothing was clipped."
                )

    # -- unit-wise statistics of views (AGC) ------------------------------------------------------
    def _pieces(self) -> dict[int, Piece]:
        """This rank's :class:`Piece` of every original parameter of the sharded
        ``use_orig_params=True`` units, keyed by the id of the parameter and of its gradient."""
        pieces: dict[int, Piece] = {}
        for handle, unit in zip(self.handles, self._first_unit):
            if unit < 0:
                continue
            flat = handle.flat_param
            for param, fqn, shape, info in zip(flat._params, flat._fqns, flat._shapes, flat._shard_param_infos):
                start, length = (info.intra_param_start_idx, info.numel_in_shard) if info.in_shard else (None, None)
                piece = pieces[id(param)] = piece_of(handle.process_group, unit, shape, start, length, fqn)
                if param.grad is not None:
                    pieces[id(param.grad)] = piece
                unit += units_of(shape)
        return pieces

    def _whole_or_refuse(self, arrays: Sequence[torch.Tensor], pieces: dict[int, Piece], where: str) -> list[int]:
        """Indices of the arrays whole on this rank; raise for a DTensor, a flat shard, or a
        view whose size is not its piece's (parameters unsharded at this point)."""
        for handle, unit in zip(self.handles, self._first_unit):
            # Decided per unit, the same on every rank (a rank may hold whole parameters only):
            # unsharded, the views hold every element, more than the shard's pieces.
            if unit < 0:
                continue
            flat_param = handle.flat_param
            held = sum(p.numel() for p in flat_param._params)
            if held != sum(i.numel_in_shard or 0 for i in flat_param._shard_param_infos if i.in_shard):
                raise BackendError(
                    f"{where}: the FSDP1 unit holding {', '.join(flat_param._fqns[:3])} has its parameters "
                    "unsharded at this point (summon_full_params, or between forward and backward): "
                    "their rows are not this rank's pieces. Clip between backward() and the optimizer "
                    "step. Nothing was clipped."
                )
        flat = {key: a.name for key, a in self._table().items() if a.flat}
        whole = []
        for i, array in enumerate(arrays):
            piece = pieces.get(id(array))
            if piece is not None:
                if array.numel() != piece.length:
                    raise BackendError(
                        f"{where}: {piece.name} holds {array.numel()} element(s) here where FSDP1's "
                        f"shard holds {piece.length}: its parameters are not sharded at this point "
                        "(clip between backward() and the optimizer step). Nothing was clipped."
                    )
                continue
            if is_dtensor(array) or id(array) in flat:
                what = "a DTensor" if is_dtensor(array) else f"the FSDP1 flat parameter shard {flat[id(array)]}"
                raise BackendError(
                    f"{where}: unit-wise clipping (AGC) of gradient #{i}, {what}, under an FSDP1 "
                    "layout is not supported (rows are formed for use_orig_params=True views only); "
                    "use a global-norm or per-tensor clipper here. Nothing was clipped."
                )
            whole.append(i)
        return whole

    def unit_norms(self, ops: Any, arrays: Sequence[torch.Tensor], axes: Sequence[Any], where: str) -> list[torch.Tensor]:
        """``Ops.unit_norms`` under this layout: whole tensors' units locally; each view's rows
        from per-row partial sums, one all-reduce per shard group (every rank joins each, in the
        same order, with or without a piece in it), given per element of the view.

        Raises:
            BackendError: A DTensor or a flat shard among ``arrays`` (before any collective).
        """
        pieces = self._pieces()
        whole = self._whole_or_refuse(arrays, pieces, where)
        out: list[Any] = [None] * len(arrays)
        if whole:
            for i, norms in zip(whole, ops._twin.unit_norms([arrays[i] for i in whole], [axes[i] for i in whole])):
                out[i] = norms
        sums = {i: unit_sums(a, pieces[id(a)]) for i, a in enumerate(arrays) if id(a) in pieces}
        for group in self.shard_groups:
            vector = torch.zeros((self.units[group],), dtype=torch.float64, device=ops.device)
            mine = [i for i in sums if pieces[id(arrays[i])].group is group]
            for i in mine:
                index, values = sums[i]
                vector[index : index + values.numel()] += values.to(ops.device)
            vector = _sum_(vector, [group]).sqrt()
            for i in mine:
                index, values = sums[i]
                acc = torch.float64 if arrays[i].dtype == torch.float64 else torch.float32
                out[i] = per_element(vector[index : index + values.numel()].to(acc), pieces[id(arrays[i])])
        return out

    def unit_totals(
        self, ops: Any, values: Sequence[torch.Tensor], arrays: Sequence[torch.Tensor], axes: Sequence[Any], where: str
    ) -> list[torch.Tensor]:
        """``Ops.unit_totals`` under this layout: each vector laid out as
        ``flat_concat(unit_norms(arrays, axes))`` is summed with every unit counted once (a
        view's row where its first element lies) and reduced over each array's group."""
        pieces = self._pieces()
        self._whole_or_refuse(arrays, pieces, where)
        counts = [pieces[id(a)].length if id(a) in pieces else _unit_count(a, kept) for a, kept in zip(arrays, axes)]
        rows = []
        for vector in values:
            parts = torch.split(vector.to(ops.device, torch.float64), counts) if arrays else ()
            sums = [owned_sums(part, pieces[id(a)]) if id(a) in pieces else part.sum() for part, a in zip(parts, arrays)]
            rows.append(torch.stack(sums) if sums else torch.zeros((0,), dtype=torch.float64, device=ops.device))
        partials = torch.stack(rows) if rows else torch.zeros((0, len(arrays)), dtype=torch.float64, device=ops.device)
        totals = assigned_totals(self, partials, list(range(len(arrays))), self.assign(arrays, where), False)
        return list(totals.to(ops.acc).unbind())


def _walk(clipper: Any):
    """``clipper`` and every clipper nested in it."""
    yield clipper
    for child in clipper.children() if hasattr(clipper, "children") else ():
        yield from _walk(child)


def needs_whole_tensors(clipper: Any) -> Any:
    """The first clipper (itself or a child) deciding per tensor or per unit, else None."""
    if getattr(clipper, "coefficient", None) in _PER_TENSOR or getattr(clipper, "per_tensor_state", False):
        children = list(clipper.children()) if hasattr(clipper, "children") else []
        for child in children:
            found = needs_whole_tensors(child)
            if found is not None:
                return found
        return clipper
    for child in clipper.children() if hasattr(clipper, "children") else ():
        found = needs_whole_tensors(child)
        if found is not None:
            return found
    return None


_LAYOUTS: weakref.WeakKeyDictionary[torch.nn.Module, FSDPLayout | None] = weakref.WeakKeyDictionary()


def fsdp_layout(module: Any) -> FSDPLayout | None:
    """The :class:`FSDPLayout` of a module holding FSDP1 units (cached per module), else None."""
    if "torch.distributed.fsdp" not in sys.modules or not isinstance(module, torch.nn.Module):
        return None
    try:
        return _LAYOUTS[module]
    except KeyError:
        pass
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not any(getattr(m, "_handle", None) is not None for m in FSDP.fsdp_modules(module)):
        return None  # not cached: the module may be wrapped later
    layout = _LAYOUTS[module] = FSDPLayout(module)
    return layout


def implied_group(
    clipper: Any, target: Any, params: Sequence[Any], grads: Sequence[Any], group: Any, where: str, names: Sequence[str] | None = None
) -> Any:
    """The reduction for a clipping call under FSDP1: the clipper's own ``group`` when it has
    one, else the layout FSDP1 implies, else None.

    Args:
        clipper: The clipper being called (its kinds decide whether flat slices are refused).
        target: What the call was given (a module, parameters...).
        params: The parameters whose gradients were collected, and ``grads`` those gradients.
        group: The clipper's ``distributed_group()``.
        names: The parameters' names, for error messages.

    Returns:
        The group or layout to reduce with, or None.

    Raises:
        InvalidArgumentError: FSDP1 flat parameters given without their module (their group is
            unknown), or a per-tensor clipper on flat slices. Nothing was clipped.
    """
    if isinstance(group, FSDPLayout):
        group.refuse_per_tensor(clipper, grads, where)
        return group
    if group is not None or "torch.distributed.fsdp" not in sys.modules:
        return group
    # FSDP1 marks its flat parameters and, with use_orig_params=True, the original ones with
    # "_fsdp_flattened". No mark (the common case, one C-level pass; Lightning and accelerate
    # import FSDP even when unused): not FSDP1, and the module is not walked.
    if not any(map(getattr, params, repeat("_fsdp_flattened"), repeat(False))):
        return None
    layout = fsdp_layout(target)
    if layout is None:
        from torch.distributed.fsdp._flat_param import FlatParameter

        # Marked parameters without their module: their shard group is unknown and a local norm
        # would be silently wrong. (DTensor parameters marked by FSDP1 x TP carry their mesh.)
        for name, p in zip(names or [None] * len(params), params):
            flat = getattr(p, "_is_flat_param", False) or type(p) is FlatParameter
            if flat or (getattr(p, "_fsdp_flattened", False) and type(p.data) is torch.Tensor):
                kind = "FlatParameter" if flat else "use_orig_params=True parameter"
                raise InvalidArgumentError(
                    f"{where}: {name or 'a parameter'} is an FSDP1 {kind} given without its "
                    "FullyShardedDataParallel module, so its shard group is unknown; call "
                    "clip_(fsdp_model), or set clipper.process_group = gradclip.torch.fsdp.reduction(fsdp_model). "
                    "Nothing was clipped."
                )
        return None
    layout.refuse_per_tensor(clipper, grads, where)
    return layout
