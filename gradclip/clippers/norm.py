"""Norm-based clipping: the whole gradient, each tensor, or a sign step past a norm threshold.

* :class:`GlobalNorm` — all tensors together, direction kept (Pascanu et al. 2013; seed 001;
  ``torch.nn.utils.clip_grad_norm_``, ``optax.clip_by_global_norm``).
* :class:`Norm` — each tensor's own norm (``tf.clip_by_norm``, Keras ``clipnorm``).
* :class:`AverageNorm` — each tensor's norm divided by its element count
  (``tf.clip_by_average_norm``).
* :class:`BlockRMS` — each tensor's root-mean-square (``optax.clip_by_block_rms``; Adafactor's
  update clipping, Shazeer & Stern 2018).
* :class:`NormSign` — seed 001's formula (2): ``ε·sign(g)`` when the global norm exceeds ε.

Every coefficient is computed as ``where(norm > threshold, threshold / (norm + eps), 1)`` and
always multiplied in: no Python branch on a device value (DESIGN.md rule 1), and a norm at or
under the threshold multiplies by exactly 1, leaving gradients bit-for-bit unchanged (rule 4).

The thresholds of ``GlobalNorm``, ``Norm``, ``AverageNorm`` and ``BlockRMS`` accept a schedule
(:mod:`gradclip.schedules`: ``GlobalNorm(max_norm=CosineDecay(1.0, 10_000, 0.1))``, or a plain
callable of the step); the clipper then keeps the step in its state. With a number it is
stateless, as always.
"""

from __future__ import annotations

import math
from typing import Any

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.measure import check_policy, settle
from gradclip._core.ops import Ops, accumulation, dtype_label, largest_finite
from gradclip._core.registry import register
from gradclip._core.types import EmptyState
from gradclip._core.validation import check_norm_type, check_number
from gradclip.clippers._scheduled import Scheduled, as_threshold

__all__ = ["GlobalNorm", "Norm", "AverageNorm", "BlockRMS", "NormSign", "clip_coefficient"]


def clip_coefficient(ops: Ops, norm: Any, threshold: Any, eps: float = 0.0) -> Any:
    """``threshold / (norm + eps)`` where ``norm > threshold``, else exactly 1: the backend's
    :meth:`~gradclip._core.ops.Ops.clip_coefficient` (the formula and why it is written so are
    documented there)."""
    return ops.clip_coefficient(norm, threshold, eps)


@register("global_norm")
class GlobalNorm(Scheduled, Clipper):
    """Clip all gradients together so their global p-norm is at most ``max_norm``.

    ``g ← g · min(1, max_norm / (‖g‖ + eps))`` over the concatenation of every tensor, which
    keeps the update's direction (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training
    recurrent neural networks"). The norm accumulates in fp32 whatever the gradient dtype.

    Args:
        max_norm: Largest allowed global norm, ``>= 0`` (``inf`` measures without clipping), or
            a schedule of it (:mod:`gradclip.schedules`; then the step is kept in the state).
        norm_type: The p of the p-norm: any p > 0, or ``inf`` (max-abs).
        eps: Added to the norm in the divisor, as torch does (``1e-6``), so the clipped norm is
            ``max_norm · norm / (norm + eps)``, just under ``max_norm``; ``>= 0``.
        nonfinite: Non-finite policy, see :mod:`gradclip.clippers.nonfinite`.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: A negative/NaN ``max_norm`` or ``eps`` (or a schedule reaching
            one), ``norm_type <= 0``, or an unknown ``nonfinite`` policy.
    """

    defaults = {"max_norm": 1.0}

    def __init__(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        eps: float = 1e-6,
        nonfinite: str = "propagate",
        *,
        process_group: Any = None,
    ):
        super().__init__()
        self.process_group = process_group
        where = "GlobalNorm"
        self.max_norm = as_threshold(where, "max_norm", max_norm)
        self.norm_type = check_norm_type(where, norm_type)
        self.eps = check_number(where, "eps", eps, high=math.inf, high_inclusive=False)
        self.nonfinite = check_policy(where, nonfinite)
        self._use_schedules({"max_norm": 0.0}, EmptyState, {})

    def init_state(self, ops, grads):
        return self._with_clock(ops, EmptyState())

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        norm, finite = measured.norm, measured.finite
        step = self._step_of(ops, state, signals)
        threshold = self._setting(ops, "max_norm", step, accumulation(norm))
        coef, skip = settle(ops, ops.clip_coefficient(norm, threshold, self.eps), finite, self.nonfinite)
        info = make_info(ops, norm, threshold, coef, coef < 1, measured.given_finite, skip)
        return Decision(coef, self._advance(state, step), info)

    def validate_state(self, where, state):
        self._check_clock(where, state)


