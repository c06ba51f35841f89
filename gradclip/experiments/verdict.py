"""The verdict a comparison opens with: the best fixed threshold in hindsight, how far each
adaptive clipper landed from it, and one recommendation.

Clippers fall in four kinds:

* **fixed** — a bound set by hand: ``global_norm``, ``norm``, ``value``, ``average_norm``,
  ``block_rms``, ``norm_sign``, ``zero_outliers`` (and chains of them);
* **adaptive** — a bound the clipper derives from the run: ``zclip``, ``autoclip``, ``adagc``,
  ``agc``, ``quantile_norm``, ``skip_on_spike`` (and any registered clipper that keeps state or
  reads the parameters); *untuned* when given no arguments;
* **none** — no clipping;
* **other** — policies that bound nothing (``non_finite``).

Clippers are ranked by the mean of the task's metric over seeds (higher or lower is better, as
the task says), then by seeds solved, fewer diverged or failed runs, and the median held-out
loss. "Within 5 %" compares the metric means: ``adaptive >= best * 0.95`` when higher is better
(``<= best * 1.05`` when lower is). The best fixed threshold is chosen in hindsight, on the same
runs, so it is an optimistic baseline: an adaptive clipper that matches it needs no sweep.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gradclip.experiments.spec import NONE, parse_spec

__all__ = ["Standing", "Distance", "Verdict", "judge", "clipper_kind", "TOLERANCE"]

#: "Within 5 %" of the best fixed threshold's metric.
TOLERANCE = 0.05

_FIXED = {"global_norm", "norm", "value", "average_norm", "block_rms", "norm_sign", "zero_outliers", "skip_above"}
_ADAPTIVE = {"zclip", "autoclip", "adagc", "agc", "quantile_norm", "skip_on_spike"}
_OTHER = {"non_finite"}


def _kind_of(clipper: Any) -> str:
    name = getattr(clipper, "name", "")
    children = getattr(clipper, "clippers", None)
    if children is not None:  # a chain: adaptive if any link is, else fixed if any link is
        kinds = {_kind_of(child) for child in children}
        return "adaptive" if "adaptive" in kinds else ("fixed" if "fixed" in kinds else "other")
    inner = getattr(clipper, "clipper", None)
    if name == "subset" and inner is not None:
        return _kind_of(inner)
    if name in _FIXED:
        return "fixed"
    if name in _ADAPTIVE:
        return "adaptive"
    if name in _OTHER:
        return "other"
    # A clipper registered elsewhere: state or parameters mean it adapts its bound.
    return "adaptive" if (getattr(clipper, "keeps_state", False) or getattr(clipper, "needs_params", False)) else "fixed"


def clipper_kind(spec_text: str) -> str:
    """``"fixed"``, ``"adaptive"``, ``"none"`` or ``"other"`` for a clipper spec (``"other"``
    too for a spec this installation cannot build, e.g. from another version's records)."""
    try:
        spec = parse_spec(spec_text)
    except Exception:  # noqa: BLE001 - a label from elsewhere: no kind to tell
        return "other"
    if spec.name == NONE:
        return "none"
    return _kind_of(spec.build())


@dataclass(frozen=True)
class Standing:
    """One clipper's results over its seeds.

    Attributes:
        clipper: The spec text.
        kind: See :func:`clipper_kind`.
        untuned: An adaptive clipper given no arguments.
        runs: Runs started.
        finished: Runs that ended with a metric (``ok`` or ``diverged``).
        metric_mean, metric_sd, metric_min, metric_max: The metric over finished runs
            (a diverged run counts with the task's ``diverged_metric``).
        solved, diverged, failed: Counts (``failed`` includes killed runs).
        eval_loss_median: Median held-out loss of the runs that did not diverge.
    """

    clipper: str
    kind: str
    untuned: bool
    runs: int
    finished: int
    metric_mean: float
    metric_sd: float
    metric_min: float
    metric_max: float
    solved: int
    diverged: int
    failed: int
    eval_loss_median: float

    def spread(self) -> str:
        """``"0.512 ± 0.010 (0.50–0.52)"`` over seeds."""
        if self.finished == 0:
            return "no finished run"
        return f"{self.metric_mean:.3f} ± {self.metric_sd:.3f} ({self.metric_min:.3f}–{self.metric_max:.3f})"


@dataclass(frozen=True)
class Distance:
    """An adaptive clipper against the best fixed threshold.

    Attributes:
        standing: The adaptive clipper's :class:`Standing`.
        delta: Its metric mean minus the best fixed one's.
        relative: The relative gap on :attr:`basis`, signed so that negative is worse (NaN when
            it cannot be computed).
        within: Within :data:`TOLERANCE` of the best.
        basis: ``"metric"``, or ``"eval loss"`` when the best fixed threshold's metric is 0
            (no seed solved anything, so the metric cannot tell clippers apart and the median
            held-out loss does).
    """

    standing: Standing
    delta: float
    relative: float
    within: bool
    basis: str = "metric"

    def describe(self, best: Standing, metric: str) -> str:
        """One line: metric with spread, the gap, seeds solved against the best's."""
        s = self.standing
        gap = "—" if math.isnan(self.relative) else f"{self.relative:+.1%}"
        mark = "within 5%" if self.within else "not within 5%"
        untuned = " (untuned)" if s.untuned else ""
        extra = f", {s.diverged} diverged" if s.diverged else ""
        extra += f", {s.failed} failed" if s.failed else ""
        if self.basis == "metric":
            gap_text = f"{gap} ({self.delta:+.3f}) from the best fixed"
        else:
            gap_text = f"{metric} tied at {best.metric_mean:.3f}, held-out loss {s.eval_loss_median:.4g} vs {best.eval_loss_median:.4g} ({gap})"
        return (
            f"{s.clipper}{untuned}: {metric} {s.spread()}, {gap_text}, {mark}; "
            f"solved {s.solved}/{s.runs} vs {best.solved}/{best.runs}{extra}"
        )


@dataclass(frozen=True)
class Verdict:
    """What a comparison concludes.

    Attributes:
        metric_name: The metric ranked by.
        greater_is_better: Its direction.
        standings: Every clipper's :class:`Standing`, in the comparison's order.
        best_fixed: The best fixed threshold in hindsight (None when none was compared).
        best: The best clipper of all.
        distances: Each adaptive clipper against ``best_fixed``.
        recommendation: One sentence.
        notes: Caveats (a best value at the edge of a sweep, equivalent thresholds, failures).
    """

    metric_name: str
    greater_is_better: bool
    standings: list[Standing]
    best_fixed: Standing | None
    best: Standing | None
    distances: list[Distance]
    recommendation: str
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The verdict as plain lines (the console, report.md and report.html use them)."""
        lines = []
        if self.best_fixed is not None:
            b = self.best_fixed
            lines.append(
                f"Best fixed threshold in hindsight: {b.clipper} — {self.metric_name} {b.spread()}, "
                f"solved {b.solved}/{b.runs}"
                + (f", {b.diverged} diverged" if b.diverged else "")
            )
            for distance in self.distances:
                lines.append("  " + distance.describe(b, self.metric_name))
        lines.append(f"Recommendation: {self.recommendation}")
        lines.extend(f"Note: {note}" for note in self.notes)
        return lines


def _standing(clipper: str, runs: list[dict[str, Any]]) -> Standing:
    finished = [r for r in runs if r.get("status", "ok") in ("ok", "diverged")]
    metrics = [float(r["metric"]) for r in finished if r.get("metric") is not None and not math.isnan(float(r["metric"]))]
    losses = [
        float(r["eval_loss"]) for r in finished
        if not r["diverged"] and r.get("eval_loss") is not None and math.isfinite(float(r["eval_loss"]))
    ]
    kind = clipper_kind(clipper)
    return Standing(
        clipper=clipper,
        kind=kind,
        untuned=kind == "adaptive" and ":" not in clipper,
        runs=len(runs),
        finished=len(metrics),
        metric_mean=statistics.fmean(metrics) if metrics else math.nan,
        metric_sd=statistics.stdev(metrics) if len(metrics) > 1 else 0.0 if metrics else math.nan,
        metric_min=min(metrics) if metrics else math.nan,
        metric_max=max(metrics) if metrics else math.nan,
        solved=sum(bool(r.get("solved")) for r in runs),
        diverged=sum(bool(r.get("diverged")) for r in runs),
        failed=sum(r.get("status") in ("failed", "killed") for r in runs),
        eval_loss_median=statistics.median(losses) if losses else math.nan,
    )


def _rank_key(standing: Standing, greater: bool) -> tuple:
    metric = standing.metric_mean
    if math.isnan(metric):
        metric_key = math.inf
    else:
        metric_key = -metric if greater else metric
    loss = standing.eval_loss_median
    return (metric_key, -standing.solved, standing.diverged + standing.failed, math.inf if math.isnan(loss) else loss)


def _compare_to(standing: Standing, best: Standing, greater: bool, tolerance: float) -> tuple[bool, float, str]:
    """(within, relative gap, basis) of ``standing`` against the best fixed threshold."""
    if best.metric_mean == 0 and greater and standing.metric_mean == 0:
        # Nothing solved by either: the metric cannot separate them, the held-out loss can.
        a, b = standing.eval_loss_median, best.eval_loss_median
        if math.isnan(a) or math.isnan(b) or b <= 0:
            return False, math.nan, "eval loss"
        return a <= b * (1 + tolerance), -(a - b) / b + 0.0, "eval loss"
    delta = standing.metric_mean - best.metric_mean
    return _within(standing.metric_mean, best.metric_mean, greater, tolerance), _relative(delta, best.metric_mean, greater), "metric"


def _within(value: float, best: float, greater: bool, tolerance: float) -> bool:
    if math.isnan(value) or math.isnan(best):
        return False
    if greater:
        return value >= best - tolerance * abs(best)
    return value <= best + tolerance * abs(best)


def _relative(delta: float, best: float, greater: bool) -> float:
    if best == 0 or math.isnan(best) or math.isnan(delta):
        return math.nan
    # Signed so that negative always means worse.
    return (delta if greater else -delta) / abs(best) + 0.0  # + 0.0: no "-0.0%"


def _edge_note(best: Standing, fixed: list[Standing]) -> str | None:
    """A note when the best fixed threshold is the smallest or largest value swept."""
    spec = parse_spec(best.clipper)
    for key, value in spec.kwargs.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        others = {k: v for k, v in spec.kwargs.items() if k != key}
        values = set()
        for standing in fixed:
            candidate = parse_spec(standing.clipper)
            if candidate.name == spec.name and {k: v for k, v in candidate.kwargs.items() if k != key} == others:
                number = candidate.kwargs.get(key)
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    values.add(float(number))
        if len(values) >= 3 and float(value) in (min(values), max(values)):
            side = "smallest" if float(value) == min(values) else "largest"
            return (
                f"{key}={value:g} is the {side} value swept for {spec.name}; the best may lie beyond it: "
                "extend the sweep"
            )
    return None


def judge(records: Sequence[dict[str, Any]], tolerance: float = TOLERANCE) -> Verdict:
    """The verdict on a comparison's run records.

    Args:
        records: Run records (:func:`~gradclip.experiments.runner.run_one`), any order.
        tolerance: The relative gap that counts as "within" (0.05).

    Returns:
        The :class:`Verdict`.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["clipper"], []).append(record)
    named = [r for r in records if r.get("metric_name")]
    metric = named[0]["metric_name"] if named else "metric"
    greater = bool(named[0].get("greater_is_better", True)) if named else True
    standings = [_standing(clipper, runs) for clipper, runs in groups.items()]
    ranked = sorted((s for s in standings if s.finished), key=lambda s: _rank_key(s, greater))
    fixed = [s for s in ranked if s.kind == "fixed"]
    adaptive = [s for s in ranked if s.kind == "adaptive"]
    best = ranked[0] if ranked else None
    best_fixed = fixed[0] if fixed else None
    notes: list[str] = []
    failed = sum(s.failed for s in standings)
    if failed:
        notes.append(f"{failed} run(s) failed or were killed; they count as unsolved and are left out of the means")
    distances: list[Distance] = []
    if best_fixed is not None:
        for standing in adaptive:
            within, relative, basis = _compare_to(standing, best_fixed, greater, tolerance)
            distances.append(Distance(standing, standing.metric_mean - best_fixed.metric_mean, relative, within, basis))
        if greater and best_fixed.metric_mean == 0:
            notes.append(f"no run met the task's success criterion: clippers are ranked by their median held-out loss")
        edge = _edge_note(best_fixed, fixed)
        if edge:
            notes.append(edge)
        unclipped = next((s for s in standings if s.kind == "none" and s.finished), None)
        if unclipped is not None and unclipped.metric_mean == best_fixed.metric_mean:
            notes.append(_unclipped_note(unclipped, best_fixed, metric, greater, tolerance))
        equivalent = [s.clipper for s in fixed[1:] if _compare_to(s, best_fixed, greater, tolerance)[0]]
        if equivalent:
            notes.append(f"also within 5% of the best fixed threshold: {', '.join(equivalent)}")
    recommendation = _recommend(best, best_fixed, distances, ranked, metric, greater, tolerance)
    return Verdict(metric, greater, standings, best_fixed, best, distances, recommendation, notes)


