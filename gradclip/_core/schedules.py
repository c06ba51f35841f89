"""Schedules: threshold arguments that change with the training step, evaluated on the device.

The threshold arguments of the norm-based clippers take a number, a schedule object from this
module, or a plain callable ``f(step)`` (:mod:`gradclip.schedules` lists them). A clipper given a
schedule keeps the step in its state (an int64 ``clock``, checkpointed with it) and evaluates the
schedule there with device arithmetic: no branch on the step, no host read, one trace under
``jax.jit`` and ``tf.function``, no recompile under ``torch.compile``. The step is the number of
earlier calls (0 on the first), or ``step=`` when a call passes it (then counted on from).

Schedule objects are serialisable: a schedule is a read-only mapping of its settings (``{"schedule":
"cosine_decay", "init_value": 1.0, ...}``), so a clipper's ``config()`` and checkpoint hold it as
plain data and :func:`gradclip._core.registry.from_config` rebuilds it. The forms follow optax's
(``optax.linear_schedule``, ``cosine_decay_schedule``, ``join_schedules``,
``warmup_cosine_decay_schedule``) and agree with them to fp32 precision (``tests/test_schedules.py``).

A plain callable is called with the step as a 0-d int64 array of the gradients' framework (int32
under JAX without ``jax_enable_x64``) and must return a number or a one-element array of that
framework: an optax schedule works under JAX. It is not plain data: the config records its name
(``{"schedule": "callable", "function": "module.qualname"}``), so a checkpoint saves the step
and loads into a clipper given a function of the same name; ``from_config`` cannot rebuild it
(pass the function again, or use a schedule object). Its values are not checked when it is
given (that would read the device): a clipper raises them to the argument's lower bound.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

from gradclip._core.errors import InvalidArgumentError
from gradclip._core.ops import Ops, framework_of, get_ops
from gradclip._core.validation import check_int, check_number, traced_scalar

__all__ = [
    "Schedule",
    "Constant",
    "Linear",
    "CosineDecay",
    "Piecewise",
    "Join",
    "FromCallable",
    "warmup_cosine",
    "as_threshold",
    "schedule_from_config",
]

_KINDS: dict[str, type[Schedule]] = {}


def _kind(name: str):
    def decorate(cls):
        cls.kind = name
        _KINDS[name] = cls
        return cls

    return decorate


def _finite(where: str, name: str, value: Any) -> float:
    # plain_config writes ±inf as strings (strict JSON): a rebuilt config may hold them.
    value = float(value) if isinstance(value, str) and value in ("inf", "-inf") else value
    return check_number(where, name, value, low=-math.inf, low_inclusive=False, high=math.inf, high_inclusive=False)


class Schedule(Mapping):
    """Base of the schedule objects: a value per step, computed on the device.

    A schedule is a read-only mapping of its settings, ``{"schedule": kind, ...}``, so clipper
    configs and checkpoints hold it as plain data. Subclasses set ``kind`` (by registering),
    keep their settings and implement :meth:`value` and :meth:`bounds`.
    """

    kind: ClassVar[str] = "schedule"

    def settings(self) -> dict[str, Any]:
        """The settings as plain data (numbers, lists, nested schedule configs)."""
        raise NotImplementedError

    def value(self, ops: Ops, step: Any, dtype: str = "float32") -> Any:
        """The value at ``step`` (a 0-d integer device array), a 0-d ``dtype`` device array.

        Pure device arithmetic: no Python branch on ``step``, nothing read back.
        """
        raise NotImplementedError

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes over all steps (host numbers):
        what a clipper checks against its argument's valid range."""
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        """The value at ``step`` as a Python float, computed by the same device code on NumPy
        in float64 (for plots and checks; clippers call :meth:`value`).

        Raises:
            InvalidArgumentError: ``step`` is not an integer ``>= 0``.
        """
        step = check_int(f"{type(self).__name__}", "step", step, low=0)
        ops = get_ops([], framework="numpy", where=type(self).__name__)
        return float(self.value(ops, ops.scalar(step, "int64"), "float64"))

    # -- the mapping of settings --------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"schedule": self.kind, **self.settings()}

    def __getitem__(self, key: str) -> Any:
        return self.config()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.config())

    def __len__(self) -> int:
        return len(self.config())

    def __repr__(self) -> str:
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({arguments})"


