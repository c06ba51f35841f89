"""Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan 2021).

"High-Performance Large-Scale Image Recognition Without Normalization" (NFNets), section 4:
each unit ``i`` of a weight (a row of a linear layer, an output filter of a convolution) has its
gradient ``G_i`` clipped relative to its weight ``W_i``::

    max_i = clip_factor * max(‖W_i‖, eps)
    G_i  ← G_i * max_i / max(‖G_i‖, 1e-6)    if ‖G_i‖ > max_i

Units follow the backend's weight layout (``Ops.unit_axis``: torch and NumPy are output-major,
so the norm runs over dims ``1..n``; TensorFlow/JAX are input-major), with an explicit ``axis``
override; vectors and scalars (biases, gains) are one unit. The paper leaves the final
classifier unclipped: name it in ``exclude`` (``exclude=("fc.*",)``), never "the last two
parameters" as timm's training script does by position.

Reference implementations and where this one differs (each a named test in
``tests/test_adaptive_parity.py``):

* timm ``adaptive_clip_grad``: same rule and results for torch layouts; timm takes norms in the
  gradient's dtype, this takes them in fp32. timm has no exclusion (its train script drops the
  last two parameters by position).
* optax ``adaptive_grad_clip``: input-major; also treats ``(1, n)`` tensors as vectors (it
  squeezes before testing ``ndim``) and, for 3-D tensors, reduces axis 0 only. Here a tensor is a
  vector only when ``ndim <= 1``, and ``axis`` says which axes index units.
"""

from __future__ import annotations

import fnmatch
import numbers
import warnings
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.measure import check_policy, gradients_finite, raise_if_nonfinite
from gradclip._core.ops import accumulation
from gradclip._core.registry import register
from gradclip._core.types import EmptyState
from gradclip._core.validation import check_number
from gradclip.clippers._scheduled import Scheduled, as_threshold

__all__ = ["AGC"]

#: Floor of the gradient norm in the divisor (the paper's and timm's 1e-6).
_GRAD_FLOOR = 1e-6


def _check_axis(where: str, axis: Any) -> tuple[int, ...] | None:
    if axis is None:
        return None
    items = axis if isinstance(axis, (tuple, list)) else (axis,)
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise InvalidArgumentError(
                f"{where}: axis must be None, an int or a tuple of ints (the axes indexing units), "
                f"got {axis!r}"
            )
        out.append(int(item))
    if len(set(out)) != len(out):
        raise InvalidArgumentError(f"{where}: axis must not repeat an axis, got {axis!r}")
    return tuple(out)


def _check_exclude(where: str, exclude: Any) -> tuple[str, ...]:
    if isinstance(exclude, str):
        # A bare pattern, not a sequence of one-character patterns.
        exclude = (exclude,)
    try:
        patterns = tuple(exclude)
    except TypeError:
        raise InvalidArgumentError(
            f"{where}: exclude must be a sequence of parameter-name patterns, got {exclude!r}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidArgumentError(
                f"{where}: exclude must hold non-empty parameter-name patterns (str), got {pattern!r}"
            )
    return patterns


