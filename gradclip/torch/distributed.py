"""Clipping under ``torch.distributed``: DDP, FSDP2 / tensor parallel (DTensor), hand-made shards.

Every reduction goes through ``torch.distributed.all_reduce`` on device tensors (no host sync, no
communication layer of gradclip's own). The torch backend switches to :class:`DistributedTorchOps`
by itself when a gradient is a ``DTensor`` or a clipper carries ``process_group=``; nothing
changes, and nothing is communicated, for plain tensors without a process group.

How each layout is reduced (``s`` is a tensor's local sum of ``|g|**p`` in fp32/fp64):

* **Plain tensors, no process group** (single process, DDP): counted as *replicated*. DDP has
  already averaged the gradients, so every rank holds the full gradient and the norm is local:
  no collective at all (reducing again would over-count by ``sqrt(world)``).
* **DTensor** (FSDP2 ``fully_shard``, tensor parallel, HSDP, mixed meshes): each tensor's local
  shard gives ``s``; on the tensor's own mesh, ``s`` is divided by the size of every mesh
  dimension on which the tensor is ``Replicate`` and then all-reduced (SUM) over every mesh
  dimension, so shards add up and replicas count once; ``p = inf`` all-reduces with MAX (NaN
  kept). ``Partial`` gradients are first reduced to ``Replicate`` (``redistribute``) for reading;
  scaling a ``Partial`` gradient is fine (linear), element-wise rewriting one raises. Per-tensor
  norms (``Norm``, ``AdaGC``, monitor layer norms) are the full tensors' norms. All DTensors on
  one mesh share one all-reduce per mesh dimension.
* **Plain tensors with ``process_group=``**: the ranks of the group hold *different* parts of
  the gradient (pipeline stages, ZeRO-style partitions, hand-made shards). The sum of ``s`` over
  the local tensors is all-reduced over the group (SUM; MAX for ``inf``) when the global norm is
  formed, so ranks may hold different numbers of tensors, or none. Per-tensor statistics
  (``Norm``, ``AverageNorm``, ``BlockRMS``, ``AGC``, ``AdaGC``) are those of the local tensors:
  exact when each rank holds whole tensors; a tensor split by hand across ranks should be a
  DTensor instead.
* **Mixed lists**: DTensors are reduced on their meshes, plain tensors as above; the global norm
  adds the two parts.

The global norm returned (``info.norm``, ``clip_grad_norm_``) is a plain tensor, fully reduced and
identical on every rank, so the coefficients and every adaptive clipper's statistics and
decisions (AutoClip, ZClip, QuantileNorm, SkipOnSpike, NonFinite, AdaGC's per-tensor EMAs over
DTensors) are identical on every rank too.

Collectives happen in an order fixed by the clipper's code and the layout of the gradients, never
by their values. A rank with no gradients joins the process-group reduction with zeros. Every
rank must pass the same DTensor gradients in the same order (FSDP2 and tensor parallelism
guarantee this: their own gradient reductions are collectives); plain tensors may differ freely
between ranks.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradclip._core.errors import BackendError, InvalidArgumentError
from gradclip.backends.torch import TorchOps

__all__ = [
    "DistributedTorchOps",
    "is_dtensor",
    "local_tensor",
    "resolve_process_group",
]


# -- DTensor helpers -------------------------------------------------------------------------------
def _dtensor_type() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor is imported: never import it here.
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (never imports DTensor)."""
    if type(x) is torch.Tensor:
        return False
    cls = _dtensor_type()
    return cls is not None and isinstance(x, cls)


def any_dtensor(arrays: Sequence[Any]) -> bool:
    """Whether any of ``arrays`` is a DTensor (cheap: one type check per array)."""
    cls = _dtensor_type()
    if cls is None:
        return False
    return any(type(a) is not torch.Tensor and isinstance(a, cls) for a in arrays)


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the storage itself, so in-place writes reach the DTensor);
    a plain tensor is returned as it is."""
    if not is_dtensor(x):
        return x
    with torch.no_grad():
        local = x.to_local()
    wait = getattr(local, "wait", None)
    if type(local).__name__ == "AsyncCollectiveTensor" and callable(wait):
        local = wait()
    return local


def _is_replicate(placement: Any) -> bool:
    return placement.is_replicate()


def _is_partial(placement: Any) -> bool:
    return placement.is_partial()


def _shard_dim(placement: Any) -> int | None:
    """The tensor dimension a sharding placement splits (``Shard``, ``_StridedShard``), else None."""
    if placement.is_replicate() or placement.is_partial():
        return None
    dim = getattr(placement, "dim", None)
    if dim is None:
        raise BackendError(
            f"gradclip: unsupported DTensor placement {placement!r}; supported are Shard, "
            "Replicate and Partial (and torch's _StridedShard)"
        )
    return dim


class _Meta(NamedTuple):
    """What is needed to reduce over a DTensor's shards and to rebuild it from a local tensor."""

    mesh: Any
    placements: tuple
    shape: torch.Size
    stride: tuple


