"""The figures of a comparison: training loss, gradient norms and thresholds, clip rate, sweeps.

Plots stay readable for any number of clippers: every clipper gets its own pair of colour and
line style (10 colours x 4 styles, then markers), and the gradient norms are small multiples,
one panel per clipper. With a sweep, :func:`sweep_figure` draws the metric against the swept
value, with each adaptive clipper as a horizontal band. :mod:`~gradclip.experiments.report`
writes them beside the tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from gradclip.experiments.plots import _pyplot

__all__ = [
    "clip_rate_figure",
    "line_styles",
    "loss_figure",
    "norms_figure",
    "plot_clip_rate",
    "plot_loss",
    "plot_norms",
    "save_figure",
    "sweep_figure",
    "threshold_scope",
]


def _finished(record: dict[str, Any]) -> bool:
    return record.get("status", "ok") in ("ok", "diverged")


def _by_clipper(records):
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["clipper"], []).append(record)
    return groups


def _with_history(runs):
    return [r for r in runs if r.get("history") and r["history"].get("loss")]


_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
            "tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
_DASHES = ("-", "--", ":", "-.")
_MARKERS = (None, "o", "s", "^", "v", "D", "x", "+")


def line_styles(count: int) -> list[dict[str, Any]]:
    """``count`` distinct line styles (colour, dash pattern, marker), for plotting that many
    clippers on one axis: 10 colours x 4 dash patterns, then markers, so no two clippers look
    alike for any count.

    Returns:
        Keyword dicts for ``axis.plot``: ``color``, ``linestyle`` and, past 40, ``marker``.
    """
    styles = []
    for index in range(count):
        colour = _COLOURS[index % len(_COLOURS)]
        dash = _DASHES[(index // len(_COLOURS)) % len(_DASHES)]
        marker = _MARKERS[(index // (len(_COLOURS) * len(_DASHES))) % len(_MARKERS)]
        style = {"color": colour, "linestyle": dash}
        if marker is not None:
            style.update(marker=marker, markevery=0.1, markersize=4)
        styles.append(style)
    return styles


def _percentile_band(series: list[list[float]]):
    """Median and 25-75 % band over seeds, step by step, over the runs still going."""
    import warnings

    import numpy as np

    length = max(len(s) for s in series)
    padded = np.full((len(series), length), np.nan)
    for row, values in enumerate(series):
        padded[row, : len(values)] = [np.nan if v is None else v for v in values]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (
            np.nanmedian(padded, axis=0),
            np.nanpercentile(padded, 25, axis=0),
            np.nanpercentile(padded, 75, axis=0),
        )


def _smooth(values, window: int):
    import numpy as np

    values = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def _legend(axis, count: int) -> None:
    # Beyond a handful of clippers the legend goes beside the plot, where it hides no line.
    if count > 6:
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        axis.legend(fontsize=8)


def loss_figure(records, title: str):
    """The training-loss figure: per clipper the median over seeds with the 25-75 % band (log
    scale), each clipper in its own colour and line style; the legend counts diverged and failed
    runs. Returns the matplotlib figure (not yet saved)."""
    plt = _pyplot()
    groups = _by_clipper(records)
    figure, axis = plt.subplots(figsize=(10 if len(groups) > 6 else 8, 4.5))
    for style, (clipper, runs) in zip(line_styles(len(groups)), groups.items()):
        drawn = _with_history(runs)
        diverged = sum(bool(r["diverged"]) for r in runs)
        failed = sum(not _finished(r) for r in runs)
        notes = [f"{diverged}/{len(runs)} diverged"] * bool(diverged) + [f"{failed}/{len(runs)} failed"] * bool(failed)
        label = clipper + (f" ({', '.join(notes)})" if notes else "")
        if not drawn:
            axis.plot([], [], label=label + " — no trace", **style)
            continue
        window = max(1, max(len(r["history"]["loss"]) for r in drawn) // 100)
        series = [list(_smooth(r["history"]["loss"], window)) for r in drawn]
        median, low, high = _percentile_band(series)
        steps = range(len(median))
        axis.plot(steps, median, label=label, **style)
        axis.fill_between(steps, low, high, color=style["color"], alpha=0.12)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (smoothed)")
    axis.set_title(title)
    _legend(axis, len(groups))
    return figure


def plot_loss(records, path: Path, title: str) -> Path:
    """Write :func:`loss_figure` to ``path`` (PNG)."""
    return _save(loss_figure(records, title), path)


#: Clippers whose ``info.threshold`` is not a bound on the global norm, with what it bounds.
#: Drawn on the global-norm axis it would mislead (value clipping's 0.1 is a per-element limit).
_LOCAL_THRESHOLDS = {
    "value": "bounds each element",
    "zero_outliers": "bounds each element",
    "norm": "bounds each tensor's norm",
    "average_norm": "bounds each tensor's norm per element",
    "block_rms": "bounds each tensor's RMS",
    "agc": "is a per-unit ratio",
}


def threshold_scope(clipper: str) -> str | None:
    """What a clipper spec's threshold bounds, when it is not the global gradient norm.

    Args:
        clipper: A spec text (``"value:clip_value=0.1"``).

    Returns:
        None when the threshold is a global-norm bound (it can be drawn over the norm trace),
        else a phrase such as ``"bounds each element"``.
    """
    from gradclip.clippers.chain import Chain
    from gradclip.clippers.subset import Subset
    from gradclip.experiments.spec import parse_spec

    built = parse_spec(clipper).build()
    # A Subset reports the wrapped clipper's threshold, a Chain its last link's.
    while isinstance(built, (Subset, Chain)):
        built = built.clipper if isinstance(built, Subset) else built.clippers[-1]
    return None if built is None else _LOCAL_THRESHOLDS.get(built.name)


def norms_figure(records, title: str):
    """Pre-clip global gradient norm of each clipper's first seed, one panel per clipper, with
    the threshold dashed where it bounds the global norm (for per-element or per-tensor bounds
    the panel title says what the threshold bounds instead). Returns the figure."""
    plt = _pyplot()
    groups = {clipper: _with_history(runs) for clipper, runs in _by_clipper(records).items()}
    groups = {clipper: runs for clipper, runs in groups.items() if runs}
    count = max(1, len(groups))
    figure, axes = plt.subplots(count, 1, figsize=(8, 1.9 * count + 0.8), sharex=True, squeeze=False)
    for axis, (clipper, runs) in zip(axes[:, 0], groups.items()):
        history = runs[0]["history"]
        norms = [math.nan if n is None else n for n in history["norm"]]
        axis.plot(norms, lw=0.8, label="global gradient norm (pre-clip)")
        thresholds = [t if t is not None and math.isfinite(t) else math.nan for t in history["threshold"]]
        scope = threshold_scope(clipper)
        note = ""
        if scope is not None:
            note = f"; threshold {scope}, not drawn"
        elif any(math.isfinite(t) for t in thresholds):
            axis.plot(thresholds, "--", lw=1.0, color="tab:red", label="threshold")
        if any(n > 0 for n in norms if math.isfinite(n)):
            axis.set_yscale("log")
        axis.set_title(f"{clipper} (seed {runs[0]['seed']}{note})", fontsize=9)
        axis.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    figure.suptitle(title)
    return figure


def plot_norms(records, path: Path, title: str) -> Path:
    """Write :func:`norms_figure` to ``path`` (PNG)."""
    return _save(norms_figure(records, title), path)


def clip_rate_figure(records, title: str):
    """Fraction of steps clipped over training (rolling window, median over seeds), each
    clipper in its own colour and line style. Returns the figure."""
    plt = _pyplot()
    groups = _by_clipper(records)
    figure, axis = plt.subplots(figsize=(10 if len(groups) > 6 else 8, 4))
    for style, (clipper, runs) in zip(line_styles(len(groups)), groups.items()):
        drawn = _with_history(runs)
        if not drawn:
            axis.plot([], [], label=clipper + " — no trace", **style)
            continue
        window = max(1, max(len(r["history"]["clipped"]) for r in drawn) // 20)
        series = [list(_smooth([float(c) for c in r["history"]["clipped"]], window)) for r in drawn]
        median, _, _ = _percentile_band(series)
        axis.plot(median, label=clipper, **style)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("fraction of steps clipped (rolling)")
    axis.set_title(title)
    _legend(axis, len(groups))
    return figure


def plot_clip_rate(records, path: Path, title: str) -> Path:
    """Write :func:`clip_rate_figure` to ``path`` (PNG)."""
    return _save(clip_rate_figure(records, title), path)


def _sweeps(verdict) -> dict[tuple, list[tuple[float, Any]]]:
    """Fixed clippers that differ in one numeric argument: ``{(name, key, others): [(value, standing)]}``."""
    from gradclip.experiments.spec import parse_spec

    families: dict[tuple, list[tuple[float, Any]]] = {}
    for standing in verdict.standings:
        if standing.kind != "fixed" or not standing.finished:
            continue
        spec = parse_spec(standing.clipper)
        for key, value in spec.kwargs.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                others = tuple(sorted((k, str(v)) for k, v in spec.kwargs.items() if k != key))
                families.setdefault((spec.name, key, others), []).append((float(value), standing))
    return {family: sorted(points, key=lambda p: p[0]) for family, points in families.items() if len(points) >= 2}


def sweep_figure(verdict, title: str):
    """The metric against each swept argument (mean over seeds, bars from the worst to the best
    seed, log scale), with every adaptive clipper and ``none`` as a horizontal band (mean, and
    the range over seeds). Returns the figure, or None when nothing was swept."""
    families = _sweeps(verdict)
    if not families:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(families), figsize=(8 * len(families), 4.5), squeeze=False)
    flat = [s for s in verdict.standings if s.kind in ("adaptive", "none") and s.finished]
    styles = line_styles(len(families) + len(flat))
    for axis, ((name, key, others), points) in zip(axes[0], families.items()):
        values = [p[0] for p in points]
        means = [p[1].metric_mean for p in points]
        low = [p[1].metric_mean - p[1].metric_min for p in points]
        high = [p[1].metric_max - p[1].metric_mean for p in points]
        label = f"{name}:{key}" + (f" ({', '.join(f'{k}={v}' for k, v in others)})" if others else "")
        axis.errorbar(values, means, yerr=[low, high], marker="o", capsize=3, label=label, color="black", lw=1.5)
        if all(v > 0 for v in values):
            axis.set_xscale("log")
        for style, standing in zip(styles[len(families):], flat):
            axis.axhline(standing.metric_mean, label=standing.clipper, color=style["color"], linestyle=style["linestyle"], lw=1.2)
            axis.axhspan(standing.metric_min, standing.metric_max, color=style["color"], alpha=0.08)
        if verdict.best_fixed is not None and any(p[1] is verdict.best_fixed for p in points):
            best = next(p for p in points if p[1] is verdict.best_fixed)
            axis.annotate("best fixed", (best[0], best[1].metric_mean), textcoords="offset points", xytext=(0, 10),
                          ha="center", fontsize=8)
        axis.set_xlabel(key)
        axis.set_ylabel(f"{verdict.metric_name} (mean over seeds; bars: worst to best seed)")
        axis.set_title(title)
        _legend(axis, 1 + len(flat))
    return figure


save_figure = _save
