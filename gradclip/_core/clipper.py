"""The base class every clipping method derives from, and its contract: measure → decide → apply.

A clipper declares, as class attributes, what it needs and what it can do:

* ``coefficient`` — the kind of coefficient it decides (:class:`~gradclip._core.contract.Coefficient`:
  one scalar, one per tensor, one per unit, element-wise, or none), which fixes how it is applied;
* ``needs_params`` — whether ``decide`` needs the parameters (AGC);
* ``needs_optimizer_state`` — whether ``decide`` reads the ``optimizer_state`` signal (SPAM's
  :class:`~gradclip.SpikeAware`): then ``ClippedOptimizer`` passes the optimizer's moments;
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
from collections.abc import Mapping
from typing import Any, ClassVar

from gradclip._core.calls import CallsMixin, Folded
from gradclip._core.checkpoint import (
    CHILD,
    CHILDREN,
    STATE_FORMAT_VERSION,
    check_header,
    check_keys,
    plain_config,
)
from gradclip._core.contract import (
    NO_SIGNALS,
    Coefficient,
    Decision,
    Measured,
    Signals,
)
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.keeping import KeptState
from gradclip._core.measure import measurement
from gradclip._core.ops import Ops
from gradclip._core.types import ClipInfo, EmptyState

__all__ = ["Clipper", "Folded", "STATE_FORMAT_VERSION", "make_info", "plain_config", "check_header", "check_keys"]


def make_info(ops: Ops, norm, threshold, coef, clipped, finite, skip=None) -> ClipInfo:
    """Assemble a :class:`ClipInfo` from device scalars (``skip`` defaults to False)."""
    if skip is None:
        skip = ops.scalar(False, "bool")
    return ClipInfo(norm=norm, threshold=threshold, coef=coef, clipped=clipped, finite=finite, skip=skip)


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


class Clipper(CallsMixin):
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
    #: Whether decide() reads the optimizer_state signal (SPAM), which ClippedOptimizer then passes.
    needs_optimizer_state: ClassVar[bool] = False
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
        """Whether a call advances state (then a repeated call on the same gradients is refused).
        Fixed at construction (state type and children), so computed once (kept in the instance
        dict without functools.cached_property, whose lock dynamo cannot trace)."""
        known = self.__dict__.get("keeps_state")
        if known is None:
            own = any(self.state_dtypes.get(f) not in (CHILD, CHILDREN) for f in self.state_type._fields)
            known = own or any(child.keeps_state for child in self.children())
            self.__dict__["keeps_state"] = known
        return known

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
        """The constructor's settings, by name (wrapped clippers as ``{"clipper": name, "config":
        ...}``), each as given: a schedule stays a schedule object and ``inf`` a float, so
        ``type(self)(**config)`` rebuilds the clipper. For strict JSON use
        :func:`gradclip._core.checkpoint.plain_config` of it, what :meth:`state_dict` writes."""
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
        return measurement(ops, grads, self.norm_type, self.nonfinite, names, type(self).__name__, params)

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
