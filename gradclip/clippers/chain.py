"""Composition: several clippers applied left to right as one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, check_header, make_info
from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import out_of_place

__all__ = ["Chain", "chain"]


class ChainState(NamedTuple):
    """One state per link, in order."""

    states: tuple


class Chain(Clipper):
    """Apply clippers one after the other; built by :func:`chain`.

    The combined :class:`~gradclip.ClipInfo` reports the first link's norm (the gradients as they
    came in), the last link's threshold, the product of the coefficients, and ``clipped``/``skip``
    if any link clipped/asked to skip; ``finite`` is the first link's.
    """

    name = "chain"

    def __init__(self, *clippers: Clipper):
        super().__init__()
        if not clippers:
            raise InvalidArgumentError("chain: give at least one clipper, got none")
        for position, clipper in enumerate(clippers):
            if not isinstance(clipper, Clipper):
                raise InvalidArgumentError(
                    f"chain: argument #{position} must be a gradclip clipper, got {type(clipper).__name__}"
                )
        self.clippers = tuple(clippers)

    def config(self):
        return {"clippers": [{"clipper": c.name, "config": c.config()} for c in self.clippers]}

    def _uses_params(self) -> bool:
        return any(c._uses_params() for c in self.clippers)

    def _stateful(self) -> bool:
        # The chain's own state is only a tuple of its links' states.
        return any(c._stateful() for c in self.clippers)

    def _init(self, ops, grads):
        return ChainState(tuple(c._init(ops, grads) for c in self.clippers))

    def _update(self, ops, grads, state, params, names):
        # In place, a later link may still raise (a "raise" policy on non-finite values, AGC
        # without parameters, AdaGC state for other tensors) after an earlier link has already
        # written into the gradients: the call would fail with the gradients half clipped. So
        # with two or more links the links work out of place and the result is written back once,
        # after the last link has succeeded: one more copy pass, and up to two gradient-sized
        # temporaries (a link's input and output) while the links run.
        targets = None
        link_ops = ops
        if getattr(ops, "inplace", False) and len(self.clippers) > 1 and grads:
            targets, link_ops = grads, out_of_place(ops)
        infos = []
        new_states = []
        for clipper, link_state in zip(self.clippers, state.states):
            grads, link_state, info = clipper._update(link_ops, grads, link_state, params, names)
            new_states.append(link_state)
            infos.append(info)
        if targets is not None:
            grads = ops.write_back(targets, grads)
        coef = infos[0].coef
        clipped, skip = infos[0].clipped, infos[0].skip
        for info in infos[1:]:
            coef = coef * info.coef
            clipped = clipped | info.clipped
            skip = skip | info.skip
        combined = make_info(ops, infos[0].norm, infos[-1].threshold, coef, clipped, infos[0].finite, skip)
        return grads, ChainState(tuple(new_states)), combined

    # A chain's checkpoint is its links' checkpoints, so each link validates its own part.
    def state_dict(self) -> dict[str, Any]:
        base = super().state_dict()
        if self._state is not None:
            for clipper, link_state in zip(self.clippers, self._state.states):
                clipper._state = link_state
        base["state"] = {"links": [c.state_dict() for c in self.clippers]}
        return base

    def load_state_dict(self, state_dict) -> None:
        where = "Chain.load_state_dict"
        # Header checks (keys, format, version, name, config) first; they change nothing.
        check_header(where, state_dict, self.name, self.config())
        # A non-mapping "state" (e.g. a list) used to fail with AttributeError, not StateError.
        state = state_dict["state"]
        links = state.get("links") if isinstance(state, Mapping) and set(state) == {"links"} else None
        if not isinstance(links, list) or len(links) != len(self.clippers):
            raise StateError(f"{where}: expected {len(self.clippers)} link states under state['links']")
        # Validate everything first, into scratch copies, so a bad link loses nothing.
        scratch = [copy.copy(c) for c in self.clippers]
        for clipper, link in zip(scratch, links):
            clipper.load_state_dict(link)
        # Only now, every part valid, is anything changed.
        self._last_seen = None
        for clipper, loaded in zip(self.clippers, scratch):
            # Everything the load set on the copy (state, and what it forgets, such as AdaGC's
            # remembered tensor layout), as if the original had loaded it.
            vars(clipper).update(vars(loaded))
        self._state = None
        self._pending_state = None
        self._links_loaded = True
        self._sync_held()  # TensorFlow: the links' state goes into the chain's variables now

    def _has_python_state(self) -> bool:
        return getattr(self, "_links_loaded", False) or super()._has_python_state()

    def _current_state(self, ops, grads):
        if getattr(self, "_links_loaded", False):
            self._links_loaded = False
            self._state = ChainState(tuple(c._current_state(ops, grads) for c in self.clippers))
        return super()._current_state(ops, grads)

    def reset(self) -> None:
        self._links_loaded = False
        super().reset()
        for clipper in self.clippers:
            clipper.reset()


def chain(*clippers: Clipper) -> Chain:
    """Compose clippers left to right: ``chain(NonFinite("zero"), GlobalNorm(1.0))``.

    Args:
        *clippers: Two or more clipper instances (one is allowed, and behaves as itself).

    Returns:
        A :class:`Chain`, itself a clipper.

    Raises:
        InvalidArgumentError: No clippers, or an argument that is not a clipper.
    """
    return Chain(*clippers)