def _unclipped_note(unclipped: Standing, best_fixed: Standing, metric: str, greater: bool, tolerance: float) -> str:
    """The note when no clipping's metric equals the best fixed threshold's.

    An equal metric says the bound mattered little only when no clipping also diverged no more
    often and, where the metric ties at 0 (nothing solved, so clippers are ranked by held-out
    loss), its held-out loss is as close as "within" asks. A diverged run counts with the
    task's diverged metric (0 for accuracy), so a metric of 0 can hide runs that blew up.
    """
    if unclipped.diverged > best_fixed.diverged:
        return (
            f"no clipping reached the same {metric} as the best fixed threshold, but it diverged on "
            f"{unclipped.diverged}/{unclipped.runs} seeds against {best_fixed.diverged}/{best_fixed.runs}: "
            "the bound kept runs from diverging"
        )
    within, _, basis = _compare_to(unclipped, best_fixed, greater, tolerance)
    if basis == "eval loss" and not within:
        return (
            f"no clipping reached the same {metric} as the best fixed threshold (no seed solved either), but a "
            f"held-out loss of {unclipped.eval_loss_median:.4g} against {best_fixed.eval_loss_median:.4g}: "
            "the bound mattered"
        )
    return f"no clipping reached the same {metric} as the best fixed threshold: on this task the bound mattered little"


