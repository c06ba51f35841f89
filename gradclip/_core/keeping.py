"""The state a clipper object keeps between calls of ``clip``/``clip_`` (the stateful conveniences).

The pure core (``init``/``update``) keeps nothing. The object users hold keeps, in one
:class:`KeptState`:

* the current state, as arrays of the backend last used, or as the plain data of a checkpoint
  not yet placed on a device (``pending``: arrays are rebuilt on the device of the next
  gradients seen);
* on backends that hold state themselves (``ops.holds_state``: TensorFlow, whose ``tf.function``
  must read and write ``tf.Variable``s rather than freeze Python values into its trace), the
  backend's store, which is then the truth;
* the gradients of the last call (weak references and a host-side version token), to refuse a
  second call on the same unchanged gradients: adaptive state advances once per optimizer step;
* the names and shapes of the tensors a per-tensor state was built for, to refuse gradients
  laid out otherwise before they are matched with another tensor's entry.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING, Any

from gradclip._core.checkpoint import state_from_plain, state_to_plain
from gradclip._core.errors import StateError
from gradclip._core.ops import Ops, framework_of, get_ops
from gradclip._core.tracing import compiling

if TYPE_CHECKING:
    from gradclip._core.clipper import Clipper

__all__ = ["KeptState", "home_of"]


def home_of(state: Any) -> tuple[str | None, Any]:
    """The framework and device of a state's arrays, from their types alone (no device read):
    what a call with no gradient at all runs on. ``(None, None)`` when it holds no array."""
    pending = [state]
    while pending:
        value = pending.pop()
        if isinstance(value, (tuple, list)):  # a NamedTuple, or the states of wrapped clippers
            pending.extend(reversed(value))
        elif value is not None and not isinstance(value, (bool, int, float)):
            framework = framework_of(value)
            return framework, (getattr(value, "device", None) if framework == "torch" else None)
    return None, None


class KeptState:
    """What one clipper object carries from call to call (see the module documentation)."""

    __slots__ = ("state", "pending", "held", "last_seen", "layout")

    def __init__(self) -> None:
        self.state: Any = None  # a state NamedTuple of arrays, or None
        self.pending: dict[str, Any] | None = None  # validated plain state from a checkpoint
        self.held: Any = None  # the backend's store (TensorFlow), once created
        self.last_seen: tuple[list[Any], Any] | None = None  # weak refs and version token
        self.layout: tuple | None = None  # (name, shape) per tensor of a per-tensor state

    def __deepcopy__(self, memo: Any) -> KeptState:
        # A copy keeps its own copy of the state; a backend's store (tf.Variables) and the
        # memory of the last call belong to the original.
        twin = KeptState()
        twin.state = copy.deepcopy(self.state, memo)
        twin.pending = copy.deepcopy(self.pending, memo)
        twin.layout = self.layout
        return twin

    def __getstate__(self) -> dict[str, Any]:
        # Pickled (torch.save of an object holding a clipper, multiprocessing, Ray) as deep-copied:
        # the state and a pending checkpoint travel; the memory of the last call (weak
        # references, which cannot be pickled) stays behind, as it would not mean anything in
        # another process. A TensorFlow store's variables do not pickle: its checkpoint does.
        if self.held is not None:
            raise TypeError(
                "a clipper that keeps its state in TensorFlow variables cannot be pickled; save "
                "clipper.state_dict() and load it into a new clipper instead"
            )
        return {"state": self.state, "pending": self.pending, "layout": self.layout}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        self.state, self.pending, self.layout = saved["state"], saved["pending"], saved["layout"]
        self.held = self.last_seen = None

    def has_state(self) -> bool:
        return self.state is not None or self.pending is not None or self.held is not None

    # -- the current state ------------------------------------------------------------------
    def current(self, clipper: Clipper, ops: Ops, grads: list[Any]) -> Any:
        """The state for this call: the backend's store's, else the kept arrays (from a pending
        checkpoint, or initial, as needed)."""
        if ops.holds_state:
            return self._from_store(clipper, ops, grads)
        return self._arrays(clipper, ops, grads)

    def home(self) -> tuple[str | None, Any]:
        """The framework and device of the state kept (see :func:`home_of`)."""
        if self.held is not None:
            return self.held.framework, None
        return home_of(self.state)

    def check_home(self, ops: Ops, where: str) -> None:
        """Refuse gradients of another framework than the state kept from earlier calls.

        A torch state fed to NumPy math (or a TensorFlow one to JAX's) fails deep inside a
        clipper's arithmetic with an error about array types; this names the cause first, before
        anything changes. A checkpoint waiting to be placed has no framework yet: it is built
        for whatever gradients come next (so a new clipper that loads this one's checkpoint takes
        its statistics to another framework).

        Raises:
            StateError: The kept state's framework is not the gradients'.
        """
        if self.pending is not None:
            return
        framework, _ = self.home()
        if framework is None or framework == ops.name:
            return
        raise StateError(
            f"{where}: this clipper keeps its state in {framework} arrays from its earlier calls, but "
            f"these gradients are {ops.name} arrays; a clipper's state lives in one framework. Use one "
            "clipper per framework; to carry the statistics over, load this one's checkpoint into a new "
            "clipper: new.load_state_dict(clipper.state_dict()). Nothing was changed."
        )

    def peek(self, clipper: Clipper, ops: Ops) -> Any:
        """The current state, changing nothing (no checkpoint placed, no store created): for a
        call that has no gradient to clip. None before the first step."""
        if self.pending is not None:
            return state_from_plain(clipper, ops, self.pending, [])
        # With a store (TensorFlow), ``state`` is its variables (see ``commit``), None after a reset.
        return self.state

    def _arrays(self, clipper: Clipper, ops: Ops, grads: list[Any]) -> Any:
        if not clipper.state_type._fields:
            # Nothing to keep. (Kept, the empty state would flip ``self.state`` from None on the
            # first call, a change torch.compile's guards see: a second compile for nothing.)
            return clipper.init_state(ops, grads)
        if self.pending is not None:
            self.state = state_from_plain(clipper, ops, self.pending, grads)
            self.pending = None
        if self.state is None:
            self.state = clipper.init_state(ops, grads)
        return self.state

    def _from_store(self, clipper: Clipper, ops: Ops, grads: list[Any]) -> Any:
        fresh = clipper.init_state(ops, grads)
        if self.held is None:
            self.held = ops.state_store(fresh)
            if self.state is not None or self.pending is not None:
                # State loaded or kept before the store existed goes into the store now.
                with self.held.eager_scope():
                    self.held.load(self._arrays(clipper, ops, grads))
        return self.held.read(fresh)

    def commit(self, ops: Ops, new_state: Any, where: str) -> None:
        """Keep ``new_state`` as the current state (in the backend's store where it has one)."""
        if self.held is not None and ops.holds_state:
            self.held.write(new_state)
            self.state, self.pending = self.held.current(), None
            return
        ops.check_state(new_state, where)
        self.state = new_state

    def plain(self, clipper: Clipper) -> dict[str, Any] | None:
        """The current state as plain data (None before the first step)."""
        if self.held is not None and self.pending is None:
            # A traced tf.function may have advanced the variables (or run after a reset).
            self.state = self.held.current() if self.held.is_ready() else None
        if self.pending is not None:
            return dict(self.pending)
        if not clipper.state_type._fields:
            return {}
        return state_to_plain(clipper, self.state)

    def load(self, clipper: Clipper, plain: dict[str, Any] | None) -> None:
        """Replace the state by validated plain data (None: no state); forget the last call."""
        self.state, self.pending = None, (None if plain is None else dict(plain))
        self.last_seen, self.layout = None, None
        self._sync_store(clipper)

    def reset(self, clipper: Clipper) -> None:
        self.state = self.pending = self.last_seen = self.layout = None
        self._sync_store(clipper)

    def _sync_store(self, clipper: Clipper) -> None:
        """After a load or reset: make the backend's store match the Python side now."""
        if self.held is None:
            return
        if self.pending is None and self.state is None:
            self.held.reset()
            return
        ops = get_ops([], framework=self.held.framework, where=f"{type(clipper).__name__}.load_state_dict")
        with self.held.eager_scope():
            # Rebuilt from the checkpoint alone: an initial state for no gradients fills gaps.
            self.held.load(self._arrays(clipper, ops, []))
            self.state, self.pending = self.held.current(), None

    # -- one update per optimizer step ----------------------------------------------------------
    def guard_repeat(self, clipper: Clipper, ops: Ops, grads: list[Any], where: str) -> None:
        """Refuse a stateful clipper called again on the very gradients of its last call,
        unchanged since (host-side counters only; never a device value).

        Raises:
            StateError: Before anything changes.
        """
        if self.last_seen is None or not grads or not clipper.keeps_state:
            return
        refs, token = self.last_seen
        # Identity first (cheap): new gradient tensors mean a new step, whatever their values.
        if len(refs) != len(grads) or any(ref() is not g for ref, g in zip(refs, grads)):
            return
        if token is None or ops.version_token(grads) != token:
            return
        raise StateError(
            f"{where}: called again on the same {len(grads)} gradient array(s), unchanged since "
            f"the previous call; {type(clipper).__name__} keeps adaptive state, which must advance "
            "once per optimizer step (a second call would count this step's gradient twice). "
            "Compute new gradients (backward()) before clipping again, or pass "
            "allow_repeat=True if the repeat is deliberate. Nothing was changed."
        )

    def remember(self, clipper: Clipper, ops: Ops, grads: list[Any]) -> None:
        """Remember the gradients as they are now, after this call's own in-place writes
        (not while dynamo traces: their version counters are the fake tensors')."""
        if not grads or not clipper.keeps_state or compiling():
            self.last_seen = None
            return
        try:
            refs = [weakref.ref(g) for g in grads]
        except TypeError:  # arrays that cannot be weakly referenced: no detection
            self.last_seen = None
            return
        self.last_seen = (refs, ops.version_token(grads))

    def check_layout(self, clipper: Clipper, names: list[str], grads: list[Any], where: str) -> None:
        """For a clipper whose state holds one entry per tensor: refuse gradients laid out
        unlike those the state was built for, before anything changes.

        Raises:
            StateError: Naming the first position whose tensor differs.
        """
        if not clipper.per_tensor_state:
            return
        layout = tuple(zip(names, (tuple(g.shape) for g in grads)))
        known = self.layout
        if known is not None and self.has_state() and layout != known:
            changed = next(
                (i for i, (a, b) in enumerate(zip(layout, known)) if a != b), min(len(layout), len(known))
            )
            seen = f"{known[changed][0]} {list(known[changed][1])}" if changed < len(known) else "nothing"
            given = f"{layout[changed][0]} {list(layout[changed][1])}" if changed < len(layout) else "nothing"
            owner = next((c for c in _tree(clipper) if c.per_tensor_state and not c.children()), clipper)
            raise StateError(
                f"{where}: {type(owner).__name__} keeps one threshold per tensor, built for {len(known)} "
                f"tensor(s); position {changed} held {seen} and now holds {given}. A parameter without a "
                "gradient this step shifts the others onto its neighbours' thresholds: give it a "
                "zero gradient, or reset() the clipper. Nothing was changed."
            )
        self.layout = layout


def _tree(clipper: Clipper):
    yield clipper
    for child in clipper.children():
        yield from _tree(child)
