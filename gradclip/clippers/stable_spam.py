"""Stable-SPAM's gradient stabilisers: AdaClip (adaptive spike clipping per element) and AdaGN
(adaptive gradient-norm scaling per tensor).

Huang, Zhu, Jin, Liu, Wang & Liu 2025, "Stable-SPAM: How to Train in 4-Bit More Stably than
16-Bit Adam" (arXiv:2502.17055), and its reference code, TianjinYellow/StableSPAM
``galore_torch/stablespam.py`` (commit 6a66da1), which applies, per parameter tensor and in this
order, before its Adam update:

* **AdaClip** (:class:`AdaClip`): ``m ← θ·m + (1-θ)·max|g|``, ``m̂ = m / (1 - θ^t)``; the elements
  with ``|g| > m̂`` become ``g / max|g| · m̂`` (the largest is brought to ``±m̂``, the others above
  ``m̂`` scaled by the same factor).
* **AdaGN** (:class:`AdaGN`): with ``‖g‖`` the tensor's norm after AdaClip,
  ``m ← γ₁·m + (1-γ₁)·‖g‖``, ``v ← γ₂·v + (1-γ₂)·‖g‖²``, bias-corrected ``m̂``, ``v̂``, and
  ``g ← g / ‖g‖ · m̂ / (√v̂ + ε)``: every tensor is rescaled to a norm near 1 that follows its
  norm's recent mean relative to its recent RMS (Adam is invariant to that scale; a plain SGD
  step is not).

``gradclip.chain(AdaClip(), AdaGN())`` is Stable-SPAM's gradient path; its momentum reset every
``update_proj_gap`` steps is the optimizer's (:class:`gradclip.torch.ClippedOptimizer`).

Deviations from the reference code (each a strict expectation in ``tests/test_stable_spam.py``):

* **Statistics survive the optimizer's momentum resets.** The reference sets its per-tensor step
  counter back to 1 at every reset (``update_proj_gap``), which re-inflates the bias correction of
  the *clipping* statistics too: right after a reset AdaClip's ``m̂`` is ``m / (1 - θ²)``, about
  500 times the running maximum for θ = 0.999 (AdaClip is off for hundreds of steps), and
  AdaGN's ``m̂`` about twice its mean. Here the bias corrections count this clipper's own steps.
* **Non-finite tensors** (NaN/inf, or a norm that overflows) are left as they are and do not
  enter the statistics; in the reference ``max|g| = inf`` makes ``m`` inf for ever (and AdaClip
  divides ``inf / inf``).
* **fp32 arithmetic** for bf16/fp16 gradients (the reference computes ``g / max|g| · m̂`` and the
  comparisons in the gradient's dtype); fp64 gradients are computed in fp64.
* AdaGN's optional cosine warm-up of ``γ₁`` (the reference's ``total_T``/``eta_min``, off by
  default there) is not part of it.

The state holds the bias-corrected estimates themselves, with the bias correction as an EMA of
1 beside them (``d ← θ·d + (1-θ)``, which is ``1 - θ^t``): ``m̂ ← m̂ + (1-θ)/d · (x - m̂)`` is
``(θ·m + (1-θ)·x) / (1 - θ^t)`` in exact arithmetic, needs no power of a device step count, and
keeps a constant input exactly constant (dividing an fp32 EMA by an fp32 ``1 - θ^t`` can land one
unit below the input, and AdaClip would then clip the largest element of a steady gradient by
that unit). The two agree with the reference to fp32 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import StateError
from gradclip._core.measure import check_policy
from gradclip._core.ops import largest_finite
from gradclip._core.registry import register
from gradclip._core.validation import check_choice, check_number
from gradclip.clippers._adaptive import accumulation, as_f32, check_field, skip_flag
from gradclip.clippers.value import elementwise_info

__all__ = ["AdaClip", "AdaClipState", "AdaGN", "AdaGNState"]


class AdaClipState(NamedTuple):
    """Per tensor: the bias-corrected EMA of the largest element magnitude, and the correction."""

    peak: Any  # (n,) fp32: m̂, the bias-corrected EMA of max|g| (0 before the first update)
    debias: Any  # (n,) fp32: 1 - θ^t for the t updates seen (0 before the first)


def _debiased(ops, estimate: Any, debias: Any, x: Any, rate: float, ok: Any) -> tuple[Any, Any]:
    """One update of a bias-corrected EMA where ``ok``: ``(estimate, debias)`` after ``x``.

    ``d' = (1-rate)·d + rate`` and ``m̂' = m̂ + rate/d' · (x - m̂)`` (the first update gives
    ``m̂ = x`` exactly: ``rate/d'`` is ``rate/rate``). ``d'`` is positive where the update is
    used; elsewhere the divisor is 1 (no 0 / 0 in a discarded branch).
    """
    new_debias = (1.0 - rate) * debias + rate
    # A device numerator: torch computes `number / tensor` as `reciprocal(tensor) * number`,
    # another rounding than NumPy's (and TensorFlow's) division.
    weight = ops.scalar(rate, "float32") / ops.where(ok, new_debias, ops.scalar(1.0, "float32"))
    new_estimate = estimate + weight * (x - estimate)
    return ops.where(ok, new_estimate, estimate), ops.where(ok, new_debias, debias)


def _fraction(where: str, name: str, value: Any) -> float:
    return check_number(where, name, value, low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)


def _check_tensors(where: str, state: Any, field: str, grads: list[Any], what: str) -> None:
    count = getattr(state, field).shape[0]
    if count != len(grads):
        raise StateError(
            f"{where}: the state tracks {count} tensor(s) but {len(grads)} gradient(s) were given; "
            f"{what} keeps statistics per tensor, so pass the same tensors every step (or reset() "
            "the clipper). Nothing was changed."
        )


def _check_ema_pair(where: str, state: Mapping[str, Any], value: str, debias: str, shape: tuple[int, ...]) -> None:
    """An EMA and its bias correction: values >= 0, the correction in [0, 1), the EMA 0 where
    the correction is (no update yet)."""
    check_field(where, state, value, "float", shape, low=0.0)
    check_field(where, state, debias, "float", shape, low=0.0, high=1.0)
    values = state[value] if shape else [state[value]]
    weights = state[debias] if shape else [state[debias]]
    for index, (v, d) in enumerate(zip(values, weights)):
        if d >= 1.0 or (d == 0 and v != 0):
            raise StateError(
                f"{where}: entry #{index} has {value}={v!r} with {debias}={d!r}; the bias correction "
                f"must be in [0, 1), and {value} 0 where it is 0 (the state is inconsistent)"
            )


@register("ada_clip")
class AdaClip(Clipper):
    """Stable-SPAM's AdaClip: clip each tensor's elements at a bias-corrected EMA of its largest
    element magnitude.

    Args:
        theta: EMA factor θ in ``(0, 1)`` (the paper's and the reference's 0.999).
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`); under
            ``"propagate"`` a tensor with NaN/inf is left as it is and its statistics unchanged.

    The first step of each tensor has ``m̂ = max|g|`` and clips nothing. ``info.threshold`` is
    the largest element magnitude allowed this step (the largest ``m̂`` over the tensors; ``inf``
    before any statistic); ``info.coef`` the effective scale of the global norm.

    The state holds statistics per tensor: pass the same tensors every step (``clip_`` and
    ``clip`` refuse another layout).

    Raises:
        InvalidArgumentError: ``theta`` outside ``(0, 1)``, an unknown policy.
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.ELEMENTWISE
    per_tensor_state = True
    state_type = AdaClipState
    state_dtypes = {"peak": "float32", "debias": "float32"}

    def __init__(self, theta: float = 0.999, nonfinite: str = "propagate"):
        super().__init__()
        self.theta = _fraction("AdaClip", "theta", theta)
        self.nonfinite = check_policy("AdaClip", nonfinite)

    def init_state(self, ops, grads):
        zeros = ops.cast(ops.arange(len(grads)), "float32") * 0.0
        return AdaClipState(zeros, zeros)

    def check_fits(self, state, grads):
        _check_tensors("AdaClip", state, "peak", grads, "AdaClip")

    def measure(self, ops, grads, names, params):
        """The default measurement (norms under the policy) and each tensor's extrema."""
        measured = super().measure(ops, grads, names, params)
        return measured._replace(extra=ops.extrema(measured.grads))

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        f32 = "float32"
        grads, norms, norm, finite = measured.grads, measured.norms, measured.norm, measured.finite
        highs, lows = measured.extra
        zero, inf = ops.scalar(0.0, f32), ops.scalar(math.inf, f32)
        largest = ops.maximum(highs, -lows)  # max|g| per tensor, fp32 (-inf for an empty tensor)
        # A tensor informs and is clipped when its values are finite (its norm too: an overflow
        # counts as non-finite) and it has elements; under "skip" nothing happens on a bad step.
        ok = ops.isfinite(norms) & ops.isfinite(largest) & (largest >= 0)
        if self.nonfinite == "skip":
            ok = ok & finite
        largest = ops.where(ok, largest, zero)
        peak, debias = _debiased(ops, state.peak, state.debias, largest, 1.0 - self.theta, ok)
        bound = ops.where(debias > 0, peak, inf)  # m̂, fp32 (none before the first update)
        clip_each = ok & (largest > bound)
        # The largest bound, over every process's tensors: an inf-norm is a MAX reduction there
        # (a rank without gradients takes part, with nothing).
        reduce = len(grads) > 0 or ops.distributed
        threshold = ops.cast(ops.combine_norms(bound, math.inf) if reduce else inf, accumulation(norm))
        clipped = ops.any(clip_each) if len(grads) else ops.scalar(False, "bool")
        skip = skip_flag(ops, finite, self.nonfinite)
        one_acc = ops.scalar(1.0, accumulation(norm))
        info = make_info(ops, norm, threshold, one_acc, clipped, measured.given_finite, skip)
        return Decision((clip_each, bound, largest), AdaClipState(peak, debias), info)

    def apply(self, ops, grads, decision):
        """``g / max|g| · m̂`` where ``|g| > m̂``, per tensor; everything else as it is."""
        clip_each, bound, largest = decision.coef
        info = decision.info
        acc = accumulation(info.norm)
        replacements, masks = [], []
        for i, g in enumerate(grads):
            value = ops.cast(g, acc)
            limit = ops.cast(bound[i], acc)
            # The divisor is 1 where the tensor is not clipped (no 0 / 0 in a discarded branch).
            divisor = ops.cast(ops.where(clip_each[i], largest[i], ops.scalar(1.0, "float32")), acc)
            replacements.append(value / divisor * limit)
            masks.append(((value > limit) | (value < -limit)) & clip_each[i])
        grads = ops.select(grads, replacements, masks) if grads else grads
        done = elementwise_info(ops, info.norm, grads, info.threshold, info.clipped)
        return grads, done._replace(finite=info.finite, skip=info.skip)

    def validate_state(self, where, state):
        peak = state["peak"]
        if not isinstance(peak, list):
            raise StateError(f"{where}: state field 'peak' must be a list, got {type(peak).__name__}")
        _check_ema_pair(where, state, "peak", "debias", (len(peak),))


class AdaGNState(NamedTuple):
    """Bias-corrected EMAs of the norm and the squared norm (per tensor, or of the global
    norm), and their bias corrections."""

    mean: Any  # (n,) or 0-d fp32: m̂, bias-corrected EMA of ‖g‖ (γ₁)
    square: Any  # (n,) or 0-d fp32: v̂, bias-corrected EMA of ‖g‖² (γ₂)
    debias_mean: Any  # 1 - γ₁^t
    debias_square: Any  # 1 - γ₂^t


@register("ada_gn")
class AdaGN(Clipper):
    """Stable-SPAM's AdaGN: rescale each tensor to ``m̂ / (√v̂ + ε)`` from EMAs of its norm.

    Args:
        gamma1: EMA factor of the norm, in ``(0, 1)`` (the reference's 0.7).
        gamma2: EMA factor of the squared norm, in ``(0, 1)`` (the reference's 0.9).
        eps: Added to ``√v̂``, ``>= 0`` (the reference uses Adam's ``eps``, 1e-8).
        scope: ``"tensor"`` (the reference: one norm and one scale per tensor) or ``"global"``
            (one scale for all gradients from the global norm: a single coefficient, which
            ``ClippedOptimizer(fold=True)`` folds into a fused step).
        nonfinite: Non-finite policy; under ``"propagate"`` a tensor (``scope="global"``: a
            step) with NaN/inf is left as it is and the statistics unchanged.

    A zero norm enters the statistics (as in the reference) and is left as it is, as is a norm
    too small for its scale to be represented (a denormal one).
    ``info.threshold`` is the global norm the gradients are scaled to; ``info.coef`` the
    effective scale; ``info.clipped`` whether any tensor was rescaled (up or down).

    Raises:
        InvalidArgumentError: An argument out of range, an unknown ``scope`` or policy.
    """

    defaults: dict[str, Any] = {}
    state_type = AdaGNState
    state_dtypes = {"mean": "float32", "square": "float32", "debias_mean": "float32", "debias_square": "float32"}

    def __init__(
        self,
        gamma1: float = 0.7,
        gamma2: float = 0.9,
        eps: float = 1e-8,
        scope: str = "tensor",
        nonfinite: str = "propagate",
    ):
        super().__init__()
        where = "AdaGN"
        self.gamma1 = _fraction(where, "gamma1", gamma1)
        self.gamma2 = _fraction(where, "gamma2", gamma2)
        self.eps = check_number(where, "eps", eps, high_inclusive=False)
        self.scope = check_choice(where, "scope", scope, ("tensor", "global"))
        self.nonfinite = check_policy(where, nonfinite)
        per_tensor = self.scope == "tensor"
        self.coefficient = Coefficient.PER_TENSOR if per_tensor else Coefficient.SCALAR
        self.per_tensor_state = per_tensor

    def init_state(self, ops, grads):
        if self.scope == "tensor":
            zero = ops.cast(ops.arange(len(grads)), "float32") * 0.0
        else:
            zero = ops.scalar(0.0, "float32")
        return AdaGNState(zero, zero, zero, zero)

    def check_fits(self, state, grads):
        if self.scope == "tensor":
            _check_tensors("AdaGN", state, "mean", grads, "AdaGN(scope='tensor')")

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        f32 = "float32"
        norms, norm, finite = measured.norms, measured.norm, measured.finite
        acc = accumulation(norm)
        per_tensor = self.scope == "tensor"
        x = norms if per_tensor else norm
        # Finite in fp32 too (an fp64 norm beyond fp32's range would make the state inf).
        x32 = as_f32(ops, x)
        ok = ops.isfinite(x32)
        if self.nonfinite == "skip":
            ok = ok & finite
        zero = ops.scalar(0.0, f32)
        x32 = ops.where(ok, x32, zero)
        mean, debias_mean = _debiased(ops, state.mean, state.debias_mean, x32, 1.0 - self.gamma1, ok)
        square, debias_square = _debiased(ops, state.square, state.debias_square, x32 * x32, 1.0 - self.gamma2, ok)
        divisor = ops.sqrt(square) + self.eps
        if self.eps == 0:
            # v̂ = 0 only where every norm seen was 0 (m̂ = 0 too, and the tensor is not
            # scaled): divide by 1 there, not 0 / 0.
            divisor = ops.where(square > 0, divisor, ops.scalar(1.0, f32))
        target = ops.cast(mean / divisor, acc)
        one_acc = ops.scalar(1.0, acc)
        # Scaled where target/‖g‖ is finite: a denormal norm would make it inf (and the
        # elements inf); it is left as it is. (Compared without forming the quotient: NumPy
        # warns on an overflowing division.)
        scaled = ok & (x > 0) & (x > target * (1.0 / largest_finite(acc)))
        # The norm's own dtype divides (fp64 gradients keep fp64 coefficients); 1 elsewhere.
        coef = ops.where(scaled, target / ops.where(scaled, x, one_acc), one_acc)
        if per_tensor:
            # torch.distributed: combine_norms reduces over the process group, so a rank without
            # gradients takes part too.
            present = len(measured.grads) > 0
            after = ops.combine_norms(coef * norms, 2.0) if present or ops.distributed else norm
            changed = ops.any(coef != 1) if present else ops.scalar(False, "bool")
        else:
            after = coef * norm
            changed = coef != 1
        usable = (norm > 0) & finite
        effective = ops.where(usable, after / ops.where(usable, norm, one_acc), one_acc)
        skip = skip_flag(ops, finite, self.nonfinite)
        threshold = ops.where(finite, after, norm)
        info = make_info(ops, norm, threshold, effective, changed, measured.given_finite, skip)
        return Decision(coef, AdaGNState(mean, square, debias_mean, debias_square), info)

    def validate_state(self, where, state):
        if self.scope == "tensor":
            mean = state["mean"]
            if not isinstance(mean, list):
                raise StateError(f"{where}: state field 'mean' must be a list (scope='tensor'), got {mean!r}")
            shape: tuple[int, ...] = (len(mean),)
        else:
            shape = ()
        _check_ema_pair(where, state, "mean", "debias_mean", shape)
        _check_ema_pair(where, state, "square", "debias_square", shape)
        # Both EMAs are updated together.
        means = state["debias_mean"] if shape else [state["debias_mean"]]
        squares = state["debias_square"] if shape else [state["debias_square"]]
        if any((a == 0) != (b == 0) for a, b in zip(means, squares)):
            raise StateError(f"{where}: debias_mean and debias_square must be 0 at the same entries")
