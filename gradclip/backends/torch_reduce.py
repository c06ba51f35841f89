"""The torch backend's Reducer: how statistics of a gradient list are reduced across processes.

:class:`~gradclip.backends.torch.TorchOps` holds one Reducer, chosen at construction from the
gradients and the ``process_group`` (:func:`choose_reducer`); algorithms never see it.

* :data:`LOCAL` (:class:`LocalReducer`): one process, or DDP (every rank holds the full, averaged
  gradient). Nothing is communicated; ``TorchOps`` runs its kernels directly, so the
  single-process path costs one attribute test per call.
* :class:`DistributedReducer`: DTensors (FSDP2, tensor parallel, HSDP: each tensor reduced over
  its own mesh, replicas counted once) and/or plain tensors sharded over a ``process_group``
  (pipeline stages, ZeRO-style partitions). Every list operation runs the local kernels of the
  Ops' local twin on the shards; results are rebuilt as DTensors.

The reduction itself is one function of a per-tensor assignment (:class:`Layout`): each tensor's
local partial (``Σ|g|^p``, a unit sum, a flag) is weighted (``1 / replicas``) and summed over
the tensor's *shard groups* (its mesh: the per-tensor statistic becomes the full tensor's), and
totals are summed over each tensor's *partition groups* (the process group: ranks hold different
tensors). Per-parameter groups slot in as assignments: a replicated parameter has no groups, a
tied one weight 0 on all but one position, an expert parameter its expert group as partition.
See :mod:`gradclip.torch.distributed` for the semantics users see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from gradclip._core.errors import BackendError
from gradclip.backends.torch_dtensor import (
    _by_mesh,
    _group_device,
    _is_partial,
    _max,
    _mesh_groups,
    _Meta,
    _meta,
    _readable,
    _readables,
    _replicated_size,
    _rewrap,
    _shard_dim,
    _sum_,
    _unit_count,
    _weights,
    any_dtensor,
    is_dtensor,
    local_tensor,
    resolve_process_group,
)
from gradclip.backends.torch_groups import Assign, Assigner, assigned_totals, group_label, slot_reduce

__all__ = ["LOCAL", "DistributedReducer", "Layout", "LocalReducer", "choose_reducer"]


class LocalReducer:
    """One process: statistics are local and complete; nothing to reduce or rewrap."""

    distributed = False

    def local_arrays(self, arrays: Sequence[Any]) -> Sequence[Any]:
        return arrays

    def device(self, fallback: torch.device) -> torch.device:
        return fallback


#: The one LocalReducer (it holds nothing).
LOCAL = LocalReducer()


def choose_reducer(arrays: Sequence[Any], process_group: Any, where: str) -> Any:
    """:data:`LOCAL` unless a process group (or an :class:`Assigner`: a reduction spec, FSDP1's
    layout) is given or a gradient is a DTensor."""
    if process_group is not None or any_dtensor(arrays):
        return DistributedReducer(process_group, where)
    return LOCAL


class Layout(NamedTuple):
    """Per-tensor assignment of a gradient list: each tensor's DTensor metadata (None: plain),
    and, under an :class:`Assigner`, each plain tensor's :class:`Assign` (None otherwise)."""

    metas: list[_Meta | None]
    assigns: list[Assign | None] | None = None
    #: Per tensor, the share of its full ``Σ|g|^p`` held on this rank (tensors split over a
    #: shard group): ``combine_norms`` sums ``norm**p * share`` over the total group, so the
    #: whole tensor is counted once however its pieces lie.
    shares: Any = None

    @property
    def plain(self) -> list[int]:
        return [i for i, m in enumerate(self.metas) if m is None]


