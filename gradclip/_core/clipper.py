"""The base class every clipping method derives from.

A clipper is pure at heart (optax's lesson): ``init(grads) -> state`` and
``update(grads, state, params=None) -> (grads, state, info)``, written once per method against
the Ops protocol. The object users hold wraps that pure pair with the conveniences of a stateful
API (``clip``, ``clip_``, ``state_dict``); it keeps the current state, never a second copy of the
algorithm.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

from gradclip._core.errors import InvalidArgumentError, StateError
from gradclip._core.ops import Ops, framework_of, get_ops, largest_finite
from gradclip._core.tree import collect_gradients, flatten, flatten_like
from gradclip._core.types import ClipInfo, EmptyState

__all__ = ["Clipper", "STATE_FORMAT_VERSION", "make_info", "plain_config", "check_header", "check_keys"]

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
        # Backend-held state (TensorFlow: tf.Variables, see _held_state); None elsewhere.
        self._held: Any = None
        # The gradients of the last clip/clip_ (weak references and their version token), to
        # detect a second call on unchanged gradients (see _guard_repeat).
        self._last_seen: tuple[list[Any], Any] | None = None

    @classmethod
    def with_defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The arguments :func:`gradclip.get` passes: ``defaults`` completed by ``given``.

        Methods whose arguments come in alternative forms (``Value``) override this so a default
        never conflicts with what the caller chose.
        """
        return {**cls.defaults, **given}

    # -- distributed training (torch.distributed) --------------------------------------------
    @property
    def process_group(self) -> Any:
        """The ``torch.distributed`` group over which plain-tensor gradients are sharded, or None.

        ``None`` (the default) suits one process, DDP (gradients already averaged: nothing more
        is reduced) and FSDP2 / tensor parallelism (DTensor gradients are reduced on their own
        mesh). Set a ``ProcessGroup`` (or a ``DeviceMesh``) when each rank of it holds a different
        part of the gradient as plain tensors (pipeline stages, ZeRO-style partitions): norms are
        then all-reduced over it, and a rank without gradients still takes part. Norm-based
        clippers take it as a keyword (``GlobalNorm(1.0, process_group=pg)``); any clipper accepts
        ``clipper.process_group = pg`` or ``gradclip.get(name, process_group=pg)``. It is not
        part of :meth:`config` or the checkpoint. See :mod:`gradclip.torch.distributed`.
        """
        ref = self.__dict__.get("_process_group")
        return None if ref is None else ref.group

    @process_group.setter
    def process_group(self, group: Any) -> None:
        self.__dict__["_process_group"] = None if group is None else _SharedGroup(group)

    def _distributed_group(self) -> Any:
        """The process group for this call: this clipper's, or the one its wrapped clippers
        (``Chain`` links, ``Subset``'s clipper) carry.

        Raises:
            InvalidArgumentError: Two different groups among them.
        """
        found = self.process_group
        for child in self._children():
            group = child._distributed_group()
            if group is None or group is found:
                continue
            if found is not None:
                raise InvalidArgumentError(
                    f"{type(self).__name__}: its clippers carry different process groups "
                    f"({found!r} and {group!r}); give them all the same process_group"
                )
            found = group
        return found

    def _children(self) -> list[Clipper]:
        """The clippers this one wraps (``Chain`` links, ``Subset``'s clipper), if any."""
        children = getattr(self, "clippers", None)
        children = list(children) if isinstance(children, (list, tuple)) else []
        inner = getattr(self, "clipper", None)
        if inner is not None:
            children.append(inner)
        return [child for child in children if isinstance(child, Clipper) and child is not self]

    def _check_layout(self, names: list[str], grads: list[Any], where: str) -> None:
        """Refuse, before anything changes, gradients laid out unlike those this clipper's own
        state was built for. Only clippers with per-tensor state (AdaGC) override it; wrappers
        ask the clippers they wrap.

        Raises:
            StateError: From a clipper whose per-tensor state would be misaligned.
        """
        for child in self._children():
            child._check_layout(names, grads, where)

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
    def clip(self, grads: Any, params: Any = None, *, allow_repeat: bool = False):
        """Clip gradients functionally (new arrays), advancing this clipper's own state.

        Args:
            grads: An array or a list/tuple/dict of arrays (torch, NumPy, ...).
            params: The matching parameters, for methods that need them.
            allow_repeat: Let a stateful clipper advance again on the very gradients of its
                previous call (see :meth:`clip_`).

        Returns:
            ``(clipped_grads, info)``.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        clipped, _, info = self._run(
            grads, None, params, inplace=False, own_state=True, allow_repeat=allow_repeat
        )
        return clipped, info

    def clip_(self, parameters: Any, *, allow_repeat: bool = False) -> ClipInfo:
        """Clip gradients in place and return what was measured and done.

        Adaptive state advances exactly once per optimizer step (DESIGN.md rule 6). A stateful
        clipper remembers the gradient arrays it clipped (weak references) and their version
        token (torch: each tensor's ``_version`` counter, bumped by every in-place write; NumPy:
        a fingerprint of the bytes). Called again on the same arrays, unchanged since, it raises
        :class:`~gradclip.StateError` before touching gradients or state: the second call would
        count one step's gradient twice in the statistics. New gradients from the next
        ``backward()`` (fresh tensors, or the old ones written or zeroed) pass. The check reads
        host-side counters only, never a device value. Stateless clippers never check.

        Args:
            parameters: A ``torch.nn.Module``, an iterable of parameters (their ``.grad`` is
                clipped), optimizer parameter groups, or NumPy arrays (clipped themselves).
            allow_repeat: Skip that check, for a deliberate second update on the same
                gradients (e.g. replaying one fixed gradient in a test).

        Returns:
            A :class:`~gradclip.ClipInfo` whose fields stay on the gradients' device.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        where = f"{type(self).__name__}.clip_"
        collected = collect_gradients(parameters, where)
        group = self._distributed_group()
        # With a process group, ranks without gradients are expected (pipeline stages, uneven
        # partitions): they still join the reduction, silently.
        if not collected.grads and group is None:
            warnings.warn(
                f"{where}: found no gradients among {collected.seen} parameter(s); was it called "
                "before backward()? Nothing was clipped.",
                RuntimeWarning,
                stacklevel=2,
            )
        # With no gradient at all, the parameters seen still fix the backend (a torch module
        # before backward() gets a torch ClipInfo); collected.params only holds those with one.
        framework = collected.framework if not collected.grads else None
        ops = get_ops(collected.grads, inplace=True, framework=framework, where=where, process_group=group)
        params = collected.params if self._uses_params() else None
        self._guard_repeat(ops, collected.grads, where, allow_repeat)
        self._check_layout(collected.names, collected.grads, where)
        with ops.context():
            state = self._own_state(ops, collected.grads)
            _, new_state, info = self._update(ops, collected.grads, state, params, collected.names)
            info = _finish_info(ops, info)
            self._commit_state(ops, new_state, where)
        # Remember the gradients as they are now, after our own in-place writes.
        self._remember_grads(ops, collected.grads)
        return info

    def as_optax(self):
        """This clipper as an ``optax.GradientTransformation`` (JAX).

        Its state is a pytree (the clipper's state plus the last :class:`~gradclip.ClipInfo`),
        so it works inside ``jax.jit`` and ``optax.chain``; read the info for logging with
        :func:`gradclip.optax.clip_info`. See :func:`gradclip.optax.as_optax`.

        Raises:
            ImportError: optax or jax is not installed.
        """
        from gradclip.optax import as_optax

        return as_optax(self)

    def _uses_params(self) -> bool:
        return False

    # -- one update per optimizer step ------------------------------------------------------------
    def _stateful(self) -> bool:
        """Whether a call advances state (then a repeated call on the same gradients is refused)."""
        return bool(self.state_type._fields)

    def _guard_repeat(self, ops: Ops, grads: list[Any], where: str, allow_repeat: bool) -> None:
        if allow_repeat or self._last_seen is None or not grads or not self._stateful():
            return
        refs, token = self._last_seen
        # Identity first (cheap): new gradient tensors mean a new step, whatever their values.
        if len(refs) != len(grads) or any(ref() is not g for ref, g in zip(refs, grads)):
            return
        if token is None or ops.version_token(grads) != token:
            return
        raise StateError(
            f"{where}: called again on the same {len(grads)} gradient array(s), unchanged since "
            f"the previous call; {type(self).__name__} keeps adaptive state, which must advance "
            "once per optimizer step (a second call would count this step's gradient twice). "
            "Compute new gradients (backward()) before clipping again, or pass "
            "allow_repeat=True if the repeat is deliberate. Nothing was changed."
        )

    def _remember_grads(self, ops: Ops, grads: list[Any]) -> None:
        if not grads or not self._stateful():
            self._last_seen = None
            return
        try:
            refs = [weakref.ref(g) for g in grads]
        except TypeError:  # arrays that cannot be weakly referenced: no detection
            self._last_seen = None
            return
        self._last_seen = (refs, ops.version_token(grads))

    def _run(
        self,
        grads,
        state,
        params,
        *,
        inplace: bool,
        own_state: bool = False,
        allow_repeat: bool = False,
    ):
        where = f"{type(self).__name__}.{'clip' if own_state else 'update'}"
        leaves, unflatten, names = flatten(grads)
        # The same array given twice (tied weights passed as grads) is clipped and counted once;
        # every position it held gets the one result.
        first: dict[int, int] = {}
        positions = []
        for i, g in enumerate(leaves):
            if g is not None and id(g) not in first:
                first[id(g)] = i
                positions.append(i)
        repeats = [(i, first[id(g)]) for i, g in enumerate(leaves) if g is not None and first[id(g)] != i]
        present = [leaves[i] for i in positions]
        param_leaves = None
        if params is not None:
            flat_params = flatten_like(params, grads)  # dict entries paired by key
            if len(flat_params) != len(leaves):
                raise InvalidArgumentError(
                    f"{where}: params must have the same structure as grads; got {len(flat_params)} "
                    f"parameter(s) for {len(leaves)} gradient(s)"
                )
            param_leaves = [flat_params[i] for i in positions]
        ops = get_ops(present, inplace=inplace, where=where, process_group=self._distributed_group())
        if own_state:
            self._guard_repeat(ops, present, where, allow_repeat)
            self._check_layout([names[i] for i in positions], present, where)
            state = self._own_state(ops, present)
        elif state is None:
            state = self._init(ops, present)
        new, new_state, info = self._update(
            ops, present, state, param_leaves, [names[i] for i in positions]
        )
        info = _finish_info(ops, info)
        if own_state:
            self._commit_state(ops, new_state, where)
            self._remember_grads(ops, present)
        out = list(leaves)
        for position, value in zip(positions, new):
            out[position] = value
        for position, original in repeats:
            out[position] = out[original]
        return unflatten(out), new_state, info

    # -- the state the object keeps (clip / clip_) ------------------------------------------------
    # Backends may offer two optional hooks, looked up with getattr (they are not Ops primitives):
    #   ops.state_store(template) -> store   state kept by the backend (TensorFlow: tf.Variables,
    #       so that `clip` inside tf.function advances the same state on every call instead of
    #       freezing it into the trace); see gradclip.backends.tensorflow.StateStore.
    #   ops.check_state(state, where)        refuse state that must not be kept (JAX tracers).
    def _own_state(self, ops: Ops, grads: list[Any]) -> Any:
        if getattr(ops, "state_store", None) is not None:
            return self._held_state(ops, grads)
        return self._current_state(ops, grads)

    def _held_state(self, ops: Ops, grads: list[Any]) -> Any:
        fresh = self._init(ops, grads)
        held = getattr(self, "_held", None)
        if held is None:
            held = ops.state_store(fresh)
            self._held = held
            if self._has_python_state():
                # State loaded or kept before the store existed: move it into the store now.
                with held.eager_scope():
                    held.load(self._current_state(ops, grads))
        return held.read(fresh)

    def _has_python_state(self) -> bool:
        """Whether a checkpoint is pending or arrays are kept (Chain adds its links')."""
        return self._pending_state is not None or self._state is not None

    def _commit_state(self, ops: Ops, new_state: Any, where: str) -> None:
        held = getattr(self, "_held", None)
        if held is not None and getattr(ops, "state_store", None) is not None:
            held.write(new_state)
            self._state, self._pending_state = held.current(), None
            return
        check = getattr(ops, "check_state", None)
        if check is not None:
            check(new_state, where)
        self._state = new_state

    def _refresh_from_held(self) -> None:
        """Before reading ``self._state`` for a checkpoint: backend-held variables are the truth
        (a traced tf.function may have advanced them, or run again after a reset)."""
        held = getattr(self, "_held", None)
        if held is not None and self._pending_state is None:
            self._state = held.current() if held.is_ready() else None

    def _sync_held(self) -> None:
        """After reset/load_state_dict: make backend-held state match the Python side now."""
        held = getattr(self, "_held", None)
        if held is None:
            return
        if not self._has_python_state():
            held.reset()
            return
        ops = get_ops([], framework=held.framework, where=f"{type(self).__name__}.load_state_dict")
        with held.eager_scope():
            # Rebuilt from the checkpoint alone: an initial state for no gradients fills gaps.
            state = self._current_state(ops, [])
            held.load(state)
            self._state, self._pending_state = held.current(), None

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
            "state": {...} or None}``; ``state`` is None before the first step. The config is
            :func:`plain_config` of :meth:`config` (infinite arguments such as
            ``norm_type=inf`` appear as the strings ``"inf"``/``"-inf"``), so the whole result
            passes strict JSON (``json.dumps(..., allow_nan=False)``).
        """
        self._refresh_from_held()
        if self._pending_state is not None:
            state = dict(self._pending_state)
        elif self._state is None or not self.state_type._fields:
            state = None if self._state is None and self.state_type._fields else {}
        else:
            # Only to_list is needed, which takes any array of the backend: pick the backend by
            # type alone. Binding it to the fields themselves refused NumPy scalars, which is what
            # 0-d NumPy arithmetic (state.count + 1) returns, with a BackendError.
            first = [v for v in self._state if hasattr(v, "shape")][:1]
            ops = get_ops(
                [], framework=framework_of(first[0]) if first else None, where=f"{type(self).__name__}.state_dict"
            )
            state = {name: ops.to_list(getattr(self._state, name)) for name in self.state_type._fields}
        return {
            "format": "gradclip",
            "version": STATE_FORMAT_VERSION,
            "clipper": self.name,
            "config": plain_config(self.config()),
            "state": state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`.

        The data is validated completely before anything changes: on error the clipper keeps
        its current state. Arrays are rebuilt on the device of the next gradients seen.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.

        Raises:
            StateError: Wrong format or version (an ``int``; ``True`` or ``1.0`` are refused),
                unexpected top-level keys, another clipper's state, a different
                configuration, missing or extra fields, or values of the wrong type or out of
                their dtype's range.
        """
        where = f"{type(self).__name__}.load_state_dict"
        check_header(where, state_dict, self.name, self.config())
        state = state_dict.get("state")
        if state is None:
            self._state, self._pending_state, self._last_seen = None, None, None
            self._sync_held()
            return
        if not isinstance(state, Mapping) or set(state) != set(self.state_type._fields):
            raise StateError(
                f"{where}: state fields must be {sorted(self.state_type._fields)}, got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        for name in self.state_type._fields:
            _check_plain(where, name, state[name], self.state_dtypes.get(name))
        self._validate_state(where, state)
        self._last_seen = None
        if not self.state_type._fields:
            self._state, self._pending_state = EmptyState(), None
            return
        self._state, self._pending_state = None, dict(state)
        self._sync_held()

    def _validate_state(self, where: str, state: Mapping[str, Any]) -> None:
        """Hook for methods with extra invariants on their state (lengths, ranges)."""

    def reset(self) -> None:
        """Forget all state; the next step starts as the first did."""
        self._state = None
        self._pending_state = None
        self._last_seen = None
        self._sync_held()

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({arguments})"


def _finish_info(ops: Ops, info: ClipInfo) -> ClipInfo:
    """Let the backend complete the info of a whole call (optional hook, looked up with getattr):
    the torch backend makes ``clipped`` agree across a process group, where per-tensor and
    element-wise methods decide it from each rank's own tensors."""
    hook = getattr(ops, "finish_info", None)
    return info if hook is None else hook(info)


class _SharedGroup:
    """Holds a clipper's process group; copies of the clipper share it (a ProcessGroup cannot be
    deep-copied, and ``ClippedOptimizer`` probes clippers on deep copies)."""

    __slots__ = ("group",)

    def __init__(self, group: Any):
        self.group = group

    def __copy__(self) -> _SharedGroup:
        return self

    def __deepcopy__(self, memo: Any) -> _SharedGroup:
        return self

    def __repr__(self) -> str:
        return f"_SharedGroup({self.group!r})"


#: The top-level keys of every checkpoint, no more and no fewer.
HEADER_KEYS = frozenset({"format", "version", "clipper", "config", "state"})


def plain_config(value: Any) -> Any:
    """A clipper's :meth:`~Clipper.config` as strict-JSON data.

    ``float("inf")`` is a valid argument value (``norm_type=inf``, a one-sided ``Value``
    range) but not valid JSON: ``json.dumps(..., allow_nan=False)`` refuses it and other JSON
    readers choke on the ``Infinity`` token Python writes by default. ±inf become the strings
    ``"inf"``/``"-inf"`` and tuples become lists (what a JSON round trip gives back anyway).
    Checkpoints written before this encoding (with float inf) normalise to the same data, so
    they still load.
    """
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, Mapping):
        return {key: plain_config(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item) for item in value]
    return value


