"""Per-parameter reduction groups for plain-tensor gradients: the assignments the Reducer reads.

A plain tensor's statistic (``Σ|g|^p``, a flag, an extremum) is reduced according to its
:class:`Assign`:

* ``total``: the process group its (weighted) partial is summed over when a *global* statistic
  is formed: the ranks that together hold the model once (the model-parallel group for
  Megatron, the shard group for FSDP1, the expert group for expert parameters). ``None``: the
  tensor is complete on this rank and counted here only (DDP-like, FSDP1 ``NO_SHARD``).
* ``copies``: how many ranks of ``total`` hold an identical copy (replicated LayerNorm weights
  across tensor-parallel ranks, embeddings tied across pipeline stages): the partial is divided
  by it, so the sum over ``total`` counts it once.
* ``shard``: the group over which the tensor itself is split (tensor-parallel shards, FSDP1
  ``use_orig_params=True`` views): its *own* statistic (per-tensor norms, ``Norm``, ``AdaGC``) is
  summed over it; ``slot`` is its position in that group's per-tensor vector, the same on every
  rank of the group (ranks without the tensor contribute zero at that slot).
* ``flat``: an FSDP1 ``FlatParameter`` shard: many parameters concatenated and cut anywhere, so
  per-tensor statistics mean nothing and are refused.

An :class:`Assigner` (a ``ReductionSpec``, FSDP1's layout) maps each gradient of a call to its
assignment and lists, in an order identical on every rank, every group it may reduce over, so
every rank joins every collective even without a tensor in it (no hang).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradclip._core.errors import InvalidArgumentError

__all__ = ["Assign", "Assigner", "check_member", "group_label"]


class Assign(NamedTuple):
    """How one plain gradient is reduced (see the module docstring)."""

    total: Any
    copies: int
    shard: Any
    slot: int
    flat: bool
    name: str
    #: The whole tensor's element count when this rank holds a piece of it (-1: the local one).
    numel: int = -1


#: A tensor complete on this rank, counted here only.
def local_assign(name: str) -> Assign:
    return Assign(None, 1, None, -1, False, name)


def group_label(group: Any) -> str:
    """A readable name for a process group: its ranks (global numbering)."""
    if group is None:
        return "this rank only"
    try:
        ranks = dist.get_process_group_ranks(group)
    except Exception:  # noqa: BLE001 - a group torch no longer knows (destroyed)
        return repr(group)
    return f"group of ranks {ranks}"


def check_member(group: Any, what: str, where: str) -> None:
    """Raise unless this rank belongs to ``group``.

    Raises:
        InvalidArgumentError: This rank is not in ``group`` (its collectives would fail or hang).
    """
    if group is None:
        return
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        # What dist.new_group returns on the ranks outside the group.
        raise InvalidArgumentError(
            f"{where}: {what}: this rank ({dist.get_rank()}) is not in that group (dist.new_group "
            "returned NON_GROUP_MEMBER here); give each rank the groups it belongs to"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise InvalidArgumentError(
            f"{where}: {what}: expected a torch.distributed.ProcessGroup, got {type(group).__qualname__}"
        )
    if dist.get_rank(group) < 0:
        raise InvalidArgumentError(
            f"{where}: {what}: this rank ({dist.get_rank()}) is not in the {group_label(group)}; "
            "give each rank the groups it belongs to (dist.new_group returns a group object on "
            "every rank, but only its members may use it)"
        )


class Assigner:
    """Maps the gradients of a call to their :class:`Assign` (the protocol the Reducer reads).

    Subclasses set ``total_groups`` and ``shard_groups`` (lists of process groups, in an order
    that is the same on every rank sharing a group) and ``slots`` (per shard group, the length
    of its per-tensor vector), and implement :meth:`assign`.
    """

    total_groups: list[Any]
    shard_groups: list[Any]
    slots: dict[Any, int]
    #: Whether gradients of this layout may be FSDP1 flat shards (then per-tensor methods refuse).
    has_flat = False
    #: Whether unit-wise statistics (AGC's rows) are formed by the assigner itself
    #: (:meth:`unit_norms`, :meth:`unit_totals`): pieces that cut rows anywhere (FSDP1 views).
    forms_units = False

    def assign(self, grads: Sequence[torch.Tensor], where: str) -> list[Assign]:  # pragma: no cover
        """One :class:`Assign` per gradient.

        Raises:
            InvalidArgumentError: A gradient the layout does not know, or knows twice.
        """
        raise NotImplementedError

    def device(self, fallback: torch.device) -> torch.device:
        """The device collectives run on for a rank holding no gradient (see ``_group_device``)."""
        return fallback

    def unit_norms(self, ops: Any, arrays: Sequence[torch.Tensor], axes: Sequence[Any], where: str) -> list[torch.Tensor]:  # pragma: no cover
        """``Ops.unit_norms`` of this layout's arrays (only when :attr:`forms_units`)."""
        raise NotImplementedError

    def unit_totals(
        self, ops: Any, values: Sequence[torch.Tensor], arrays: Sequence[torch.Tensor], axes: Sequence[Any], where: str
    ) -> list[torch.Tensor]:  # pragma: no cover
        """``Ops.unit_totals`` of vectors laid out as this layout's :meth:`unit_norms` (only when
        :attr:`forms_units`)."""
        raise NotImplementedError


