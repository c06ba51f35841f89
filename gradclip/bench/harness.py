"""The benchmark harness: interleaved timing, paired ratios, result rows, and RESULTS.md sections.

Contenders are timed in the same process, in interleaved rounds (each round calls every
contender once, the order alternating between rounds), after warm-up. A ratio is the median over
rounds of the per-round ratio: both sides of one round ran moments apart and saw the same
machine, so load from other processes cancels out much better than in two separate medians.
Absolute times (medians) are context only; targets are judged on ratios.

RESULTS.md holds one section per device and label, each between ``<!-- bench:KEY -->`` markers;
writing a section replaces the one with the same key and keeps every other section.
Nothing here knows which benchmarks exist: the suites (:mod:`gradclip.bench.suites`) do.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["interleave", "Result", "parse_results", "TABLE_HEADER", "run_groups", "format_section", "write_section"]


def interleave(
    contenders: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    rounds: int = 9,
    sync: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Time each contender once per round, for ``warmup`` untimed and ``rounds`` timed rounds.

    The order within a round alternates (forwards, backwards) so that no contender always runs
    after the same one (caches, allocator state, CPU frequency).

    Args:
        contenders: Name to a function of no arguments doing one step.
        warmup: Untimed rounds first (kernel selection, allocator, lazy imports).
        rounds: Timed rounds.
        sync: Called after each step inside the timed region (``torch.cuda.synchronize``), so
            that asynchronous device work is counted.

    Returns:
        Name to the list of wall times in seconds, one per timed round.
    """
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            if sync is not None:
                sync()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _ratio(ours: list[float], reference: list[float]) -> float:
    """Median over rounds of ``ours / reference`` (the two lists are paired by round)."""
    return statistics.median(a / b for a, b in zip(ours, reference))


@dataclass
class Result:
    """One row of the results table."""

    id: str
    name: str
    ours: float | None = None
    reference: float | None = None
    target: str = ""
    ratio: float | None = None
    passed: bool | None = None
    note: str = ""

    def row(self) -> str:
        def ms(x):
            return "—" if x is None else f"{x * 1e3:.2f} ms"

        ratio = "—" if self.ratio is None else f"{self.ratio:.3f}"
        verdict = {True: "yes", False: "NO", None: "—"}[self.passed]
        note = self.note.replace("|", "/")
        return f"| {self.id} | {self.name} | {ms(self.ours)} | {ms(self.reference)} | {ratio} | {self.target} | {verdict} | {note} |"


def _compare(id_, name, ours: list[float], reference: list[float], limit, *, speedup=False, note="", extra_ok=True):
    """A row from paired round times: the ratio (or speed-up) against ``limit``."""
    ratio = _ratio(ours, reference)
    if speedup:
        ratio = 1.0 / ratio
    target = f">= {limit}x faster" if speedup else f"<= {limit}"
    passed = (ratio >= limit if speedup else ratio <= limit) and extra_ok
    return Result(id_, name, statistics.median(ours), statistics.median(reference), target, ratio, passed, note)


TABLE_HEADER = [
    "| id | measurement | gradclip | reference | ratio | target | met | note |",
    "|---|---|---|---|---|---|---|---|",
]


def parse_results(text: str) -> list[dict[str, str]]:
    """Rows of every results table in ``text`` (a RESULTS.md or the printed output).

    Returns:
        One dict per row with the keys of the table header (``id``, ``ratio``, ``met``...).
    """
    keys = [k.strip() for k in TABLE_HEADER[0].strip("|").split("|")]
    rows = []
    for line in text.splitlines():
        if not line.startswith("| ") or line == TABLE_HEADER[0]:
            continue
        cells = [c.strip() for c in line.strip()[1:-1].split("|")]
        if len(cells) == len(keys):
            rows.append(dict(zip(keys, cells)))
    return rows



def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _machine(device) -> list[str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- CPU: {cpu}, {os.cpu_count()} cores; torch uses {torch.get_num_threads()} threads",
        f"- Python {platform.python_version()}, torch {torch.__version__}, gradclip {_version('gradclip')}, "
        f"zclip {_version('zclip')}, timm {_version('timm')}",
    ]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(f"- GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}")
    try:
        lines.append(f"- load average at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass
    return lines


def _merge_section(path: Path, key: str, section: str) -> str:
    """The text of ``path`` with the section ``key`` replaced by ``section`` (or appended)."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{section.rstrip()}\n{end}\n"
    old = path.read_text() if path.exists() else ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(old):
        return pattern.sub(lambda _: block, old)
    if not old.strip():
        old = (
            "# gradclip benchmark results\n\n"
            "Written by `python benchmarks/run.py` (also `gradclip bench`); see `gradclip/bench/`\n"
            "for what each row measures. Ratios are medians of per-round ratios, gradclip and its\n"
            "reference timed in the same interleaved rounds; the times are medians, for context.\n"
        )
    return old.rstrip() + "\n\n" + block



def run_groups(suite: Any, groups) -> list[Result]:
    """The rows of each group in order (``getattr(suite, group)()``); a group that raises gives
    one ``failed: ...`` row with the group's name as id, and the others still run."""
    results: list[Result] = []
    for group in groups:
        try:
            results += getattr(suite, group)()
        except Exception as error:  # noqa: BLE001 - one broken benchmark must not hide the others
            results.append(Result(group.upper(), group, note=f"failed: {type(error).__name__}: {error}"))
    return results


def format_section(key: str, sizes: str, rounds: int, warmup: int, started: float, machine: list[str],
                   results: list[Result]) -> str:
    """A RESULTS.md section: a heading (key, sizes, rounds, elapsed time since ``started``, date),
    the machine description, and the results table."""
    return "\n".join([
        f"## {key} ({sizes}, {rounds} rounds after {warmup} warm-up, "
        f"{time.perf_counter() - started:.0f} s, {time.strftime('%Y-%m-%d %H:%M')})",
        "",
        *machine,
        "",
        *TABLE_HEADER,
        *(r.row() for r in results),
    ]) + "\n"


def write_section(out: Path, key: str, section: str) -> None:
    """Write ``section`` as the section ``key`` of ``out``, keeping its other sections."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_merge_section(out, key, section))