@_kind("constant")
class Constant(Schedule):
    """The same value at every step.

    Args:
        value: A finite number.

    Raises:
        InvalidArgumentError: Not a finite number.
    """

    def __init__(self, value: float):
        self.value_ = _finite("Constant", "value", value)

    def settings(self):
        return {"value": self.value_}

    def value(self, ops, step, dtype="float32"):
        del step
        return ops.scalar(self.value_, dtype)

    def bounds(self):
        return self.value_, self.value_


def _lerp(ops: Ops, a: float, b: float, t: Any) -> Any:
    """``a + (b - a)·t`` for a device ``t`` in ``[0, 1]``, exactly ``a`` at 0 and ``b`` at 1:
    from the nearer end (NumPy's ``lerp``), so a threshold starts and ends at the values given,
    not an fp32 rounding of ``(a - b) + b``."""
    return ops.where(t < 0.5, t * (b - a) + a, (1.0 - t) * (a - b) + b)


def _elapsed(ops: Ops, step: Any, begin: int, length: int) -> Any:
    """``clip(step - begin, 0, length)`` as an int64 device scalar."""
    return ops.minimum(ops.maximum(step - begin, 0), length)


@_kind("linear")
class Linear(Schedule):
    """Linear interpolation from ``init_value`` to ``end_value`` (``optax.linear_schedule``).

    ``init_value`` up to step ``transition_begin``, then a straight line reaching ``end_value``
    after ``transition_steps`` more steps, ``end_value`` from then on. A linear warm-up of a
    threshold is ``Linear(0.1, 1.0, 1000)``.

    Args:
        init_value, end_value: Finite numbers.
        transition_steps: Steps the line takes, ``>= 1``.
        transition_begin: Steps held at ``init_value`` first, ``>= 0``.

    Raises:
        InvalidArgumentError: A value not finite, a step count out of range.
    """

    def __init__(self, init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0):
        where = "Linear"
        self.init_value = _finite(where, "init_value", init_value)
        self.end_value = _finite(where, "end_value", end_value)
        self.transition_steps = check_int(where, "transition_steps", transition_steps, low=1)
        self.transition_begin = check_int(where, "transition_begin", transition_begin, low=0)

    def settings(self):
        return {
            "init_value": self.init_value,
            "end_value": self.end_value,
            "transition_steps": self.transition_steps,
            "transition_begin": self.transition_begin,
        }

    def value(self, ops, step, dtype="float32"):
        count = _elapsed(ops, step, self.transition_begin, self.transition_steps)
        return _lerp(ops, self.init_value, self.end_value, ops.cast(count, dtype) / float(self.transition_steps))

    def bounds(self):
        return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


#: Taylor coefficients of cos(u) in u², to u¹²: for 0 <= u <= π/2 the first term left out,
#: (π/2)¹⁴ / 14!, is 6.4e-9, below fp32's rounding (a threshold needs no more). Each term is a
#: device operation (a kernel launch on a GPU), so no more are taken.
_COS_TAYLOR = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(7))


def _half_cosine(ops: Ops, fraction: Any) -> Any:
    """``0.5 · (1 + cos(π·t))`` for a device ``t`` in ``[0, 1]``, as ``cos(π·t/2)²``.

    The Ops protocol has no cosine (adaptive clippers never needed one): this is a polynomial
    in backend arithmetic, exact at ``t = 0`` (the sum is 1 there) and within a few units in
    the last place elsewhere.
    """
    u = fraction * (math.pi / 2.0)
    u2 = u * u
    cosine = _COS_TAYLOR[-1]
    for coefficient in reversed(_COS_TAYLOR[:-1]):
        cosine = cosine * u2 + coefficient
    return cosine * cosine