# -- reductions under an assigner -------------------------------------------------------------------
def slot_reduce(assigner: Assigner, values: torch.Tensor, assigns: Sequence[Assign | None], op: str) -> torch.Tensor:
    """Per-tensor values of tensors split over shard groups -> the whole tensors' values.

    Each shard group's per-tensor vector (``assigner.slots[group]`` long, the same on all its
    ranks) gets this rank's values at their slots, zero elsewhere (MAX: -inf), and is reduced
    over the group. Every rank takes part in every shard group the assigner declares, in the
    declared order, with or without tensors in it, so no rank waits for ever.

    Args:
        values: fp64, one entry per tensor of ``assigns``.
        op: ``"sum"`` or ``"max"`` (NaN kept).

    Returns:
        ``values`` with the entries of split tensors replaced by the whole tensors' values.
    """
    from gradclip.backends.torch_dtensor import _max, _sum_

    out = values
    fill = -math.inf if op == "max" else 0.0
    for group in assigner.shard_groups:
        index = [(i, a.slot) for i, a in enumerate(assigns) if a is not None and a.shard is group]
        vector = torch.full((assigner.slots[group],), fill, dtype=values.dtype, device=values.device)
        if index:
            rows = torch.as_tensor([i for i, _ in index], device=values.device)
            slots = torch.as_tensor([s for _, s in index], device=values.device)
            vector = vector.index_copy(0, slots, values.index_select(0, rows))
        vector = _max(vector, [group]) if op == "max" else _sum_(vector, [group])
        if index:
            out = out.index_copy(0, rows, vector.index_select(0, slots))
    return out


def assigned_totals(
    assigner: Assigner, partials: torch.Tensor, plain: Sequence[int], assigns: Sequence[Assign | None] | None, is_max: bool
) -> torch.Tensor:
    """Totals of the plain columns of ``partials`` (``(K, n)``, fp64) under an assigner.

    Each column is weighted by ``1 / copies`` and summed (MAX: maxima; copies are equal) over
    its total group: one all-reduce per group the assigner declares, in its order, joined with
    zeros by ranks holding nothing in it; columns without a group are added locally.

    Returns:
        A ``(K,)`` fp64 tensor (0 where there is nothing).
    """
    from gradclip.backends.torch_dtensor import _max, _sum_, _weights

    k = partials.shape[0]
    empty = -math.inf if is_max else 0.0
    assigns = assigns or [None] * partials.shape[1]
    columns: dict[Any, list[int]] = {None: []}
    for group in assigner.total_groups:
        columns.setdefault(group, [])
    for i in plain:
        a = assigns[i]
        columns.setdefault(None if a is None else a.total, []).append(i)
    total = torch.full((k,), empty, dtype=partials.dtype, device=partials.device)
    for group, cols in columns.items():
        if group is None and not cols:
            continue
        local = torch.full((k,), empty, dtype=partials.dtype, device=partials.device)
        if cols:
            part = partials[:, cols]
            if is_max:
                local = part.amax(1)  # amax keeps NaN
            else:
                copies = [1 if assigns[i] is None else assigns[i].copies for i in cols]
                if 0 in copies:  # duplicates counted on another rank: weight 0
                    keep = [j for j, c in enumerate(copies) if c > 0]
                    part, copies = part[:, keep], [copies[j] for j in keep]
                weights = _weights(copies, part)
                local = (part if weights is None else part * weights).sum(1)
        if group is not None:
            local = _max(local, [group]) if is_max else _sum_(local.contiguous(), [group])
        total = torch.maximum(total, local) if is_max else total + local
    if is_max:  # nothing anywhere: 0, as for the other reductions
        total = torch.where(total == -math.inf, torch.zeros_like(total), total)
    return total
