"""Building blocks shared by the adaptive clippers, written once against the Ops protocol.

Everything here runs on the device and reads nothing back: buffers are written with ``where``
over an index vector (no Python branch on a count), percentiles are taken by sorting with the
unused slots set to ``+inf``, and counts are int64 device scalars. The helpers at the bottom
validate plain state loaded from a checkpoint, before any of it is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gradclip._core.errors import StateError
from gradclip._core.ops import Ops

__all__ = [
    "as_f32",
    "ring_write",
    "prefix_percentile",
    "SKETCH_SIZE",
    "sketch_anchor",
    "sketch_insert",
    "sketch_percentile",
    "check_field",
]


def as_f32(ops: Ops, x: Any) -> Any:
    """``x`` as fp32 (state is kept in fp32 whatever the gradient dtype)."""
    return ops.cast(x, "float32")


def ring_write(ops: Ops, buffer: Any, position: Any, value: Any, accept: Any) -> Any:
    """``buffer[position] = value`` where ``accept``, as a ``where`` over the whole buffer.

    A window is tens to hundreds of floats, so rewriting it costs less than a scatter's launch
    and needs no integer index on the host.
    """
    index = ops.arange(buffer.shape[0])
    return ops.where((index == position) & accept, value, buffer)


def _lerp_like_numpy(ops: Ops, a: Any, b: Any, gamma: Any) -> Any:
    """NumPy's ``_lerp(a, b, t)`` for fp32 ``a``, ``b`` and a float64 ``t``, bit for bit.

    ``numpy.percentile`` with a Python-float ``q`` turns ``t`` into a Python float, so each of
    ``t`` and ``1 - t`` (computed in double) is rounded to fp32 where it meets the fp32 data,
    and the second form is used from ``t >= 0.5`` on (it is exact at ``t = 1``). Two separate
    multiplications and additions, never a fused multiply-add, as NumPy computes them.
    """
    t = ops.cast(gamma, "float32")
    one_minus_t = ops.cast(1.0 - gamma, "float32")
    diff = b - a
    low_form = a + diff * t
    high_form = b - diff * one_minus_t
    return ops.where(gamma >= 0.5, high_form, low_form)


def _virtual_ranks(ops: Ops, k: Any, q: float):
    """NumPy's 'linear' percentile positions for ``k`` values: ``(k - 1) * q`` in float64.

    Returns ``(lower_rank, upper_rank, gamma, at_top)``: the two neighbouring order statistics
    (int64, clamped into ``[0, k - 1]``), the interpolation weight, and whether the position is
    at or past the last value (then NumPy returns the largest value itself).
    """
    kf = ops.cast(k, "float64")
    last = kf - 1.0
    position = last * q
    floor = ops.floor(position)
    at_top = position >= last
    gamma = position - floor
    top = ops.where(k > 0, k - 1, k * 0)
    lower = ops.cast(ops.where(at_top, last, floor), "int64")
    lower = ops.where(lower > top, top, lower)
    lower = ops.where(lower < 0, k * 0, lower)  # k == 0 only
    upper = ops.where(at_top, top, ops.where(lower + 1 > top, top, lower + 1))
    return lower, upper, gamma, at_top


def prefix_percentile(ops: Ops, values: Any, k: Any, q: float) -> Any:
    """``numpy.percentile(values[:k], 100 * q)`` bit for bit (method ``"linear"``).

    Args:
        ops: The backend.
        values: A 1-D fp32 buffer whose first ``k`` entries are the sample (a ring buffer that
            has not wrapped fills its prefix; one that has is entirely valid).
        k: int64 0-d device array, the sample size (``0`` gives ``+inf``: nothing to clip by).
        q: The quantile in ``[0, 1]`` (``percentile / 100``, computed in double as NumPy does).

    Returns:
        An fp32 0-d array.
    """
    n = values.shape[0]
    inf = ops.scalar(math.inf, "float32")
    index = ops.arange(n)
    ordered = ops.sort(ops.where(index < k, values, inf))
    lower, upper, gamma, at_top = _virtual_ranks(ops, k, q)
    # With k == 0 both are +inf; zero them so no inf - inf is formed (NumPy would warn).
    empty = k <= 0
    zero = ops.scalar(0.0, "float32")
    a = ops.where(empty, zero, ops.take(ordered, lower))
    b = ops.where(empty, zero, ops.take(ordered, upper))
    result = ops.where(at_top, a, _lerp_like_numpy(ops, a, b, gamma))
    return ops.where(k > 0, result, inf)


# -- the bounded sketch behind AutoClip(history=None) ------------------------------------------
# Bins are log-spaced relative to an anchor, the first positive value seen: scaling every value
# by a constant scales the anchor with them, so the sketch (and a clip decision made against
# it) does not depend on the loss scale, as the exact percentile does not.
#: Log-spaced bins: 64 per octave over anchor·2**-32 .. anchor·2**32 (9.6 decades either way;
#: values beyond fall into the end bins, and the exact minimum and maximum are kept besides).
SKETCH_PER_OCTAVE = 64
SKETCH_OFFSET = 32 * SKETCH_PER_OCTAVE
SKETCH_SIZE = 64 * SKETCH_PER_OCTAVE
#: Worst-case relative error of a bin's representative value: 2**(1/128) - 1, about 0.54%.
SKETCH_RELATIVE_ERROR = 2.0 ** (1.0 / (2 * SKETCH_PER_OCTAVE)) - 1.0


def sketch_anchor(ops: Ops, anchor: Any, value: Any, accept: Any) -> Any:
    """The anchor after seeing ``value``: the first positive accepted value, then fixed."""
    return ops.where(accept & (anchor <= 0) & (value > 0), value, anchor)


def sketch_insert(ops: Ops, bins: Any, value: Any, accept: Any, anchor: Any) -> Any:
    """Count ``value`` (fp32, finite, >= 0) into its log bin where ``accept``.

    Bin 0 holds exact zeros. Bin ``i >= 1`` holds ``anchor · [2**((i - OFFSET) / 64),
    2**((i - OFFSET + 1) / 64))``; positive values below ``anchor · 2**-32`` go to bin 1, values
    above ``anchor · 2**32`` to the last bin (the exact minimum and maximum are kept beside the
    bins, so the extremes are never approximated). ``anchor`` must already account for
    ``value`` (:func:`sketch_anchor`).
    """
    positive = value > 0
    one = ops.scalar(1.0, "float32")
    safe = ops.where(positive, value / ops.where(anchor > 0, anchor, one), one)
    position = ops.floor(ops.log(safe) * (SKETCH_PER_OCTAVE / math.log(2.0))) + SKETCH_OFFSET
    zero = ops.scalar(0.0, "float32")
    position = ops.where(position < 1, ops.scalar(1.0, "float32"), position)
    position = ops.where(positive, position, zero)
    position = ops.where(position > SKETCH_SIZE - 1, ops.scalar(SKETCH_SIZE - 1.0, "float32"), position)
    index = ops.arange(bins.shape[0])
    hit = (index == ops.cast(position, "int64")) & accept
    return bins + ops.cast(hit, "int64")


def sketch_percentile(ops: Ops, bins: Any, k: Any, low: Any, high: Any, anchor: Any, q: float) -> Any:
    """The ``q`` quantile of the sketched sample, within :data:`SKETCH_RELATIVE_ERROR`.

    The same positions and interpolation as :func:`prefix_percentile`; each order statistic
    is its bin's geometric midpoint, clamped into ``[low, high]``, and the smallest and largest
    are ``low`` and ``high`` exactly (so one or two samples, ``q = 0`` and ``q = 1`` are exact).
    Work per call: one cumulative sum and two compare-and-count passes over the bins.
    """
    cumulative = ops.cumsum(bins)
    lower, upper, gamma, at_top = _virtual_ranks(ops, k, q)
    top = ops.where(k > 0, k - 1, k * 0)

    def order_statistic(rank):
        # The bin holding order statistic `rank` (0-based) is the number of bins whose
        # cumulative count is <= rank.
        which = ops.sum(cumulative <= rank)
        exponent = (ops.cast(which, "float32") - SKETCH_OFFSET + 0.5) * (math.log(2.0) / SKETCH_PER_OCTAVE)
        value = ops.where(which == 0, ops.scalar(0.0, "float32"), ops.exp(exponent) * anchor)
        value = ops.where(value < low, low, value)
        value = ops.where(value > high, high, value)
        value = ops.where(rank >= top, high, value)
        return ops.where(rank <= 0, low, value)

    empty = k <= 0
    zero = ops.scalar(0.0, "float32")
    a = ops.where(empty, zero, order_statistic(lower))
    b = ops.where(empty, zero, order_statistic(upper))
    result = ops.where(at_top, a, _lerp_like_numpy(ops, a, b, gamma))
    return ops.where(empty, ops.scalar(math.inf, "float32"), result)


# -- validating plain state from checkpoints -------------------------------------------------
def _shape_of(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, list):
        return ()
    if not value:
        return (0,)
    inner = {_shape_of(v) for v in value}
    if len(inner) != 1:
        return None
    (shape,) = inner
    return None if shape is None else (len(value), *shape)


def _leaves(value: Any):
    if isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def check_field(
    where: str,
    state: Mapping[str, Any],
    name: str,
    kind: str,
    shape: tuple[int, ...] = (),
    *,
    low: float | None = None,
    high: float | None = None,
) -> None:
    """Check one field of plain state: its nesting shape, element type and range.

    Args:
        where: ``"Class.load_state_dict"``, for the message.
        state: The plain state mapping.
        name: The field.
        kind: ``"float"`` (finite numbers; ints accepted), ``"int"`` (integers, not bools) or
            ``"bool"``.
        shape: The expected shape: ``()`` for a scalar, ``(n,)`` for a vector.
        low, high: Inclusive bounds for numbers.

    Raises:
        StateError: Naming the field, what it holds and what was expected.
    """
    value = state[name]
    found = _shape_of(value)
    if found != tuple(shape):
        described = "a scalar" if shape == () else f"a list of {shape[0]}"
        got = "ragged lists" if found is None else ("a scalar" if found == () else f"shape {list(found)}")
        raise StateError(f"{where}: state field {name!r} must be {described} {kind} value(s), got {got}")
    for item in _leaves(value):
        if kind == "bool":
            ok = isinstance(item, bool)
        elif kind == "int":
            ok = isinstance(item, int) and not isinstance(item, bool)
        else:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item)
        if not ok:
            raise StateError(
                f"{where}: state field {name!r} must hold {'finite ' if kind == 'float' else ''}{kind} "
                f"values, found {item!r}"
            )
        if kind != "bool" and ((low is not None and item < low) or (high is not None and item > high)):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise StateError(f"{where}: state field {name!r} holds {item!r}, outside {bounds}")
