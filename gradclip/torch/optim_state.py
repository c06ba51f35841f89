"""The checkpoint format of :class:`gradclip.torch.ClippedOptimizer`: torch's own, plus one key.

``ClippedOptimizer.state_dict()`` is the wrapped optimizer's ``state_dict()`` (``state`` and
``param_groups`` at the top level, as every torch optimizer's) with gradclip's part under one
extra key, ``"gradclip"``::

    {"state": {...}, "param_groups": [...],
     "gradclip": {"format": "gradclip.ClippedOptimizer", "version": 2,
                  "clipper": clipper.state_dict(), "micro_step": 0}}

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
from typing import Any

from gradclip._core.checkpoint import check_keys
from gradclip._core.errors import StateError

__all__ = ["FORMAT", "FORMAT_VERSION", "KEY", "build", "load"]

FORMAT = "gradclip.ClippedOptimizer"
FORMAT_VERSION = 2
#: The one key gradclip adds to the optimizer's own state_dict.
KEY = "gradclip"
#: The keys of gradclip's part, no more and no fewer.
_PART_KEYS = frozenset({"format", "version", "clipper", "micro_step"})
#: The top-level keys of a version-1 checkpoint.
_V1_KEYS = frozenset({"format", "version", "optimizer", "clipper", "micro_step"})


def build(optimizer: Any, clipper: Any, micro_step: int) -> dict[str, Any]:
    """The checkpoint: the optimizer's state_dict with gradclip's part under :data:`KEY`."""
    state = dict(optimizer.state_dict())
    state[KEY] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "clipper": clipper.state_dict(),
        "micro_step": micro_step,
    }
    return state


def load(opt: Any, state_dict: Any) -> int:
    """Load a checkpoint into ``opt`` (a ClippedOptimizer): the optimizer's part into
    ``opt.optimizer``, the clipper's into ``opt.clipper``; returns the micro-step to resume at.

    Raises:
        StateError: Not a torch optimizer state_dict (nor a version-1 ClippedOptimizer one), a
            malformed gradclip part, a micro-step outside ``[0, accumulation_steps)``, a clipper
            part its clipper refuses, or an optimizer part the optimizer refuses. Nothing has
            changed then.
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
    micro = 0
    if part is not None:
        micro = part["micro_step"]
        if type(micro) is not int or not 0 <= micro < opt.accumulation_steps:
            raise StateError(
                f"{where}: micro_step must be an int in [0, {opt.accumulation_steps}) (accumulation_steps="
                f"{opt.accumulation_steps}), got {micro!r} of type {type(micro).__name__}"
            )
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
        opt.clipper.load_state_dict(part["clipper"])
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
    return micro


def _check_part(where: str, part: Any) -> None:
    if not isinstance(part, Mapping) or part.get("format") != FORMAT:
        raise StateError(
            f"{where}: the {KEY!r} entry must be the mapping ClippedOptimizer.state_dict() writes (format "
            f"{FORMAT!r}), got {_describe(part)}"
        )
    check_keys(where, part, _PART_KEYS, f"the {KEY!r} entry of a ClippedOptimizer checkpoint")
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
