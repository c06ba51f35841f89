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

import secrets
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.checkpoint import CHILD
from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Signals
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import accumulation
from gradclip._core.registry import from_config, register
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
    if isinstance(clipper, str) or (isinstance(clipper, Mapping) and isinstance(clipper.get("clipper"), str)):
        return from_config(clipper)
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
    state_dtypes = {"key": "int64", "step": "int64", "inner": CHILD}

    def __init__(self, clipper: Any, fraction: float, by: str = "element", seed: int | None = None):
        super().__init__()
        where = "Subset"
        self.clipper = _build_inner(where, clipper)
        self.fraction = check_number(where, "fraction", fraction, high=1.0)
        self.by = check_choice(where, "by", by, ("element", "tensor"))
        self.seed = check_int(where, "seed", seed, low=0, allow_none=True)
        if self.seed is not None and self.seed >= _KEY_LIMIT:
            raise InvalidArgumentError(f"{where}: seed must be None or an int in [0, 2**62), got {seed!r}")

    coefficient = Coefficient.ELEMENTWISE

    def children(self) -> tuple[Clipper, ...]:
        return (self.clipper,)

    @property
    def needs_params(self) -> bool:  # type: ignore[override]
        return self.clipper.needs_params

    @property
    def needs_optimizer_state(self) -> bool:  # type: ignore[override]
        return self.clipper.needs_optimizer_state

    @property
    def per_tensor_state(self) -> bool:  # type: ignore[override]
        return self.clipper.per_tensor_state

    def init_state(self, ops, grads):
        if self.seed is None and ops.world_size() > 1:
            # Each rank would draw its own key: different subsets per rank (DDP replicas would
            # drift apart, DTensor shards would use different masks).
            raise InvalidArgumentError(
                "Subset: seed=None draws a random key per process, but torch.distributed runs "
                f"{ops.world_size()} processes; pass seed= (the same int on every rank) so every rank "
                "draws the same subsets"
            )
        key = self.seed if self.seed is not None else secrets.randbelow(_KEY_LIMIT)
        return SubsetState(ops.scalar(key, "int64"), ops.scalar(0, "int64"), self.clipper.init_state(ops, grads))

    def check_fits(self, state, grads):
        self.clipper.check_fits(state.inner, grads)

    def run(self, ops, grads, state, params=None, names=None, signals: Signals = NO_SIGNALS):
        # The wrapped clipper computes out of place: its result is merged into a subset below.
        new, inner_state, info = self.clipper.run(ops.out_of_place(), list(grads), state.inner, params, names, signals)
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
        # In the norm the wrapped clipper reports (its p-norm), so the ratio is a scale of it.
        after = ops.global_norm(merged, self.clipper.norm_type)
        safe = ops.where(norm > 0, norm, one)
        effective = ops.where(norm > 0, after / safe, one)
        effective = ops.where(ops.isfinite(effective), effective, one)
        clipped = info.clipped & any_selected
        new_state = SubsetState(state.key, state.step + 1, inner_state)
        return merged, new_state, make_info(ops, norm, info.threshold, effective, clipped, info.finite, info.skip)

    def validate_state(self, where, state):
        # Both are stored in int64; the key is drawn below 2**62.
        for name, limit in (("key", _KEY_LIMIT), ("step", 2**63)):
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
                raise StateError(f"{where}: state field {name!r} must be an int in [0, {limit}), got {value!r}")