@_kind("cosine_decay")
class CosineDecay(Schedule):
    """Cosine decay from ``init_value`` to ``end_value`` over ``decay_steps`` steps (SGDR,
    Loshchilov & Hutter 2017; ``optax.cosine_decay_schedule`` with ``alpha = end / init``).

    ``end + (init - end) · ½(1 + cos(π·t/T))`` with ``t = clip(step - decay_begin, 0, T)``.

    Args:
        init_value: The value up to ``decay_begin``, finite.
        decay_steps: ``T``, ``>= 1``.
        end_value: The value from ``decay_begin + T`` on, finite (default 0).
        decay_begin: Steps held at ``init_value`` first, ``>= 0``.

    Raises:
        InvalidArgumentError: A value not finite, a step count out of range.
    """

    def __init__(self, init_value: float, decay_steps: int, end_value: float = 0.0, decay_begin: int = 0):
        where = "CosineDecay"
        self.init_value = _finite(where, "init_value", init_value)
        self.decay_steps = check_int(where, "decay_steps", decay_steps, low=1)
        self.end_value = _finite(where, "end_value", end_value)
        self.decay_begin = check_int(where, "decay_begin", decay_begin, low=0)

    def settings(self):
        return {
            "init_value": self.init_value,
            "decay_steps": self.decay_steps,
            "end_value": self.end_value,
            "decay_begin": self.decay_begin,
        }

    def value(self, ops, step, dtype="float32"):
        count = _elapsed(ops, step, self.decay_begin, self.decay_steps)
        weight = _half_cosine(ops, ops.cast(count, dtype) / float(self.decay_steps))
        # weight falls from 1 to 0: the share of the way from init_value to end_value is 1 - weight.
        return _lerp(ops, self.end_value, self.init_value, weight)

    def bounds(self):
        return min(self.init_value, self.end_value), max(self.init_value, self.end_value)


@_kind("piecewise")
class Piecewise(Schedule):
    """A step function: ``values[i]`` from step ``boundaries[i - 1]`` up to ``boundaries[i]``.

    ``Piecewise([1000, 5000], [1.0, 0.5, 0.25])`` is 1.0 for steps 0-999, 0.5 for 1000-4999 and
    0.25 from 5000 on. (``optax.piecewise_constant_schedule`` multiplies scales; these are the
    values themselves.)

    Args:
        boundaries: Strictly increasing integers ``>= 1``.
        values: Finite numbers, one more than ``boundaries``.

    Raises:
        InvalidArgumentError: Boundaries not increasing integers, a count mismatch, a value not
            finite.
    """

    def __init__(self, boundaries: Sequence[int], values: Sequence[float]):
        where = "Piecewise"
        if not isinstance(boundaries, (list, tuple)) or not isinstance(values, (list, tuple)):
            raise InvalidArgumentError(
                f"{where}: boundaries and values must be lists, got {type(boundaries).__name__} and "
                f"{type(values).__name__}"
            )
        self.boundaries = [check_int(where, f"boundaries[{i}]", b, low=1) for i, b in enumerate(boundaries)]
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise InvalidArgumentError(f"{where}: boundaries must be strictly increasing, got {list(boundaries)!r}")
        if len(values) != len(self.boundaries) + 1:
            raise InvalidArgumentError(
                f"{where}: values must hold one more entry than boundaries ({len(self.boundaries) + 1}), "
                f"got {len(values)}"
            )
        self.values = [_finite(where, f"values[{i}]", v) for i, v in enumerate(values)]

    def settings(self):
        return {"boundaries": list(self.boundaries), "values": list(self.values)}

    def value(self, ops, step, dtype="float32"):
        if not self.boundaries:
            return ops.scalar(self.values[0], dtype)
        # The number of boundaries passed is the index of the value: a count and a gather.
        passed = ops.sum(ops.array(self.boundaries, "int64") <= step)
        return ops.take(ops.array(self.values, dtype), passed)

    def bounds(self):
        return min(self.values), max(self.values)


