"""Apply a clipper to a random subset of elements or tensors (seed 003's clipping strategies).

Seed 003 lists three clipping strategies — "random clipping, random-selection clipping and clip
everything" — choosing *which* gradient values a clip applies to. :class:`Subset` wraps any
clipper: the wrapped clipper sees every gradient (its norms and statistics are those of the
whole update) and computes its result, and each element (``by="element"``) or each whole tensor
(``by="tensor"``) takes that result with probability ``fraction``, independently, a fresh draw
every step; the rest keep their values. ``fraction=1`` clips everything; ``Subset(Value(...),
0.3)`` is seed 003's random element-wise clipping.

The draws come from ``Ops.uniform``, a counter-based generator: a pure function of
``(key, step)``, so the state is two integers (checkpointed exactly, identical on NumPy and
torch) and no generator object or host round trip is involved. The cost is one hash per
element per step (``by="element"``) plus the wrapped clipper run out of place (one extra copy of
the gradients).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.clipper import STATE_FORMAT_VERSION, Clipper, check_header, make_info, plain_config
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import accumulation, framework_of, get_ops, out_of_place
from gradclip._core.registry import get, register, registered_class
from gradclip._core.validation import check_choice, check_int, check_number

__all__ = ["Subset", "SubsetState"]

#: Seeds and keys are kept below 2**62 so every backend holds them in int64 with room to spare.
_KEY_LIMIT = 2**62


class SubsetState(NamedTuple):
    """The random stream's key and position, and the wrapped clipper's own state."""

    key: Any  # int64 0-d
    step: Any  # int64 0-d: calls so far (the counter of the random stream)
    inner: Any  # the wrapped clipper's state


def _build_inner(where: str, clipper: Any) -> Clipper:
    if isinstance(clipper, Clipper):
        return clipper
    if isinstance(clipper, str):
        return get(clipper)
    if isinstance(clipper, Mapping) and isinstance(clipper.get("clipper"), str):
        config = clipper.get("config") or {}
        if not isinstance(config, Mapping):
            raise InvalidArgumentError(f"{where}: clipper['config'] must be a mapping, got {config!r}")
        return registered_class(clipper["clipper"])(**config)
    raise InvalidArgumentError(
        f"{where}: clipper must be a gradclip clipper, a registry name or "
        f"{{'clipper': name, 'config': {{...}}}}, got {clipper!r}"
    )


@register("subset")
class Subset(Clipper):
    """Apply ``clipper`` to a random ``fraction`` of the elements or tensors, fresh each step.

    Args:
        clipper: The clipper to apply: an instance, a registry name (``"value"``) or
            ``{"clipper": name, "config": {...}}`` (the form :meth:`config` reports).
        fraction: Probability in ``[0, 1]`` that an element (or tensor) takes the clipped value.
        by: ``"element"`` or ``"tensor"``.
        seed: An int in ``[0, 2**62)`` for a reproducible stream, or ``None`` for a random key
            drawn at the first step (it is part of the state, so checkpoints still resume the
            same stream).

    ``info`` is the wrapped clipper's (norm, threshold, finite, skip), with ``coef`` the
    effective scale of the global norm after the merge and ``clipped`` True when the wrapped
    clipper clipped and anything was selected.

    Raises:
        InvalidArgumentError: Bad ``clipper``, ``fraction`` outside ``[0, 1]``, unknown ``by``,
            ``seed`` not None nor an int in ``[0, 2**62)``.
    """

    defaults = {"clipper": "value", "fraction": 0.5}
    state_type = SubsetState
    state_dtypes = {"key": "int64", "step": "int64"}

    def __init__(self, clipper: Any, fraction: float, by: str = "element", seed: int | None = None):
        super().__init__()
        where = "Subset"
        self.clipper = _build_inner(where, clipper)
        self.fraction = check_number(where, "fraction", fraction, high=1.0)
        self.by = check_choice(where, "by", by, ("element", "tensor"))
        self.seed = check_int(where, "seed", seed, low=0, allow_none=True)
        if self.seed is not None and self.seed >= _KEY_LIMIT:
            raise InvalidArgumentError(f"{where}: seed must be None or an int in [0, 2**62), got {seed!r}")

    def config(self):
        return {
            "clipper": {"clipper": self.clipper.name, "config": self.clipper.config()},
            "fraction": self.fraction,
            "by": self.by,
            "seed": self.seed,
        }

    def _uses_params(self) -> bool:
        return self.clipper._uses_params()

    def _stateful(self) -> bool:
        return True  # the random stream advances every call

    def _init(self, ops, grads):
        world_size = getattr(ops, "world_size", None)
        if self.seed is None and world_size is not None and world_size() > 1:
            # Each rank would draw its own key: different subsets per rank (DDP replicas would
            # drift apart, DTensor shards would use different masks).
            raise InvalidArgumentError(
                "Subset: seed=None draws a random key per process, but torch.distributed runs "
                f"{world_size()} processes; pass seed= (the same int on every rank) so every rank "
                "draws the same subsets"
            )
        key = self.seed if self.seed is not None else secrets.randbelow(_KEY_LIMIT)
        return SubsetState(ops.scalar(key, "int64"), ops.scalar(0, "int64"), self.clipper._init(ops, grads))

    def _update(self, ops, grads, state, params, names):
        # The wrapped clipper computes out of place: its result is merged into a subset below.
        inner_ops = out_of_place(ops)
        new, inner_state, info = self.clipper._update(inner_ops, list(grads), state.inner, params, names)
        if self.by == "tensor":
            chosen = ops.uniform(state.key, state.step, [(len(grads),)])[0] < self.fraction
            masks = [chosen[i] for i in range(len(grads))]
            any_selected = ops.any(chosen) if len(grads) else ops.scalar(False, "bool")
        else:
            draws = ops.uniform(state.key, state.step, [tuple(g.shape) for g in grads])
            masks = [u < self.fraction for u in draws]
            any_selected = ops.any(ops.stack([ops.any(m) for m in masks])) if masks else ops.scalar(False, "bool")
        merged = ops.select(grads, new, masks)
        norm = info.norm
        acc = accumulation(norm)
        one = ops.scalar(1.0, acc)
        after = ops.global_norm(merged, 2.0)
        safe = ops.where(norm > 0, norm, one)
        effective = ops.where(norm > 0, after / safe, one)
        effective = ops.where(ops.isfinite(effective), effective, one)
        clipped = info.clipped & any_selected
        new_state = SubsetState(state.key, state.step + 1, inner_state)
        return merged, new_state, make_info(ops, norm, info.threshold, effective, clipped, info.finite, info.skip)

    # -- checkpoints: the key and step, and the wrapped clipper's own checkpoint ----------------
    def state_dict(self) -> dict[str, Any]:
        """As :meth:`Clipper.state_dict`; ``state`` is ``{"key", "step", "inner"}`` with ``inner``
        the wrapped clipper's own ``state_dict()``."""
        self._refresh_from_held()  # TensorFlow: the state lives in tf.Variables
        if self._pending_state is not None:
            state = copy.deepcopy(self._pending_state)
        elif self._state is None:
            state = None
        else:
            # By type alone: 0-d NumPy arithmetic yields NumPy scalars, which get_ops refuses.
            ops = get_ops([], framework=framework_of(self._state.key), where="Subset.state_dict")
            self.clipper._state, self.clipper._pending_state = self._state.inner, None
            state = {
                "key": int(ops.to_list(self._state.key)),
                "step": int(ops.to_list(self._state.step)),
                "inner": self.clipper.state_dict(),
            }
        return {
            "format": "gradclip",
            "version": STATE_FORMAT_VERSION,
            "clipper": self.name,
            "config": plain_config(self.config()),
            "state": state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As :meth:`Clipper.load_state_dict`: everything is validated (the wrapped clipper's
        part by the wrapped clipper, on a copy) before anything changes."""
        where = "Subset.load_state_dict"
        # Header checks (keys, format, version, name, config) first; they change nothing.
        check_header(where, state_dict, self.name, self.config())
        state = state_dict["state"]
        if state is None:
            self.reset()
            return
        if not isinstance(state, Mapping) or set(state) != {"key", "step", "inner"}:
            raise StateError(
                f"{where}: state fields must be ['inner', 'key', 'step'], got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        for name, limit in (("key", _KEY_LIMIT), ("step", 2**63)):  # both are stored in int64
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise StateError(f"{where}: state field {name!r} must be an int in [0, {limit}), got {value!r}")
        copy.deepcopy(self.clipper).load_state_dict(state["inner"])  # validates, or raises
        self.clipper.load_state_dict(state["inner"])
        self._state, self._last_seen = None, None
        self._pending_state = {"key": state["key"], "step": state["step"], "inner": copy.deepcopy(state["inner"])}
        self._sync_held()  # TensorFlow: into the variables a traced tf.function reads

    def _current_state(self, ops, grads):
        if self._pending_state is not None:
            plain = self._pending_state
            inner = self.clipper._current_state(ops, grads)
            self._state = SubsetState(ops.scalar(plain["key"], "int64"), ops.scalar(plain["step"], "int64"), inner)
            self._pending_state = None
        if self._state is None:
            self._state = self._init(ops, grads)
        return self._state

    def reset(self) -> None:
        super().reset()
        self.clipper.reset()

