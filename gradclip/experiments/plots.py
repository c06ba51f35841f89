"""Plots of logged runs: what ``gradclip report`` and ``gradclip suggest`` draw.

They read records written by :class:`gradclip.Monitor`'s JSON Lines writer: one object per
logged step with at least ``step`` and ``norm``, and optionally ``norm_after``, ``threshold``,
``clipped`` and ``layer_norms`` (a dict of per-layer norms).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_logged_run", "plot_norm_histogram"]


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (never opens a window), imported lazily:
    the ``cli`` extra is optional."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(values):
    return [v if v is not None and isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def plot_logged_run(records: Sequence[dict[str, Any]], out: Path, stem: str) -> list[Path]:
    """Draw a logged run: norms and threshold, clip rate, and the largest per-layer norms.

    The per-layer norms are the ones :class:`gradclip.Monitor` records, measured after clipping
    (the gradients the optimizer stepped with); the plot says so.

    Args:
        records: Monitor records in step order.
        out: Directory for the PNG files.
        stem: File name prefix.

    Returns:
        The paths written.
    """
    plt = _pyplot()
    steps = [r.get("step", i) for i, r in enumerate(records)]
    paths = []

    figure, axis = plt.subplots(figsize=(8, 4))
    axis.plot(steps, _finite([r.get("norm") for r in records]), lw=0.8, label="norm before clipping")
    if any("norm_after" in r for r in records):
        axis.plot(steps, _finite([r.get("norm_after") for r in records]), lw=0.8, label="norm after clipping")
    if any("threshold" in r for r in records):
        axis.plot(steps, _finite([r.get("threshold") for r in records]), "--", color="tab:red", label="threshold")
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("global gradient norm")
    axis.legend(fontsize=8)
    axis.set_title(f"{stem}: gradient norm")
    figure.tight_layout()
    paths.append(out / f"{stem}.norms.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    if any("clipped" in r for r in records):
        clipped = [float(bool(r.get("clipped"))) for r in records]
        window = max(1, len(clipped) // 20)
        rolling = [sum(clipped[max(0, i - window + 1) : i + 1]) / len(clipped[max(0, i - window + 1) : i + 1]) for i in range(len(clipped))]
        figure, axis = plt.subplots(figsize=(8, 3))
        axis.plot(steps, rolling)
        axis.set_ylim(-0.02, 1.02)
        axis.set_xlabel("step")
        axis.set_ylabel(f"clip rate (last {window} records)")
        axis.set_title(f"{stem}: clip rate")
        figure.tight_layout()
        paths.append(out / f"{stem}.clip_rate.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)

    layered = [r for r in records if isinstance(r.get("layer_norms"), dict) and r["layer_norms"]]
    if layered:
        totals: dict[str, float] = {}
        for record in layered:
            for name, value in record["layer_norms"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    totals[name] = max(totals.get(name, 0.0), value)
        top = sorted(totals, key=totals.get, reverse=True)[:8]
        figure, axis = plt.subplots(figsize=(8, 4))
        layer_steps = [r.get("step", i) for i, r in enumerate(layered)]
        for name in top:
            axis.plot(layer_steps, _finite([r["layer_norms"].get(name) for r in layered]), lw=0.8, label=name)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        # Monitor measures layer norms from .grad after the clipper ran: what the optimizer used.
        axis.set_ylabel("per-layer gradient norm (post-clip)")
        axis.set_title(f"{stem}: largest layers, gradient norms after clipping")
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths.append(out / f"{stem}.layers.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)
    return paths


def plot_norm_histogram(norms: Sequence[float], suggestion: Any, out: Path) -> Path:
    """Histogram of observed norms (log bins) with the suggested threshold marked."""
    import numpy as np

    plt = _pyplot()
    # Monitor logs write a non-finite norm as null: _finite makes it NaN, which is left out.
    values = np.asarray([n for n in _finite(norms) if n > 0])
    figure, axis = plt.subplots(figsize=(7, 4))
    if len(values):
        bins = np.logspace(np.log10(values.min()), np.log10(values.max()) + 1e-9, 40)
        axis.hist(values, bins=bins)
        axis.set_xscale("log")
    threshold = getattr(suggestion, "threshold", None) or getattr(suggestion, "max_norm", None)
    if threshold is not None and math.isfinite(threshold):
        axis.axvline(threshold, color="tab:red", ls="--", label=f"suggested max_norm = {threshold:.3g}")
        axis.legend()
    axis.set_xlabel("global gradient norm")
    axis.set_ylabel("steps")
    axis.set_title("observed gradient norms")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
