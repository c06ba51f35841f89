"""Clipping under ``torch.distributed``: DDP, FSDP2 / tensor parallel (DTensor), hand-made shards.

Every reduction goes through ``torch.distributed.all_reduce`` on device tensors (no host sync, no
communication layer of gradclip's own). The torch backend picks its distributed Reducer
(:mod:`gradclip.backends.torch_reduce`) by itself when a gradient is a ``DTensor`` or a clipper
carries ``process_group=``; nothing changes, and nothing is communicated, for plain tensors
without a process group. This module is the front end: the semantics below, and the helpers
users and tests import.

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
* **FSDP1** (``FullyShardedDataParallel``): found from the module by ``clip_(model)``; each flat
  parameter's slice is summed over its unit's shard group (HSDP: the shard group only), and
  ``use_orig_params=True`` views get whole-tensor per-tensor norms (:mod:`gradclip.torch.fsdp`).
* **Per-parameter groups** (a :class:`~gradclip.torch.reduction.ReductionSpec` as
  ``process_group=``): each plain tensor is sharded over its group (its per-tensor statistics
  summed there), replicated or tied (counted once), or an expert tensor (summed over the expert
  group); :mod:`gradclip.megatron` builds one from Megatron-core's attributes, and
  :mod:`gradclip.deepspeed` clips ZeRO partitions with the same machinery.
* **CPU-resident partial sums** (CPU offload) travel to the group's accelerator for the
  collective and back (NCCL reduces device tensors only); gloo reduces them on CPU.

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

from collections.abc import Sequence
from typing import Any

from gradclip.backends.torch import TorchOps
from gradclip.backends.torch_dtensor import (
    any_dtensor,
    is_dtensor,
    local_tensor,
    resolve_process_group,
)
from gradclip.backends.torch_reduce import DistributedReducer

__all__ = [
    "DistributedTorchOps",
    "any_dtensor",
    "is_dtensor",
    "local_tensor",
    "resolve_process_group",
]


class DistributedTorchOps(TorchOps):
    """:class:`~gradclip.backends.torch.TorchOps` that always holds a
    :class:`~gradclip.backends.torch_reduce.DistributedReducer`, even for plain tensors without
    a process group (``TorchOps``/``get_ops`` pick that Reducer by themselves when needed).

    Args:
        arrays, inplace, foreach, where, torch_kernels: As for ``TorchOps``.
        process_group: The group over which plain tensors are sharded (see
            :func:`resolve_process_group`), or None (plain tensors are replicated).
    """

    def __init__(self, arrays: Sequence[Any] = (), *, process_group: Any = None, where: str = "gradclip", **kwargs: Any):
        super().__init__(
            arrays, process_group=process_group, where=where,
            reducer=DistributedReducer(process_group, where), **kwargs,
        )
