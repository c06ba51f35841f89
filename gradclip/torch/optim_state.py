"""The checkpoint format of :class:`gradclip.torch.ClippedOptimizer`: torch's own, plus one key.

``ClippedOptimizer.state_dict()`` is the wrapped optimizer's ``state_dict()`` (``state`` and
``param_groups`` at the top level, as every torch optimizer's) with gradclip's part under one
extra key, ``"gradclip"``::

    {"state": {...}, "param_groups": [...],
     "gradclip": {"format": "gradclip.ClippedOptimizer", "version": 2,
                  "clipper": clipper.state_dict(), "micro_step": 0, "consecutive_skips": 0}}

With ``update_clipper=`` one more optional key, ``"update_clipper"``, holds that clipper's
checkpoint (:mod:`gradclip.torch.optim_state_aware`).

``consecutive_skips`` is the skip streak (``max_consecutive_skips``) as an int ``>= 0``. With
per-group clipping (:mod:`gradclip.torch.optim_groups`) ``"clipper"`` is None and one more key,
``"clippers"``, holds ``{group key: clipper.state_dict() or None}``, every group's. Both keys
came after the version-2 layout did, so they are optional on loading: a checkpoint without
``consecutive_skips`` (an older gradclip) resumes with a streak of 0. A per-group checkpoint
loads only into a per-group optimizer with the same group keys, and a single-clipper one only
into a single-clipper optimizer.

So code that handles optimizer checkpoints keeps working when the optimizer is wrapped: a plain
``torch.optim.AdamW`` loads it (torch reads ``state`` and ``param_groups`` and ignores the rest),
nanoGPT's resume path loads it back, and ``ClippedOptimizer.load_state_dict`` takes a plain
optimizer's checkpoint too (the clipper then starts fresh, with a warning). Version 1 checkpoints
(``{"format", "version": 1, "optimizer", "clipper", "micro_step"}``, gradclip before this format)
still load. Everything is validated before anything changes.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.checkpoint import check_keys
from gradclip._core.errors import StateError
from gradclip.torch.optim_groups import GroupClippers

__all__ = ["FORMAT", "FORMAT_VERSION", "KEY", "Loaded", "build", "load"]

FORMAT = "gradclip.ClippedOptimizer"
FORMAT_VERSION = 2
#: The one key gradclip adds to the optimizer's own state_dict.
KEY = "gradclip"
#: The keys of gradclip's part, no more and no fewer.
_PART_KEYS = frozenset({"format", "version", "clipper", "micro_step"})
#: Keys a version-2 part may also have (added later; see the module documentation).
_OPTIONAL_KEYS = frozenset({"consecutive_skips", "clippers", "update_clipper"})
#: The top-level keys of a version-1 checkpoint.
_V1_KEYS = frozenset({"format", "version", "optimizer", "clipper", "micro_step"})


class Loaded(NamedTuple):
    """What :func:`load` restored besides the optimizer's and the clippers' state."""

    micro_step: int
    consecutive_skips: int


def build(optimizer: Any, clipper: Any, micro_step: int, consecutive_skips: int = 0) -> dict[str, Any]:
    """The checkpoint: the optimizer's state_dict with gradclip's part under :data:`KEY`
    (``clipper`` a clipper, or the :class:`~gradclip.torch.optim_groups.GroupClippers`)."""
    state = dict(optimizer.state_dict())
    per_group = isinstance(clipper, GroupClippers)
    state[KEY] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "clipper": None if per_group else clipper.state_dict(),
        "micro_step": micro_step,
        "consecutive_skips": consecutive_skips,
    }
    if per_group:
        state[KEY]["clippers"] = clipper.state_dict()
    return state


def load(opt: Any, state_dict: Any) -> Loaded:
    """Load a checkpoint into ``opt`` (a ClippedOptimizer): the optimizer's part into
    ``opt.optimizer``, the clipper's (or every group's clipper's) into ``opt.clipper``.

    Returns:
        The micro-step and the skip streak to resume at (0 where the checkpoint has none).

    Raises:
        StateError: Not a torch optimizer state_dict (nor a version-1 ClippedOptimizer one), a
            malformed gradclip part, a micro-step outside ``[0, accumulation_steps)``, a
            ``consecutive_skips`` that is not an int ``>= 0``, a single-clipper part for a
            per-group optimizer (or the reverse), a clipper part its clipper refuses, or an
            optimizer part the optimizer refuses. Nothing has changed then.
    """
    where = "ClippedOptimizer.load_state_dict"
    if isinstance(state_dict, Mapping) and state_dict.get("format") == FORMAT and "optimizer" in state_dict:
        optimizer_state, part = _from_v1(where, state_dict)
    else:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= set(state_dict):
            raise StateError(
                f"{where}: expected a torch optimizer state_dict (a mapping with 'state' and 'param_groups', "
                f"from ClippedOptimizer.state_dict() or any torch optimizer's), got {_describe(state_dict)}"
            )
        optimizer_state = {k: v for k, v in state_dict.items() if k != KEY}
        part = state_dict.get(KEY)
        if part is not None:
            _check_part(where, part)
    micro = skips = 0
    if part is not None:
        micro = part["micro_step"]
        if type(micro) is not int or not 0 <= micro < opt.accumulation_steps:
            raise StateError(
                f"{where}: micro_step must be an int in [0, {opt.accumulation_steps}) (accumulation_steps="
                f"{opt.accumulation_steps}), got {micro!r} of type {type(micro).__name__}"
            )
        skips = part.get("consecutive_skips", 0)
        if type(skips) is not int or skips < 0:
            raise StateError(
                f"{where}: consecutive_skips must be an int >= 0 (the skip streak), got {skips!r} of type "
                f"{type(skips).__name__}"
            )
        _check_clipper_kind(where, opt.clipper, part)
    # torch's own check, made here so that it fails before the clipper is touched.
    sizes = _group_sizes(opt.optimizer.param_groups)
    saved_sizes = _group_sizes(optimizer_state.get("param_groups"))
    if saved_sizes != sizes:
        raise StateError(
            f"{where}: the optimizer's part does not fit {type(opt.optimizer).__name__}: it has parameter "
            f"groups of sizes {saved_sizes}, this optimizer {sizes}"
        )
    # The clipper validates its part completely before it changes (gradclip's checkpoint rule);
    # the optimizer last: should torch (or a load hook) still refuse its part, the clipper's
    # previous state goes back.
    previous_clipper = opt.clipper.state_dict()
    if part is None:
        opt.clipper.reset()
    else:
        opt.clipper.load_state_dict(part["clippers"] if isinstance(opt.clipper, GroupClippers) else part["clipper"])
    try:
        opt.optimizer.load_state_dict(optimizer_state)
    except Exception as error:
        opt.clipper.load_state_dict(previous_clipper)
        raise StateError(f"{where}: the optimizer's part does not fit {type(opt.optimizer).__name__}: {error}") from error
    if part is None:
        warnings.warn(
            f"{where}: this is a plain torch optimizer state_dict (no {KEY!r} entry): the optimizer's state "
            f"was loaded; the clipper {type(opt.clipper).__name__} starts fresh (no adaptive history) and "
            "the micro-batch count at 0",
            UserWarning,
            stacklevel=3,
        )
    return Loaded(micro, skips)


def _check_clipper_kind(where: str, clipper: Any, part: Mapping[str, Any]) -> None:
    """A per-group part for a per-group optimizer, a single clipper's for a single clipper."""
    per_group = isinstance(clipper, GroupClippers)
    saved_per_group = part.get("clippers") is not None
    if per_group and not saved_per_group:
        raise StateError(
            f"{where}: the checkpoint was written by a ClippedOptimizer with one clipper; this one clips per "
            f"parameter group ({list(clipper)}), so its clippers' states cannot come from it"
        )
    if saved_per_group and not per_group:
        raise StateError(
            f"{where}: the checkpoint was written by a ClippedOptimizer that clips per parameter group "
            f"({sorted(part['clippers'], key=repr)}); this one has one clipper, {type(clipper).__name__}"
        )
    if saved_per_group and part.get("clipper") is not None:
        raise StateError(f"{where}: a per-group checkpoint's 'clipper' entry must be None, got {_describe(part['clipper'])}")


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, Mapping) or part.get("format") != FORMAT:
        raise StateError(
            f"{where}: the {KEY!r} entry must be the mapping ClippedOptimizer.state_dict() writes (format "
            f"{FORMAT!r}), got {_describe(part)}"
        )
    check_keys(where, part, _PART_KEYS | (set(part) & _OPTIONAL_KEYS), f"the {KEY!r} entry of a ClippedOptimizer checkpoint")
    version = part["version"]
    # bool and float compare equal to ints in Python; a checkpoint says exactly what it is.
    if type(version) is not int or version != FORMAT_VERSION:
        raise StateError(
            f"{where}: unsupported version {version!r} of type {type(version).__name__} in the {KEY!r} entry; "
            f"expected the int {FORMAT_VERSION}"
        )