class _PerTensorNorm(Scheduled, Clipper):
    """Shared body of the per-tensor methods: a statistic per tensor, a coefficient per tensor.

    The statistic is ``‖g_i‖ / d_i`` where :meth:`_divisors` gives ``d_i`` (1 for the norm, the
    element count for the average norm, its square root for the RMS).
    """

    where = "Norm"
    argument = "max_norm"
    coefficient = Coefficient.PER_TENSOR

    def __init__(self, threshold: float, nonfinite: str, process_group: Any = None):
        super().__init__()
        self.process_group = process_group
        self.threshold = as_threshold(self.where, self.argument, threshold)
        self.nonfinite = check_policy(self.where, nonfinite)
        self._use_schedules({"threshold": 0.0}, EmptyState, {})

    def init_state(self, ops, grads):
        return self._with_clock(ops, EmptyState())

    def validate_state(self, where, state):
        self._check_clock(where, state)

    def _divisors(self, ops: Ops, grads: list[Any]) -> list[float]:
        return [1.0] * len(grads)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        grads, norms, norm, finite = measured.grads, measured.norms, measured.norm, measured.finite
        dtype = accumulation(norm)
        step = self._step_of(ops, state, signals)
        threshold = self._setting(ops, "threshold", step, dtype)
        # Empty tensors have divisor 0; their statistic is defined as 0 (nothing to clip). Norm's
        # divisors are all 1: its statistic is the norms themselves (no array to make each step).
        divisors = [d if d > 0 else 1.0 for d in self._divisors(ops, grads)]
        statistic = norms
        if any(d != 1.0 for d in divisors):
            statistic = norms / ops.array(divisors, dtype)
        coefs = ops.clip_coefficient(statistic, threshold)
        # A tensor with NaN/inf keeps coef 1 under "propagate"; "skip" leaves every tensor alone.
        # (Norms, and their ratios below, are >= 0 or NaN: finite_norm tests them in one step.)
        per_tensor_finite = ops.finite_norm(norms)
        coefs, skip = settle(ops, coefs, finite if self.nonfinite == "skip" else per_tensor_finite, self.nonfinite)
        after = ops.combine_norms(coefs * norms, self.norm_type)
        one = ops.scalar(1.0, dtype)
        # Divide only by a finite, positive norm (inf / inf is NaN, and NumPy warns); the
        # coefficient reported for other steps is 1.
        usable = (norm > 0) & finite
        effective = ops.ratio_or_one(usable, after, norm)
        effective = ops.where(ops.finite_norm(effective), effective, one)
        clipped = ops.any(coefs < 1)
        info = make_info(ops, norm, threshold, effective, clipped, measured.given_finite, skip)
        return Decision(coefs, self._advance(state, step), info)


@register("norm")
class Norm(_PerTensorNorm):
    """Clip each tensor separately so its own L2 norm is at most ``max_norm``.

    ``g_i ← g_i · max_norm / max(‖g_i‖, max_norm)``, the rule of ``tf.clip_by_norm`` and Keras'
    ``clipnorm``. Directions of single tensors are kept; the direction of the whole update is not.

    Args:
        max_norm: Largest allowed norm per tensor, ``>= 0``, or a schedule of it.
        norm_type: The p of the per-tensor p-norm (any p > 0, or ``inf``).
        nonfinite: Non-finite policy; under ``"propagate"`` only the tensors with non-finite
            values are left unclipped.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: Negative or NaN ``max_norm``, ``norm_type <= 0``, unknown policy.
    """

    defaults = {"max_norm": 1.0}
    where = "Norm"

    def __init__(
        self, max_norm: float, norm_type: float = 2.0, nonfinite: str = "propagate", *, process_group: Any = None
    ):
        super().__init__(max_norm, nonfinite, process_group)
        self.norm_type = check_norm_type(self.where, norm_type)

    @property
    def max_norm(self) -> float:
        return self.threshold


@register("average_norm")
class AverageNorm(_PerTensorNorm):
    """Clip each tensor so its L2 norm divided by its element count is at most ``max_norm``.

    The rule of ``tf.clip_by_average_norm`` (TensorFlow 1.x), applied to every tensor:
    ``g_i ← g_i · max_norm / max(‖g_i‖ / n_i, max_norm)``.

    Args:
        max_norm: Largest allowed average norm per tensor, ``>= 0``, or a schedule of it.
        nonfinite: Non-finite policy.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: Negative or NaN ``max_norm``, unknown policy.
    """

    defaults = {"max_norm": 1e-3}
    where = "AverageNorm"

    def __init__(self, max_norm: float, nonfinite: str = "propagate", *, process_group: Any = None):
        super().__init__(max_norm, nonfinite, process_group)

    @property
    def max_norm(self) -> float:
        return self.threshold

    def _divisors(self, ops, grads):
        return [float(ops.numel(g)) for g in grads]


