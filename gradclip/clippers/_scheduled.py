"""Scheduled threshold arguments, shared by the clippers that take them.

A clipper whose threshold is a schedule (:mod:`gradclip.schedules`) keeps the step in its state:
its state type gains an int64 ``clock`` field (the base state's fields first, unchanged), so the
step is checkpointed with the rest and advances inside ``jax.jit``/``tf.function`` like any
state. A clipper given plain numbers keeps the state (and the checkpoint format) it always had:
nothing here runs on its hot path.

Each step reads its step as ``signals.step`` when the call passes ``step=``, else as the clock;
the schedule is evaluated there, and the clock becomes that step plus one.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.contract import Signals
from gradclip._core.ops import Ops
from gradclip._core.schedules import FromCallable, Schedule, as_threshold
from gradclip._core.types import EmptyState
from gradclip.clippers._adaptive import check_field

__all__ = ["ClockState", "Scheduled", "as_threshold", "clocked"]


class ClockState(NamedTuple):
    """The state of a stateless method whose threshold is scheduled: the step alone."""

    clock: Any  # int64 0-d: the step the next call evaluates its schedules at


_CLOCKED: dict[type, type] = {EmptyState: ClockState}


def clocked(base: type) -> type:
    """``base`` (a state NamedTuple type) with an int64 ``clock`` field appended (cached).

    The new type is a module attribute of this module, named after the base, so states pickle.
    """
    known = _CLOCKED.get(base)
    if known is None:
        name = f"{base.__name__}WithClock"
        known = collections.namedtuple(name, (*base._fields, "clock"))
        known.__module__ = __name__
        globals()[name] = known
        _CLOCKED[base] = known
    return known


class Scheduled:
    """Mixin for clippers with threshold arguments that may be schedules.

    A subclass validates each such argument with :func:`as_threshold`, then calls
    :meth:`_use_schedules` with its base state type and dtypes; in ``init_state`` it wraps its
    base state with :meth:`_with_clock`, in ``decide`` it reads thresholds with
    :meth:`_setting` at the step :meth:`_step_of` gives and returns :meth:`_next_state`, and in
    ``validate_state`` it calls :meth:`_check_clock`.
    """

    _scheduled_names: tuple[str, ...] = ()
    #: Lower bound of each scheduled setting: a callable's values are raised to it.
    _lower_bounds: dict[str, float] = {}

    def _use_schedules(self, names: Mapping[str, float], base_type: type, base_dtypes: Mapping[str, str]) -> None:
        """Declare which of ``names`` (setting name -> lower bound) hold schedules, and switch
        the state to the clocked one when any does."""
        self._scheduled_names = tuple(n for n in names if isinstance(getattr(self, n), Schedule))
        self._lower_bounds = dict(names)
        if self._scheduled_names:
            self.state_type = clocked(base_type)
            self.state_dtypes = {**base_dtypes, "clock": "int64"}

    @property
    def scheduled(self) -> bool:
        """Whether any threshold of this clipper is a schedule (then its state holds a clock)."""
        return bool(self._scheduled_names)

    def _with_clock(self, ops: Ops, base_state: Any) -> Any:
        """The initial state: ``base_state`` with a zero clock when scheduled."""
        if not self._scheduled_names:
            return base_state
        return self.state_type(*base_state, ops.scalar(0, "int64"))

    def _step_of(self, ops: Ops, state: Any, signals: Signals) -> Any:
        """The step this call evaluates its schedules at (None when nothing is scheduled)."""
        if not self._scheduled_names:
            return None
        given = signals.step
        if given is None:
            return state.clock
        if not hasattr(given, "shape"):
            return ops.scalar(int(given), "int64")
        # A one-element integer array (signals_from checked it): sum() makes it 0-d.
        return ops.cast(ops.sum(given), "int64")

    def _setting(self, ops: Ops, name: str, step: Any, dtype: str) -> Any:
        """The value of setting ``name`` at ``step``, a 0-d ``dtype`` device array."""
        value = getattr(self, name)
        if name not in self._scheduled_names:  # (a tuple test: isinstance on an ABC costs more)
            return ops.scalar(value, dtype)
        out = value.value(ops, step, dtype)
        if isinstance(value, FromCallable):
            # Unchecked values: keep them in the argument's range from below (a negative
            # max_norm would flip the gradients).
            out = ops.maximum(out, self._lower_bounds[name])
        return out

    def _next_state(self, base_state: Any, step: Any) -> Any:
        """The next state from the next base state (an instance of the base type): with the
        clock past ``step`` when scheduled."""
        if not self._scheduled_names:
            return base_state
        return self.state_type(*base_state, step + 1)

    def _advance(self, state: Any, step: Any) -> Any:
        """``state`` (of a clipper whose base state never changes) with the clock past ``step``."""
        if not self._scheduled_names:
            return state
        return state._replace(clock=step + 1)

    def _base_state(self, state: Any, base_type: type) -> Any:
        """The base fields of a (possibly clocked) state, as ``base_type``."""
        if not self._scheduled_names:
            return state
        return base_type(*tuple(state)[: len(base_type._fields)])

    def _check_clock(self, where: str, state: Mapping[str, Any]) -> None:
        if self._scheduled_names:
            check_field(where, state, "clock", "int", low=0)