@register("agc")
class AGC(Scheduled, Clipper):
    """Unit-wise adaptive gradient clipping relative to the parameters (NFNets' AGC).

    Needs the parameters: ``clip_(model)`` finds them beside their ``.grad``; the functional
    forms take ``params=`` in the structure of ``grads``.

    Args:
        clip_factor: λ, the largest allowed ratio ``‖G_i‖ / max(‖W_i‖, eps)``, ``> 0``. The
            paper uses 0.01 for batch size 4096 and larger values for smaller batches. A
            schedule of it (:mod:`gradclip.schedules`) is evaluated at each step (kept in the state).
        eps: Floor of the weight norm, ``> 0``, so zero-initialised units (biases) can still
            move: their gradient may reach ``clip_factor * eps``.
        exclude: Parameter-name patterns (``fnmatch`` globs, matched against the names of
            ``model.named_parameters()`` or dict keys joined by ``.``; list positions are
            ``#i``) whose gradients are left unclipped, e.g. ``("fc.*",)`` for a ResNet head.
            A pattern that matches no gradient is warned about once.
        axis: Which axes index units for tensors with ``ndim >= 2`` (an int or a tuple of ints;
            the norm is taken over the others). ``None`` uses the backend's layout
            (``Ops.unit_axis``). Vectors and scalars are always one unit. Under FSDP1 with
            ``use_orig_params=True`` (1-D pieces of each parameter) the backend forms the rows
            of the original shapes, and only ``None`` is accepted.
        nonfinite: Non-finite policy (see :mod:`gradclip.clippers.nonfinite`); under
            ``"propagate"`` units whose gradient norm is not finite are left as they are.

    ``info.threshold`` reports ``clip_factor`` (the bound is a ratio, per unit); ``info.coef``
    is the effective scale of the global norm.

    Raises:
        InvalidArgumentError: ``clip_factor`` or ``eps`` not > 0, bad ``exclude`` or ``axis``,
            an unknown policy; at call time, missing ``params``, parameters whose shapes differ
            from their gradients', NumPy ``clip_`` (no separate parameters), or an ``axis`` out of
            range for a tensor (nothing is modified).
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.PER_UNIT
    needs_params = True

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: Any = (),
        axis: Any = None,
        nonfinite: str = "propagate",
    ):
        super().__init__()
        where = "AGC"
        self.clip_factor = as_threshold(where, "clip_factor", clip_factor, low=0.0, low_inclusive=False, high_inclusive=False)
        self.eps = check_number(where, "eps", eps, low=0.0, low_inclusive=False, high_inclusive=False)
        self.exclude = _check_exclude(where, exclude)
        self.axis = _check_axis(where, axis)
        self.nonfinite = check_policy(where, nonfinite)
        self._warned_unmatched: set[str] = set()
        self._use_schedules({"clip_factor": 0.0}, EmptyState, {})

    def init_state(self, ops, grads):
        return self._with_clock(ops, EmptyState())

    def validate_state(self, where, state):
        self._check_clock(where, state)

    def _kept_axes(self, where: str, ops, shape: tuple[int, ...], name: str):
        ndim = len(shape)
        if ndim <= 1:
            return None
        axes = self.axis if self.axis is not None else (ops.unit_axis,)
        kept = []
        for axis in axes:
            if not -ndim <= axis < ndim:
                raise InvalidArgumentError(
                    f"{where}: axis {axis} is out of range for {name} of shape {tuple(shape)} "
                    f"(valid: {-ndim}..{ndim - 1}); nothing was clipped"
                )
            kept.append(axis % ndim)
        return tuple(sorted(set(kept)))

    def _excluded(self, names: list[str]) -> list[bool]:
        flags = [any(fnmatch.fnmatchcase(n, p) for p in self.exclude) for n in names]
        for pattern in self.exclude:
            if pattern not in self._warned_unmatched and not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                self._warned_unmatched.add(pattern)
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                warnings.warn(
                    f"AGC: exclude pattern {pattern!r} matches no parameter with a gradient "
                    f"(names: {shown}); it excludes nothing",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return flags

    def measure(self, ops, grads, names, params) -> Measured:
        """Unit-wise gradient norms, laid end to end, and their global norm (reduced over every
        process that shares a unit); ``extra`` carries the units' layout for decide/apply."""
        where = "AGC"
        if params is None:
            raise InvalidArgumentError(
                f"{where}: AGC clips relative to the parameters; pass params= (the weights, in the "
                "structure of grads), or call clip_(model) on a torch model"
            )
        if len(params) != len(grads):
            raise InvalidArgumentError(f"{where}: got {len(params)} parameter(s) for {len(grads)} gradient(s)")
        for name, p, g in zip(names, params, grads):
            if p is g:
                raise InvalidArgumentError(
                    f"{where}: {name} is its own gradient (NumPy arrays passed to clip_ have no "
                    "separate parameters); use AGC.clip(grads, params=weights)"
                )
            if tuple(p.shape) != tuple(g.shape):
                raise InvalidArgumentError(
                    f"{where}: parameter {name} has shape {tuple(p.shape)} but its gradient has "
                    f"shape {tuple(g.shape)}"
                )
        # Everything that can be refused is checked (on shapes and names, host-side) before any
        # gradient is read or written.
        axes = [self._kept_axes(where, ops, tuple(g.shape), n) for g, n in zip(grads, names)]
        excluded = self._excluded(names) if self.exclude else [False] * len(grads)

        given_finite = None
        if self.nonfinite == "zero":
            # info.finite describes the gradients as given (see gradclip.clippers.nonfinite).
            given_finite = gradients_finite(ops, grads)
            grads = ops.zero_nonfinite(grads)
        grad_units = ops.unit_norms(grads, axes)
        # Every unit of every tensor laid end to end: the per-unit rule below runs as a few
        # operations on one vector, not a few per tensor (on a GPU each is a kernel launch).
        # unit_totals sums such vectors over every unit, each counted once over all processes
        # (sharded units, process groups), so the global norms are identical on every rank.
        all_units = ops.flat_concat(grad_units)
        (squares,) = ops.unit_totals([all_units * all_units], grads, axes)
        norm = ops.sqrt(squares)
        if self.nonfinite == "raise":
            raise_if_nonfinite(ops, grads, norm, names, where)
        finite = ops.isfinite(norm)
        given_finite = finite if given_finite is None else given_finite
        layout = _Units(axes, excluded, grad_units, all_units)
        return Measured(grads, None, norm, finite, given_finite, 2.0, names, params, extra=layout)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS) -> Decision:
        grads, params, norm, finite = measured.grads, measured.params, measured.norm, measured.finite
        axes, excluded, grad_units, all_units = measured.extra
        acc = accumulation(norm)
        one = ops.scalar(1.0, acc)
        step = self._step_of(ops, state, signals)
        clip_factor = self._setting(ops, "clip_factor", step, acc)
        chosen = [i for i, skip in enumerate(excluded) if not skip]
        coefs: list[Any] = []
        if chosen:
            every = len(chosen) == len(grads)
            chosen_units = grad_units if every else [grad_units[i] for i in chosen]
            g_units = all_units if every else ops.flat_concat(chosen_units)
            p_units = ops.flat_concat(ops.unit_norms([params[i] for i in chosen], [axes[i] for i in chosen]))
            # A fixed factor multiplies as a host number (as it always has); a scheduled one as
            # this step's device value.
            factor = clip_factor if self.scheduled else self.clip_factor
            limit = ops.maximum(p_units, ops.scalar(self.eps, acc)) * factor
            above = g_units > limit
            divisor = ops.where(above, ops.maximum(g_units, ops.scalar(_GRAD_FLOOR, acc)), one)
            coef = ops.where(above, limit / divisor, one)
            # Under "skip" a non-finite step leaves everything alone; under "propagate" a unit
            # with a non-finite norm is left as it is (finite units are still clipped).
            keep = finite if self.nonfinite == "skip" else ops.isfinite(g_units)
            coef = ops.where(keep, coef, one)
            coefs = ops.split_as(coef, chosen_units)
            if every:
                kept = coef * g_units
                flags = ops.cast(coef < 1, acc)
            else:
                # Excluded tensors count in the norm after, unchanged, and clip no unit.
                by_tensor = dict(zip(chosen, coefs))
                kept = ops.flat_concat([by_tensor[i] * u if i in by_tensor else u for i, u in enumerate(grad_units)])
                flags = ops.flat_concat([
                    ops.cast(by_tensor[i] < 1, acc) if i in by_tensor else ops.cast(u < 0, acc)  # zeros, NaN-safe
                    for i, u in enumerate(grad_units)
                ])
        else:
            kept, flags = all_units, ops.cast(all_units < 0, acc)  # nothing clipped (NaN-safe zeros)
        # One reduction for both, on every rank whatever it holds (a collective when distributed):
        # the squares after clipping and the count of clipped units.
        squares_after, clipped_units = ops.unit_totals([kept * kept, flags], grads, axes)
        norm_after = ops.sqrt(squares_after)
        clipped = clipped_units > 0
        safe = ops.where(norm > 0, norm, one)
        effective = ops.where(norm > 0, norm_after / safe, one)
        effective = ops.where(ops.isfinite(effective), effective, one)
        skip = (~finite) if self.nonfinite == "skip" else ops.scalar(False, "bool")
        info = make_info(ops, norm, clip_factor, effective, clipped, measured.given_finite, skip)
        return Decision((chosen, coefs), self._advance(state, step), info)

    def apply(self, ops, grads, decision):
        """Scale the units of the tensors not excluded; excluded tensors stay as they are."""
        chosen, coefs = decision.coef
        grads = list(grads)
        if chosen:
            for i, g in zip(chosen, ops.scale_units([grads[i] for i in chosen], coefs)):
                grads[i] = g
        return grads, decision.info


class _Units(NamedTuple):
    """AGC's measurement beside the global norm: per tensor the kept axes and whether it is
    excluded, the unit norms per tensor and all of them laid end to end."""

    axes: list
    excluded: list
    grad_units: list
    all_units: Any

