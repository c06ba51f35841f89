"""Per-parameter-group clipping for :class:`gradclip.torch.ClippedOptimizer`.

``ClippedOptimizer(optimizer, {group: clipper | None, ...})`` clips each parameter group of the
wrapped optimizer with its own clipper, or not at all::

    opt = gct.ClippedOptimizer(
        torch.optim.Adam([{"params": G.parameters(), "name": "G"},
                          {"params": D.parameters(), "name": "D", "lr": 4e-4}]),
        {"G": gradclip.GlobalNorm(1.0), "D": gradclip.ZClip()})

Why: one global clip over groups that are trained differently is wrong in known ways. A GAN's
generator and discriminator have gradients of unrelated scales (one threshold fits neither);
Muon's orthogonalised updates must not be rescaled by a norm that mixes in the AdamW groups
(Megatron found that a global clip over both silently stalls training). Each clipper here keeps
its own adaptive state and sees only its group's parameters.

Rules (the choices a careful user would want, stated once):

* **Keys** are a group's index in ``optimizer.param_groups`` (an int) or its name (the ``"name"``
  entry of the group's dict, a str). **Every group must be named**, ``None`` being "not clipped":
  a group left out by mistake (or added later) would otherwise go unclipped in silence.
  :meth:`ClippedOptimizer.add_param_group` takes the new group's ``clipper=`` for the same reason.
* **Bad mappings** are refused at construction, before anything is stored: an empty mapping, a
  key that is neither an int nor a str, an index out of range, a name no group (or more than one
  group) has, two keys for the same group, a value that is neither a clipper nor None, the same
  clipper object for two groups (its state would advance twice per step and mix the groups'
  statistics), and a mapping whose every value is None (nothing would be clipped).
* **Signals** (``loss=``...) reach every group's clipper; ``optimizer_state=`` is split by group.
* A clipped group whose parameters have no gradient this step (a frozen discriminator) is left
  out: its clipper does not advance. Only when no clipped group has a gradient are the clippers
  called anyway (and warn, as a single clipper does before ``backward()``).
* A **skip** asked by any group's clipper skips the whole optimizer step: one step either
  happens for every group or for none.
* **Folding** into a fused optimizer needs one coefficient for every gradient the step reads:
  possible only when one group is clipped and every other group is empty. Otherwise the groups
  are clipped in place (``fold=None``), or ``fold=True`` raises.

What is reported (``ClippedOptimizer.last_infos`` and ``last_info``):

* ``last_infos``: ``{group key: ClipInfo}``, each clipper's own info, for the clipped groups that
  took part in the last step.
* ``last_info``: one :class:`~gradclip.ClipInfo` for the step. With ``measure="clipped"``
  (default), ``norm`` is the clipped groups' norms combined as ``sqrt(sum norm_g**2)`` (their
  global 2-norm when the clippers measure 2-norms, as every norm clipper does by default); with
  ``measure="all"``, ``norm`` is the global 2-norm of the gradients of *all* groups before
  clipping, clipped or not, measured in one extra pass over them (what
  ``torch.nn.utils.clip_grad_norm_`` over all parameters would report). ``threshold`` is the
  clipped groups' thresholds combined the same way (the bound on their combined norm after
  clipping); ``coef`` is the effective ``norm_after / norm`` (1 when the norm is 0 or not finite);
  ``clipped`` is any group clipped, ``finite`` every group finite, ``skip`` any group asked to
  skip. With one group taking part (and ``measure="clipped"``) it is that group's info itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch

from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import get_ops
from gradclip._core.types import ClipInfo

__all__ = ["MEASURES", "GroupClippers"]

#: What ``last_info.norm`` covers with per-group clipping.
MEASURES = ("clipped", "all")


class _Entry(NamedTuple):
    key: int | str  # as the user gave it (or as add_param_group chose it)
    clipper: Clipper | None


class GroupClippers(Mapping):
    """The per-group clippers of a ClippedOptimizer: a read-only mapping ``key -> clipper | None``
    in parameter-group order that clips, folds and checkpoints like one clipper.

    Args:
        where: The public entry point, for messages.
        optimizer: The wrapped ``torch.optim.Optimizer``.
        clippers: ``{group index or name: clipper or None}``, every group named once.
        measure: ``"clipped"`` or ``"all"``: what the combined info's norm covers (see the
            module documentation).

    Raises:
        InvalidArgumentError: A bad mapping (see the module documentation) or ``measure``.
    """

    def __init__(self, where: str, optimizer: torch.optim.Optimizer, clippers: Mapping, measure: str = "clipped"):
        if measure not in MEASURES:
            raise InvalidArgumentError(f"{where}: measure must be one of {list(MEASURES)}, got {measure!r}")
        groups = optimizer.param_groups
        if len(clippers) == 0:
            raise InvalidArgumentError(
                f"{where}: the clipper mapping is empty; map each of the {len(groups)} parameter group(s) "
                "(by index or by its 'name') to a clipper or to None"
            )
        by_index: dict[int, _Entry] = {}
        owners: dict[int, Any] = {}  # id(clipper) -> the key it was given for
        for key, clipper in clippers.items():
            index = _group_index(where, groups, key)
            if index in by_index:
                raise InvalidArgumentError(
                    f"{where}: keys {by_index[index].key!r} and {key!r} both name parameter group {index}; "
                    "name each group once"
                )
            check_mapped_clipper(where, key, clipper, owners)
            by_index[index] = _Entry(key, clipper)
        missing = [i for i in range(len(groups)) if i not in by_index]
        if missing:
            raise InvalidArgumentError(
                f"{where}: the clipper mapping names no clipper for parameter group(s) "
                f"{', '.join(_describe_group(groups, i) for i in missing)}; map every group to a clipper, "
                "or to None to leave it unclipped"
            )
        if all(entry.clipper is None for entry in by_index.values()):
            raise InvalidArgumentError(
                f"{where}: the clipper mapping maps every parameter group to None, so nothing would be clipped; "
                "give at least one group a clipper (or use the optimizer unwrapped)"
            )
        self._entries = [by_index[i] for i in range(len(groups))]
        self._optimizer = optimizer
        self.measure = measure
        #: ``{group key: ClipInfo}`` of the clipped groups that took part in the last step.
        self.last_infos: dict[int | str, ClipInfo] | None = None

    # -- the mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: int | str) -> Clipper | None:
        for entry in self._entries:
            if entry.key == key and type(entry.key) is type(key):
                return entry.clipper
        raise KeyError(key)

    def __iter__(self) -> Iterator[int | str]:
        return iter([entry.key for entry in self._entries])

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        shown = ", ".join(f"{entry.key!r}: {entry.clipper!r}" for entry in self._entries)
        return f"GroupClippers({{{shown}}}, measure={self.measure!r})"

    # -- what ClippedOptimizer asks of a clipper ------------------------------------------------
    @property
    def clipped(self) -> list[tuple[int | str, Clipper]]:
        """``(key, clipper)`` of the clipped groups, in group order."""
        return [(entry.key, entry.clipper) for entry in self._entries if entry.clipper is not None]

    @property
    def may_skip(self) -> bool:
        """Whether any group's clipper can ask for the step to be skipped."""
        return any(clipper.may_skip for _, clipper in self.clipped)

    @property
    def needs_optimizer_state(self) -> bool:
        """Whether any group's clipper reads the optimizer's state (``optimizer_state=``)."""
        return any(getattr(clipper, "needs_optimizer_state", False) for _, clipper in self.clipped)

    def cannot_fold_reason(self) -> str | None:
        """Why the clip cannot be folded into a fused optimizer's step (None: it can)."""
        return _fold_reason(self._entries, [len(group["params"]) for group in self._optimizer.param_groups])

    @property
    def coefficient(self) -> Any:
        """The coefficient kind of the one clipper a fold uses."""
        return self._fold_clipper().coefficient

    def fold_(self, named: list[tuple[str, torch.Tensor]], **kwargs: Any) -> Any:
        """:meth:`gradclip.Clipper.fold_` with the one clipped group's clipper (the other groups
        are empty, see :meth:`cannot_fold_reason`)."""
        self._check_groups(kwargs.get("where") or "ClippedOptimizer.step")
        key, clipper = self.clipped[0]
        folded = clipper.fold_(named, **kwargs)
        self.last_infos = {key: folded.info}
        return folded

    def clip_(self, named: list[tuple[str, torch.Tensor]], **signals: Any) -> ClipInfo:
        """Clip each clipped group in place with its own clipper and return the combined info.

        Args:
            named: ``(name, parameter)`` of every parameter of every group, in group order (what
                ``ClippedOptimizer`` passes to a single clipper).
            **signals: As for :meth:`gradclip.Clipper.clip_`; ``optimizer_state`` (one entry per
                parameter with a gradient, in that order) is split by group.

        Returns:
            The combined :class:`~gradclip.ClipInfo`; each group's is in :attr:`last_infos`.

        Raises:
            StateError: The optimizer's parameter groups changed behind this object's back
                (``param_groups`` appended to directly); raised before anything changes.
        """
        where = "ClippedOptimizer.step"
        self._check_groups(where)
        parts = self._split(named, signals.get("optimizer_state"))
        taking_part = [p for p in parts if p.clipper is not None and p.has_grad]
        if not taking_part:  # nothing to clip: every clipper runs (and warns), as one clipper would
            taking_part = [p for p in parts if p.clipper is not None]
        # measure="all" measures every group before any gradient is clipped in place.
        measured = self._group_norms(parts) if self.measure == "all" else None
        infos: dict[int | str, ClipInfo] = {}
        for part in taking_part:
            group_signals = dict(signals)
            if part.optimizer_state is not None:
                group_signals["optimizer_state"] = part.optimizer_state
            infos[part.key] = part.clipper.clip_(part.named, **group_signals)
        self.last_infos = infos
        return _combine(infos, measured)

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[int | str, Any]:
        """``{group key: clipper.state_dict() or None}``, every group in order."""
        return {entry.key: None if entry.clipper is None else entry.clipper.state_dict() for entry in self._entries}

    def load_state_dict(self, saved: Any, where: str = "ClippedOptimizer.load_state_dict") -> None:
        """Restore :meth:`state_dict`'s mapping; on any error every clipper is as it was.

        Raises:
            StateError: Not a mapping with exactly these group keys, a None where a group is
                clipped now (or the reverse), or a part its clipper refuses.
        """
        if not isinstance(saved, Mapping):
            raise StateError(f"{where}: the per-group clippers' part must be a mapping of group keys, got {type(saved).__name__}")
        expected = [entry.key for entry in self._entries]
        if sorted(map(repr, saved)) != sorted(map(repr, expected)):
            raise StateError(
                f"{where}: the checkpoint clips the parameter groups {sorted(saved, key=repr)}, this optimizer "
                f"the groups {sorted(expected, key=repr)} (the keys must match, index or name alike)"
            )
        for entry in self._entries:
            if (saved[entry.key] is None) != (entry.clipper is None):
                now = "not clipped" if entry.clipper is None else f"clipped by {type(entry.clipper).__name__}"
                then = "not clipped" if saved[entry.key] is None else "clipped"
                raise StateError(f"{where}: parameter group {entry.key!r} is {now} here but was {then} in the checkpoint")
        # Each clipper checks its part completely before it changes; should a later one refuse,
        # the ones already loaded go back.
        previous = self.state_dict()
        loaded: list[_Entry] = []
        try:
            for entry in self._entries:
                if entry.clipper is not None:
                    entry.clipper.load_state_dict(saved[entry.key])
                    loaded.append(entry)
        except BaseException:
            for entry in loaded:
                entry.clipper.load_state_dict(previous[entry.key])
            raise

    def reset(self) -> None:
        """Forget every clipper's adaptive state."""
        for _, clipper in self.clipped:
            clipper.reset()

    # -- groups added after construction ------------------------------------------------------
    def add_group(self, where: str, param_group: dict[str, Any], clipper: Clipper | None, fold: bool | None) -> None:
        """Add ``param_group`` to the optimizer, clipped by ``clipper`` (None: not clipped).

        Its key is its ``"name"`` when it has one, else its index. Checked before the optimizer
        changes: ``clipper`` a clipper (not one of this mapping's) or None, the name unused, and
        with ``fold=True`` the fold still possible.

        Raises:
            InvalidArgumentError: One of the above; nothing changed.
        """
        owners = {id(c): key for key, c in self.clipped}
        name = param_group.get("name") if isinstance(param_group, Mapping) else None
        key: int | str = name if isinstance(name, str) else len(self._entries)
        check_mapped_clipper(where, key, clipper, owners)
        if any(entry.key == key and type(entry.key) is type(key) for entry in self._entries):
            raise InvalidArgumentError(f"{where}: a parameter group is already keyed {key!r}; give the new group another name")
        if fold is True:
            params = param_group.get("params") if isinstance(param_group, Mapping) else None
            size = 1 if isinstance(params, torch.Tensor) else len(list(params or []))
            sizes = [len(group["params"]) for group in self._optimizer.param_groups] + [size]
            reason = _fold_reason([*self._entries, _Entry(key, clipper)], sizes)
            if reason is not None:
                raise InvalidArgumentError(f"{where}: fold=True, and with this group the clip could no longer be folded: {reason}")
        self._optimizer.add_param_group(param_group)  # torch validates the group; raises before adding
        self._entries.append(_Entry(key, clipper))

    # -- helpers -------------------------------------------------------------------------------------
    def _fold_clipper(self) -> Clipper:
        return self.clipped[0][1]

    def _check_groups(self, where: str) -> None:
        count = len(self._optimizer.param_groups)
        if count != len(self._entries):
            raise StateError(
                f"{where}: the optimizer has {count} parameter groups but clippers were given for {len(self._entries)}; "
                "add groups through ClippedOptimizer.add_param_group(group, clipper=...) (nothing was changed)"
            )

    def _split(self, named: list[tuple[str, torch.Tensor]], optimizer_state: Any) -> list[_Part]:
        parts = []
        position = 0
        with_grad = 0  # optimizer_state has one entry per parameter with a gradient
        for entry, group in zip(self._entries, self._optimizer.param_groups):
            group_named = named[position : position + len(group["params"])]
            position += len(group["params"])
            grads = sum(param.grad is not None for _, param in group_named)
            state = None if optimizer_state is None else list(optimizer_state[with_grad : with_grad + grads])
            with_grad += grads
            parts.append(_Part(entry.key, entry.clipper, group_named, grads > 0, state))
        return parts

    def _group_norms(self, parts: list[_Part]) -> list[tuple[Any, Any]]:
        """``(clipped?, 2-norm)`` of every group with a gradient, before anything is clipped."""
        out = []
        for part in parts:
            grads = list({id(p.grad): p.grad for _, p in part.named if p.grad is not None}.values())
            if grads:
                norm = get_ops(grads, where="ClippedOptimizer.step").global_norm(grads, 2.0)
                out.append((part.key if part.clipper is not None and part.has_grad else None, norm))
        return out


