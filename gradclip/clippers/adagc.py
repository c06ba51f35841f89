"""AdaGC: per-tensor clipping against an EMA of each tensor's own clipped norm.

Wang, Li, Chen, Zeng, Yang, Yu, Ma & Shen 2025, "AdaGC: Improving Training Stability for Large
Language Model Pretraining" (arXiv:2502.11034), Algorithm 1. For each tensor ``i``:

* **Warm-up** (the first ``start_clip_steps`` steps): global-norm clipping at
  ``warmup_max_norm``, ``h = min(1, warmup_max_norm / ‖g‖)``, ``ĝ_i = h·g_i``; ``γ_i`` is the
  running minimum of ``‖ĝ_i‖``.
* **Afterwards**: ``h_i = min(1, clip_ratio · γ_i / ‖g_i‖)``, ``ĝ_i = h_i·g_i``, and
  ``γ_i ← β·γ_i + (1-β)·‖ĝ_i‖`` (an EMA of the *clipped* norm, so a spike cannot raise it by more
  than a factor ``β + (1-β)·clip_ratio`` per step).

State: one fp32 ``γ`` and one flag per tensor (``5·n`` bytes) and a step count. The clip
coefficient is ``clip_ratio·γ_i / (‖g_i‖ + eps)`` where the norm exceeds ``clip_ratio·γ_i``, else
exactly 1.

Deviations from the paper, chosen (each tested in ``tests/test_adaptive_adagc.py``):

* A zero (or non-finite) norm does not update ``γ_i``: the paper's running minimum would become
  0 for a tensor whose gradient is zero during warm-up (zero-initialised branches, unused
  embeddings), and its EMA of zeros would then clip that tensor to zero for ever.
* A tensor with no positive norm before the end of warm-up starts its ``γ_i`` from its first
  positive norm afterwards (that step is not clipped).
* ``γ_i`` stays positive and finite: an update that would underflow fp32 to 0 is not taken (the
  paper's reals cannot reach 0; fp32 can, for norms near 1e-38), nor one that would overflow it
  (an unseen fp64 tensor's first norm beyond ~3.4e38: the tensor stays unseen, unclipped, until
  a representable norm arrives). ``load_state_dict`` accordingly requires ``seen_i`` exactly
  where ``γ_i > 0`` and every ``γ_i`` finite.

Precision: the coefficients are computed in the norms' dtype (fp32, or fp64 for fp64
gradients), so an fp64 tensor under its bound is left bit for bit as it is (DESIGN rule 4) and
one beyond fp32's range (~3.4e38) is scaled, not zeroed; only ``γ`` is fp32.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import StateError
from gradclip._core.measure import check_policy
from gradclip._core.registry import register
from gradclip._core.validation import check_int, check_number
from gradclip.clippers._adaptive import accumulation, as_f32, check_field, skip_flag

__all__ = ["AdaGC", "AdaGCState"]


class AdaGCState(NamedTuple):
    """Per-tensor EMA of clipped norms."""

    step: Any  # int64 0-d: finite steps seen
    gamma: Any  # (n,) fp32: γ_i
    seen: Any  # (n,) bool: γ_i holds a value (a positive norm was seen)


@register("adagc")
class AdaGC(Clipper):
    """Adaptive per-tensor gradient clipping relative to each tensor's history (AdaGC).

    Args:
        clip_ratio: λ_rel, how far above its EMA ``γ_i`` a tensor's norm may go, ``> 0`` (the
            paper uses 1.04).
        beta: EMA factor in ``[0, 1)`` (the paper: 0.99).
        start_clip_steps: Warm-up steps of global-norm clipping, ``>= 1``.
        warmup_max_norm: λ_abs, the global norm bound during warm-up, ``> 0``.
        eps: Added to each norm in the divisor, ``>= 0``.
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`). Non-finite steps
            leave the state unchanged.

    The state holds one ``γ`` per gradient tensor, so every call must pass the same tensors in
    the same order. ``clip_`` and ``clip`` remember the names and shapes of the tensors their
    state was last used with and refuse others (a parameter without a gradient on one step
    would shift every later tensor onto another's ``γ``, silently); give such a parameter a zero
    gradient instead, as ``gradclip.keras.ClippingOptimizer`` does. ``info.threshold`` is
    ``warmup_max_norm`` during warm-up and afterwards the bound on the clipped global norm,
    ``‖(clip_ratio·γ_i)_i‖`` (``inf`` while a tensor has no ``γ`` yet).

    Raises:
        InvalidArgumentError: An argument out of range (named in the message), unknown policy.
        StateError: At call time, a state built for a different number of tensors, or (through
            ``clip_``/``clip``) gradients whose names or shapes differ from the last call's.
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.PER_TENSOR
    per_tensor_state = True
    state_type = AdaGCState
    state_dtypes = {"step": "int64", "gamma": "float32", "seen": "bool"}

    def __init__(
        self,
        clip_ratio: float = 1.04,
        beta: float = 0.99,
        start_clip_steps: int = 100,
        warmup_max_norm: float = 1.0,
        eps: float = 1e-6,
        nonfinite: str = "propagate",
    ):
        super().__init__()
        where = "AdaGC"
        self.clip_ratio = check_number(where, "clip_ratio", clip_ratio, low=0.0, low_inclusive=False, high_inclusive=False)
        self.beta = check_number(where, "beta", beta, low=0.0, high=1.0, high_inclusive=False)
        self.start_clip_steps = check_int(where, "start_clip_steps", start_clip_steps, low=1)
        self.warmup_max_norm = check_number(
            where, "warmup_max_norm", warmup_max_norm, low=0.0, low_inclusive=False, high_inclusive=False
        )
        self.eps = check_number(where, "eps", eps, high_inclusive=False)
        self.nonfinite = check_policy(where, nonfinite)

    def check_fits(self, state, grads):
        if state.gamma.shape[0] != len(grads):
            raise StateError(
                f"AdaGC: the state tracks {state.gamma.shape[0]} tensor(s) but {len(grads)} "
                "gradient(s) were given; AdaGC keeps one threshold per tensor, so pass the same "
                "tensors every step (or reset() the clipper). Nothing was changed."
            )

    def init_state(self, ops, grads):
        n = len(grads)
        gamma = ops.cast(ops.arange(n), "float32") * 0.0
        return AdaGCState(ops.scalar(0, "int64"), gamma, gamma > 0)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        found = measured
        grads, norms, norm, finite = found.grads, found.norms, found.norm, found.finite
        # Coefficients are computed in the norms' dtype (fp64 for fp64 gradients): an fp64 norm
        # compared with its own fp32 rounding would clip by an ulp, and one beyond fp32's range
        # would become inf (and inf·0 NaN). Only γ, the state, is fp32.
        acc = accumulation(norm)
        one, zero = ops.scalar(1.0, acc), ops.scalar(0.0, acc)
        # A non-finite step changes nothing: its norms are replaced by 0 before any arithmetic
        # (so no inf * 0 or inf / inf is ever formed), which makes every coefficient below
        # exactly 1 and no tensor informative. (A finite global norm has finite per-tensor norms.)
        norms = ops.where(finite, norms, zero)
        total = ops.where(finite, norm, zero)
        gamma, seen = state.gamma, state.seen
        warming = state.step < self.start_clip_steps

        # γ where a tensor has one, else inf (an unseen tensor's γ is 0, which load_state_dict
        # checks): the warm-up's running minimum and the bounds below both want inf there.
        known = ops.where(seen, gamma, ops.scalar(math.inf, "float32"))

        # The coefficients: during warm-up one global coefficient; afterwards one per tensor,
        # against clip_ratio·γ (an unseen tensor has no bound).
        warm_limit = ops.scalar(self.warmup_max_norm, acc)
        h = ops.clip_coefficient(total, warm_limit, self.eps)
        bounds = ops.cast(known, acc) * self.clip_ratio
        above = norms > bounds
        # With eps > 0 the divisor is positive; with eps = 0 it is 1 where unused (no 0 / 0).
        divisor = norms + self.eps if self.eps > 0 else ops.where(above, norms, one)
        h_each = ops.where(above, bounds / divisor, one)
        coefs = ops.where(warming, h, h_each)

        # γ from the clipped norms (the warm-up's or the per-tensor ones, as coefs is): during
        # warm-up their running minimum (an unseen tensor takes its clipped norm), afterwards
        # their EMA.
        clipped_norms = coefs * norms
        clipped_f32 = as_f32(ops, clipped_norms)
        gamma_warm = ops.minimum(clipped_f32, known)
        ema = self.beta * gamma + (1.0 - self.beta) * clipped_f32
        gamma_adaptive = ops.where(seen, ema, clipped_f32)

        candidate = ops.where(warming, gamma_warm, gamma_adaptive)
        # Which tensors inform γ this step: positive norms (so finite steps) and a positive new γ
        # (one that underflowed fp32 would clip the tensor to zero for ever); neither is NaN, so
        # both are positive where their minimum is. So ``seen`` holds exactly where γ > 0, which
        # load_state_dict checks.
        informative = ops.minimum(norms, candidate) > 0
        if acc == "float64":
            # An fp64 norm beyond fp32's range (~3.4e38) would store γ = inf, a bound that never
            # clips again (and a checkpoint that cannot load): such a norm informs nothing, and
            # the tensor stays as it was. fp32 norms cannot get here (their clipped values and
            # the EMA of them are at most the fp32 norm).
            informative = informative & ops.isfinite(candidate)
        gamma = ops.where(informative, candidate, gamma)
        seen = seen | informative
        skip = skip_flag(ops, finite, self.nonfinite)
        step = ops.count_up(state.step, finite)

        # The effective coefficient: every coef is <= 1, so the clipped global norm is at most the
        # (finite) global norm and the ratio is finite.
        after = ops.combine_norms(clipped_norms, 2.0)
        positive = total > 0
        effective = ops.ratio_or_one(positive, after, total)
        # torch.distributed: combine_norms reduces over the process group, so a rank without
        # gradients must call it too.
        reduce = len(grads) or ops.distributed
        adaptive_threshold = ops.combine_norms(bounds, 2.0) if reduce else zero
        threshold = ops.where(warming, warm_limit, adaptive_threshold)
        clipped = ops.any(coefs < 1) if len(grads) else ops.scalar(False, "bool")
        info = make_info(ops, norm, threshold, effective, clipped, found.given_finite, skip)
        return Decision(coefs, AdaGCState(step, gamma, seen), info)

    def validate_state(self, where, state):
        check_field(where, state, "step", "int", low=0)
        gamma, seen = state["gamma"], state["seen"]
        if not isinstance(gamma, list) or not isinstance(seen, list) or len(gamma) != len(seen):
            raise StateError(f"{where}: state fields 'gamma' and 'seen' must be lists of one length")
        check_field(where, state, "gamma", "float", (len(gamma),), low=0.0)
        check_field(where, state, "seen", "bool", (len(seen),))
        # γ_i is set only from a positive value, at the step that marks the tensor seen, and an
        # EMA of positive values stays positive (an update that would underflow is refused):
        # seen_i holds exactly where γ_i > 0. Seen with γ_i = 0 would clip the tensor to zero for
        # ever; unseen with γ_i > 0 cannot arise.
        for index, (g, flag) in enumerate(zip(gamma, seen)):
            if flag != (g > 0):
                raise StateError(
                    f"{where}: tensor #{index} has seen={flag!r} with gamma={g!r}; seen must be "
                    "True exactly where gamma > 0 (the state is inconsistent)"
                )
        if state["step"] == 0 and any(seen):
            raise StateError(f"{where}: step is 0 but {sum(seen)} tensor(s) are marked seen; the state is inconsistent")
