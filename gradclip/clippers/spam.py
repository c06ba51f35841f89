"""SPAM's spike-aware clipping: bound each element against the optimizer's second moment.

Huang, Zhu, Jin, Liu, Wang & Liu 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
Training" (ICLR 2025, arXiv:2501.06842), and its reference code, TianjinYellow/SPAM-Optimizer
``galore_torch/SPAM.py`` (commit e8185fb). Before the Adam update of step ``t``, with ``v`` Adam's
second moment from the previous step (``exp_avg_sq``)::

    where g² > θ·v:   g ← sign(g) · √(θ·v)

an element whose square is more than θ times its running mean square is brought back to that
bound, keeping its sign (θ = 5000 in the paper). The rule needs ``v``: it reads it from the
``optimizer_state`` signal, one array per gradient (:class:`~gradclip._core.contract.Signals`).

After a momentum reset ``v`` is 0 and the rule would zero every gradient, so SPAM clips only from
step ``warmup_steps`` (its ``grad_accu_steps``, 20) on, and with periodic resets (its ``DeltaT``,
500: ``reset_interval`` here) only ``warmup_steps`` steps after each. The reset itself zeroes the
optimizer's moments, which is the optimizer's business: :meth:`SpikeAware.reset_due` says at which
steps SPAM resets, and :class:`gradclip.torch.ClippedOptimizer` passes ``exp_avg_sq`` and performs
the resets (:mod:`gradclip.torch.optim_state_aware`, ``reset_momentum=False`` to keep the moments).

Deviations from the reference code (each a strict expectation in ``tests/test_spam.py``):

* The comparison and the bound are computed in fp32 for bf16/fp16 gradients (the reference
  squares a bf16 gradient in bf16), in fp64 for fp64 ones.
* ``optimizer_state`` missing, or ``None`` for a tensor: that gradient is left as it is (the
  reference creates a zero ``v`` and then skips its first ``grad_accu_steps`` steps; a torch
  optimizer has no state before its first step).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from gradclip._core.clipper import Clipper, make_info
from gradclip._core.contract import NO_SIGNALS, Coefficient, Decision, Measured
from gradclip._core.errors import InvalidArgumentError
from gradclip._core.measure import check_policy
from gradclip._core.registry import register
from gradclip._core.validation import check_int, check_number
from gradclip.clippers._adaptive import accumulation, check_field, skip_flag
from gradclip.clippers.value import elementwise_info

__all__ = ["SpikeAware", "SpikeAwareState"]


class SpikeAwareState(NamedTuple):
    """The step count, which places the warm-ups after the (periodic) momentum resets."""

    step: Any  # int64 0-d: calls so far (this call is step + 1, counted from 1 as SPAM does)


class _Plan(NamedTuple):
    """What apply writes: per gradient the mask and the replacement (None: left alone)."""

    masks: list[Any]
    replacements: list[Any]


@register("spike_aware")
class SpikeAware(Clipper):
    """SPAM's spike-aware element-wise clipping: ``g ← sign(g)·√(θ·v)`` where ``g² > θ·v``.

    ``v`` is the optimizer's second moment, passed each step as ``optimizer_state=``: a list with
    one entry per gradient (in the order the clipper receives them), each an array of the
    gradient's shape (torch Adam's ``optimizer.state[p]["exp_avg_sq"]``, optax's
    ``ScaleByAdamState.nu`` leaves) or ``None`` for a tensor without state, which is left
    unclipped. Without ``optimizer_state`` the gradients pass through unchanged (and the step
    count advances): there is nothing to compare against, as before the optimizer's first step.

    Args:
        theta: θ, the largest allowed ratio ``g² / v``, ``> 0`` (the paper's 5000).
        warmup_steps: The first step (counted from 1) that clips, and with ``reset_interval``
            the steps after each reset that do not, ``>= 0`` (SPAM's ``grad_accu_steps``, 20).
        reset_interval: SPAM's momentum-reset period ``ΔT`` (its default 500), or None when the
            optimizer never resets its moments. Clipping pauses for ``warmup_steps`` steps after
            every step ``t`` with ``t % reset_interval == 0``; see :meth:`reset_due`.
        nonfinite: Non-finite policy (:mod:`gradclip.clippers.nonfinite`). Under
            ``"propagate"`` NaN elements stay NaN and ``±inf`` ones are bounded like any other.

    ``info.threshold`` is ``inf`` (no bound on the norm: each element has its own);
    ``info.clipped`` says whether any element was bounded, ``info.coef`` the effective scale of
    the global norm.

    Raises:
        InvalidArgumentError: ``theta`` not > 0, a bad ``warmup_steps`` or ``reset_interval``
            (``warmup_steps`` must be below it), an unknown policy; at call time,
            ``optimizer_state`` with the wrong number of entries or an entry of another shape
            than its gradient (nothing is changed).
    """

    defaults: dict[str, Any] = {}
    coefficient = Coefficient.ELEMENTWISE
    needs_optimizer_state = True  # ClippedOptimizer passes Adam's exp_avg_sq as optimizer_state
    state_type = SpikeAwareState
    state_dtypes = {"step": "int64"}

    def __init__(
        self,
        theta: float = 5000.0,
        warmup_steps: int = 20,
        reset_interval: int | None = None,
        nonfinite: str = "propagate",
    ):
        super().__init__()
        where = "SpikeAware"
        self.theta = check_number(where, "theta", theta, low=0.0, low_inclusive=False, high_inclusive=False)
        self.warmup_steps = check_int(where, "warmup_steps", warmup_steps, low=0)
        self.reset_interval = check_int(where, "reset_interval", reset_interval, low=1, allow_none=True)
        if self.reset_interval is not None and self.warmup_steps >= self.reset_interval:
            raise InvalidArgumentError(
                f"{where}: warmup_steps must be below reset_interval={self.reset_interval} (no step would "
                f"ever clip), got {warmup_steps!r}"
            )
        self.nonfinite = check_policy(where, nonfinite)

    def reset_due(self, step: Any) -> Any:
        """Whether SPAM resets the optimizer's moments at ``step`` (counted from 1, the step about
        to be taken): ``step % reset_interval == 0``, before that step's clip.

        Args:
            step: A Python int or an integer device scalar (then the answer is a device bool,
                so an optimizer can zero its moments with ``where`` and no host read).

        Returns:
            A bool (False when ``reset_interval`` is None), or a device bool.
        """
        if self.reset_interval is None:
            return False
        if isinstance(step, bool) or (not hasattr(step, "shape") and not isinstance(step, int)):
            raise InvalidArgumentError(f"SpikeAware.reset_due: step must be an integer, got {step!r}")
        return step % self.reset_interval == 0

    def init_state(self, ops, grads):
        return SpikeAwareState(ops.scalar(0, "int64"))

    def _moments(self, measured: Measured, signals) -> list[Any] | None:
        """The second moments aligned with the gradients, checked host-side (shapes only)."""
        moments = signals.optimizer_state
        if moments is None:
            return None
        grads, names = measured.grads, measured.names
        if len(moments) != len(grads):
            raise InvalidArgumentError(
                f"SpikeAware: optimizer_state has {len(moments)} entries for {len(grads)} gradient(s); give one "
                "second-moment array (or None) per gradient, in the order the clipper receives them. "
                "Nothing was changed."
            )
        for name, g, v in zip(names, grads, moments):
            if v is not None and tuple(v.shape) != tuple(g.shape):
                raise InvalidArgumentError(
                    f"SpikeAware: optimizer_state entry for {name} has shape {tuple(v.shape)} but the gradient "
                    f"has shape {tuple(g.shape)}; nothing was changed"
                )
        return list(moments)

    def decide(self, ops, measured: Measured, state, signals=NO_SIGNALS):
        moments = self._moments(measured, signals)  # refuses bad input before anything changes
        norm, finite = measured.norm, measured.finite
        acc = accumulation(norm)
        t = state.step + 1
        active = t >= self.warmup_steps
        if self.reset_interval is not None:
            active = active & (t % self.reset_interval >= self.warmup_steps)
        if self.nonfinite == "skip":
            active = active & finite
        masks: list[Any] = []
        replacements: list[Any] = []
        hits = []
        for g, v in zip(measured.grads, moments or [None] * len(measured.grads)):
            if v is None:
                masks.append(None)
                replacements.append(None)
                continue
            value = ops.cast(g, acc)
            limit = ops.cast(v, acc) * self.theta  # θ·v, as the reference (v·θ: the same product)
            mask = (value * value > limit) & active
            bound = ops.sqrt(limit)
            # sign(g)·√(θv): g is not 0 where the mask holds (g² > θv >= 0).
            replacements.append(ops.where(value > 0, bound, -bound))
            masks.append(mask)
            hits.append(ops.any(mask))
        clipped = ops.any(ops.stack(hits)) if hits else ops.scalar(False, "bool")
        inf = ops.scalar(math.inf, acc)
        one = ops.scalar(1.0, acc)
        skip = skip_flag(ops, finite, self.nonfinite)
        info = make_info(ops, norm, inf, one, clipped, measured.given_finite, skip)
        return Decision(_Plan(masks, replacements), SpikeAwareState(t), info)

    def apply(self, ops, grads, decision):
        """Write the bounded elements into the gradients that have a second moment."""
        plan, info = decision.coef, decision.info
        chosen = [i for i, mask in enumerate(plan.masks) if mask is not None]
        if not chosen:
            return grads, info
        grads = list(grads)
        written = ops.select([grads[i] for i in chosen], [plan.replacements[i] for i in chosen], [plan.masks[i] for i in chosen])
        for i, g in zip(chosen, written):
            grads[i] = g
        done = elementwise_info(ops, info.norm, grads, info.threshold, info.clipped)
        return grads, done._replace(finite=info.finite, skip=info.skip)

    def validate_state(self, where, state):
        check_field(where, state, "step", "int", low=0)
