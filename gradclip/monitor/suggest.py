"""Threshold suggestion: a recommended ``max_norm`` from observed gradient norms, with reasons.

Pure NumPy: it reads norms from a list, an array of any framework, or a JSON Lines log
(:func:`gradclip.monitor.read_log`), and imports no deep-learning framework.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradclip._core.errors import InvalidArgumentError

__all__ = ["ThresholdSuggestion", "suggest_threshold"]

#: Fewer finite norms than this make a suggestion tentative.
MIN_CONFIDENT_SAMPLES = 50


@dataclass(frozen=True)
class ThresholdSuggestion:
    """A recommended clipping threshold and how it was reached.

    ``float(suggestion)`` is :attr:`max_norm`; ``str(suggestion)`` is the reasoning as text.

    Attributes:
        max_norm: The recommended threshold (the ``quantile`` of the finite observed norms).
        quantile: The quantile used.
        samples: How many finite norms the suggestion rests on.
        dropped: How many observed norms were NaN/inf (or missing) and left out.
        percentiles: ``{"p10", "p50", "p90", "p99", "max"}`` of the finite norms.
        expected_clip_rate: Fraction of the observed norms above ``max_norm``: how often it
            would have clipped.
        current_threshold: The threshold in use when the norms were recorded, if known.
        current_clip_rate: Fraction of observed norms above ``current_threshold``, if known.
        confident: False when there were too few samples to trust the tail.
        reasoning: The argument, one sentence per line.
    """

    max_norm: float
    quantile: float
    samples: int
    dropped: int
    percentiles: dict[str, float]
    expected_clip_rate: float
    current_threshold: float | None = None
    current_clip_rate: float | None = None
    confident: bool = True
    reasoning: list[str] = field(default_factory=list)

    def __float__(self) -> float:
        return float(self.max_norm)

    def __str__(self) -> str:
        return "\n".join(self.reasoning)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return {
            "max_norm": self.max_norm,
            "quantile": self.quantile,
            "samples": self.samples,
            "dropped": self.dropped,
            "percentiles": dict(self.percentiles),
            "expected_clip_rate": self.expected_clip_rate,
            "current_threshold": self.current_threshold,
            "current_clip_rate": self.current_clip_rate,
            "confident": self.confident,
            "reasoning": list(self.reasoning),
        }


def _to_numpy(norms: Any) -> np.ndarray:
    where = "suggest_threshold"
    if hasattr(norms, "detach") and hasattr(norms, "cpu"):  # torch, without importing it
        norms = norms.detach().cpu().numpy()
    if isinstance(norms, (str, bytes, dict)):
        raise InvalidArgumentError(f"{where}: norms must be a sequence or array of numbers, got {type(norms).__name__}")
    if not hasattr(norms, "__array__"):
        if not isinstance(norms, Iterable):
            raise InvalidArgumentError(
                f"{where}: norms must be a sequence or array of numbers, got {type(norms).__name__}"
            )
        norms = [float("nan") if v is None else (v.item() if hasattr(v, "item") else v) for v in norms]
    try:
        return np.asarray(norms, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise InvalidArgumentError(f"{where}: norms must be numbers ({error})") from None


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def suggest_threshold(
    norms: Any,
    quantile: float = 0.9,
    *,
    current_threshold: float | None = None,
) -> ThresholdSuggestion:
    """Recommend a ``max_norm`` for global-norm clipping from gradient norms seen in training.

    The recommendation is the ``quantile`` of the finite pre-clip norms: with 0.9, typical steps
    (the 90% below it) pass untouched and the largest 10% — the spikes clipping exists for — are
    scaled down. A threshold far below the typical norm clips nearly every step, which turns
    clipping into a hidden learning-rate cut; the reasoning says so when the current threshold
    does that.

    Args:
        norms: Pre-clip global norms, one per step (a list, NumPy/torch/JAX array; ``None``,
            NaN and inf entries are dropped and counted).
        quantile: In ``(0, 1]``.
        current_threshold: The threshold in use when the norms were recorded, to compare against.

    Returns:
        A :class:`ThresholdSuggestion`.

    Raises:
        InvalidArgumentError: ``quantile`` outside ``(0, 1]``, negative norms, or no finite norm.
    """
    where = "suggest_threshold"
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 < quantile <= 1:
        raise InvalidArgumentError(f"{where}: quantile must be a number in (0, 1], got {quantile!r}")
    quantile = float(quantile)
    if current_threshold is not None:
        if isinstance(current_threshold, bool) or not isinstance(current_threshold, (int, float)) or not current_threshold >= 0:
            raise InvalidArgumentError(
                f"{where}: current_threshold must be a number >= 0 or None, got {current_threshold!r}"
            )
        current_threshold = float(current_threshold)
    array = _to_numpy(norms)
    finite = array[np.isfinite(array)]
    dropped = int(array.size - finite.size)
    if finite.size == 0:
        raise InvalidArgumentError(
            f"{where}: no finite norm among {array.size} value(s); record some training steps first"
        )
    if (finite < 0).any():
        raise InvalidArgumentError(f"{where}: norms must be >= 0, got {float(finite.min())!r}")
    p = {
        "p10": float(np.quantile(finite, 0.10)),
        "p50": float(np.quantile(finite, 0.50)),
        "p90": float(np.quantile(finite, 0.90)),
        "p99": float(np.quantile(finite, 0.99)),
        "max": float(finite.max()),
    }
    max_norm = float(np.quantile(finite, quantile))
    expected = float((finite > max_norm).mean())
    n = int(finite.size)
    confident = n >= MIN_CONFIDENT_SAMPLES
    reasons = [
        f"Suggested max_norm = {_fmt(max_norm)}: the {quantile:.0%} quantile of {n} finite pre-clip "
        f"gradient norms (median {_fmt(p['p50'])}, p90 {_fmt(p['p90'])}, p99 {_fmt(p['p99'])}, "
        f"max {_fmt(p['max'])}).",
        f"At this threshold {expected:.1%} of the observed steps would have been clipped: typical "
        "steps pass untouched and only the largest ones are scaled down, which is what clipping "
        "is for.",
    ]
    if dropped:
        reasons.append(
            f"{dropped} non-finite or missing norm(s) were left out; non-finite gradients are a "
            "matter for the non-finite policy (nonfinite='skip' or 'zero'), not the threshold."
        )
    if not confident:
        reasons.append(
            f"Only {n} step(s) were observed (fewer than {MIN_CONFIDENT_SAMPLES}): the tail is poorly "
            "estimated; record more steps before fixing the threshold."
        )
    if max_norm == 0.0:
        reasons.append(
            "The norms at this quantile are zero: the model may not be learning (no gradient flow); "
            "a threshold of 0 would zero every gradient, check the training setup first."
        )
    elif p["p50"] > 0 and p["p99"] / p["p50"] > 10:
        reasons.append(
            f"The tail is heavy (p99 is {p['p99'] / p['p50']:.0f}x the median): spikes dominate; an "
            "adaptive clipper (ZClip, AutoClip) or SkipOnSpike follows them better than a constant."
        )
    if n >= 20:
        half = n // 2
        early, late = float(np.median(finite[:half])), float(np.median(finite[half:]))
        if late > 0 and early / late > 2:
            reasons.append(
                f"Norms fell during the run (median {_fmt(early)} in the first half, {_fmt(late)} in "
                "the second): a constant threshold chosen from all of it clips ever fewer steps; "
                "recompute it from recent steps or use AutoClip."
            )
        elif early > 0 and late / early > 2:
            reasons.append(
                f"Norms rose during the run (median {_fmt(early)} in the first half, {_fmt(late)} in "
                "the second), which often precedes instability; check the learning rate schedule."
            )
    current_rate = None
    if current_threshold is not None:
        current_rate = float((finite > current_threshold).mean())
        reasons.append(
            f"The current threshold {_fmt(current_threshold)} clipped {current_rate:.1%} of these steps."
        )
        if current_rate > 0.5:
            reasons.append(
                "That is more than half: clipping has become a step-size limit (every step is "
                "shrunk), not a guard against spikes; raise the threshold or lower the learning rate."
            )
        elif current_rate == 0 and p["max"] > 0 and current_threshold > 10 * p["max"]:
            reasons.append("It never clipped and lies far above every observed norm: it has no effect.")
    if not math.isfinite(max_norm):  # pragma: no cover - finite inputs give a finite quantile
        raise InvalidArgumentError(f"{where}: could not compute a finite threshold")
    return ThresholdSuggestion(
        max_norm=max_norm,
        quantile=quantile,
        samples=n,
        dropped=dropped,
        percentiles=p,
        expected_clip_rate=expected,
        current_threshold=current_threshold,
        current_clip_rate=current_rate,
        confident=confident,
        reasoning=reasons,
    )
