"""DTensor layouts and ``torch.distributed`` collectives for the torch backend's Reducer.

Helpers only: which gradients are DTensors, their local shards and metadata, the process groups
of a mesh, and all-reduces that keep NaN. A DTensor can only exist once
``torch.distributed.tensor`` is imported, so nothing here imports it to answer "is this a
DTensor?". Collectives run on device tensors, never on host values.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradclip._core.errors import BackendError, InvalidArgumentError

__all__ = [
    "any_dtensor",
    "is_dtensor",
    "local_tensor",
    "resolve_process_group",
]


# -- DTensor helpers -------------------------------------------------------------------------------
#: The DTensor class once ``torch.distributed.tensor`` is imported (a class does not change):
#: remembered, so the checks made per tensor and per call cost one ``isinstance``.
_DTENSOR: list[type] = []


def _dtensor_type() -> type | None:
    # A DTensor can only exist once torch.distributed.tensor is imported: never import it here.
    if _DTENSOR:
        return _DTENSOR[0]
    module = sys.modules.get("torch.distributed.tensor")
    cls = None if module is None else getattr(module, "DTensor", None)
    if cls is not None:
        _DTENSOR.append(cls)
    return cls


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor`` (never imports DTensor)."""
    if type(x) is torch.Tensor:
        return False
    cls = _DTENSOR[0] if _DTENSOR else _dtensor_type()
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
    if type(x) is torch.Tensor or not is_dtensor(x):
        return x
    # What ``to_local()`` returns under ``no_grad``, read directly: the autograd function and
    # the grad-mode context cost microseconds per tensor, which tens of thousands of tensors
    # (MoE, LoRA) pay on every step. ``to_local`` stays the fallback for a DTensor without it.
    local = getattr(x, "_local_tensor", None)
    if local is None:
        with torch.no_grad():
            local = x.to_local()
    if type(local) is not torch.Tensor and type(local).__name__ == "AsyncCollectiveTensor":
        wait = getattr(local, "wait", None)
        if callable(wait):
            local = wait()
    return local


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
    """A DTensor's metadata (None for a plain tensor).

    The DTensor's own ``DTensorSpec`` when it has one: it carries the same four attributes
    (``mesh``, ``placements`` as a tuple, ``shape``, ``stride``) and is shared, not built, so a
    step over tens of thousands of DTensors allocates nothing per tensor here (new objects
    that live through a call make the garbage collector walk every tensor again and again).
    """
    if type(x) is torch.Tensor or not is_dtensor(x):
        return None
    spec = getattr(x, "_spec", None)
    if spec is not None and getattr(spec, "tensor_meta", None) is not None:
        return spec
    return _Meta(x.device_mesh, tuple(x.placements), x.shape, x.stride())


def _has_partial(placements: Sequence[Any]) -> bool:
    """Whether any placement is ``Partial`` (a loop: no generator per tensor)."""
    for placement in placements:
        if placement.is_partial():
            return True
    return False


def _readable(x: Any, meta: _Meta) -> tuple[torch.Tensor, tuple]:
    """The local tensor to read norms/extrema from, with ``Partial`` placements reduced first."""
    placements = meta.placements
    if _has_partial(placements):
        from torch.distributed.tensor import Replicate

        with torch.no_grad():
            x = x.redistribute(meta.mesh, [Replicate() if _is_partial(p) else p for p in placements])
        placements = tuple(x.placements)
    return local_tensor(x), placements


def _readables(grads: Sequence[Any], metas: Sequence[_Meta], indices: Sequence[int]) -> tuple[list, list]:
    """:func:`_readable` of ``grads[i]`` for each of ``indices``, as two lists (local tensors,
    placements). No pair per tensor stays alive: tens of thousands of live objects made during
    a call get the garbage collector to walk every tensor again and again (cost growing faster
    than the tensor count)."""
    locals_, placements = [], []
    for i in indices:
        meta = metas[i]
        if _has_partial(meta.placements):
            local, placed = _readable(grads[i], meta)
        else:
            local, placed = local_tensor(grads[i]), meta.placements
        locals_.append(local)
        placements.append(placed)
    return locals_, placements


def _rewrap(local: torch.Tensor, meta: _Meta):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local, meta.mesh, list(meta.placements), run_check=False, shape=meta.shape, stride=meta.stride
    )


def _mesh_groups(mesh: Any) -> list[Any]:
    """The process group of every mesh dimension of size > 1, in dimension order."""
    return [mesh.get_group(d) for d in range(mesh.ndim) if mesh.size(d) > 1]


#: ``_replicated_size`` per (mesh, placements): one lookup per tensor, whatever the mesh's rank.
_SIZES: dict[tuple, int] = {}


def _replicated_size(mesh: Any, placements: Sequence[Any], also: Any = None) -> int:
    """Product of the sizes of the mesh dimensions on which the tensor is replicated (Replicate,
    or Partial already reduced to Replicate), and of those for which ``also(placement)`` holds."""
    if also is not None:
        return _product(mesh, placements, also)
    key = (mesh, placements)
    size = _SIZES.get(key)
    if size is None:
        if len(_SIZES) >= 256:
            _SIZES.clear()
        size = _SIZES[key] = _product(mesh, placements, None)
    return size


def _product(mesh: Any, placements: Sequence[Any], also: Any) -> int:
    size = 1
    for d, placement in enumerate(placements):
        if placement.is_replicate() or placement.is_partial() or (also is not None and also(placement)):
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
def _on_group_device(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """``tensor`` on a device ``group`` can reduce on. CPU-offloaded gradients (FSDP2's
    ``CPUOffloadPolicy``, ZeRO offload) give CPU partial sums, which NCCL cannot reduce ("No
    backend type associated with device type cpu"): they travel to the group's accelerator for
    the collective and back after it. Device tensors and CPU-only groups (gloo) stay put."""
    if tensor.device.type != "cpu":
        return tensor
    device = _group_device([group], tensor.device)
    return tensor if device.type == "cpu" else tensor.to(device)


def _sum_(tensor: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """All-reduce SUM over ``groups``, in place (on the group's device; see _on_group_device)."""
    for group in groups:
        moved = _on_group_device(tensor, group)
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
        if moved is not tensor:
            tensor.copy_(moved)
    return tensor


def _max(values: torch.Tensor, groups: Sequence[Any]) -> torch.Tensor:
    """All-reduce MAX that keeps NaN (backends' max may drop it): NaN flags travel beside."""
    if not groups:
        return values
    flat = values.reshape(-1)
    nan = torch.isnan(flat)
    packed = torch.cat([torch.where(nan, torch.full_like(flat, -math.inf), flat), nan.to(flat.dtype)])
    for group in groups:
        moved = _on_group_device(packed, group)
        dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=group)
        packed = moved.to(packed.device)
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
        except Exception:  # noqa: BLE001, S112 - an accelerator module without these functions
            continue
    return torch.device("cpu")