@_kind("join")
class Join(Schedule):
    """Schedules one after another (``optax.join_schedules``): ``schedules[i]`` from step
    ``boundaries[i - 1]`` on, evaluated at the steps since that boundary.

    Args:
        schedules: Schedule objects (or their configs), at least one.
        boundaries: Strictly increasing integers ``>= 1``, one fewer than ``schedules``.

    Raises:
        InvalidArgumentError: Not schedule objects, a count mismatch, bad boundaries; a
            callable (which has no plain config).
    """

    def __init__(self, schedules: Sequence[Any], boundaries: Sequence[int]):
        where = "Join"
        if not isinstance(schedules, (list, tuple)) or not schedules:
            raise InvalidArgumentError(f"{where}: schedules must be a non-empty list of schedules, got {schedules!r}")
        parts = []
        for i, part in enumerate(schedules):
            if isinstance(part, Mapping) and not isinstance(part, Schedule):
                part = schedule_from_config(part, where)
            if not isinstance(part, Schedule) or isinstance(part, FromCallable):
                raise InvalidArgumentError(
                    f"{where}: schedules[{i}] must be a schedule object of gradclip.schedules, got {part!r}"
                )
            parts.append(part)
        self.schedules = parts
        if not isinstance(boundaries, (list, tuple)):
            raise InvalidArgumentError(f"{where}: boundaries must be a list, got {type(boundaries).__name__}")
        self.boundaries = [check_int(where, f"boundaries[{i}]", b, low=1) for i, b in enumerate(boundaries)]
        if len(self.boundaries) != len(parts) - 1:
            raise InvalidArgumentError(
                f"{where}: boundaries must hold one entry fewer than schedules ({len(parts) - 1}), "
                f"got {len(self.boundaries)}"
            )
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise InvalidArgumentError(f"{where}: boundaries must be strictly increasing, got {list(boundaries)!r}")

    def settings(self):
        return {"schedules": [s.config() for s in self.schedules], "boundaries": list(self.boundaries)}

    def value(self, ops, step, dtype="float32"):
        out = self.schedules[0].value(ops, step, dtype)
        for boundary, part in zip(self.boundaries, self.schedules[1:]):
            # Every part is evaluated (no branch on the step), the right one selected.
            out = ops.where(step < boundary, out, part.value(ops, step - boundary, dtype))
        return out

    def bounds(self):
        lows, highs = zip(*(s.bounds() for s in self.schedules))
        return min(lows), max(highs)

    def __repr__(self):
        return f"Join({self.schedules!r}, boundaries={self.boundaries!r})"


def warmup_cosine(
    init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0
) -> Join:
    """A linear warm-up from ``init_value`` to ``peak_value`` over ``warmup_steps``, then a
    cosine decay to ``end_value`` ending at step ``decay_steps`` (warm-up included), as
    ``optax.warmup_cosine_decay_schedule``.

    Raises:
        InvalidArgumentError: ``decay_steps <= warmup_steps``, or as :class:`Linear` and
            :class:`CosineDecay`.
    """
    warmup_steps = check_int("warmup_cosine", "warmup_steps", warmup_steps, low=1)
    decay_steps = check_int("warmup_cosine", "decay_steps", decay_steps, low=1)
    if decay_steps <= warmup_steps:
        raise InvalidArgumentError(
            f"warmup_cosine: decay_steps (warm-up included) must be > warmup_steps={warmup_steps}, got {decay_steps}"
        )
    return Join(
        [Linear(init_value, peak_value, warmup_steps), CosineDecay(peak_value, decay_steps - warmup_steps, end_value)],
        [warmup_steps],
    )