def _meta(x: Any) -> _Meta | None:
    if not is_dtensor(x):
        return None
    return _Meta(x.device_mesh, tuple(x.placements), x.shape, x.stride())


def _readable(x: Any, meta: _Meta) -> tuple[torch.Tensor, tuple]:
    """The local tensor to read norms/extrema from, with ``Partial`` placements reduced first."""
    placements = meta.placements
    if any(_is_partial(p) for p in placements):
        from torch.distributed.tensor import Replicate

        with torch.no_grad():
            x = x.redistribute(meta.mesh, [Replicate() if _is_partial(p) else p for p in placements])
        placements = tuple(x.placements)
    return local_tensor(x), placements


def _rewrap(local: torch.Tensor, meta: _Meta):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, meta.mesh, list(meta.placements), run_check=False, shape=meta.shape, stride=meta.stride
    )


def _mesh_groups(mesh: Any) -> list[Any]:
    """The process group of every mesh dimension of size > 1, in dimension order."""
    return [mesh.get_group(d) for d in range(mesh.ndim) if mesh.size(d) > 1]


def _replicated_size(mesh: Any, placements: Sequence[Any], also: Any = None) -> int:
    """Product of the sizes of the mesh dimensions on which the tensor is replicated (Replicate,
    or Partial already reduced to Replicate), and of those for which ``also(placement)`` holds."""
    size = 1
    for d, placement in enumerate(placements):
        if _is_replicate(placement) or _is_partial(placement) or (also is not None and also(placement)):
            size *= mesh.size(d)
    return size


#: Device vectors of ``1 / replicated size`` per layout, built once: creating one from a Python
#: list is a host-to-device copy, which would synchronise a CUDA stream on every step.
_WEIGHTS: dict[tuple, torch.Tensor] = {}


def _weights(sizes: Sequence[int], like: torch.Tensor) -> torch.Tensor | None:
    """``1 / size`` per entry on ``like``'s device and dtype (None when every size is 1)."""
    if all(size == 1 for size in sizes):
        return None
    key = (like.device, like.dtype, tuple(sizes))
    weights = _WEIGHTS.get(key)
    if weights is None:
        if len(_WEIGHTS) >= 64:
            _WEIGHTS.clear()
        weights = torch.tensor([1.0 / size for size in sizes], dtype=like.dtype).to(like.device)
        _WEIGHTS[key] = weights
    return weights