class _Part(NamedTuple):
    """One parameter group at a step."""

    key: int | str
    clipper: Clipper | None
    named: list[tuple[str, torch.Tensor]]
    has_grad: bool
    optimizer_state: list[Any] | None


def _group_index(where: str, groups: list[dict[str, Any]], key: Any) -> int:
    """The index of the parameter group ``key`` names (an index or a ``"name"``)."""
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise InvalidArgumentError(
            f"{where}: a clipper mapping's key must be a parameter group's index (int) or name (str), "
            f"got {key!r} of type {type(key).__name__}"
        )
    if isinstance(key, int):
        if not 0 <= key < len(groups):
            raise InvalidArgumentError(
                f"{where}: parameter group index {key} is out of range; the optimizer has {len(groups)} "
                f"group(s), indices 0 to {len(groups) - 1}"
            )
        return key
    matches = [i for i, group in enumerate(groups) if group.get("name") == key]
    if not matches:
        names = [group["name"] for group in groups if isinstance(group.get("name"), str)]
        raise InvalidArgumentError(
            f"{where}: no parameter group is named {key!r}; the groups' names are {names} "
            "(a group's name is the 'name' entry of its dict)"
        )
    if len(matches) > 1:
        raise InvalidArgumentError(f"{where}: parameter groups {matches} are all named {key!r}; key them by index")
    return matches[0]


