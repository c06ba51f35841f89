"""Building blocks shared by the adaptive clippers, written once against the Ops protocol.

Everything here runs on the device and reads nothing back: buffers are written with ``where``
over an index vector (no Python branch on a count), percentiles are taken by sorting with the
unused slots set to ``+inf``, and counts are int64 device scalars. The helpers at the bottom
validate plain state loaded from a checkpoint, before any of it is used.

Operation count matters here: on a GPU every scalar operation is a kernel launch on the clipping
step's critical path, between the norm and the scale. So each constant is made once per call and
passed in, a condition is computed once and reused, and a ``where`` is dropped wherever an
invariant of the state makes it a no-op (each such place says which invariant).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from gradclip._core.errors import StateError
from gradclip._core.ops import Ops, accumulation

__all__ = [
    "as_f32",
    "accumulation",
    "fp32_finite",
    "skip_flag",
    "ring_write",
    "prefix_percentile",
    "prefix_median_mad",
    "SKETCH_SIZE",
    "sketch_insert",
    "sketch_percentile",
    "check_field",
]


def as_f32(ops: Ops, x: Any) -> Any:
    """``x`` as fp32 (state is kept in fp32 whatever the gradient dtype)."""
    return ops.cast(x, "float32")


def fp32_finite(ops: Ops, norm: Any, finite: Any) -> Any:
    """Whether ``norm`` is finite and stays finite in fp32, the dtype of the adaptive state.

    For an fp32 norm that is ``finite`` itself (no operation). An fp64 norm beyond fp32's range
    (~3.4e38) becomes inf when cast; since a non-finite norm casts to a non-finite fp32 value,
    the cast's finiteness alone decides.
    """
    if accumulation(norm) == "float32":
        return finite
    return ops.isfinite(as_f32(ops, norm))


def skip_flag(ops: Ops, finite: Any, policy: str) -> Any:
    """The ``info.skip`` flag of :func:`~gradclip.clippers.nonfinite.settle`, alone.

    For the clippers whose clip coefficient is already exactly 1 on a non-finite step (their
    bound is ``inf`` there, and ``inf > inf`` and ``NaN > bound`` are False), so the ``where``
    that settle applies to the coefficient would change nothing.
    """
    return ~finite if policy == "skip" else ops.scalar(False, "bool")


def ring_write(ops: Ops, buffer: Any, position: Any, value: Any, accept: Any = None, index: Any = None) -> Any:
    """``buffer[position] = value`` where ``accept`` (always when None), as a ``where`` over the
    whole buffer.

    A window is tens to hundreds of floats, so rewriting it costs less than a scatter's launch
    and needs no integer index on the host. ``index`` is ``ops.arange(len(buffer))`` when the
    caller has it already. A ``position`` outside the buffer writes nothing.
    """
    if index is None:
        index = ops.arange(buffer.shape[0])
    write = index == position
    if accept is not None:
        write = write & accept
    return ops.where(write, value, buffer)


def _lerp_like_numpy(ops: Ops, a: Any, b: Any, gamma: Any) -> Any:
    """NumPy's ``_lerp(a, b, t)`` for fp32 ``a``, ``b`` and a float64 ``t``, bit for bit.

    ``numpy.percentile`` with a Python-float ``q`` turns ``t`` into a Python float, so each of
    ``t`` and ``1 - t`` (computed in double) is rounded to fp32 where it meets the fp32 data,
    and NumPy computes ``a + (b - a)·t``, or ``b - (b - a)·(1 - t)`` from ``t >= 0.5`` on (exact
    at ``t = 1``). The second form is written here as ``b + (b - a)·(t - 1)``: ``t - 1`` is
    exactly ``-(1 - t)`` in double and after rounding, and ``x + (-y)`` is ``x - y`` in IEEE
    arithmetic, so one multiplication and one addition serve both forms with the same bits.
    Never a fused multiply-add, as NumPy computes them.
    """
    high = gamma >= 0.5
    t = ops.cast(ops.where(high, gamma - 1.0, gamma), "float32")
    return ops.where(high, b, a) + (b - a) * t


def _lower_rank(ops: Ops, last: Any, q: float) -> tuple[Any, Any]:
    """NumPy's 'linear' percentile position among ``last + 1 >= 1`` values: ``last * q`` in
    float64 (``last`` is the int64 index of the last value, ``k - 1``).

    Returns ``(lower, gamma)``: the order statistic below the position (int64) and the
    interpolation weight. For ``q`` in ``[0, 1]`` the product rounds into ``[0, last]`` (rounding
    is monotonic and ``last·1`` is exact), so ``lower`` needs no clamping, and where the
    position is the last value (NumPy then returns it alone) ``gamma`` is 0: interpolating with
    any finite upper neighbour gives the lower value bit for bit.
    """
    position = ops.cast(last, "float64") * q
    floor = ops.floor(position)
    return ops.cast(floor, "int64"), position - floor


def _exact_at_ranks(q: float) -> bool:
    """Whether percentile positions are whole ranks for every sample size (``q`` 0 or 1)."""
    return q in (0.0, 1.0)


def _prefix(ops: Ops, values: Any, count: Any, index: Any) -> tuple[Any, Any]:
    """Which slots of ``values`` hold the sample, its first ``k = min(max(count, 1), len(values))``
    entries, and ``k - 1``, the int64 index of its last value once sorted.

    With no value yet (``count == 0``) slot 0 stands in for the sample (it is finite), so every
    rank and index below is valid and no ``inf - inf`` is formed.
    """
    if index is None:
        index = ops.arange(values.shape[0])
    size = ops.clamp_values(count, ops.scalar(1, "int64"), ops.scalar(values.shape[0], "int64"))
    return index < size, size - 1


def prefix_percentile(ops: Ops, values: Any, count: Any, q: float, inf: Any, index: Any = None) -> Any:
    """``numpy.percentile(values[:k], 100 * q)`` bit for bit (method ``"linear"``), with
    ``k = min(count, len(values))``.

    Args:
        ops: The backend.
        values: A 1-D fp32 buffer whose first ``k`` entries are the sample (a ring buffer that
            has not wrapped fills its prefix; one that has is entirely valid).
        count: int64 0-d device array, how many values were ever written (``0`` gives ``+inf``:
            nothing to clip by).
        q: The quantile in ``[0, 1]`` (``percentile / 100``, computed in double as NumPy does).
        inf: fp32 ``+inf`` (a scalar the caller has made).
        index: ``ops.arange(len(values))`` when the caller has it.

    Returns:
        An fp32 0-d array.
    """
    valid, last = _prefix(ops, values, count, index)
    # The slots outside the sample sort after it.
    ordered = ops.sort(ops.where(valid, values, inf))
    lower, gamma = _lower_rank(ops, last, q)
    a = ops.take(ordered, lower)
    if _exact_at_ranks(q):
        result = a
    else:
        # The upper neighbour, kept inside the sample (at the last value gamma is 0).
        b = ops.take(ordered, ops.minimum(lower + 1, last))
        result = _lerp_like_numpy(ops, a, b, gamma)
    return ops.where(count > 0, result, inf)


def prefix_median_mad(ops: Ops, values: Any, count: Any, inf: Any, index: Any = None) -> tuple[Any, Any]:
    """The median of the first ``k = min(count, len(values))`` entries of ``values`` and their
    median absolute deviation: ``m = numpy.median(v)`` and ``numpy.median(numpy.abs(v - m))``
    bit for bit, for ``count >= 1`` and non-negative values. For ``count == 0`` slot 0 alone is
    the sample (no ``inf``: the caller knows what slot 0 holds then).

    At ``q = 0.5`` the position ``last / 2`` is a whole rank or halfway between two, so NumPy's
    weight is 0 or 0.5: with ``lower = last // 2`` and ``upper = last - lower`` (the same rank
    when ``last`` is even), ``b - (b - a)·0.5``, NumPy's form for a weight of 0.5, gives its
    result in both cases (for even ``last`` it is ``a - 0``, which is ``a`` as NumPy's
    ``a + (b - a)·0`` is; only the sign of a zero ``a`` may differ). The two medians share the
    sample's ranks, computed once.
    """
    valid, last = _prefix(ops, values, count, index)
    lower = last // 2
    upper = last - lower

    def median(sample: Any) -> Any:
        ordered = ops.sort(ops.where(valid, sample, inf))
        a = ops.take(ordered, lower)
        b = ops.take(ordered, upper)
        return b + (b - a) * -0.5

    centre = median(values)
    return centre, median(ops.abs(values - centre))


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


def sketch_insert(ops: Ops, bins: Any, anchor: Any, value: Any, accept: Any, one: Any) -> tuple[Any, Any]:
    """Count ``value`` into its log bin where ``accept``; returns ``(bins, anchor)``.

    ``value`` is fp32, finite and positive where ``accept``, 0 elsewhere. The anchor becomes the
    first positive value and then stays (a stored anchor is 0 or positive). Bin 0 holds exact
    zeros (counted by earlier versions; none is counted now). Bin ``i >= 1`` holds
    ``anchor · [2**((i - OFFSET) / 64), 2**((i - OFFSET + 1) / 64))``; positive values below
    ``anchor · 2**-32`` go to bin 1, values above ``anchor · 2**32`` to the last bin (the exact
    minimum and maximum are kept beside the bins, so the extremes are never approximated).
    ``one`` is an fp32 scalar the caller has made.
    """
    anchor = ops.where(anchor > 0, anchor, value)
    # Where accepted the value is positive, and so is the anchor; elsewhere nothing is counted.
    ratio = ops.ratio_or_one(accept, value, anchor)
    position = ops.floor(ops.log(ratio) * (SKETCH_PER_OCTAVE / math.log(2.0))) + SKETCH_OFFSET
    # Never NaN (the ratio is positive), so minimum/maximum clamp as comparisons would.
    position = ops.clamp_values(position, one, ops.scalar(SKETCH_SIZE - 1.0, "float32"))
    # A float index: the positions are whole numbers below 2**24, compared exactly.
    hit = (ops.arange(bins.shape[0], "float32") == position) & accept
    return ops.count_up(bins, hit), anchor


def sketch_percentile(
    ops: Ops, bins: Any, count: Any, low: Any, high: Any, anchor: Any, q: float, zero: Any, inf: Any
) -> Any:
    """The ``q`` quantile of the sketched sample, within :data:`SKETCH_RELATIVE_ERROR`.

    The same positions and interpolation as :func:`prefix_percentile`; each order statistic
    is its bin's geometric midpoint, clamped into ``[low, high]``, and the smallest and largest
    are ``low`` and ``high`` exactly (so one or two samples, ``q = 0`` and ``q = 1`` are exact).
    ``count == 0`` gives ``+inf``. Work per call: one cumulative sum and two compare-and-count
    passes over the bins; the two order statistics are then computed together, as a 2-vector.
    """
    cumulative = ops.cumsum(bins)
    top = count - 1  # the rank of the largest value
    lower, gamma = _lower_rank(ops, top, q)
    if _exact_at_ranks(q):
        ranks = lower
        # The bin holding order statistic `rank` (0-based) is the number of bins whose
        # cumulative count is <= rank.
        which = ops.sum(cumulative <= lower)
    else:
        # The upper neighbour is always the next rank: at the last value gamma is 0 and the
        # (clamped, finite) neighbour does not change the result. Both ranks at once, and both
        # bins by one search of the (non-decreasing) cumulative counts.
        ranks = lower + ops.arange(2)
        which = ops.count_at_most(cumulative, ranks)
    exponent = (ops.cast(which, "float32") + (0.5 - SKETCH_OFFSET)) * (math.log(2.0) / SKETCH_PER_OCTAVE)
    values = ops.where(which == 0, zero, ops.exp(exponent) * anchor)
    # Never NaN (exp is finite, the anchor finite), so minimum/maximum clamp as comparisons would.
    values = ops.clamp_values(values, low, high)
    values = ops.where(ranks >= top, high, values)
    values = ops.where(ranks <= 0, low, values)
    if _exact_at_ranks(q):
        result = values
    else:
        result = _lerp_like_numpy(ops, values[..., 0], values[..., 1], gamma)
    return ops.where(count > 0, result, inf)


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
