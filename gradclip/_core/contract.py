"""The values that pass between the three steps of every clipper: measure → decide → apply.

1. **measure** (:meth:`~gradclip.Clipper.measure`) reads the gradients once and returns a
   :class:`Measured`: per-tensor norms of the order the clipper declares, their global norm
   reduced across processes by the backend, the finiteness flags, and any statistic of the
   clipper's own (``extra``: AGC's unit norms, the extrema an element-wise method needs).
2. **decide** (:meth:`~gradclip.Clipper.decide`) is pure device math from that measurement, the
   clipper's state and optional :class:`Signals` to a :class:`Decision`: the coefficient, the
   next state and the :class:`~gradclip.ClipInfo`. Every adaptive rule lives here.
3. **apply** (:meth:`~gradclip.Clipper.apply`) writes the decision into the gradients, generically
   for each :class:`Coefficient` kind; only element-wise methods write their own.

Integrations compose these steps rather than a clipper's private methods: folding into a fused
optimizer is "measure, decide, hand the scalar to the step"; a one-coefficient clipper never
needs ``apply`` there.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.errors import InvalidArgumentError
from gradclip._core.ops import Ops, framework_of
from gradclip._core.types import ClipInfo

__all__ = ["Coefficient", "Measured", "Decision", "Signals", "NO_SIGNALS", "signals_from"]


class Coefficient:
    """The kinds of coefficient a clipper's :meth:`~gradclip.Clipper.decide` produces, which
    fix how :meth:`~gradclip.Clipper.apply` writes it (class attribute ``coefficient``)."""

    #: One scalar for every gradient (``ops.scale``): the clip can fold into a fused optimizer.
    SCALAR = "scalar"
    #: A vector, one entry per tensor (``ops.scale_each``).
    PER_TENSOR = "per_tensor"
    #: One broadcastable array per tensor, one entry per unit (``ops.scale_units``; AGC).
    PER_UNIT = "per_unit"
    #: Element-wise rules (clamp, zero, sign, random subsets): the clipper's own ``apply``.
    ELEMENTWISE = "elementwise"
    #: The gradients are never changed (spike skipping, counting): ``apply`` returns them as is.
    NONE = "none"

    ALL = (SCALAR, PER_TENSOR, PER_UNIT, ELEMENTWISE, NONE)


class Measured(NamedTuple):
    """What :meth:`~gradclip.Clipper.measure` found (device values; nothing is read back).

    ``norms`` and ``norm`` are ``None`` for a clipper that measures no norm. ``factor`` is the
    product of every scale :meth:`scaled` applied (None: none): a later measurement of the same
    gradients (another link of a chain, another norm order) is scaled the same way.
    """

    grads: list[Any]  # the gradients to clip: under nonfinite="zero", with non-finite elements zeroed
    norms: Any  # per-tensor norms of ``grads`` of order ``norm_type``
    norm: Any  # their global norm, reduced over the processes that share the gradients
    finite: Any  # ``norm`` is finite: what the algorithm clips and learns from
    given_finite: Any  # every element as given was finite (and its norm did not overflow): info.finite
    norm_type: float = 2.0
    names: tuple[str, ...] | list[str] = ()
    params: list[Any] | None = None
    extra: Any = None  # a clipper's own statistic (extrema, unit norms)
    factor: Any = None

    def scaled(self, ops: Ops, factor: Any) -> Measured:
        """The measurement of the gradients multiplied by the non-negative scalar ``factor``.

        p-norms are homogeneous, so no gradient is read again: used to divide out an AMP loss
        scale, and by a chain to measure what its next link would see, without writing.
        """
        norms = None if self.norms is None else self.norms * ops.cast(factor, _dtype_of(self.norms))
        norm = None if self.norm is None else self.norm * ops.cast(factor, _dtype_of(self.norm))
        total = factor if self.factor is None else self.factor * factor
        return self._replace(norms=norms, norm=norm, factor=total)


def _dtype_of(x: Any) -> str:
    return "float64" if "float64" in str(getattr(x, "dtype", "")) else "float32"


class Decision(NamedTuple):
    """What :meth:`~gradclip.Clipper.decide` chose: ``coef`` in the clipper's coefficient kind
    (a scalar, a per-tensor vector, per-unit arrays, or the clipper's own description for
    element-wise methods), the next state, and the step's :class:`~gradclip.ClipInfo`."""

    coef: Any
    state: Any
    info: ClipInfo


class Signals(NamedTuple):
    """Optional values of the training step that a clipper's ``decide`` may use.

    Attributes:
        loss: The step's loss, a scalar array of the gradients' framework or a Python number.
        step: The optimizer step, an integer (a device scalar or a Python int).
        sample_norms: Per-example gradient norms, a non-empty 1-D array (QuantileNorm's
            unclipped fraction under per-example clipping).
        optimizer_state: The optimizer's state for these gradients, when an integration has it.
    """

    loss: Any = None
    step: Any = None
    sample_norms: Any = None
    optimizer_state: Any = None


NO_SIGNALS = Signals()


def signals_from(where: str, given: dict[str, Any], framework: str | None) -> Signals:
    """Validate the signal keywords of ``clip_``/``clip``/``update`` into :class:`Signals`.

    Args:
        where: The public entry point, for messages.
        given: The keyword arguments (names outside :class:`Signals` are refused).
        framework: The gradients' framework (None when unknown): arrays of another are refused.

    Returns:
        A :class:`Signals`.

    Raises:
        InvalidArgumentError: An unknown name, a loss that is not a scalar number or array, an
            array of another framework, or ``sample_norms`` that is not a non-empty 1-D array.
    """
    if not given:
        return NO_SIGNALS
    unknown = sorted(set(given) - set(Signals._fields))
    if unknown:
        raise InvalidArgumentError(
            f"{where}: unknown argument(s) {unknown}; the signals a clipper takes are {list(Signals._fields)}"
        )
    for name, value in given.items():
        if value is None or name == "optimizer_state":
            continue
        if name == "sample_norms" and not hasattr(value, "shape"):
            raise InvalidArgumentError(
                f"{where}: sample_norms must be a non-empty 1-D array of per-sample gradient norms, "
                f"got {type(value).__name__} with shape None; nothing was changed"
            )
        if isinstance(value, bool) or (not hasattr(value, "shape") and not isinstance(value, (int, float))):
            raise InvalidArgumentError(
                f"{where}: {name} must be a number or an array, got {type(value).__name__}; nothing was changed"
            )
        if not hasattr(value, "shape"):
            continue
        kind = framework_of(value)
        if framework is not None and kind != framework:
            raise InvalidArgumentError(
                f"{where}: {name} is a {kind} array but the gradients are {framework} arrays; nothing was changed"
            )
        shape = tuple(value.shape)
        if name == "sample_norms":
            if len(shape) != 1 or shape[0] < 1:
                raise InvalidArgumentError(
                    f"{where}: sample_norms must be a non-empty 1-D array of per-sample gradient norms, "
                    f"got {type(value).__name__} with shape {shape!r}; nothing was changed"
                )
        elif math.prod(shape) != 1:
            raise InvalidArgumentError(
                f"{where}: {name} must be a scalar (one element), got an array of shape {shape}; nothing was changed"
            )
    return Signals(**given)
