"""Writing a comparison's results: JSON Lines, CSV summary, PNG plots, Markdown and HTML reports.

Every number in the summary is computed here from the run records (nothing is typed in), and
every file can be parsed back: ``results.jsonl`` one run per line, ``summary.csv`` one clipper
per row, ``report.html`` self-contained with the plots embedded as base64 PNG.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradclip.experiments.plots import _pyplot
from gradclip.experiments.tasks import DIVERGENCE_FACTOR
from gradclip.monitor.writers import json_safe

__all__ = [
    "summarise",
    "write_outputs",
    "SUMMARY_FIELDS",
    "plot_loss",
    "plot_norms",
    "plot_clip_rate",
    "loss_figure",
    "norms_figure",
    "clip_rate_figure",
    "threshold_scope",
    "divergence_note",
]

SUMMARY_FIELDS = (
    "clipper",
    "runs",
    "metric_name",
    "metric_mean",
    "solved",
    "diverged",
    "eval_loss_median",
    "final_train_loss_median",
    "clip_rate_mean",
    "skip_rate_mean",
    "wall_time_mean",
)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate run records per clipper, in the order clippers first appear.

    Returns:
        One dict per clipper with the keys of :data:`SUMMARY_FIELDS`. The medians
        (``eval_loss_median``, ``final_train_loss_median``) are over the runs that did not
        diverge (NaN when every run diverged): a blown-up run's loss says only that it blew up,
        and ``diverged`` counts those. Means are over every run; a diverged run's metric is 0.
    """
    by_clipper: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_clipper.setdefault(record["clipper"], []).append(record)
    rows = []
    for clipper, runs in by_clipper.items():
        stable = [r for r in runs if not r["diverged"]]
        rows.append(
            {
                "clipper": clipper,
                "runs": len(runs),
                "metric_name": runs[0]["metric_name"],
                "metric_mean": statistics.fmean(r["metric"] for r in runs),
                "solved": sum(bool(r["solved"]) for r in runs),
                "diverged": sum(bool(r["diverged"]) for r in runs),
                "eval_loss_median": _median([r["eval_loss"] for r in stable]),
                "final_train_loss_median": _median([r["final_train_loss"] for r in stable]),
                "clip_rate_mean": statistics.fmean(r["clip_rate"] for r in runs),
                "skip_rate_mean": statistics.fmean(r["skip_rate"] for r in runs),
                "wall_time_mean": statistics.fmean(r["wall_time"] for r in runs),
            }
        )
    return rows


def _by_clipper(records):
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(record["clipper"], []).append(record)
    return groups


def _percentile_band(series: list[list[float]]):
    """Median and 25-75 % band over seeds, step by step, over the runs still going."""
    import numpy as np

    length = max(len(s) for s in series)
    padded = np.full((len(series), length), np.nan)
    for row, values in enumerate(series):
        padded[row, : len(values)] = values
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return (
                np.nanmedian(padded, axis=0),
                np.nanpercentile(padded, 25, axis=0),
                np.nanpercentile(padded, 75, axis=0),
            )


def _smooth(values, window: int):
    import numpy as np

    values = np.asarray(values, dtype=float)
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