def _by_mesh(metas: Sequence[_Meta | None]) -> list[tuple[Any, list[int]]]:
    """Indices of the DTensors grouped by mesh, meshes in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for index, meta in enumerate(metas):
        if meta is not None:
            groups.setdefault(meta.mesh, []).append(index)
    return list(groups.items())


def _unit_count(local: torch.Tensor, kept) -> int:
    """How many units ``unit_norms`` finds in a (local) tensor."""
    if kept is None:
        return 1
    count = 1
    for d in kept:
        count *= local.shape[d]
    return count if kept else local.numel()


# -- collectives -------------------------------------------------------------------------------
def _sum_(tensor: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    for group in groups:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _max(values: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """All-reduce MAX that keeps NaN (backends' max may drop it): NaN flags travel beside."""
    if not groups:
        return values
    flat = values.reshape(-1)
    nan = torch.isnan(flat)
    packed = torch.cat([torch.where(nan, torch.full_like(flat, -math.inf), flat), nan.to(flat.dtype)])
    for group in groups:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    n = flat.numel()
    out = torch.where(packed[n:] > 0, torch.full_like(flat, math.nan), packed[:n])
    return out.reshape(values.shape)


def resolve_process_group(group: Any, where: str = "gradclip") -> tuple:
    """The process groups to all-reduce plain-tensor norms over, in order.

    Args:
        group: ``None`` (nothing to reduce), a ``ProcessGroup`` (e.g. ``dist.group.WORLD`` or
            one from ``dist.new_group``), or a ``DeviceMesh`` (every dimension of it).

    Raises:
        InvalidArgumentError: torch.distributed is not initialised, or ``group`` is neither.
    """
    if group is None:
        return ()
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidArgumentError(
            f"{where}: process_group={group!r} was given but torch.distributed is not initialised; "
            "call torch.distributed.init_process_group first (or pass process_group=None)"
        )
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        return tuple(_mesh_groups(group))
    if isinstance(group, dist.ProcessGroup):
        return (group,)
    raise InvalidArgumentError(
        f"{where}: process_group must be None, a torch.distributed.ProcessGroup or a DeviceMesh, "
        f"got {type(group).__qualname__}"
    )


def _group_device(groups: Sequence[Any], fallback: torch.device) -> torch.device:
    """A device the group can reduce on, for a rank that has no gradient to take it from."""
    try:
        capability = list(dist.distributed_c10d._device_capability(groups[0]))
    except Exception:  # noqa: BLE001 - private helper; CPU works with gloo, the common case
        return fallback
    # Prefer the accelerator: with "cpu:gloo,cuda:nccl" the ranks holding CUDA gradients reduce
    # through NCCL, and this rank must use the same backend.
    for kind in capability:
        if kind == "cpu":
            continue
        module = getattr(torch, kind, None)
        try:
            if module is not None and module.is_available():
                return torch.device(kind, module.current_device())
        except Exception:  # noqa: BLE001 - an accelerator module without these functions
            continue
    return torch.device("cpu")


# -- the Ops -------------------------------------------------------------------------------------
class DistributedTorchOps(TorchOps):
    """:class:`~gradclip.backends.torch.TorchOps` over DTensors and process-group shards.

    Built by ``TorchOps(...)`` itself (and so by ``get_ops``) when a gradient is a DTensor or a
    ``process_group`` is given. Every list operation runs the torch kernels on the local shards;
    out-of-place results are rebuilt as DTensors with the input's mesh and placements, in-place
    results are the input DTensors. Reductions are described in the module documentation.

    Args:
        arrays, inplace, foreach, where: As for ``TorchOps``.
        process_group: The group over which plain tensors are sharded (see
            :func:`resolve_process_group`), or None (plain tensors are replicated).
    """

    distributed = True

    def __init__(
        self,
        arrays: Sequence[Any] = (),
        *,
        inplace: bool = False,
        foreach: bool | None = None,
        where: str = "gradclip",
        process_group: Any = None,
        torch_kernels: bool = False,
    ):
        arrays = list(arrays)
        super().__init__(
            [local_tensor(a) for a in arrays], inplace=inplace, foreach=foreach, where=where,
            torch_kernels=torch_kernels,
        )
        #: The process group given (None: plain tensors are replicated).
        self.process_group = process_group
        self._reduce_groups = resolve_process_group(process_group, where)
        # Which positions hold plain tensors, for combine_norms (set again by every norms call).
        self._plain = [not is_dtensor(a) for a in arrays]
        self._seen_dtensor = not all(self._plain)
        if not arrays and self._reduce_groups:
            self.device = _group_device(self._reduce_groups, self.device)

    # -- helpers ---------------------------------------------------------------------------------
    def _map(self, grads, run, *, linear: bool, operation: str):
        """``run(list of local tensors) -> list``, DTensors put back around the results."""
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return run(list(grads))
        self._seen_dtensor = True
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
            out if meta is None else (grad if self.inplace else _rewrap(out, meta))
            for grad, meta, out in zip(grads, metas, outs)
        ]

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

    def _acc_of(self, tensors) -> torch.dtype:
        return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    def _reduce_on_mesh(self, values: torch.Tensor, mesh: Any, placements_list, norm_type: float, dtype):
        """Per-tensor local norms of DTensors on one mesh -> the full tensors' norms."""
        groups = _mesh_groups(mesh)
        if not groups:
            return values
        values = values.to(dtype)
        if norm_type == math.inf:
            return _max(values, groups).to(self.acc)
        sums = values if norm_type == 1 else values**norm_type
        weights = _weights([_replicated_size(mesh, placements) for placements in placements_list], sums)
        if weights is not None:
            sums = sums * weights
        sums = _sum_(sums.contiguous(), groups)
        return (sums if norm_type == 1 else sums ** (1.0 / norm_type)).to(self.acc)

    def _per_mesh(self, grads, metas, compute):
        """Run ``compute(mesh, indices, locals, placements) -> list of results`` per mesh."""
        results: dict[int, Any] = {}
        for mesh, indices in _by_mesh(metas):
            read = [_readable(grads[i], metas[i]) for i in indices]
            outs = compute(mesh, indices, [r[0] for r in read], [r[1] for r in read])
            results.update(zip(indices, outs))
        return results

    # -- norms -------------------------------------------------------------------------------------
    def norms(self, grads, norm_type):
        metas = [_meta(g) for g in grads]
        self._plain = [m is None for m in metas]
        if all(self._plain):
            return super().norms(grads, norm_type)
        self._seen_dtensor = True
        out: list[Any] = [None] * len(grads)
        plain = [i for i, m in enumerate(metas) if m is None]
        if plain:
            for i, value in zip(plain, super().norms([grads[i] for i in plain], norm_type).unbind()):
                out[i] = value

        def compute(mesh, indices, locals_, placements):
            local_norms = super(DistributedTorchOps, self).norms(locals_, norm_type)
            full = self._reduce_on_mesh(local_norms, mesh, placements, norm_type, self._acc_of(locals_))
            return full.unbind()

        for i, value in self._per_mesh(grads, metas, compute).items():
            out[i] = value
        return self.stack(out)

    def _plain_positions(self, n: int) -> list[bool]:
        if len(self._plain) == n:
            return self._plain
        if not self._seen_dtensor:
            return [True] * n
        raise BackendError(
            f"{self.caller}: combine_norms got {n} norm(s) but the last gradients measured were "
            f"{len(self._plain)}; with DTensors and process_group= together the norms must be "
            "aligned with the gradients (call norms() on the same list first)"
        )

    def combine_norms(self, norms, norm_type):
        if not self._reduce_groups:
            return super().combine_norms(norms, norm_type)
        plain = self._plain_positions(norms.shape[0])
        parts = norms.unbind() if norms.numel() else ()
        mine = [v for v, is_plain in zip(parts, plain) if is_plain]
        others = [v for v, is_plain in zip(parts, plain) if not is_plain]
        wide = torch.float64
        zero = torch.zeros((), dtype=wide, device=self.device)
        if norm_type == math.inf:
            local = torch.stack(mine).to(wide).max() if mine else zero
            total = _max(local.reshape(1), self._reduce_groups)[0]
            if others:
                total = torch.maximum(total, torch.stack(others).to(wide).max())
            return total.to(self.acc)
        power = (lambda v: v) if norm_type == 1 else (lambda v: v**norm_type)
        local = power(torch.stack(mine).to(wide)).sum() if mine else zero
        total = _sum_(local.reshape(1).contiguous(), self._reduce_groups)[0]
        if others:
            total = total + power(torch.stack(others).to(wide)).sum()
        return (total if norm_type == 1 else total ** (1.0 / norm_type)).to(self.acc)

    def unit_norms(self, arrays, axes):
        out = []
        for array, kept in zip(arrays, axes):
            meta = _meta(array)
            if meta is None:
                out.extend(super().unit_norms([array], [kept]))
                continue
            self._seen_dtensor = True
            local, placements = _readable(array, meta)
            ndim = local.dim()
            reduced = tuple(range(ndim)) if kept is None else tuple(d for d in range(ndim) if d not in kept)
            groups = [
                meta.mesh.get_group(d)
                for d, p in enumerate(placements)
                if meta.mesh.size(d) > 1 and _shard_dim(p) is not None and _shard_dim(p) in reduced
            ]
            if not groups or not reduced:
                out.extend(super().unit_norms([local], [kept]))
                continue
            acc = torch.float64 if local.dtype == torch.float64 else torch.float32
            norm = torch.linalg.vector_norm(local.detach(), 2, dim=reduced, keepdim=True, dtype=acc)
            squares = _sum_((norm * norm).contiguous(), groups)
            out.append(torch.sqrt(squares))
        return out

    def unit_totals(self, values, arrays, axes):
        """:meth:`Ops.unit_totals` over shards: each DTensor's units summed over its mesh (each
        unit counted once), plain tensors' over the process group."""
        arrays = list(arrays)
        counts = [_unit_count(local_tensor(a), kept) for a, kept in zip(arrays, axes)]
        if not arrays:
            per_tensor = torch.zeros((len(values), 0), dtype=self.acc, device=self.device)
        else:
            per_tensor = torch.stack([
                torch.stack([piece.sum() for piece in torch.split(v.to(self.device, self.acc), counts)])
                for v in values
            ])
        metas = [_meta(a) for a in arrays]
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
            index = torch.as_tensor(indices, device=self.device)
            part = per_tensor.index_select(1, index)
            weights = _weights(sizes, part)
            if weights is not None:
                part = part * weights
            per_tensor = per_tensor.index_copy(1, index, _sum_(part.contiguous(), groups))
        plain = [i for i, m in enumerate(metas) if m is None]
        totals = per_tensor.index_select(1, torch.as_tensor([i for i, m in enumerate(metas) if m is not None], dtype=torch.int64, device=self.device)).sum(1)
        local = per_tensor.index_select(1, torch.as_tensor(plain, dtype=torch.int64, device=self.device)).sum(1)
        if self._reduce_groups:
            local = _sum_(local.to(torch.float64).contiguous(), self._reduce_groups)
        return list((totals.to(torch.float64) + local.to(torch.float64)).to(self.acc).unbind())

    # -- flags and extrema -------------------------------------------------------------------------
    def finite_each(self, grads):
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return super().finite_each(grads)
        # A shard with NaN/inf makes the whole tensor non-finite: MAX of "bad" over the mesh.
        # Partial gradients are reduced first, as for the norms: finite parts can add up to inf,
        # and the flags must agree with the norm (this runs on the "raise" path only).
        flags = list(
            super().finite_each([g if m is None else _readable(g, m)[0] for g, m in zip(grads, metas)]).unbind()
        )
        for mesh, indices in _by_mesh(metas):
            bad = _max((~torch.stack([flags[i] for i in indices])).to(torch.float32), _mesh_groups(mesh))
            for i, value in zip(indices, (bad == 0).unbind()):
                flags[i] = value
        return torch.stack(flags)

    def extrema(self, grads):
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return super().extrema(grads)
        reads = {i: _readable(g, m)[0] for i, (g, m) in enumerate(zip(grads, metas)) if m is not None}
        highs, lows = super().extrema([reads.get(i, g) for i, g in enumerate(grads)])
        highs, lows = list(highs.unbind()), list(lows.unbind())
        for mesh, indices in _by_mesh(metas):
            n = len(indices)
            packed = torch.cat([torch.stack([highs[i] for i in indices]), -torch.stack([lows[i] for i in indices])])
            packed = _max(packed, _mesh_groups(mesh))
            for position, i in enumerate(indices):
                highs[i], lows[i] = packed[position], -packed[n + position]
        return torch.stack(highs), torch.stack(lows)

    def version_token(self, grads):
        try:
            return tuple(
                (t._version, local_tensor(t)._version) if is_dtensor(t) else t._version for t in grads
            )
        except RuntimeError:
            return None

    # -- writes --------------------------------------------------------------------------------------
    def scale(self, grads, coef):
        return self._map(grads, lambda ls: TorchOps.scale(self, ls, coef), linear=True, operation="scale")

    def scale_each(self, grads, coefs):
        return self._map(grads, lambda ls: TorchOps.scale_each(self, ls, coefs), linear=True, operation="scale_each")

    def scale_units(self, grads, coefs):
        return self._map(grads, lambda ls: TorchOps.scale_units(self, ls, coefs), linear=True, operation="scale_units")

    def clamp(self, grads, low, high):
        return self._map(grads, lambda ls: TorchOps.clamp(self, ls, low, high), linear=False, operation="clamping")

    def zero_above(self, grads, threshold):
        return self._map(
            grads, lambda ls: TorchOps.zero_above(self, ls, threshold), linear=False, operation="zeroing outliers"
        )

    def sign_where(self, grads, magnitude, cond):
        return self._map(
            grads, lambda ls: TorchOps.sign_where(self, ls, magnitude, cond), linear=False, operation="sign_where"
        )

    def zero_nonfinite(self, grads):
        return self._map(
            grads, lambda ls: TorchOps.zero_nonfinite(self, ls), linear=False, operation="zeroing non-finite values"
        )

    def select(self, grads, replacements, masks):
        metas = [_meta(g) for g in grads]
        if all(m is None for m in metas):
            return super().select(grads, replacements, masks)

        def run(locals_):
            reps = [self._local_like(r, m, t.shape) for r, m, t in zip(replacements, metas, locals_)]
            keep = [self._local_like(k, m, t.shape) for k, m, t in zip(masks, metas, locals_)]
            return TorchOps.select(self, locals_, reps, keep)

        return self._map(grads, run, linear=False, operation="select")

    # -- the info of a whole call ----------------------------------------------------------------------
    def finish_info(self, info):
        """Make ``info.clipped`` agree on every rank of the process group.

        Per-tensor and element-wise methods (``Norm``, ``AGC``, ``AdaGC``, ``Value``...) decide
        ``clipped`` from each rank's own plain tensors; one MAX all-reduce makes it "clipped
        anywhere". Called once per clipper call by ``Clipper.clip_``/``clip``/``update`` (an
        optional hook), on every rank. Nothing is communicated without a process group: DTensor
        statistics are already reduced.
        """
        if not self._reduce_groups:
            return info
        flag = info.clipped.to(self.device, torch.float32).reshape(1).contiguous()
        for group in self._reduce_groups:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return info._replace(clipped=flag[0] > 0)
