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

    Every entry point (``clip_``, ``clip``, ``update``, ``fold_``) takes them as keywords and
    validates them with :func:`signals_from` before anything changes.

    Attributes:
        loss: The step's loss: a Python number, or a one-element array of the gradients'
            framework (a torch tensor that carries autograd history is detached: a clipper
            keeps values, never graphs). Under ``jax.jit``, ``tf.function`` and
            ``torch.compile`` pass an array: a Python number is a constant of the trace.
        step: The optimizer step, an integer ``>= 0``: a Python int, or a one-element integer
            array of the gradients' framework. A clipper with a scheduled threshold evaluates
            its schedule at this step instead of its own count of calls (and counts on from it).
        sample_norms: Per-example gradient norms, a non-empty 1-D array (QuantileNorm's
            unclipped fraction under per-example clipping).
        optimizer_state: Per-tensor optimizer state for these gradients: a list (or tuple) with
            one entry per gradient, in the order the clipper receives them (for ``update`` and
            ``clip`` the order of the flattened gradients, for ``clip_`` the parameters that have
            a gradient, in iteration order), each an array of the gradient's shape (SPAM's and
            :class:`~gradclip.SpikeAware`'s Adam second moment ``exp_avg_sq``) or None for a
            tensor without state. Entries are arrays of the gradients' framework.
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
        A :class:`Signals` (a torch ``loss`` that requires grad is detached).

    Raises:
        InvalidArgumentError: An unknown name; a loss or step that is not a scalar number or
            one-element array; a step that is not an integer ``>= 0``; an array of another
            framework; ``sample_norms`` that is not a non-empty 1-D array; ``optimizer_state``
            that is not a list or tuple of arrays and None entries. Nothing is changed.
    """
    if not given:
        return NO_SIGNALS
    unknown = sorted(set(given) - set(Signals._fields))
    if unknown:
        raise InvalidArgumentError(
            f"{where}: unknown argument(s) {unknown}; the signals a clipper takes are {list(Signals._fields)}"
        )
    values = dict(given)
    for name, value in given.items():
        if value is None:
            continue
        if name == "optimizer_state":
            _check_optimizer_state(where, value, framework)
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
            # Steps are int64 on the device: a larger one would overflow there.
            if name == "step" and (not isinstance(value, int) or not 0 <= value < 2**63):
                raise InvalidArgumentError(
                    f"{where}: step must be an integer in [0, 2**63) (the optimizer step), got {value!r}; "
                    "nothing was changed"
                )
            continue
        _check_framework(where, name, value, framework)
        shape = tuple(value.shape)
        if name == "sample_norms":
            if len(shape) != 1 or shape[0] < 1:
                raise InvalidArgumentError(
                    f"{where}: sample_norms must be a non-empty 1-D array of per-sample gradient norms, "
                    f"got {type(value).__name__} with shape {shape!r}; nothing was changed"
                )
            continue
        if math.prod(shape) != 1:
            raise InvalidArgumentError(
                f"{where}: {name} must be a scalar (one element), got an array of shape {shape}; nothing was changed"
            )
        if name == "step" and not _is_integer_dtype(value):
            raise InvalidArgumentError(
                f"{where}: step must be an integer array (the optimizer step), got dtype {value.dtype}; "
                "nothing was changed"
            )
        if name == "loss" and framework_of(value) == "torch" and value.requires_grad:
            # A clipper keeps the loss in its state: a graph kept there would hold every
            # activation of the step alive until the value leaves the window.
            values[name] = value.detach()
    return Signals(**values)


def _check_framework(where: str, name: str, value: Any, framework: str | None) -> None:
    kind = framework_of(value)
    if framework is not None and kind != framework:
        raise InvalidArgumentError(
            f"{where}: {name} is a {kind} array but the gradients are {framework} arrays; nothing was changed"
        )


def _is_integer_dtype(value: Any) -> bool:
    # Every framework spells its integer dtypes with "int" ("int64", "torch.int32", "<dtype:
    # 'int64'>", "uint8"); no floating, bool or complex dtype contains it.
    return "int" in str(value.dtype)


def _check_optimizer_state(where: str, value: Any, framework: str | None) -> None:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(
            f"{where}: optimizer_state must be a list (or tuple) with one entry per gradient, each an "
            f"array of the gradient's shape or None, got {type(value).__name__}; nothing was changed"
        )
    for index, entry in enumerate(value):
        if entry is None:
            continue
        if not hasattr(entry, "shape") or isinstance(entry, bool):
            raise InvalidArgumentError(
                f"{where}: optimizer_state[{index}] must be an array or None, got {type(entry).__name__}; "
                "nothing was changed"
            )
        _check_framework(where, f"optimizer_state[{index}]", entry, framework)
