"""Argument checks shared by every public entry point.

Checks run when a clipper is constructed or a function is called, before any gradient or state
is touched, so a bad argument loses nothing. Messages name the function, the argument, the bad
value and the valid range (DESIGN.md rule 7). ``assert`` is never used for validation: it
disappears under ``python -O``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
from collections.abc import Iterable, Iterator

from gradclip._core.errors import GradClipError, InvalidArgumentError, UnknownNameError

__all__ = [
    "traced_scalar",
    "check_number",
    "check_norm_type",
    "check_choice",
    "check_range_pair",
    "check_int",
    "reported_as",
]


def _as_float(where: str, name: str, value: object) -> float:
    # bool is an int subclass; True as a threshold is almost certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        if hasattr(value, "shape") and getattr(value, "shape", None) == ():
            # A 0-d array or tensor: reading it here syncs once, at construction, not per step.
            try:
                return float(value)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - fall through to the clear error below
                pass
        raise InvalidArgumentError(
            f"{where}: {name} must be a real number, got {value!r} of type {type(value).__name__}"
        )
    return float(value)


def traced_scalar(value: object) -> bool:
    """Whether ``value`` is a one-element floating array that cannot be read on the host now:
    a symbolic tensor built inside ``tf.function``, a JAX tracer, whose value exists only when the
    traced function runs (a threshold a training step computes, e.g. from its step count)."""
    shape = getattr(value, "shape", None)
    if shape is None or isinstance(value, numbers.Real) or "float" not in str(getattr(value, "dtype", "")):
        return False
    try:
        if math.prod(tuple(shape)) != 1:
            return False
        float(value)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - symbolic tensors and tracers refuse in framework-specific ways
        return True
    return False


def check_number(
    where: str,
    name: str,
    value: object,
    *,
    low: float = 0.0,
    low_inclusive: bool = True,
    high: float = math.inf,
    high_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float after checking it lies in the given interval.

    Args:
        where: The public function or class the user called, for the message.
        name: The argument's name.
        value: The value to check.
        low, high: Interval bounds; ``math.inf`` as ``high`` with ``high_inclusive`` allows inf.
        low_inclusive, high_inclusive: Whether each bound itself is allowed.

    Returns:
        The value as a Python float.

    Raises:
        InvalidArgumentError: Not a real number (a tensor whose value only a traced function
            knows included: see :func:`traced_scalar`), NaN, or outside the interval.
    """
    if traced_scalar(value):
        raise InvalidArgumentError(
            f"{where}: {name} must be a real number, got a {type(value).__name__} whose value is only known when "
            "the traced function runs (tf.function, jax.jit); thresholds (max_norm, threshold) take such "
            f"tensors, {name} takes a number"
        )
    number = _as_float(where, name, value)
    valid = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    if math.isnan(number):
        # "must be in [-inf, inf], got nan" reads as if nan were out of range; say what is wrong.
        raise InvalidArgumentError(f"{where}: {name} must not be NaN (valid: {valid}), got {value!r}")
    below = number < low or (number == low and not low_inclusive)
    above = number > high or (number == high and not high_inclusive)
    if below or above:
        raise InvalidArgumentError(f"{where}: {name} must be in {valid}, got {value!r}")
    return number


def check_int(where: str, name: str, value: object, *, low: int = 0, allow_none: bool = False):
    """Return ``value`` as an int ``>= low`` (or None when allowed).

    Raises:
        InvalidArgumentError: Not an integer, or below ``low``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        suffix = " or None" if allow_none else ""
        raise InvalidArgumentError(f"{where}: {name} must be an integer >= {low}{suffix}, got {value!r}")
    return int(value)


def check_norm_type(where: str, norm_type: object) -> float:
    """Check a p-norm order: any p > 0, or ``inf`` (also given as the string ``"inf"``).

    Raises:
        InvalidArgumentError: p <= 0, NaN, or not a number. (torch accepts p=0 and counts
            tensors rather than elements, which is not a norm; gradclip refuses it.)
    """
    if isinstance(norm_type, str) and norm_type.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    return check_number(where, "norm_type", norm_type, low=0.0, low_inclusive=False)


def check_choice(where: str, name: str, value: object, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices``.

    Raises:
        UnknownNameError: The message lists every valid choice.
    """
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise UnknownNameError(
            f"{where}: {name} must be one of {', '.join(repr(c) for c in options)}; got {value!r}"
        )
    return value


def check_range_pair(where: str, min_value: object, max_value: object) -> tuple[float, float]:
    """Check an element-wise clipping range ``[min_value, max_value]``.

    Either bound may be infinite (a one-sided clamp) but not NaN, and ``min_value <= max_value``.

    Raises:
        InvalidArgumentError: NaN bound, or ``min_value > max_value``.
    """
    low = check_number(where, "min_value", min_value, low=-math.inf)
    high = check_number(where, "max_value", max_value, low=-math.inf)
    if low > high:
        raise InvalidArgumentError(
            f"{where}: min_value must be <= max_value, got min_value={min_value!r} > "
            f"max_value={max_value!r}"
        )
    return low, high


@contextlib.contextmanager
def reported_as(function: str, *internal: str) -> Iterator[None]:
    """Make gradclip errors raised in the block name ``function``, the function the user called.

    The one-shot functions (``clip_by_norm``, ``clip_grad_norm_``...) are thin wrappers over the
    clipper classes, whose messages start with the class (``"GlobalNorm: max_norm ..."``) or a
    method of it (``"GlobalNorm.update: ..."``). A user who called ``clip_grad_norm_`` never
    wrote ``GlobalNorm``, so such a prefix is replaced by ``function`` (DESIGN.md rule 7). The
    exception keeps its type, attributes and traceback; other messages pass through unchanged.

    Args:
        function: The public function, e.g. ``"clip_grad_norm_"``.
        *internal: The class names whose prefixes are replaced, e.g. ``"GlobalNorm"``.
    """
    try:
        yield
    except GradClipError as error:
        if error.args and isinstance(error.args[0], str):  # the pattern only on the error path
            prefix = re.compile(rf"^(?:{'|'.join(map(re.escape, internal))})(?:\.\w+)?: ")
            error.args = (prefix.sub(f"{function}: ", error.args[0], count=1), *error.args[1:])
        raise
