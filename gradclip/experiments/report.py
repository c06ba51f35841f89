"""Writing a comparison's results: JSON Lines, CSV summary, PNG plots, Markdown and HTML reports.

Every number in the summary is computed here from the run records (nothing is typed in), and
every file can be parsed back: ``results.jsonl`` one run per line, ``summary.csv`` one clipper
per row, ``report.html`` self-contained with the plots embedded as base64 PNG. The reports open
with the verdict (:mod:`~gradclip.experiments.verdict`).

Plots stay readable for any number of clippers: every clipper gets its own pair of colour and
line style (10 colours x 4 styles, then markers), and the gradient norms are small multiples,
one panel per clipper. With a sweep, ``sweep.png`` draws the metric against the swept value,
with each adaptive clipper as a horizontal band.
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

from gradclip.experiments.figures import (
    _save,
    clip_rate_figure,
    line_styles,
    loss_figure,
    norms_figure,
    plot_clip_rate,
    plot_loss,
    plot_norms,
    sweep_figure,
    threshold_scope,
)
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
    "sweep_figure",
    "line_styles",
    "threshold_scope",
    "divergence_note",
]

SUMMARY_FIELDS = (
    "clipper",
    "kind",
    "runs",
    "metric_name",
    "metric_mean",
    "metric_sd",
    "solved",
    "diverged",
    "failed",
    "eval_loss_median",
    "final_train_loss_median",
    "clip_rate_mean",
    "skip_rate_mean",
    "wall_time_mean",
)


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _mean(values: Sequence[float]) -> float:
    numbers = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(numbers) if numbers else math.nan


def _finished(record: dict[str, Any]) -> bool:
    return record.get("status", "ok") in ("ok", "diverged")


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate run records per clipper, in the order clippers first appear.

    Returns:
        One dict per clipper with the keys of :data:`SUMMARY_FIELDS`. ``kind`` is ``fixed``,
        ``adaptive``, ``none`` or ``other`` (:func:`~gradclip.experiments.verdict.clipper_kind`).
        The metric's mean and standard deviation are over the runs that finished (a diverged
        run counts with the task's diverged metric, 0 for accuracy); ``failed`` counts runs that
        failed or were killed, which count as unsolved. The medians (``eval_loss_median``,
        ``final_train_loss_median``) are over the finished runs that did not diverge (NaN when
        there is none): a blown-up run's loss says only that it blew up, and ``diverged``
        counts those. The rates and wall time are means over the finished runs.
    """
    from gradclip.experiments.verdict import clipper_kind

    by_clipper: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_clipper.setdefault(record["clipper"], []).append(record)
    named = [r["metric_name"] for r in records if r.get("metric_name")]
    rows = []
    for clipper, runs in by_clipper.items():
        finished = [r for r in runs if _finished(r)]
        stable = [r for r in finished if not r["diverged"]]
        metrics = [r["metric"] for r in finished if r["metric"] is not None and not math.isnan(r["metric"])]
        rows.append(
            {
                "clipper": clipper,
                "kind": clipper_kind(clipper),
                "runs": len(runs),
                "metric_name": named[0] if named else "metric",
                "metric_mean": statistics.fmean(metrics) if metrics else math.nan,
                "metric_sd": statistics.stdev(metrics) if len(metrics) > 1 else (0.0 if metrics else math.nan),
                "solved": sum(bool(r["solved"]) for r in runs),
                "diverged": sum(bool(r["diverged"]) for r in runs),
                "failed": len(runs) - len(finished),
                "eval_loss_median": _median([r["eval_loss"] for r in stable]),
                "final_train_loss_median": _median([r["final_train_loss"] for r in stable]),
                "clip_rate_mean": _mean([r["clip_rate"] for r in finished]),
                "skip_rate_mean": _mean([r["skip_rate"] for r in finished]),
                "wall_time_mean": _mean([r["wall_time"] for r in finished]),
            }
        )
    return rows