def check_mapped_clipper(where: str, key: Any, clipper: Any, owners: dict[int, Any], unit: str = "parameter group") -> None:
    """One entry of a ``{key: clipper | None}`` mapping (parameter groups here, optimizers in the
    Lightning callback): ``clipper`` is a clipper not mapped to another key, or None.

    Args:
        where: The public entry point, for messages.
        key: The entry's key (a group index or name, an optimizer index).
        clipper: The entry's value.
        owners: ``id(clipper) -> key`` of the entries checked so far; this one is added.
        unit: What a key names, for messages (``"parameter group"``, ``"optimizer"``).

    Raises:
        InvalidArgumentError: ``clipper`` is neither a clipper nor None, or is already mapped to
            another key (its state would advance twice per step, on two sets of gradients).
    """
    if clipper is None:
        return
    if not isinstance(clipper, Clipper):
        raise InvalidArgumentError(
            f"{where}: the clipper for {unit} {key!r} must be a gradclip clipper or None (not clipped), "
            f"got {type(clipper).__qualname__}"
        )
    if id(clipper) in owners:
        raise InvalidArgumentError(
            f"{where}: the same {type(clipper).__name__} object is mapped to {unit}s {owners[id(clipper)]!r} "
            f"and {key!r}; its state would advance twice per step on two sets of gradients. Give each "
            f"{unit} its own clipper (e.g. gradclip.GlobalNorm(1.0) twice)"
        )
    owners[id(clipper)] = key


