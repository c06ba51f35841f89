"""The base class every clipping method derives from, and its contract: measure → decide → apply.

A clipper declares, as class attributes, what it needs and what it can do:

* ``coefficient`` — the kind of coefficient it decides (:class:`~gradclip._core.contract.Coefficient`:
  one scalar, one per tensor, one per unit, element-wise, or none), which fixes how it is applied;
* ``needs_params`` — whether ``decide`` needs the parameters (AGC);
* ``state_type`` / ``state_dtypes`` — its state (a NamedTuple of arrays) and each field's dtype;
  ``keeps_state`` follows from them;
* ``per_tensor_state`` — whether the state holds one entry per tensor (then the tensors' layout
  must not change between calls);
* ``may_skip`` — whether it can ever ask for the optimizer step to be skipped;
* ``norm_type`` and ``nonfinite`` — the order of the norms it measures and its non-finite policy.

and implements the three steps (DESIGN.md, "The clipper contract"):

1. :meth:`Clipper.measure` — the statistics, read once by the backend and reduced across
   processes there (the default measures per-tensor ``norm_type`` norms under the policy);
2. :meth:`Clipper.decide` — pure device math from the measurement, the state and optional
   :class:`~gradclip._core.contract.Signals` to a :class:`~gradclip._core.contract.Decision`;
3. :meth:`Clipper.apply` — generic per coefficient kind (element-wise methods write their own).

Everything else is generic and lives here or beside it, written once: settings (the constructor's
parameters, kept under the same names) give ``config``, ``repr`` and
:func:`gradclip._core.registry.from_config`; the pure API (``init``/``update``); the stateful
conveniences (``clip``, ``clip_``, ``fold_``) with their state kept by
:class:`~gradclip._core.keeping.KeptState`; checkpoints (:mod:`gradclip._core.checkpoint`). A new
clipper written in one module gets all of it, and the optax, Keras and fold integrations too.

Composite clippers (``Chain``, ``Subset``) list what they wrap in :meth:`Clipper.children` and
compose their children's whole steps in :meth:`Clipper.run`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

from gradclip._core.checkpoint import (
    CHILD,
    CHILDREN,
    STATE_FORMAT_VERSION,
    check_header,
    check_keys,
    checkpoint,
    plain_config,
    state_from_plain,
    state_to_plain,
    validate_checkpoint,
)
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured, Signals, signals_from
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.keeping import KeptState
from gradclip._core.measure import measurement
from gradclip._core.ops import Ops, get_ops
from gradclip._core.tree import collect_gradients, flatten, flatten_like
from gradclip._core.types import ClipInfo, EmptyState

__all__ = ["Clipper", "Folded", "STATE_FORMAT_VERSION", "make_info", "plain_config", "check_header", "check_keys"]


def make_info(ops: Ops, norm, threshold, coef, clipped, finite, skip=None) -> ClipInfo:
    """Assemble a :class:`ClipInfo` from device scalars (``skip`` defaults to False)."""
    if skip is None:
        skip = ops.scalar(False, "bool")
    return ClipInfo(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite, skip=skip)


class Folded(NamedTuple):
    """What :meth:`Clipper.fold_` decided without writing a gradient."""

    coef: Any  # the one scalar coefficient (device, accumulation dtype)
    info: ClipInfo
    measured: Measured  # the measurement the decision came from (AMP scale divided out)


_SETTING_NAMES: dict[type, tuple[str, ...]] = {}


def setting_names(cls: type) -> tuple[str, ...]:
    """The settings of a clipper class: its constructor's parameters but ``process_group``
    (cached per class), unless the class lists them in ``settings``."""
    declared = cls.__dict__.get("settings")
    if declared is not None:
        return tuple(declared)
    names = _SETTING_NAMES.get(cls)
    if names is None:
        parameters = inspect.signature(cls.__init__).parameters.values()
        names = tuple(
            p.name
            for p in parameters
            if p.name not in ("self", "process_group") and p.kind is not inspect.Parameter.VAR_KEYWORD
        )
        _SETTING_NAMES[cls] = names
    return names


def _plain_setting(value: Any) -> Any:
    if isinstance(value, Clipper):
        return {"clipper": value.name, "config": value.config()}
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Clipper) for v in value):
        return [_plain_setting(v) for v in value]
    return value


class Clipper:
    """Base class of every clipping method (see the module documentation for the contract).

    Subclasses validate their constructor arguments and keep each under its parameter's name;
    they implement :meth:`decide` (and :meth:`init_state` when they keep state), and
    :meth:`measure` or :meth:`apply` only when the defaults do not fit.
    """

    #: Registry name, set by :func:`gradclip._core.registry.register`.
    name: ClassVar[str] = "clipper"
    #: Arguments :func:`gradclip.get` supplies when the caller gives none.
    defaults: ClassVar[dict[str, Any]] = {}
    #: The settings, when they are not exactly the constructor's parameters (``Value``, whose
    #: ``clip_value`` is another spelling of its range).
    settings: ClassVar[tuple[str, ...] | None] = None
    #: State NamedTuple type and the dtype of each of its fields (see gradclip._core.checkpoint).
    state_type: ClassVar[type] = EmptyState
    state_dtypes: ClassVar[dict[str, str]] = {}
    #: How the decided coefficient is applied (a :class:`Coefficient` kind).
    coefficient: ClassVar[str] = Coefficient.SCALAR
    #: Whether decide() needs the parameters (AGC).
    needs_params: ClassVar[bool] = False
    #: Whether the state holds one entry per tensor (its layout must not change).
    per_tensor_state: ClassVar[bool] = False
    #: The order of the norms the default measure() takes, and the non-finite policy.
    norm_type: float = 2.0
    nonfinite: str = "propagate"

    def __init__(self) -> None:
        self._kept = KeptState()

    @classmethod
    def with_defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The arguments :func:`gradclip.get` passes: ``defaults`` completed by ``given``.

        Methods whose arguments come in alternative forms (``Value``) override this so a default
        never conflicts with what the caller chose.
        """
        return {**cls.defaults, **given}

    # -- capabilities ---------------------------------------------------------------------------
    def children(self) -> tuple[Clipper, ...]:
        """The clippers this one wraps, in order (``Chain`` links, ``Subset``'s clipper)."""
        return ()

    @property
    def keeps_state(self) -> bool:
        """Whether a call advances state (then a repeated call on the same gradients is refused)."""
        own = any(self.state_dtypes.get(f) not in (CHILD, CHILDREN) for f in self.state_type._fields)
        return own or any(child.keeps_state for child in self.children())

    @property
    def may_skip(self) -> bool:
        """Whether this clipper can ever set ``info.skip`` (from its type and settings)."""
        return self.nonfinite == "skip" or any(child.may_skip for child in self.children())

    @property
    def one_coefficient(self) -> bool:
        """Whether every decision is one scalar applied to all gradients, measured without
        rewriting them: then :meth:`fold_` can hand it to a fused optimizer's step."""
        return self.coefficient in (Coefficient.SCALAR, Coefficient.NONE) and self.nonfinite != "zero"

    def cannot_fold_reason(self) -> str | None:
        """Why this clipper's decision cannot be folded into an optimizer step (None: it can)."""
        if self.one_coefficient:
            return None
        if self.nonfinite == "zero":
            return f"{self!r} uses nonfinite='zero', which must rewrite gradient elements"
        return (
            f"{self!r} works per tensor or per element (coefficient kind {self.coefficient!r}), so no "
            "single coefficient can be passed to the optimizer; use fold=None or False"
        )

    # -- settings -------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings as plain data (wrapped clippers as ``{"clipper": name, "config": ...}``)."""
        return {name: _plain_setting(getattr(self, name)) for name in setting_names(type(self))}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({arguments})"

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

    def distributed_group(self) -> Any:
        """The process group for a call: this clipper's, or the one its children carry.

        Raises:
            InvalidArgumentError: Two different groups among them.
        """
        found = self.process_group
        for child in self.children():
            group = child.distributed_group()
            if group is None or group is found:
                continue
            if found is not None:
                raise InvalidArgumentError(
                    f"{type(self).__name__}: its clippers carry different process groups "
                    f"({found!r} and {group!r}); give them all the same process_group"
                )
            found = group
        return found

    # -- the contract ---------------------------------------------------------------------------
    def init_state(self, ops: Ops, grads: list[Any]) -> Any:
        """The initial state for these gradients (stateless methods: ``EmptyState()``)."""
        del ops, grads
        return EmptyState()

    def measure(self, ops: Ops, grads: list[Any], names: list[str], params: list[Any] | None) -> Measured:
        """Step 1: the statistics :meth:`decide` needs. The default applies the non-finite policy
        and measures per-tensor ``norm_type`` norms and their global norm (reduced across
        processes by the backend).

        Raises:
            NonFiniteError: Under ``nonfinite="raise"``, when a value is not finite.
        """
        found = measurement(ops, grads, self.norm_type, self.nonfinite, names, type(self).__name__)
        return found._replace(params=params)

    def decide(self, ops: Ops, measured: Measured, state: Any, signals: Signals = NO_SIGNALS) -> Decision:
        """Step 2: the coefficient, the next state and the info, from the measurement alone.

        Pure device math: no Python branch on a device value, nothing read back (DESIGN rule 1).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement decide()")

    def apply(self, ops: Ops, grads: list[Any], decision: Decision) -> tuple[list[Any], ClipInfo]:
        """Step 3: write the decision into ``grads`` (in place when ``ops.inplace``).

        Generic for every coefficient kind but element-wise, whose clippers override it.

        Returns:
            ``(grads, info)``; element-wise methods complete the info from what they wrote.
        """
        kind = self.coefficient
        if kind == Coefficient.SCALAR:
            return ops.scale(grads, decision.coef), decision.info
        if kind == Coefficient.PER_TENSOR:
            return ops.scale_each(grads, decision.coef), decision.info
        if kind == Coefficient.PER_UNIT:
            return ops.scale_units(grads, decision.coef), decision.info
        if kind == Coefficient.NONE:
            return grads, decision.info
        raise NotImplementedError(f"{type(self).__name__}: element-wise clippers implement apply()")

    def validate_state(self, where: str, state: Mapping[str, Any]) -> None:
        """Extra invariants of this method's plain state (lengths, ranges), checked on load."""

    def check_fits(self, state: Any, grads: list[Any]) -> None:
        """Refuse, before anything is measured or written, gradients the state was not built
        for (host-side shapes only). Per-tensor state (AdaGC) checks the tensor count.

        Raises:
            StateError: The state does not fit these gradients.
        """

    def run(
        self,
        ops: Ops,
        grads: list[Any],
        state: Any,
        params: list[Any] | None = None,
        names: list[str] | None = None,
        signals: Signals = NO_SIGNALS,
    ) -> tuple[list[Any], Any, ClipInfo]:
        """One step on a flat list of gradients: measure, decide, apply.

        The pure core that every entry point calls (framework adapters too).

        Returns:
            ``(grads, new_state, info)``.
        """
        if names is None:
            names = [f"#{i}" for i in range(len(grads))]
        self.check_fits(state, grads)
        measured = self.measure(ops, grads, names, params)
        decision = self.decide(ops, measured, state, signals)
        grads, info = self.apply(ops, measured.grads, decision)
        return grads, decision.state, info

    # -- the pure interface ---------------------------------------------------------------------
    def init(self, grads: Any) -> Any:
        """Return the initial state for gradients shaped like ``grads``.

        Args:
            grads: An array or a list/tuple/dict of arrays (None entries are ignored; the same
                array twice counts once, as in :meth:`update`).

        Returns:
            A NamedTuple of arrays on the gradients' device.
        """
        leaves, _, _ = flatten(grads)
        present = list({id(g): g for g in leaves if g is not None}.values())
        return self.init_state(get_ops(present, where=f"{type(self).__name__}.init"), present)

    def update(self, grads: Any, state: Any, params: Any = None, **signals: Any):
        """Clip ``grads`` without modifying them and return the new state.

        Args:
            grads: An array or a list/tuple/dict of arrays; ``None`` entries are passed through.
            state: The state from :meth:`init` or a previous :meth:`update`.
            params: The parameters, in the same structure, for methods that need them (AGC).
            **signals: Optional ``loss=``, ``step=``, ``sample_norms=``, ``optimizer_state=``
                (see :class:`~gradclip._core.contract.Signals`).

        Returns:
            ``(clipped_grads, new_state, info)``: clipped gradients in the input's structure, the
            next state, and a :class:`~gradclip.ClipInfo`.
        """
        return self._run_tree(grads, state, params, signals, inplace=False)

    # -- the stateful conveniences ------------------------------------------------------------
    def clip(self, grads: Any, params: Any = None, *, allow_repeat: bool = False, **signals: Any):
        """Clip gradients functionally (new arrays), advancing this clipper's own state.

        Args:
            grads: An array or a list/tuple/dict of arrays (torch, NumPy, ...).
            params: The matching parameters, for methods that need them.
            allow_repeat: Let a stateful clipper advance again on the very gradients of its
                previous call (see :meth:`clip_`).
            **signals: As for :meth:`update`.

        Returns:
            ``(clipped_grads, info)``.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        clipped, _, info = self._run_tree(
            grads, None, params, signals, inplace=False, own_state=True, allow_repeat=allow_repeat
        )
        return clipped, info

    def clip_(self, parameters: Any, *, allow_repeat: bool = False, **signals: Any) -> ClipInfo:
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
            **signals: Optional ``loss=``, ``step=``, ``sample_norms=``, ``optimizer_state=``.

        Returns:
            A :class:`~gradclip.ClipInfo` whose fields stay on the gradients' device.

        Raises:
            StateError: A stateful clipper called again on the same, unchanged gradients.
        """
        where = f"{type(self).__name__}.clip_"
        collected, ops, params = self._collect(parameters, where, inplace=True, stacklevel=3)
        signal_values = signals_from(where, signals, ops.name)
        self._before_own_step(ops, collected, where, allow_repeat)
        with ops.context():
            state = self._kept.current(self, ops, collected.grads)
            _, new_state, info = self.run(ops, collected.grads, state, params, collected.names, signal_values)
            info = ops.finish_info(info)
            self._kept.commit(ops, new_state, where)
        self._kept.remember(self, ops, collected.grads)
        return info

    def fold_(
        self, parameters: Any, *, divide_by: Any = None, allow_repeat: bool = False, where: str | None = None, **signals: Any
    ) -> Folded:
        """Measure and decide one step without writing any gradient, advancing the state as
        :meth:`clip_` would: the coefficient for a fused optimizer's step.

        Args:
            parameters: As for :meth:`clip_`.
            divide_by: A positive device scalar the gradients are still multiplied by (an AMP
                loss scale): the measurement is divided by it, no gradient is read twice.
            allow_repeat: As for :meth:`clip_`.
            where: The public entry point, for messages (default ``"Class.fold_"``).
            **signals: As for :meth:`clip_`.

        Returns:
            A :class:`Folded`: the scalar coefficient, the info and the measurement.

        Raises:
            InvalidArgumentError: The clipper's decisions are not one scalar (:attr:`one_coefficient`).
            StateError: As for :meth:`clip_`.
        """
        where = where or f"{type(self).__name__}.fold_"
        reason = self.cannot_fold_reason()
        if reason is not None:
            raise InvalidArgumentError(f"{where}: the clip cannot be folded: {reason}")
        collected, ops, params = self._collect(parameters, where, inplace=False, stacklevel=4)
        signal_values = signals_from(where, signals, ops.name)
        self._before_own_step(ops, collected, where, allow_repeat)
        with ops.context():
            state = self._kept.current(self, ops, collected.grads)
            self.check_fits(state, collected.grads)
            measured = self.measure(ops, collected.grads, collected.names, params)
            if divide_by is not None:
                measured = measured.scaled(ops, 1.0 / divide_by)
            decision = self.decide(ops, measured, state, signal_values)
            info = ops.finish_info(decision.info)
            self._kept.commit(ops, decision.state, where)
        self._kept.remember(self, ops, collected.grads)
        return Folded(decision.coef, info, measured)

    def as_optax(self):
        """This clipper as an ``optax.GradientTransformation`` (JAX).

        Its state is a pytree (the clipper's state plus the last :class:`~gradclip.ClipInfo`),
        so it works inside ``jax.jit`` and ``optax.chain``; read the info for logging with
        :func:`gradclip.optax.clip_info`. See :func:`gradclip.optax.as_optax`.

        Raises:
            ImportError: optax or jax is not installed.
        """
        # The one import from a higher layer (an adapter) in the core: a convenience method on
        # the core type, importing the adapter (and jax) only when called.
        from gradclip.optax import as_optax

        return as_optax(self)

    # -- the machinery of the entry points ----------------------------------------------------------
    def _collect(self, parameters: Any, where: str, *, inplace: bool, stacklevel: int):
        collected = collect_gradients(parameters, where)
        group = self.distributed_group()
        # With a process group, ranks without gradients are expected (pipeline stages, uneven
        # partitions): they still join the reduction, silently.
        if not collected.grads and group is None:
            warnings.warn(
                f"{where}: found no gradients among {collected.seen} parameter(s); was it called "
                "before backward()? Nothing was clipped.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )
        # With no gradient at all, the parameters seen still fix the backend (a torch module
        # before backward() gets a torch ClipInfo); collected.params only holds those with one.
        framework = collected.framework if not collected.grads else None
        ops = get_ops(collected.grads, inplace=inplace, framework=framework, where=where, process_group=group)
        params = collected.params if self.needs_params else None
        return collected, ops, params

    def _before_own_step(self, ops: Ops, collected: Any, where: str, allow_repeat: bool) -> None:
        if not allow_repeat:
            self._kept.guard_repeat(self, ops, collected.grads, where)
        self._kept.check_layout(self, collected.names, collected.grads, where)

    def _run_tree(self, grads, state, params, signals, *, inplace: bool, own_state: bool = False, allow_repeat: bool = False):
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
        present_names = [names[i] for i in positions]
        param_leaves = None
        if params is not None:
            flat_params = flatten_like(params, grads)  # dict entries paired by key
            if len(flat_params) != len(leaves):
                raise InvalidArgumentError(
                    f"{where}: params must have the same structure as grads; got {len(flat_params)} "
                    f"parameter(s) for {len(leaves)} gradient(s)"
                )
            param_leaves = [flat_params[i] for i in positions]
        ops = get_ops(present, inplace=inplace, where=where, process_group=self.distributed_group())
        signal_values = signals_from(where, signals, ops.name)
        if own_state:
            if not allow_repeat:
                self._kept.guard_repeat(self, ops, present, where)
            self._kept.check_layout(self, present_names, present, where)
            state = self._kept.current(self, ops, present)
        elif state is None:
            state = self.init_state(ops, present)
        new, new_state, info = self.run(ops, present, state, param_leaves, present_names, signal_values)
        info = ops.finish_info(info)
        if own_state:
            self._kept.commit(ops, new_state, where)
            self._kept.remember(self, ops, present)
        out = list(leaves)
        for position, value in zip(positions, new):
            out[position] = value
        for position, original in repeats:
            out[position] = out[original]
        return unflatten(out), new_state, info

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self, state: Any = None) -> dict[str, Any]:
        """Return the clipper's configuration and state as plain, JSON-serialisable data.

        The result holds only dicts, lists, strings, numbers, bools and None, so it can be saved
        with ``json.dump`` or ``torch.save`` and read back with ``torch.load(weights_only=True)``.

        Args:
            state: A state from the pure API (:meth:`init`/:meth:`update`, an optax or Keras
                adapter) to save instead of the one this object keeps.

        Returns:
            ``{"format": "gradclip", "version": 1, "clipper": name, "config": {...},
            "state": {...} or None}``; ``state`` is None before the first step. The config is
            :func:`plain_config` of :meth:`config` (infinite arguments such as
            ``norm_type=inf`` appear as the strings ``"inf"``/``"-inf"``), so the whole result
            passes strict JSON (``json.dumps(..., allow_nan=False)``).
        """
        plain = self._kept.plain(self) if state is None else state_to_plain(self, state)
        return checkpoint(self, plain)

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
        validate_checkpoint(self, state_dict)
        self._kept.load(self, state_dict["state"])

    def state_from_dict(self, state_dict: Mapping[str, Any], like: Any = None) -> Any:
        """Validate a checkpoint and return its state for the pure API, changing nothing here.

        Args:
            state_dict: A mapping as returned by :meth:`state_dict`.
            like: Gradients (any structure) fixing the backend and device of the arrays and the
                initial state of parts saved before their first step; None gives NumPy arrays.

        Returns:
            A state NamedTuple (:meth:`init` for ``like`` when the checkpoint holds none).

        Raises:
            StateError: As for :meth:`load_state_dict`.
        """
        validate_checkpoint(self, state_dict)
        leaves = [] if like is None else [g for g in flatten(like)[0] if g is not None]
        ops = get_ops(leaves, where=f"{type(self).__name__}.state_from_dict")
        plain = state_dict["state"]
        return self.init_state(ops, leaves) if plain is None else state_from_plain(self, ops, plain, leaves)

    def reset(self) -> None:
        """Forget all state; the next step starts as the first did."""
        self._kept.reset(self)


class _SharedGroup:
    """Holds a clipper's process group; copies of the clipper share it (a ProcessGroup cannot be
    deep-copied)."""

    __slots__ = ("group",)

    def __init__(self, group: Any):
        self.group = group

    def __copy__(self) -> _SharedGroup:
        return self

    def __deepcopy__(self, memo: Any) -> _SharedGroup:
        return self

    def __repr__(self) -> str:
        return f"_SharedGroup({self.group!r})"
