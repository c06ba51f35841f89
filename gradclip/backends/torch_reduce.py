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
import torch.distributed as dist

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
    """:data:`LOCAL` unless a process group is given or a gradient is a DTensor."""
    if process_group is not None or any_dtensor(arrays):
        return DistributedReducer(process_group, where)
    return LOCAL


class Layout(NamedTuple):
    """Per-tensor assignment of a gradient list: each tensor's DTensor metadata (None: plain)."""

    metas: list[_Meta | None]

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
        #: The groups plain tensors' totals are all-reduced over, in order.
        self.partition_groups = resolve_process_group(process_group, where)

    def local_arrays(self, arrays: Sequence[Any]) -> list[Any]:
        return [local_tensor(a) for a in arrays]

    def device(self, fallback: torch.device) -> torch.device:
        """The device of a rank without gradients: one its process group can reduce on."""
        return _group_device(self.partition_groups, fallback) if self.partition_groups else fallback

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
        ops._memo["layout"] = Layout(metas)
        local = ops._twin
        if all(m is None for m in metas):
            return local.norms(grads, norm_type)
        out: list[Any] = [None] * len(grads)
        plain = [i for i, m in enumerate(metas) if m is None]
        if plain:
            for i, value in zip(plain, local.norms([grads[i] for i in plain], norm_type).unbind()):
                out[i] = value
        for mesh, indices in _by_mesh(metas):
            read = [_readable(grads[i], metas[i]) for i in indices]
            locals_ = [r[0] for r in read]
            dtype = torch.float64 if any(t.dtype == torch.float64 for t in locals_) else torch.float32
            full = self._full_norms(ops, local.norms(locals_, norm_type), mesh, [r[1] for r in read], norm_type, dtype)
            for i, value in zip(indices, full.unbind()):
                out[i] = value
        return ops.stack(out)

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
        if layout is None or all(m is None for m in layout.metas):
            return Layout([None] * n)
        raise BackendError(
            f"{self.caller}: combine_norms got {n} norm(s) but the last gradients measured were "
            f"{len(layout.metas)}; with DTensors and process_group= together the norms must be "
            "aligned with the gradients (call norms() on the same list first)"
        )

    def combine_norms(self, ops, norms, norm_type):
        if not self.partition_groups:
            return ops._twin.combine_norms(norms, norm_type)
        layout = self._layout_for(ops, norms.shape[0])
        values = norms.reshape(1, -1).to(torch.float64)
        if norm_type == math.inf:
            return self.totals(ops, values, layout, op="max")[0].to(ops.acc)
        powered = values if norm_type == 1 else values**norm_type
        total = self.totals(ops, powered, layout)[0]
        return (total if norm_type == 1 else total ** (1.0 / norm_type)).to(ops.acc)

    def unit_norms(self, ops, arrays, axes):
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
        return list(self.totals(ops, partials, Layout(metas)).to(ops.acc).unbind())

    # -- flags and extrema -------------------------------------------------------------------------
    def finite_each(self, ops, grads):
        metas = [_meta(g) for g in grads]
        local = ops._twin
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
        if not self.partition_groups:
            return info
        flag = info.clipped.to(ops.device, torch.float32).reshape(1).contiguous()
        for group in self.partition_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return info._replace(clipped=flag[0] > 0)