@register("block_rms")
class BlockRMS(_PerTensorNorm):
    """Clip each tensor so its root-mean-square is at most ``threshold``.

    ``g_i ← g_i / max(1, rms(g_i) / threshold)`` with ``rms(g) = ‖g‖₂ / √n``: the rule of
    ``optax.clip_by_block_rms`` and of Adafactor's update clipping (Shazeer & Stern 2018).

    Args:
        threshold: Largest allowed RMS per tensor, ``>= 0``, or a schedule of it.
        nonfinite: Non-finite policy.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: Negative or NaN ``threshold``, unknown policy.
    """

    defaults = {"threshold": 1.0}
    where = "BlockRMS"
    argument = "threshold"

    def __init__(self, threshold: float, nonfinite: str = "propagate", *, process_group: Any = None):
        super().__init__(threshold, nonfinite, process_group)

    def _divisors(self, ops, grads):
        return [math.sqrt(ops.numel(g)) for g in grads]


@register("norm_sign")
class NormSign(Clipper):
    """Seed 001's formula (2): replace the gradient by ``ε·sign(g)`` when ``‖g‖ > ε``.

    ``Clip(g, ε) = ε·sign(g)`` if the global L2 norm exceeds ε, else ``g``. Every element of a
    clipped step becomes ``±ε`` (or stays 0): a sign-descent step of fixed magnitude per element,
    as in signSGD (Bernstein et al. 2018), taken only when the gradient is large.

    Args:
        threshold: ε, ``>= 0``.
        nonfinite: Non-finite policy.
        process_group: Keyword only; see :attr:`gradclip.Clipper.process_group`.

    Raises:
        InvalidArgumentError: Negative or NaN ``threshold``, unknown policy; at call time, a
            threshold the gradients' dtype cannot represent (above 65504 for fp16), before
            anything is changed.
    """

    defaults = {"threshold": 1.0}

    def __init__(self, threshold: float, nonfinite: str = "propagate", *, process_group: Any = None):
        super().__init__()
        self.process_group = process_group
        self.threshold = check_number("NormSign", "threshold", threshold)
        self.nonfinite = check_policy("NormSign", nonfinite)

    coefficient = Coefficient.ELEMENTWISE

    def measure(self, ops, grads, names, params):
        # ε·sign(g) must be representable: NormSign(1e5) on fp16 gradients would write inf into
        # every element of a clipped step. The dtypes are metadata: checked before anything.
        # Each dtype once, in order of first appearance (the first offending tensor is named).
        for dtype in dict.fromkeys(grad.dtype for grad in grads):
            largest = largest_finite(dtype)
            if largest < self.threshold < math.inf:  # inf never clips: nothing is written
                name = next(n for n, g in zip(names, grads) if g.dtype == dtype)
                raise InvalidArgumentError(
                    f"NormSign: threshold={self.threshold!r} is not representable in the {dtype_label(dtype)} "
                    f"gradient {name} (largest finite value {largest:g}); a clipped step would write inf. "
                    f"Use a threshold in [0, {largest:g}] or clip in a wider dtype. Nothing was changed."
                )
        return super().measure(ops, grads, names, params)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        norm, finite = measured.norm, measured.finite
        dtype = accumulation(norm)
        threshold = ops.scalar(self.threshold, dtype)
        # settle() applies the policy the same way as for the other methods (the skip flag).
        # Whether to take the sign step is decided by comparing, not by coef < 1: the
        # coefficient threshold * (1 / norm) can round to exactly 1 for a norm one ulp above the
        # threshold, and formula (2) must still apply there. Non-finite norms never sign-clip.
        _coef, skip = settle(ops, ops.clip_coefficient(norm, threshold), finite, self.nonfinite)
        clipped = (norm > threshold) & finite
        one = ops.scalar(1.0, dtype)
        return Decision(clipped, state, make_info(ops, norm, threshold, one, clipped, measured.given_finite, skip))

    def apply(self, ops, grads, decision):
        """The sign step where the decision says so; the info's coef is the effective scale."""
        info = decision.info
        clipped, norm = decision.coef, info.norm
        grads = ops.sign_where(grads, self.threshold, clipped)
        after = ops.global_norm(grads, 2.0)
        # clipped implies a finite norm > threshold >= 0.
        effective = ops.ratio_or_one(clipped, after, norm)
        return grads, info._replace(coef=effective)