class DistributedReducer:
    """Reductions over DTensor meshes and a process group (see the module docstring).

    Args:
        process_group: The group (or ``DeviceMesh``) over which plain tensors are partitioned,
            or None (plain tensors are replicated: nothing to reduce for them).
        where: The public entry point, for error messages.
    """

    distributed = True

    def __init__(self, process_group: Any, where: str):
        self.process_group = process_group
        self.caller = where
        #: Per-parameter groups (a reduction spec, FSDP1's layout), or None.
        self.assigner = process_group if isinstance(process_group, Assigner) else None
        #: The groups plain tensors' totals are all-reduced over, in order.
        self.partition_groups = () if self.assigner else resolve_process_group(process_group, where)

    def local_arrays(self, arrays: Sequence[Any]) -> list[Any]:
        return [local_tensor(a) for a in arrays]

    def device(self, fallback: torch.device) -> torch.device:
        """The device of a rank without gradients: one its process group can reduce on."""
        groups = self.assigner.total_groups if self.assigner else self.partition_groups
        return _group_device(groups, fallback) if groups else fallback

    def _assigns(self, grads: Sequence[Any], metas: Sequence[_Meta | None]) -> list[Assign | None] | None:
        """Each plain gradient's assignment under the assigner (None without one)."""
        if self.assigner is None:
            return None
        plain = [i for i, m in enumerate(metas) if m is None]
        found = self.assigner.assign([grads[i] for i in plain], self.caller)
        out: list[Assign | None] = [None] * len(grads)
        for i, a in zip(plain, found):
            out[i] = a
        return out

    # -- the core reduction ---------------------------------------------------------------------
    def totals(self, ops, partials: torch.Tensor, layout: Layout, op: str = "sum"):
        """Totals of per-tensor partials: ``partials`` is ``(K, n)``, one row per statistic.

        DTensor columns already hold whole tensors' values (reduced over their meshes by the
        caller) and are added; plain columns are added and the sum all-reduced over the
        partition groups. ``op="max"`` takes maxima instead (NaN kept). Returns a ``(K,)``
        fp64 tensor on the Ops' device; 0 where there is nothing.
        """
        wide = torch.float64
        partials = partials.to(ops.device, wide)
        k = partials.shape[0]
        is_max = op == "max"
        plain = layout.plain
        if self.assigner is not None:
            total = assigned_totals(self.assigner, partials, layout.plain, layout.assigns, is_max)
        else:
            if plain:
                part = partials[:, plain]
                local = part.amax(1) if is_max else part.sum(1)  # amax keeps NaN
            else:
                local = torch.zeros((k,), dtype=wide, device=ops.device)
            if self.partition_groups:
                local = _max(local, self.partition_groups) if is_max else _sum_(local.contiguous(), self.partition_groups)
            total = local
        others = [i for i, m in enumerate(layout.metas) if m is not None]
        if others:
            part = partials[:, others]
            total = torch.maximum(total, part.amax(1)) if is_max else total + part.sum(1)
        return total

    # -- norms -----------------------------------------------------------------------------------
    def norms(self, ops, grads, norm_type):
        metas = [_meta(g) for g in grads]
        assigns = self._assigns(grads, metas)
        ops._memo["layout"] = Layout(metas, assigns)
        local = ops._twin
        if self.assigner is not None and self.assigner.shard_groups:
            # Every rank joins every shard group's reduction, with or without tensors in it.
            return self._split_norms(ops, grads, metas, assigns, norm_type)
        if all(m is None for m in metas):
            return local.norms(grads, norm_type)
        out: list[Any] = [None] * len(grads)
        plain = [i for i, m in enumerate(metas) if m is None]
        if plain:
            for i, value in zip(plain, local.norms([grads[i] for i in plain], norm_type).unbind()):
                out[i] = value
        for mesh, indices in _by_mesh(metas):
            locals_, placements = _readables(grads, metas, indices)
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in locals_) else torch.float32
            full = self._full_norms(ops, local.norms(locals_, norm_type), mesh, placements, norm_type, dtype)
            if len(indices) == len(grads):  # one mesh holds them all, in order: no scalar per tensor
                return full
            for i, value in zip(indices, full.unbind()):
                out[i] = value
        return ops.stack(out)

    def _split_norms(self, ops, grads, metas, assigns, norm_type):
        """Norms when plain tensors are split over shard groups: each whole tensor's norm, and
        each one's local share remembered for :meth:`combine_norms`."""
        plain = [i for i, m in enumerate(metas) if m is None]
        others = [i for i, m in enumerate(metas) if m is not None]
        out = torch.zeros((len(grads),), dtype=torch.float64, device=ops.device)
        if others:
            dt = DistributedReducer(None, self.caller).norms(ops, [grads[i] for i in others], norm_type)
            out = out.index_copy(0, torch.as_tensor(others, device=ops.device), dt.to(torch.float64))
        values = ops._twin.norms([grads[i] for i in plain], norm_type).to(ops.device, torch.float64) if plain else out[:0]
        mine = [assigns[i] for i in plain]
        if norm_type == math.inf:
            full = slot_reduce(self.assigner, values, mine, "max")
            share = torch.ones_like(full)
        else:
            powered = values if norm_type == 1 else values**norm_type
            full_p = slot_reduce(self.assigner, powered, mine, "sum")
            share = torch.where(full_p > 0, powered / full_p, torch.zeros_like(full_p))
            full = full_p if norm_type == 1 else full_p ** (1.0 / norm_type)
        shares = torch.ones((len(grads),), dtype=torch.float64, device=ops.device)
        if plain:
            index = torch.as_tensor(plain, device=ops.device)
            out = out.index_copy(0, index, full)
            shares = shares.index_copy(0, index, share)
        ops._memo["layout"] = Layout(metas, assigns, shares)
        return out.to(ops.acc)

    def _full_norms(self, ops, values, mesh, placements_list, norm_type, dtype):
        """Per-tensor local norms of DTensors on one mesh -> the full tensors' norms."""
        groups = _mesh_groups(mesh)
        if not groups:
            return values
        values = values.to(dtype)
        if norm_type == math.inf:
            return _max(values, groups).to(ops.acc)
        sums = values if norm_type == 1 else values**norm_type
        weights = _weights([_replicated_size(mesh, placements) for placements in placements_list], sums)
        if weights is not None:
            sums = sums * weights
        sums = _sum_(sums.contiguous(), groups)
        return (sums if norm_type == 1 else sums ** (1.0 / norm_type)).to(ops.acc)

    def _layout_for(self, ops, n: int) -> Layout:
        layout = ops._memo.get("layout")
        if layout is not None and len(layout.metas) == n:
            return layout
        if self.assigner is not None:
            raise BackendError(
                f"{self.caller}: combine_norms got {n} norm(s) but the last gradients measured were "
                f"{0 if layout is None else len(layout.metas)}; with per-parameter reduction groups "
                "call norms() on the same gradients first"
            )
        if layout is None or all(m is None for m in layout.metas):
            return Layout([None] * n)
        raise BackendError(
            f"{self.caller}: combine_norms got {n} norm(s) but the last gradients measured were "
            f"{len(layout.metas)}; with DTensors and process_group= together the norms must be "
            "aligned with the gradients (call norms() on the same list first)"
        )

    def combine_norms(self, ops, norms, norm_type):
        if not self.partition_groups and self.assigner is None:
            return ops._twin.combine_norms(norms, norm_type)
        layout = self._layout_for(ops, norms.shape[0])
        values = norms.reshape(1, -1).to(torch.float64)
        if norm_type == math.inf:
            return self.totals(ops, values, layout, op="max")[0].to(ops.acc)
        powered = values if norm_type == 1 else values**norm_type
        if layout.shares is not None:
            powered = powered * layout.shares.to(powered.device)
        total = self.totals(ops, powered, layout)[0]
        return (total if norm_type == 1 else total ** (1.0 / norm_type)).to(ops.acc)

    def _refuse_split(self, ops, arrays, operation: str) -> None:
        """Per-unit statistics of flat or hand-split plain tensors are refused (rows are cut at
        arbitrary offsets): raise naming the parameter and its group, before anything changes."""
        if self.assigner is None or not (self.assigner.shard_groups or self.assigner.has_flat):
            return
        # Decided from the layout, the same on every rank (not from this rank's tensors): every
        # rank refuses, so none is left waiting in a collective.
        metas = [_meta(a) for a in arrays]
        found = [a for a in self._assigns(list(arrays), metas) or [] if a is not None and (a.flat or a.shard is not None)]
        for a in found or [None]:
            if a is None:
                raise BackendError(
                    f"{self.caller}: {operation} needs whole units (rows), and the gradients are split "
                    "over shard groups (FSDP1 flat parameters or views); this rank holds none of them"
                )
            kind = "an FSDP1 flat parameter shard" if a.flat else "split over the " + group_label(a.shard)
            raise BackendError(
                f"{self.caller}: {operation} needs whole units (rows) of {a.name!r}, which is {kind}; "
                "use a global-norm or per-tensor clipper here, or FSDP2 (fully_shard: DTensor "
                "gradients keep their shape). Nothing was clipped."
            )

    def unit_norms(self, ops, arrays, axes):
        if self.assigner is not None and self.assigner.forms_units:  # FSDP1 views: rows cut anywhere
            return self.assigner.unit_norms(ops, arrays, axes, self.caller)
        self._refuse_split(ops, arrays, "unit-wise clipping (AGC)")
        out = []
        for array, kept in zip(arrays, axes):
            meta = _meta(array)
            if meta is None:
                out.extend(ops._twin.unit_norms([array], [kept]))
                continue
            local, placements = _readable(array, meta)
            ndim = local.dim()
            reduced = tuple(range(ndim)) if kept is None else tuple(d for d in range(ndim) if d not in kept)
            groups = [
                meta.mesh.get_group(d)
                for d, p in enumerate(placements)
                if meta.mesh.size(d) > 1 and _shard_dim(p) is not None and _shard_dim(p) in reduced
            ]
            if not groups or not reduced:
                out.extend(ops._twin.unit_norms([local], [kept]))
                continue
            acc = torch.float64 if local.dtype == torch.float64 else torch.float32
            norm = torch.linalg.vector_norm(local.detach(), 2, dim=reduced, keepdim=True, dtype=acc)
            squares = _sum_((norm * norm).contiguous(), groups)
            out.append(torch.sqrt(squares))
        return out

    def unit_totals(self, ops, values, arrays, axes):
        """Sums of per-unit vectors: each DTensor's units weighted by ``1 / replicas`` (a unit
        whole on every rank that shards one of its reduced axes counts once) and summed over
        its mesh; plain tensors' over the partition groups."""
        if self.assigner is not None and self.assigner.forms_units:
            return self.assigner.unit_totals(ops, values, arrays, axes, self.caller)
        arrays = list(arrays)
        metas = [_meta(a) for a in arrays]
        counts = [_unit_count(local_tensor(a), kept) for a, kept in zip(arrays, axes)]
        if arrays:
            partials = torch.stack([
                torch.stack([piece.sum() for piece in torch.split(v.to(ops.device, torch.float64), counts)])
                for v in values
            ])
        else:
            partials = torch.zeros((len(values), 0), dtype=torch.float64, device=ops.device)
        for mesh, indices in _by_mesh(metas):
            groups = _mesh_groups(mesh)
            if not groups:
                continue
            sizes = []
            for i in indices:
                kept = axes[i]
                ndim = len(metas[i].shape)
                reduced = set(range(ndim)) if kept is None else {d for d in range(ndim) if d not in kept}
                # Units are whole (and identical) across mesh dims that shard a reduced axis.
                sizes.append(_replicated_size(mesh, metas[i].placements, also=lambda p, r=reduced: _shard_dim(p) in r))
            index = torch.as_tensor(indices, dtype=torch.int64, device=ops.device)
            part = partials.index_select(1, index)
            weights = _weights(sizes, part)
            if weights is not None:
                part = part * weights
            partials = partials.index_copy(1, index, _sum_(part.contiguous(), groups))
        return list(self.totals(ops, partials, Layout(metas, self._assigns(arrays, metas))).to(ops.acc).unbind())

    # -- flags and extrema -------------------------------------------------------------------------
    def finite_each(self, ops, grads):
        metas = [_meta(g) for g in grads]
        local = ops._twin
        if self.assigner is not None and self.assigner.shard_groups:
            assigns = self._assigns(grads, metas)
            return self._split_flags(ops, grads, metas, assigns, local)
        if all(m is None for m in metas):
            return local.finite_each(grads)
        # A shard with NaN/inf makes the whole tensor non-finite: MAX of "bad" over the mesh.
        # Partial gradients are reduced first, as for the norms: finite parts can add up to inf,
        # and the flags must agree with the norm (this runs on the "raise" path only).
        flags = list(local.finite_each([g if m is None else _readable(g, m)[0] for g, m in zip(grads, metas)]).unbind())
        for mesh, indices in _by_mesh(metas):
            bad = _max((~torch.stack([flags[i] for i in indices])).to(torch.float32), _mesh_groups(mesh))
            for i, value in zip(indices, (bad == 0).unbind()):
                flags[i] = value
        return torch.stack(flags)

    def _split_flags(self, ops, grads, metas, assigns, local):
        """``finite_each`` when plain tensors are split over shard groups: MAX of "bad"."""
        plain = [i for i, m in enumerate(metas) if m is None]
        flags = DistributedReducer(None, self.caller).finite_each(ops, grads) if len(plain) < len(grads) else None
        bad = (~local.finite_each([grads[i] for i in plain])).to(ops.device, torch.float64) if plain else torch.zeros((0,), dtype=torch.float64, device=ops.device)
        bad = slot_reduce(self.assigner, bad, [assigns[i] for i in plain], "max")
        out = torch.ones((len(grads),), dtype=torch.bool, device=ops.device) if flags is None else flags
        if plain:
            out = out.index_copy(0, torch.as_tensor(plain, device=ops.device), bad == 0)
        return out

    def extrema(self, ops, grads):
        metas = [_meta(g) for g in grads]
        local = ops._twin
        if all(m is None for m in metas):
            return local.extrema(grads)
        reads = {i: _readable(g, m)[0] for i, (g, m) in enumerate(zip(grads, metas)) if m is not None}
        highs, lows = local.extrema([reads.get(i, g) for i, g in enumerate(grads)])
        highs, lows = list(highs.unbind()), list(lows.unbind())
        for mesh, indices in _by_mesh(metas):
            n = len(indices)
            packed = torch.cat([torch.stack([highs[i] for i in indices]), -torch.stack([lows[i] for i in indices])])
            packed = _max(packed, _mesh_groups(mesh))
            for position, i in enumerate(indices):
                highs[i], lows[i] = packed[position], -packed[n + position]
        return torch.stack(highs), torch.stack(lows)

    def numel(self, ops, grad) -> int:
        """The whole tensor's element count: a DTensor's global one; under an assigner, that of
        the tensor a piece belongs to (FSDP1 views), read from the last measured layout."""
        if self.assigner is None:
            return grad.numel()
        found = ops._memo.get("numels")
        if found is None:
            # Once per Ops: every gradient it was built for, so n calls cost one pass.
            arrays = list(ops._arrays)
            found = ops._memo["numels"] = {
                id(g): (a.numel if a.numel >= 0 else g.numel())
                for g, a in zip(arrays, self.assigner.assign(arrays, self.caller))
            }
        if id(grad) not in found:
            (a,) = self.assigner.assign([grad], self.caller)
            found[id(grad)] = a.numel if a.numel >= 0 else grad.numel()
        return found[id(grad)]

    def version_token(self, ops, grads):
        del ops
        try:
            return tuple((t._version, local_tensor(t)._version) if is_dtensor(t) else t._version for t in grads)
        except RuntimeError:
            return None

    # -- writes ------------------------------------------------------------------------------------
    def map(self, ops, grads, run, *, linear: bool, operation: str):
        """``run(list of local tensors) -> list``, DTensors put back around the results.

        Args:
            linear: Whether the operation is linear (a scale), hence defined on ``Partial``
                placements; element-wise rewrites of partial sums are refused.
        """
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return run(list(grads))
        if not linear:
            for index, meta in enumerate(metas):
                if meta is not None and any(_is_partial(p) for p in meta.placements):
                    raise BackendError(
                        f"{self.caller}: gradient #{index} is a DTensor with a Partial placement "
                        f"{list(meta.placements)}; {operation} rewrites elements, which is not defined "
                        "on partial sums. Reduce it first (redistribute to Replicate or Shard)."
                    )
        outs = run([g if m is None else local_tensor(g) for g, m in zip(grads, metas)])
        return [
            out if meta is None else (grad if ops.inplace else _rewrap(out, meta))
            for grad, meta, out in zip(grads, metas, outs)
        ]

    def select(self, ops, grads, replacements, masks):
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return ops._twin.select(grads, replacements, masks)

        def run(locals_):
            reps = [self._local_like(r, m, t.shape) for r, m, t in zip(replacements, metas, locals_)]
            keep = [self._local_like(k, m, t.shape) for k, m, t in zip(masks, metas, locals_)]
            return ops._twin.select(locals_, reps, keep)

        return self.map(ops, grads, run, linear=False, operation="select")

    def _local_like(self, x: Any, meta: _Meta | None, local_shape: torch.Size):
        """An operand (mask, replacement) of a gradient, as the gradient's local part."""
        if meta is None or not isinstance(x, torch.Tensor):
            return x
        if is_dtensor(x):
            return local_tensor(x)
        if x.dim() == 0 or tuple(x.shape) == tuple(local_shape):
            return x
        if tuple(x.shape) == tuple(meta.shape):
            # The operand of the whole tensor, identical on every rank (e.g. Subset's random
            # mask, a pure function of the step): keep this rank's part, no communication.
            from torch.distributed.tensor import distribute_tensor

            return distribute_tensor(x, meta.mesh, list(meta.placements), src_data_rank=None).to_local()
        raise BackendError(
            f"{self.caller}: an operand of shape {tuple(x.shape)} matches neither the DTensor "
            f"gradient's shape {tuple(meta.shape)} nor its local shard {tuple(local_shape)}"
        )

    # -- the info of a whole call -------------------------------------------------------------------
    def finish_info(self, ops, info):
        """Make ``info.clipped`` agree on every rank of the process group (MAX all-reduce):
        per-tensor and element-wise methods decide it from each rank's own plain tensors.
        Nothing is communicated without a process group (DTensor statistics are reduced)."""
        groups = self.assigner.total_groups if self.assigner is not None else self.partition_groups
        if not groups:
            return info
        flag = info.clipped.to(ops.device, torch.float32).reshape(1)
        flag = _max(flag, groups)
        return info._replace(clipped=flag[0] > 0)
