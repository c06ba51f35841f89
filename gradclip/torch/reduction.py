"""Per-parameter reduction groups for plain-tensor gradients (hybrid parallelism).

Megatron-style training keeps plain tensors whose layout no DTensor describes: tensor-parallel
shards, LayerNorm weights and row-parallel biases replicated across the tensor-parallel ranks,
embeddings tied across the first and last pipeline stages, expert weights spread over an expert
group. ``process_group=pg`` alone sums every tensor over one group, which over-counts the
replicas (norms inflated by up to ``sqrt(tp)``). A :class:`ReductionSpec` says, per parameter,
how it lies, and is passed where a process group goes::

    spec = ReductionSpec(model, {
        "*.layernorm.*": replicated(tp_group),        # identical on every TP rank
        "*.linear_fc1.*": sharded(tp_group),          # split over the TP ranks
        "embedding.*": tied(embedding_group, sharded=tp_group),   # first & last stage, TP-split
        lambda name, p: "experts" in name: expert(expert_group),  # summed over the expert group
    }, group=model_parallel_group, default="partitioned")
    clipper = gradclip.GlobalNorm(1.0, process_group=spec)

Semantics: ``group`` is the set of ranks that together hold the model once (TP x PP for
Megatron; data-parallel replicas hold the same gradients and stay out of it). A global statistic
is the sum over ``group`` of each rank's partials, each divided by its number of identical
copies in ``group`` (``replicated``/``tied``: the group's size), so every element counts once;
``expert`` parameters are summed over their expert group instead. ``sharded`` tensors'
per-tensor statistics (``Norm``, ``AdaGC``, ``BlockRMS``) are summed over their shard group, so
per-tensor methods see whole tensors: the ranks of a shard group must hold the same sharded
parameters in the same order (tensor parallelism does). See :mod:`gradclip.megatron` for the
adapter that reads Megatron-core's parameter attributes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gradclip._core.errors import InvalidArgumentError
from gradclip.backends.torch_groups import Assign, Assigner, check_member, group_label

__all__ = ["ReductionSpec", "Rule", "duplicate", "expert", "partitioned", "replicated", "sharded", "tied"]

_WHERE = "ReductionSpec"


class Rule(NamedTuple):
    """How the parameters a key matches lie (build with the functions below).

    Attributes:
        kind: ``"sharded"``, ``"replicated"``, ``"tied"``, ``"expert"``, ``"partitioned"`` or
            ``"duplicate"``.
        group: The rule's group (shard, replica, tie or expert group; None for the last two).
        shard: The group the tensor is also split over (``tied``/``expert`` of TP shards).
    """

    kind: str
    group: Any = None
    shard: Any = None


def sharded(group: Any) -> Rule:
    """Split over ``group`` (tensor-parallel shards): summed over it, per-tensor statistics too."""
    return Rule("sharded", group, group)


def replicated(group: Any) -> Rule:
    """An identical copy on every rank of ``group`` (TP-replicated LayerNorm, row-parallel
    biases): counted once."""
    return Rule("replicated", group)


def tied(group: Any, *, sharded: Any = None) -> Rule:
    """The same parameter on every rank of ``group`` (embeddings tied across pipeline stages),
    optionally itself split over ``sharded``: counted once."""
    return Rule("tied", group, sharded)


def expert(group: Any, *, sharded: Any = None) -> Rule:
    """Expert parameters: different on the ranks of ``group`` and summed over it (not over the
    spec's group), optionally split over ``sharded`` too."""
    return Rule("expert", group, sharded)


def partitioned() -> Rule:
    """Whole on this rank and held by no other rank of the spec's group (a pipeline stage's own
    layers): summed over the spec's group."""
    return Rule("partitioned")


def duplicate(*, sharded: Any = None) -> Rule:
    """A copy counted on another rank (Megatron's ``shared`` output weight): contributes nothing
    to global statistics; optionally split over ``sharded`` (per-tensor statistics whole)."""
    return Rule("duplicate", None, sharded)


_DEFAULTS = {None: None, "partitioned": partitioned(), "error": None}


def _size(group: Any) -> int:
    return dist.get_world_size(group)


class ReductionSpec(Assigner):
    """Which parameters lie how, as an argument wherever ``process_group=`` is accepted.

    Args:
        parameters: The model (``named_parameters()`` is read) or ``(name, parameter)`` pairs.
        rules: Mapping from a key to a :class:`Rule`. A key is a glob pattern on the parameter's
            name (``fnmatch``: ``"*.bias"``) or a predicate ``(name, parameter) -> bool``.
        group: The ranks that together hold the model once (the model-parallel group).
        default: For parameters no rule matches: None (the default) raises naming them;
            ``"partitioned"`` counts them as this rank's own (:func:`partitioned`).

    Raises:
        InvalidArgumentError: A parameter matched by two rules that disagree; a group that does
            not contain this rank, or that is not inside ``group``; a parameter no rule matches
            (``default=None``), or a parameter marked tensor-parallel (Megatron's
            ``tensor_model_parallel``) not assigned as sharded; shard groups whose ranks hold
            different numbers of sharded parameters (checked with one all-reduce per shard group,
            so every rank must build the spec at the same point). Each names the parameter and
            the group.
    """

    def __init__(self, parameters: Any, rules: Mapping[Any, Rule], *, group: Any, default: str | None = None):
        if default not in _DEFAULTS:
            raise InvalidArgumentError(f"{_WHERE}: default must be None or 'partitioned', got {default!r}")
        check_member(group, "group", _WHERE)
        self.group = group
        members = set(dist.get_process_group_ranks(group))
        named = list(parameters.named_parameters()) if hasattr(parameters, "named_parameters") else list(parameters)
        self.total_groups: list[Any] = [group]
        self.shard_groups: list[Any] = []
        self.slots: dict[Any, int] = {}
        self.params: list[tuple[str, torch.nn.Parameter, Assign]] = []
        for key, rule in rules.items():
            self._check_rule(key, rule, members)
        for name, param in named:
            matched = [(key, rule) for key, rule in rules.items() if _matches(key, name, param)]
            if len({r for _, r in matched}) > 1:
                shown = "; ".join(f"{_key_label(k)} -> {r.kind} over the {group_label(r.group)}" for k, r in matched)
                raise InvalidArgumentError(f"{_WHERE}: parameter {name!r} is named by two rules that disagree: {shown}")
            rule = matched[0][1] if matched else _DEFAULTS[default]
            if rule is None:
                raise InvalidArgumentError(
                    f"{_WHERE}: parameter {name!r} matches no rule; assign it (sharded, replicated, tied, "
                    "expert, partitioned) or pass default='partitioned'"
                )
            if getattr(param, "tensor_model_parallel", False) and rule.shard is None and rule.kind != "duplicate":
                raise InvalidArgumentError(
                    f"{_WHERE}: parameter {name!r} is tensor-parallel (tensor_model_parallel=True) but "
                    f"is assigned {rule.kind!r} without a shard group; its shards would be counted as "
                    "whole tensors. Assign it sharded(tp_group) (or tied/expert with sharded=)"
                )
            self.params.append((name, param, self._assign(name, rule, param)))
        self._check_slots()

    def _check_rule(self, key: Any, rule: Rule, members: set) -> None:
        if not isinstance(rule, Rule):
            raise InvalidArgumentError(
                f"{_WHERE}: the rule for {_key_label(key)} must be built with sharded(), replicated(), "
                f"tied(), expert(), partitioned() or duplicate(), got {type(rule).__qualname__}"
            )
        for label, g in (("group", rule.group), ("sharded", rule.shard)):
            if g is None:
                continue
            check_member(g, f"{_key_label(key)} ({rule.kind}, {label})", _WHERE)
            if rule.kind != "expert" and not set(dist.get_process_group_ranks(g)) <= members:
                raise InvalidArgumentError(
                    f"{_WHERE}: {_key_label(key)} ({rule.kind}) names the {group_label(g)}, which is not "
                    f"inside the spec's {group_label(self.group)}; give group= the ranks that together "
                    "hold the model once (the model-parallel group)"
                )

    def _assign(self, name: str, rule: Rule, param: Any) -> Assign:
        total = rule.group if rule.kind == "expert" else self.group
        if rule.kind == "expert" and total not in self.total_groups:
            self.total_groups.append(total)
        copies = {"replicated": _size(rule.group) if rule.group is not None else 1, "tied": _size(rule.group), "duplicate": 0}.get(rule.kind, 1)
        slot, numel = -1, -1
        if rule.shard is not None:
            if rule.shard not in self.slots:
                self.shard_groups.append(rule.shard)
                self.slots[rule.shard] = 0
            slot = self.slots[rule.shard]
            self.slots[rule.shard] += 1
            numel = param.numel() * _size(rule.shard)
        return Assign(total, copies, rule.shard, slot, False, name, numel)

    def _check_slots(self) -> None:
        for g in self.shard_groups:
            counts = torch.tensor([self.slots[g], -self.slots[g]], dtype=torch.int64)
            dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=g)
            if int(counts[0]) != -int(counts[1]):
                names = [n for n, _, a in self.params if a.shard is g][:3]
                raise InvalidArgumentError(
                    f"{_WHERE}: the ranks of the {group_label(g)} hold different numbers of parameters "
                    f"sharded over it ({-int(counts[1])} to {int(counts[0])}; here {self.slots[g]}, e.g. "
                    f"{names}); every rank of a shard group must hold the same sharded parameters in order"
                )

    def assign(self, grads: Sequence[torch.Tensor], where: str) -> list[Assign]:
        """Each gradient's assignment, from its parameter.

        Raises:
            InvalidArgumentError: A gradient of no parameter of the spec (nothing is clipped).
        """
        table = {id(p.grad): a for _, p, a in self.params if p.grad is not None}
        out = []
        for i, g in enumerate(grads):
            a = table.get(id(g))
            if a is None:
                raise InvalidArgumentError(
                    f"{where}: gradient #{i} belongs to no parameter of the ReductionSpec (built from "
                    f"{len(self.params)} parameters); build the spec from the model being clipped"
                )
            out.append(a)
        return out

    def describe(self) -> list[tuple[str, str]]:
        """``(name, how)`` per parameter, for logs and checks."""
        return [(n, f"{'weight 1/' + str(a.copies) if a.copies != 1 else 'whole'}, total over the {group_label(a.total)}"
                 + (f", split over the {group_label(a.shard)}" if a.shard is not None else "")) for n, _, a in self.params]


def _matches(key: Any, name: str, param: Any) -> bool:
    if isinstance(key, str):
        return fnmatch.fnmatchcase(name, key)
    if callable(key):
        return bool(key(name, param))
    raise InvalidArgumentError(f"{_WHERE}: a rule's key must be a glob pattern or a callable (name, parameter), got {key!r}")


def _key_label(key: Any) -> str:
    return f"pattern {key!r}" if isinstance(key, str) else f"predicate {getattr(key, '__name__', repr(key))}"
