"""The base class every clipping method derives from.

A clipper is pure at heart (optax's lesson): ``init(grads) -> state`` and
``update(grads, state, params=None) -> (grads, state, info)``, written once per method against
the Ops protocol. The object users hold wraps that pure pair with the conveniences of a stateful
API (``clip``, ``clip_``, ``state_dict``); it keeps the current state, never a second copy of the
algorithm.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import Ops, framework_of, get_ops
from gradclip._core.tree import collect_gradients, flatten
from gradclip._core.types import ClipInfo, EmptyState

__all__ = ["Clipper", "STATE_FORMAT_VERSION", "make_info"]

#: Version of the ``state_dict`` schema; bumped whenever its layout changes.
STATE_FORMAT_VERSION = 1


def make_info(ops: Ops, norm, threshold, coef, clipped, finite, skip=None) -> ClipInfo:
    """Assemble a :class:`ClipInfo` from device scalars (``skip`` defaults to False)."""
    if skip is None:
        skip = ops.scalar(False, "bool")
    return ClipInfo(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite, skip=skip)


class Clipper:
    """Base class of every clipping method.

    Subclasses implement :meth:`_update` (and :meth:`_init` when they carry state) against the
    :class:`~gradclip._core.ops.Ops` protocol, plus :meth:`config`. Everything else — input
    structures, in-place clipping, state checkpoints — lives here once.
    """

    #: Registry name, set by :func:`gradclip._core.registry.register`.
    name: ClassVar[str] = "clipper"
    #: Arguments :func:`gradclip.get` supplies when the caller gives none.
    defaults: ClassVar[dict[str, Any]] = {}
    #: State NamedTuple type and the dtype of each of its fields, for checkpoints.
    state_type: ClassVar[type] = EmptyState
    state_dtypes: ClassVar[dict[str, str]] = {}

    def __init__(self) -> None:
        self._state: Any = None
        self._pending_state: dict[str, Any] | None = None

    # -- what subclasses implement -----------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments, as plain data (used by ``repr`` and ``state_dict``)."""
        return {}

    def _init(self, ops: Ops, grads: list[Any]) -> Any:
        """Build the initial state for these gradients (stateless methods: ``EmptyState()``)."""
        del ops, grads
        return EmptyState()

    def _update(self, ops: Ops, grads: list[Any], state: Any, params: list[Any] | None, names: list[str]):
        """Clip ``grads`` (a list without None); return ``(grads, state, ClipInfo)``."""
        raise NotImplementedError

    # -- the pure interface ---------------------------------------------------------------------
    def init(self, grads: Any) -> Any:
        """Return the initial state for gradients shaped like ``grads``.

        Args:
            grads: An array or a list/tuple/dict of arrays (None entries are ignored).

        Returns:
            A NamedTuple of arrays on the gradients' device.
        """
        leaves, _, _ = flatten(grads)
        present = [g for g in leaves if g is not None]
        return self._init(get_ops(present, where=f"{type(self).__name__}.init"), present)

    def update(self, grads: Any, state: Any, params: Any = None):
        """Clip ``grads`` without modifying them and return the new state.

        Args:
            grads: An array or a list/tuple/dict of arrays; ``None`` entries are passed through.
            state: The state from :meth:`init` or a previous :meth:`update`.
            params: The parameters, in the same structure, for methods that need them (AGC).

        Returns:
            ``(clipped_grads, new_state, info)``: clipped gradients in the input's structure, the
            next state, and a :class:`~gradclip.ClipInfo`.
        """
        return self._run(grads, state, params, inplace=False)

    # -- the stateful conveniences ------------------------------------------------------------
    def clip(self, grads: Any, params: Any = None):
        """Clip gradients functionally (new arrays), advancing this clipper's own state.

        Args:
            grads: An array or a list/tuple/dict of arrays (torch, NumPy, ...).
            params: The matching parameters, for methods that need them.

        Returns:
            ``(clipped_grads, info)``.
        """
        clipped, self._state, info = self._run(grads, None, params, inplace=False, own_state=True)
        return clipped, info

    def clip_(self, parameters: Any) -> ClipInfo:
        """Clip gradients in place and return what was measured and done.

        Args:
            parameters: A ``torch.nn.Module``, an iterable of parameters (their ``.grad`` is
                clipped), optimizer parameter groups, or NumPy arrays (clipped themselves).

        Returns:
            A :class:`~gradclip.ClipInfo` whose fields stay on the gradients' device.
        """
        where = f"{type(self).__name__}.clip_"
        collected = collect_gradients(parameters)
        if not collected.grads:
            warnings.warn(
                f"{where}: found no gradients among {collected.seen} parameter(s); was it called "
                "before backward()? Nothing was clipped.",
                RuntimeWarning,
                stacklevel=2,
            )
        framework = None
        if not collected.grads and collected.params:
            framework = framework_of(collected.params[0])
        ops = get_ops(collected.grads, inplace=True, framework=framework, where=where)
        params = collected.params if self._uses_params() else None
        with ops.context():
            state = self._current_state(ops, collected.grads)
            _, new_state, info = self._update(ops, collected.grads, state, params, collected.names)
        self._state = new_state
        return info

    def _uses_params(self) -> bool:
        return False

    def _run(self, grads, state, params, *, inplace: bool, own_state: bool = False):
        where = f"{type(self).__name__}.{'clip' if own_state else 'update'}"
        leaves, unflatten, names = flatten(grads)
        positions = [i for i, g in enumerate(leaves) if g is not None]
        present = [leaves[i] for i in positions]
        param_leaves = None
        if params is not None:
            flat_params, _, _ = flatten(params)
            if len(flat_params) != len(leaves):
                raise InvalidArgumentError(
                    f"{where}: params must have the same structure as grads; got {len(flat_params)} "
                    f"parameter(s) for {len(leaves)} gradient(s)"
                )
            param_leaves = [flat_params[i] for i in positions]
        ops = get_ops(present, inplace=inplace, where=where)
        if own_state:
            state = self._current_state(ops, present)
        elif state is None:
            state = self._init(ops, present)
        new, new_state, info = self._update(
            ops, present, state, param_leaves, [names[i] for i in positions]
        )
        out = list(leaves)
        for position, value in zip(positions, new):
            out[position] = value
        return unflatten(out), new_state, info

    # -- checkpoints ----------------------------------------------------------------------------
    def _current_state(self, ops: Ops, grads: list[Any]) -> Any:
        if self._pending_state is not None:
            self._state = self._state_from_plain(ops, self._pending_state)
            self._pending_state = None
        if self._state is None:
            self._state = self._init(ops, grads)
        return self._state

    def _state_from_plain(self, ops: Ops, plain: dict[str, Any]) -> Any:
        fields = {name: ops.array(plain[name], self.state_dtypes[name]) for name in self.state_type._fields}
        return self.state_type(**fields)

    def state_dict(self) -> dict[str, Any]:
        """Return the clipper's configuration and state as plain, JSON-serialisable data.

        The result holds only dicts, lists, strings, numbers, bools and None, so it can be saved
        with ``json.dump`` or ``torch.save`` and read back with ``torch.load(weights_only=True)``.

        Returns:
            ``{"format": "gradclip", "version": 1, "clipper": name, "config": {...},
            "state": {...} or None}``; ``state`` is None before the first step.
        """
        if self._pending_state is not None:
            state = dict(self._pending_state)
        elif self._state is None or not self.state_type._fields:
            state = None if self._state is None and self.state_type._fields else {}
        else:
            ops = get_ops(
                [v for v in self._state if hasattr(v, "shape")][:1], where=f"{type(self).__name__}.state_dict"
            )
            state = {name: ops.to_list(getattr(self._state, name)) for name in self.state_type._fields}
        return {
            "format": "gradclip",
            "version": STATE_FORMAT_VERSION,
            "clipper": self.name,
            "config": self.config(),
            "state": state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`.

        The data is validated completely before anything changes: on error the clipper keeps
        its current state. Arrays are rebuilt on the device of the next gradients seen.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.

        Raises:
            StateError: Wrong format or version, another clipper's state, a different
                configuration, missing or extra fields, or values of the wrong type.
        """
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise StateError(f"{where}: expected a mapping from state_dict(), got {type(state_dict).__name__}")
        if state_dict.get("format") != "gradclip" or state_dict.get("version") != STATE_FORMAT_VERSION:
            raise StateError(
                f"{where}: not a gradclip state (format={state_dict.get('format')!r}, "
                f"version={state_dict.get('version')!r}; expected 'gradclip', {STATE_FORMAT_VERSION})"
            )
        if state_dict.get("clipper") != self.name:
            raise StateError(
                f"{where}: state belongs to clipper {state_dict.get('clipper')!r}, not {self.name!r}"
            )
        if state_dict.get("config") != self.config():
            raise StateError(
                f"{where}: state was saved with config {state_dict.get('config')!r}, but this "
                f"clipper has {self.config()!r}"
            )
        state = state_dict.get("state")
        if state is None:
            self._state, self._pending_state = None, None
            return
        if not isinstance(state, Mapping) or set(state) != set(self.state_type._fields):
            raise StateError(
                f"{where}: state fields must be {sorted(self.state_type._fields)}, got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        for name in self.state_type._fields:
            _check_plain(where, name, state[name])
        self._validate_state(where, state)
        if not self.state_type._fields:
            self._state, self._pending_state = EmptyState(), None
            return
        self._state, self._pending_state = None, dict(state)

    def _validate_state(self, where: str, state: Mapping[str, Any]) -> None:
        """Hook for methods with extra invariants on their state (lengths, ranges)."""

    def reset(self) -> None:
        """Forget all state; the next step starts as the first did."""
        self._state = None
        self._pending_state = None

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({arguments})"


def _check_plain(where: str, name: str, value: Any) -> None:
    """Accept only numbers, bools and (nested) lists of them: nothing that could run code."""
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return
    if isinstance(value, list):
        for item in value:
            _check_plain(where, name, item)
        return
    raise StateError(
        f"{where}: state field {name!r} must hold numbers or lists of numbers, got {type(value).__name__}"
    )