def check_keys(where: str, mapping: Mapping[str, Any], expected: frozenset[str], what: str) -> None:
    """Refuse a checkpoint mapping whose keys are not exactly ``expected``.

    Raises:
        StateError: Naming the unexpected and the missing keys.
    """
    keys = set(mapping)
    if keys != expected:
        unexpected = sorted(map(repr, keys - expected))
        missing = sorted(expected - keys)
        raise StateError(
            f"{where}: {what} has exactly the keys {sorted(expected)}; "
            f"unexpected: {', '.join(unexpected) or 'none'}; missing: {', '.join(missing) or 'none'}"
        )


def check_header(where: str, state_dict: Any, name: str, config: Mapping[str, Any]) -> None:
    """Validate everything of a checkpoint but its ``state``; raise before anything changes.

    Args:
        where: ``"Class.load_state_dict"``, for the message.
        state_dict: What the caller passed.
        name: The loading clipper's registry name.
        config: The loading clipper's :meth:`~Clipper.config`.

    Raises:
        StateError: Not a mapping, unexpected or missing top-level keys, a format other than
            ``"gradclip"``, a version that is not the int :data:`STATE_FORMAT_VERSION` (``True``
            and ``1.0`` compare equal to 1 in Python, and are refused), another clipper's name,
            or another configuration.
    """
    if not isinstance(state_dict, Mapping):
        raise StateError(f"{where}: expected a mapping from state_dict(), got {type(state_dict).__name__}")
    check_keys(where, state_dict, HEADER_KEYS, "a checkpoint")
    version = state_dict["version"]
    if state_dict["format"] != "gradclip" or type(version) is not int or version != STATE_FORMAT_VERSION:
        raise StateError(
            f"{where}: not a gradclip state (format={state_dict['format']!r}, version={version!r} of "
            f"type {type(version).__name__}; expected format 'gradclip' and the int {STATE_FORMAT_VERSION})"
        )
    if state_dict["clipper"] != name:
        raise StateError(f"{where}: state belongs to clipper {state_dict['clipper']!r}, not {name!r}")
    if plain_config(state_dict["config"]) != plain_config(config):
        raise StateError(
            f"{where}: state was saved with config {state_dict['config']!r}, but this "
            f"clipper has {plain_config(config)!r}"
        )