def divergence_note(records: Sequence[dict[str, Any]]) -> str:
    """One sentence saying what "diverged" meant for these runs (their task's limit)."""
    judged = [r for r in records if r.get("divergence_limit") is not None and not math.isnan(r["divergence_limit"])]
    if not records:
        return ""
    if not judged:
        return (
            "A run diverged when its training or held-out loss became non-finite (the task names no reference "
            "loss, so there is no finite limit); a diverged run counts as unsolved and is left out of the loss medians."
        )
    first = judged[0]
    if math.isinf(first["divergence_limit"]):
        return (
            "A run diverged when its training or held-out loss became non-finite (the task names no reference "
            "loss, so there is no finite limit); a diverged run counts as unsolved and is left out of the loss medians."
        )
    return (
        f"A run diverged when its training or held-out loss became non-finite or exceeded "
        f"{first['divergence_limit']:.4g}, i.e. {DIVERGENCE_FACTOR:g} x {first['reference_loss']:.4g}, "
        f"the loss of {first['reference_text']}. Training stops at such a loss; a diverged run "
        f"counts as unsolved and is left out of the loss medians."
    )


def failure_lines(records: Sequence[dict[str, Any]]) -> list[str]:
    """One line per run that failed or was killed: clipper, seed, status, error."""
    return [
        f"{r['clipper']} seed {r['seed']}: {r.get('status')} — {r.get('error')}"
        for r in records
        if not _finished(r)
    ]


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


def title_of(meta: dict[str, Any]) -> str:
    """The figures' title: task, optimizer and learning rate (or "its own optimizer"), steps, seeds."""
    training = f"{meta['optimizer']} lr={meta['lr']}" if meta.get("optimizer") else "its own optimizer"
    return f"{meta['task']} — {training}, {meta['steps']} steps, {meta['seeds']} seed(s)"


def write_outputs(records: Sequence[dict[str, Any]], out: Path, meta: dict[str, Any], verdict=None) -> dict[str, Path]:
    """Write every output file of a comparison into ``out``.

    Args:
        records: Run records from :func:`gradclip.experiments.runner.run_many`.
        out: The run directory (exists and is writable).
        meta: The comparison's settings (task, steps, lr...) for the reports' header.
        verdict: The :class:`~gradclip.experiments.verdict.Verdict` (computed from ``records``
            when not given).

    Returns:
        A dict naming each file written.
    """
    from gradclip.experiments.verdict import judge

    verdict = verdict if verdict is not None else judge(records)
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
    title = title_of(meta)
    files["loss_plot"] = plot_loss(records, out / "loss.png", title)
    files["norm_plot"] = plot_norms(records, out / "grad_norm.png", "gradient norm and threshold")
    files["clip_rate_plot"] = plot_clip_rate(records, out / "clip_rate.png", "clip rate")
    plots = [("Training loss", "loss.png"), ("Gradient norm", "grad_norm.png"), ("Clip rate", "clip_rate.png")]
    figure = sweep_figure(verdict, f"{meta['task']}: {verdict.metric_name} against the swept threshold")
    if figure is not None:
        files["sweep_plot"] = _save(figure, out / "sweep.png")
        plots.insert(0, ("Sweep", "sweep.png"))
    settings = ", ".join(f"{k}={v}" for k, v in meta.items())
    failures = failure_lines(records)
    markdown = [
        f"# gradclip compare: {meta['task']}",
        "",
        "## Verdict",
        "",
        *[f"- {line.strip()}" for line in verdict.lines()],
        "",
        f"Settings: {settings}",
        "",
        _markdown_table(rows),
        "",
        divergence_note(records),
        "",
        *(["## Failed runs", "", *[f"- {line}" for line in failures], ""] if failures else []),
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
    verdict_html = "".join(f"<li>{html.escape(line.strip())}</li>" for line in verdict.lines())
    failures_html = (
        "<h2>Failed runs</h2><ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in failures) + "</ul>"
        if failures else ""
    )
    files["report_html"] = out / "report.html"
    files["report_html"].write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>gradclip compare</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".verdict{background:#f4f8ff;border:1px solid #b8cff5;padding:4px 16px}</style></head><body>"
        f"<h1>gradclip compare: {html.escape(meta['task'])}</h1>"
        f"<div class='verdict'><h2>Verdict</h2><ul>{verdict_html}</ul></div><p>{html.escape(settings)}</p>"
        f"<table><tr>{cells}</tr>{body}</table><p>{html.escape(divergence_note(records))}</p>"
        f"{failures_html}{images}</body></html>"
    )
    return files