def _describe_group(groups: list[dict[str, Any]], index: int) -> str:
    name = groups[index].get("name")
    return f"{index} ({name!r})" if isinstance(name, str) else str(index)


def _fold_reason(entries: list[_Entry], sizes: list[int]) -> str | None:
    """Why groups clipped like ``entries`` (groups of ``sizes`` parameters) cannot fold."""
    clipped = [(entry, size) for entry, size in zip(entries, sizes) if entry.clipper is not None]
    if not clipped:
        return "no parameter group is clipped"
    others = [entry.key for entry, size in zip(entries, sizes) if entry.clipper is None and size > 0]
    if len(clipped) > 1 or others:
        return (
            "the parameter groups are clipped apart (or some not at all), and a fused optimizer's step takes one "
            "coefficient for every gradient; the groups are clipped in place instead (use fold=None or False)"
        )
    return clipped[0][0].clipper.cannot_fold_reason()


def _combine(infos: dict[int | str, ClipInfo], measured: list[tuple[Any, Any]] | None) -> ClipInfo:
    """One ClipInfo for the step from the groups' (see the module documentation)."""
    values = list(infos.values())
    if measured is None and len(values) == 1:
        return values[0]
    if not values:  # measure="all" with no clipped group taking part cannot happen (see clip_)
        raise StateError("ClippedOptimizer.step: no parameter group was clipped")
    device = values[0].norm.device
    dtype = torch.float64 if any(v.norm.dtype == torch.float64 for v in values) else torch.float32

    def stacked(tensors: list[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(t).to(device=device, dtype=dtype).reshape(()) for t in tensors])

    def flags(tensors: list[Any]) -> torch.Tensor:
        return torch.stack([torch.as_tensor(t).to(device=device, dtype=torch.bool).reshape(()) for t in tensors])

    coefs = stacked([v.coef for v in values])
    threshold = torch.linalg.vector_norm(stacked([v.threshold for v in values]))
    finite = flags([v.finite for v in values]).all()
    if measured is None:
        norms = stacked([v.norm for v in values])
        norm = torch.linalg.vector_norm(norms)
        after = torch.linalg.vector_norm(coefs * norms)
    else:
        # Every group's own 2-norm; a clipped group's after-clip norm is its coefficient times it.
        coef_of = dict(zip(infos, coefs))
        norms = stacked([n for _, n in measured])
        scale = torch.stack([coef_of[key] if key in coef_of else torch.ones((), device=device, dtype=dtype) for key, _ in measured])
        norm = torch.linalg.vector_norm(norms)
        after = torch.linalg.vector_norm(scale * norms)
        finite = finite & torch.isfinite(norms).all()
    usable = torch.isfinite(norm) & (norm > 0)
    coef = torch.where(usable, after / torch.where(usable, norm, torch.ones_like(norm)), torch.ones_like(norm))
    return ClipInfo(
        norm=norm,
        threshold=threshold,
        coef=coef,
        clipped=flags([v.clipped for v in values]).any(),
        finite=finite,
        skip=flags([v.skip for v in values]).any(),
    )