def _better(a: float, b: float, greater: bool) -> bool:
    if math.isnan(a) or math.isnan(b):
        return False
    return a > b if greater else a < b


def _recommend(best, best_fixed, distances, ranked, metric, greater, tolerance) -> str:
    if best is None:
        return "no run finished, so there is nothing to recommend: see the failed runs' errors in results.jsonl."
    unclipped = next((s for s in ranked if s.kind == "none"), None)
    clipped = [s for s in ranked if s.kind != "none"]
    if unclipped is not None and clipped and _better(unclipped.metric_mean, clipped[0].metric_mean, greater):
        return (
            f"clipping did not help here: no clipping reached {metric} {unclipped.metric_mean:.3f}, "
            f"better than every clipper (the best, {clipped[0].clipper}, {clipped[0].metric_mean:.3f})."
        )
    if best_fixed is None:
        return (
            f"use {best.clipper} (the best here, {metric} {best.metric_mean:.3f}), but no fixed threshold was "
            "compared, so there is no hindsight baseline: add --sweep global_norm:max_norm=logspace(0.1,10,5)."
        )
    if not distances:
        return (
            f"clip at {best_fixed.clipper}, the best fixed threshold in hindsight; compare adaptive clippers "
            "(--clipper zclip --clipper adagc) to learn whether one matches it without a sweep."
        )
    close = [d for d in distances if d.within]
    if close:
        choice = min(close, key=lambda d: (not d.standing.untuned, _rank_key(d.standing, greater)))
        untuned = "untuned, " if choice.standing.untuned else ""
        gap = "" if math.isnan(choice.relative) else f" ({choice.relative:+.1%})"
        return (
            f"use {choice.standing.clipper}: {untuned}it lands within {tolerance:.0%} of the best fixed threshold in "
            f"hindsight, {best_fixed.clipper}{gap}, so it needs no threshold sweep."
        )
    closest = min(distances, key=lambda d: _rank_key(d.standing, greater))
    gap = "" if math.isnan(closest.relative) else f", {closest.relative:+.1%}"
    return (
        f"clip at {best_fixed.clipper}: no adaptive clipper came within {tolerance:.0%} of it "
        f"(closest: {closest.standing.clipper}{gap})."
    )