@_kind("callable")
class FromCallable(Schedule):
    """A plain callable ``f(step)`` used as a schedule (see the module documentation).

    Args:
        function: Called with the step as a 0-d integer array of the gradients' framework;
            returns a number or a one-element array of that framework. A NaN number is refused;
            an array's value stays on the device unread (DESIGN.md rule 1), so a NaN there
            becomes a NaN threshold, which clips nothing.

    Raises:
        InvalidArgumentError: ``function`` is not callable.
    """

    def __init__(self, function: Callable[[Any], Any]):
        if not callable(function) or isinstance(function, Schedule):
            raise InvalidArgumentError(f"FromCallable: function must be callable, got {function!r}")
        self.function = function

    def settings(self):
        module = getattr(self.function, "__module__", None) or "?"
        name = getattr(self.function, "__qualname__", None) or type(self.function).__qualname__
        return {"function": f"{module}.{name}"}

    def value(self, ops, step, dtype="float32"):
        where = f"schedule {self.settings()['function']}"
        result = self.function(step)
        if isinstance(result, bool) or not (hasattr(result, "shape") or isinstance(result, numbers.Real)):
            raise InvalidArgumentError(f"{where}: returned {result!r}; a schedule returns a number or a scalar array")
        if not hasattr(result, "shape"):
            if math.isnan(result):  # a host number costs nothing to check; NaN would clip nothing
                raise InvalidArgumentError(f"{where}: returned NaN at step {step}; a schedule returns a number")
            return ops.scalar(float(result), dtype)
        if framework_of(result) != ops.name:
            raise InvalidArgumentError(
                f"{where}: returned a {framework_of(result)} array for {ops.name} gradients; return a "
                f"{ops.name} array or a number"
            )
        if math.prod(tuple(result.shape)) != 1:
            raise InvalidArgumentError(f"{where}: returned an array of shape {tuple(result.shape)}; expected one value")
        # sum() of a one-element array is its value as a 0-d array, whatever its shape.
        return ops.sum(ops.cast(result, dtype))

    def bounds(self):
        return -math.inf, math.inf

    def __repr__(self):
        return f"FromCallable({self.settings()['function']})"


def schedule_from_config(spec: Mapping[str, Any], where: str = "schedule_from_config") -> Schedule:
    """Rebuild a schedule object from its config (``{"schedule": kind, ...settings}``).

    Raises:
        InvalidArgumentError: An unknown kind, bad settings, or a callable (which cannot be
            rebuilt from its name).
    """
    kind = spec.get("schedule")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise InvalidArgumentError(
            f"{where}: unknown schedule {kind!r} in {dict(spec)!r}; valid kinds: {', '.join(sorted(_KINDS))}"
        )
    if cls is FromCallable:
        raise InvalidArgumentError(
            f"{where}: the schedule {spec.get('function')!r} was a plain callable, which a config cannot "
            "rebuild; pass the function itself again, or use a schedule object of gradclip.schedules"
        )
    settings = {k: v for k, v in spec.items() if k != "schedule"}
    try:
        return cls(**settings)
    except TypeError as error:  # unexpected or missing settings
        raise InvalidArgumentError(f"{where}: bad settings for schedule {kind!r}: {error}") from None


def as_threshold(
    where: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    low_inclusive: bool = True,
    high: float = math.inf,
    high_inclusive: bool = True,
) -> float | Schedule:
    """A threshold: a number (:func:`check_number`), a schedule or its config, a callable, a traced tensor.

    A schedule's :meth:`~Schedule.bounds` must lie in the argument's range (callables and traced
    tensors cannot be checked without reading the device).

    Returns:
        A float, a :class:`Schedule`, or the traced tensor itself.

    Raises:
        InvalidArgumentError: A number out of range, a schedule whose values leave the range
            (naming the value), a config that is not a schedule's, or another type.
    """
    if isinstance(value, Mapping) and not isinstance(value, Schedule):
        value = schedule_from_config(value, f"{where}: {name}")
    elif callable(value) and not isinstance(value, Schedule):
        return FromCallable(value)
    if traced_scalar(value):  # a device value of the traced step: the backends take it as is
        return value
    if not isinstance(value, Schedule):
        return check_number(where, name, value, low=low, low_inclusive=low_inclusive, high=high, high_inclusive=high_inclusive)
    if isinstance(value, FromCallable):
        return value
    smallest, largest = value.bounds()
    valid = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    for end in (smallest, largest):
        if end < low or (end == low and not low_inclusive) or end > high or (end == high and not high_inclusive):
            raise InvalidArgumentError(
                f"{where}: {name} must stay in {valid}, but the schedule {value!r} reaches {end!r}"
            )
    return value