def _from_v1(where: str, state_dict: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, Any]]:
    check_keys(where, state_dict, _V1_KEYS, "a version-1 ClippedOptimizer checkpoint")
    version = state_dict["version"]
    if type(version) is not int or version != 1:
        raise StateError(
            f"{where}: unsupported version {version!r} of type {type(version).__name__}; expected the int 1 "
            f"(the old layout) or a torch optimizer state_dict with a {KEY!r} entry"
        )
    optimizer_state = state_dict["optimizer"]
    if not isinstance(optimizer_state, Mapping) or not {"state", "param_groups"} <= set(optimizer_state):
        raise StateError(
            f"{where}: 'optimizer' must be a torch optimizer state_dict (a mapping with 'state' and "
            f"'param_groups'), got {_describe(optimizer_state)}"
        )
    part = {"clipper": state_dict["clipper"], "micro_step": state_dict["micro_step"]}
    return optimizer_state, part


def _group_sizes(groups: Any) -> list[int | None] | None:
    """The number of parameters of each group in ``param_groups`` (None where it is malformed)."""
    if not isinstance(groups, (list, tuple)):
        return None
    return [
        len(group["params"]) if isinstance(group, Mapping) and isinstance(group.get("params"), (list, tuple)) else None
        for group in groups
    ]


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"a mapping with keys {sorted(map(str, value))}"
    return type(value).__name__