#: The largest finite value of each float dtype a state field may be stored in.
_INT_RANGE = {"int64": (-(2**63), 2**63 - 1), "int32": (-(2**31), 2**31 - 1)}


def _check_plain(where: str, name: str, value: Any, dtype: str | None = None) -> None:
    """Accept only numbers, bools and (nested) lists of them, of the field's declared dtype:
    nothing that could run code, and nothing its array would silently change.

    ``dtype`` is the field's entry in ``state_dtypes``: ``"bool"`` fields take bools only,
    integer fields ints (not bools) within the dtype's range, float fields ints or floats (not
    bools) whose magnitude the dtype holds (1e300 would become inf in fp32). NaN and inf pass
    here; methods that need finite values refuse them in ``_validate_state``.
    """
    if isinstance(value, list):
        for item in value:
            _check_plain(where, name, item, dtype)
        return
    if not isinstance(value, (bool, int, float)):
        raise StateError(
            f"{where}: state field {name!r} must hold numbers or lists of numbers, got {type(value).__name__}"
        )
    if dtype is None:
        return
    if dtype == "bool":
        ok = isinstance(value, bool)
    elif dtype in _INT_RANGE:
        low, high = _INT_RANGE[dtype]
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    else:
        limit = largest_finite(dtype)
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int):  # exact: math.isfinite(10**400) would overflow
            ok = abs(value) <= limit
        else:
            ok = not math.isfinite(value) or abs(value) <= limit
    if not ok:
        raise StateError(
            f"{where}: state field {name!r} is stored as {dtype}, which cannot hold {value!r} "
            f"of type {type(value).__name__}"
        )