def loss_figure(records, title: str):
    """The training-loss figure: per clipper the median over seeds with the 25-75 % band (log
    scale); the legend counts diverged runs. Returns the matplotlib figure (not yet saved)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for clipper, runs in _by_clipper(records).items():
        window = max(1, max(len(r["history"]["loss"]) for r in runs) // 100)
        series = [list(_smooth(r["history"]["loss"], window)) for r in runs]
        median, low, high = _percentile_band(series)
        steps = range(len(median))
        diverged = sum(r["diverged"] for r in runs)
        label = f"{clipper}" + (f" ({diverged}/{len(runs)} diverged)" if diverged else "")
        (line,) = axis.plot(steps, median, label=label)
        axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (smoothed)")
    axis.set_title(title)
    axis.legend(fontsize=8)
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
    from gradclip.clippers.subset import Subset
    from gradclip.experiments.spec import parse_spec

    built = parse_spec(clipper).build()
    while isinstance(built, Subset):  # it reports the wrapped clipper's threshold
        built = built.clipper
    return None if built is None else _LOCAL_THRESHOLDS.get(built.name)


def norms_figure(records, title: str):
    """Pre-clip global gradient norm of each clipper's first seed, one panel per clipper, with
    the threshold dashed where it bounds the global norm (for per-element or per-tensor bounds
    the panel title says what the threshold bounds instead). Returns the figure."""
    plt = _pyplot()
    groups = _by_clipper(records)
    figure, axes = plt.subplots(len(groups), 1, figsize=(8, 1.9 * len(groups) + 0.8), sharex=True, squeeze=False)
    for axis, (clipper, runs) in zip(axes[:, 0], groups.items()):
        history = runs[0]["history"]
        axis.plot(history["norm"], lw=0.8, label="global gradient norm (pre-clip)")
        thresholds = [t if t is not None and math.isfinite(t) else math.nan for t in history["threshold"]]
        scope = threshold_scope(clipper)
        note = ""
        if scope is not None:
            note = f"; threshold {scope}, not drawn"
        elif any(math.isfinite(t) for t in thresholds):
            axis.plot(thresholds, "--", lw=1.0, color="tab:red", label="threshold")
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
    """Fraction of steps clipped over training (rolling window, median over seeds). Returns the
    figure."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 4))
    for clipper, runs in _by_clipper(records).items():
        window = max(1, max(len(r["history"]["clipped"]) for r in runs) // 20)
        series = [list(_smooth([float(c) for c in r["history"]["clipped"]], window)) for r in runs]
        median, _, _ = _percentile_band(series)
        axis.plot(median, label=clipper)
    axis.set_ylim(-0.02, 1.02)
    axis.set_xlabel("step")
    axis.set_ylabel("fraction of steps clipped (rolling)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return figure


def plot_clip_rate(records, path: Path, title: str) -> Path:
    """Write :func:`clip_rate_figure` to ``path`` (PNG)."""
    return _save(clip_rate_figure(records, title), path)


def divergence_note(records: Sequence[dict[str, Any]]) -> str:
    """One sentence saying what "diverged" meant for these runs (their task's limit)."""
    if not records:
        return ""
    first = records[0]
    return (
        f"A run diverged when its training or held-out loss became non-finite or exceeded "
        f"{first['divergence_limit']:.4g}, i.e. {DIVERGENCE_FACTOR:g} x {first['reference_loss']:.4g}, "
        f"the loss of {first['reference_text']}. Training stops at such a loss; a diverged run "
        f"counts as unsolved and is left out of the loss medians."
    )


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.4g}"
    return str(value)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(SUMMARY_FIELDS) + " |"
    rule = "|" + "---|" * len(SUMMARY_FIELDS)
    body = ["| " + " | ".join(_format(row[f]) for f in SUMMARY_FIELDS) + " |" for row in rows]
    return "\n".join([header, rule, *body])


def write_outputs(records: Sequence[dict[str, Any]], out: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write every output file of a comparison into ``out``.

    Args:
        records: Run records from :func:`gradclip.experiments.runner.run_many`.
        out: The run directory (exists and is writable).
        meta: The comparison's settings (task, steps, lr...) for the reports' header.

    Returns:
        A dict naming each file written.
    """
    out = Path(out)
    files: dict[str, Path] = {}
    files["results"] = out / "results.jsonl"
    with files["results"].open("w") as handle:
        for record in records:
            # Strict JSON: a diverged run's NaN losses and the infinite threshold of "none" are null.
            handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
    rows = summarise(records)
    files["summary"] = out / "summary.csv"
    with files["summary"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    title = f"{meta['task']} — {meta['optimizer']} lr={meta['lr']}, {meta['steps']} steps, {meta['seeds']} seed(s)"
    files["loss_plot"] = plot_loss(records, out / "loss.png", title)
    files["norm_plot"] = plot_norms(records, out / "grad_norm.png", "gradient norm and threshold")
    files["clip_rate_plot"] = plot_clip_rate(records, out / "clip_rate.png", "clip rate")
    settings = ", ".join(f"{k}={v}" for k, v in meta.items())
    plots = [("Training loss", "loss.png"), ("Gradient norm", "grad_norm.png"), ("Clip rate", "clip_rate.png")]
    markdown = [
        f"# gradclip compare: {meta['task']}",
        "",
        f"Settings: {settings}",
        "",
        _markdown_table(rows),
        "",
        divergence_note(records),
        "",
        *[f"## {name}\n\n![{name}]({png})\n" for name, png in plots],
    ]
    files["report_md"] = out / "report.md"
    files["report_md"].write_text("\n".join(markdown))
    cells = "".join(f"<th>{html.escape(f)}</th>" for f in SUMMARY_FIELDS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_format(row[f]))}</td>" for f in SUMMARY_FIELDS) + "</tr>" for row in rows
    )
    images = "".join(
        f"<h2>{html.escape(name)}</h2><img alt='{html.escape(name)}' "
        f"src='data:image/png;base64,{base64.b64encode((out / png).read_bytes()).decode()}'/>"
        for name, png in plots
    )
    files["report_html"] = out / "report.html"
    files["report_html"].write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>gradclip compare</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
        f"<h1>gradclip compare: {html.escape(meta['task'])}</h1><p>{html.escape(settings)}</p>"
        f"<table><tr>{cells}</tr>{body}</table><p>{html.escape(divergence_note(records))}</p>{images}</body></html>"
    )
    return files
