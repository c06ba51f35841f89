"""The ``gradclip`` command line: ``compare``, ``suggest``, ``report``, ``bench``.

``gradclip compare`` is the product's main job: train one task under several clippers and seeds,
in parallel, and report side by side. With no arguments it runs a default comparison on the
adding problem that finishes in one to two minutes on two cores.

Exit codes: 0 success, 2 usage error (unknown task or clipper, bad parameter, unwritable
output directory), 1 anything else.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from gradclip._core.errors import GradClipError

__all__ = ["main", "build_parser", "DEFAULT_CLIPPERS"]

#: The clippers of the default comparison: none, the fixed global norm of Pascanu et al., value
#: clipping, and two adaptive thresholds. ZClip gets a ``max_grad_norm`` cap because its first
#: ``warmup_steps`` only gather statistics: uncapped, the RNN diverges before ZClip starts to act
#: (run ``--clipper zclip`` to see it).
DEFAULT_CLIPPERS = (
    "none",
    "global_norm:max_norm=1.0",
    "value:clip_value=0.1",
    "zclip:max_grad_norm=1.0",
    "autoclip",
)


class UsageError(Exception):
    """A problem with the command line; exits with status 2."""


def available_cores() -> int:
    """The CPU cores this process may run on (the ``--jobs`` default).

    ``os.cpu_count()`` counts the host's CPUs; in a container or under ``taskset`` the process
    may be allowed far fewer, and as many workers as host CPUs would oversubscribe them.
    ``os.sched_getaffinity`` (Linux) gives the allowed set.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="gradclip", description="Gradient clipping experiments and tools.")
    commands = parser.add_subparsers(dest="command", required=True)

    compare = commands.add_parser("compare", help="train one task under several clippers and compare")
    compare.add_argument("--task", default="adding", help="adding, temporal-order, digits, spikes, charlm")
    compare.add_argument(
        "--clipper",
        action="append",
        metavar="SPEC",
        help="clipper spec, e.g. global_norm:max_norm=1.0 or value:min_value=-0.5,max_value=0.5 "
        "or zclip or none (repeatable; default: %s)" % " ".join(DEFAULT_CLIPPERS),
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per clipper (default 3)")
    compare.add_argument("--steps", type=int, help="optimizer steps per run (default: the task's)")
    compare.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    compare.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="default: the task's (sgd = momentum 0.9)")
    compare.add_argument("--seq-len", type=int, help="sequence length for adding, temporal-order, charlm")
    compare.add_argument("--jobs", type=int, default=available_cores(), help="parallel processes (default: usable cores)")
    compare.add_argument("--out", type=Path, help="run directory (default: runs/compare-TASK-TIME)")
    compare.add_argument("--quick", action="store_true", help="tiny smoke run (few steps, at most 2 seeds)")
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")

    suggest = commands.add_parser("suggest", help="recommend thresholds from a Monitor JSON Lines log")
    suggest.add_argument("log", type=Path)
    suggest.add_argument("--quantile", type=float, default=0.9, help="quantile of observed norms, in (0, 1] (default 0.9)")
    suggest.add_argument("--out", type=Path, help="histogram PNG (default: LOG with .hist.png)")

    report = commands.add_parser("report", help="plot a logged run (Monitor JSON Lines)")
    report.add_argument("log", type=Path)
    report.add_argument("--out", type=Path, help="output directory (default: beside LOG)")

    # The harness parses its own options (--quick, --out, --device, --only, --rounds, --threads,
    # --label; `gradclip bench --help` lists them): everything after "bench" is passed on.
    commands.add_parser("bench", help="run the performance benchmarks (gradclip bench --help)", add_help=False)
    return parser


def _check_writable(path: Path) -> Path:
    """Create ``path`` and prove it is writable, before any training starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".gradclip-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--out {str(path)!r} is not a writable directory: {error.strerror or error}") from error
    return path


def _check_writable_file(path: Path) -> Path:
    """Prove a file can be written at ``path`` (creating its folder), before any output."""
    if path.is_dir():
        raise UsageError(f"--out {str(path)!r} is a directory; give a file name such as hist.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab"):  # creates the file if missing, changes nothing if present
            pass
    except OSError as error:
        raise UsageError(f"--out {str(path)!r} cannot be written: {error.strerror or error}") from error
    return path


def _compare(args: argparse.Namespace) -> int:
    from gradclip.experiments.spec import parse_spec
    from gradclip.experiments.tasks import TASKS, check_options, task_names

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; valid tasks: {', '.join(task_names())}")
    for name, value, low in (("--seeds", args.seeds, 1), ("--jobs", args.jobs, 1), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    options = {"seq_len": args.seq_len} if args.seq_len is not None else {}
    try:
        check_options(args.task, options)
    except GradClipError as error:
        raise UsageError(str(error).replace("seq_len", "--seq-len")) from error
    specs = []
    for text in args.clipper or DEFAULT_CLIPPERS:
        try:
            spec = parse_spec(text)
        except GradClipError as error:
            raise UsageError(str(error)) from error
        specs.append(spec)
    task = TASKS[args.task]
    steps = args.steps or (task.defaults.quick_steps if args.quick else task.defaults.steps)
    seeds = min(args.seeds, 2) if args.quick else args.seeds
    lr = args.lr or task.defaults.lr
    optimizer = args.optimizer or task.defaults.optimizer
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = _check_writable(args.out or Path("runs") / f"compare-{args.task}-{stamp}")

    from gradclip.experiments.report import divergence_note, summarise, write_outputs
    from gradclip.experiments.runner import RunConfig

    configs = [
        RunConfig(args.task, spec.text, seed, steps, lr, optimizer, options) for spec in specs for seed in range(seeds)
    ]
    meta = {"task": args.task, "steps": steps, "lr": lr, "optimizer": optimizer, "seeds": seeds, **options}
    records = _run_with_progress(configs, max(1, min(args.jobs, len(configs))), not args.no_progress)
    files = write_outputs(records, out, meta)
    _print_summary(summarise(records), meta)
    print(divergence_note(records))
    print(f"\nwrote {', '.join(p.name for p in files.values())} to {out}")
    return 0


def _run_with_progress(configs, jobs: int, show: bool):
    from gradclip.experiments.runner import run_many

    if not show:
        return run_many(configs, jobs=jobs)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        overall = progress.add_task("[bold]all runs", total=len(configs))
        bars = [
            progress.add_task(f"{c.clipper} seed {c.seed}", total=c.steps, visible=False) for c in configs
        ]

        def on_progress(index: int, done: int) -> None:
            progress.update(bars[index], completed=done, visible=True)

        def on_done(index: int, record: dict[str, Any]) -> None:
            status = "[red]diverged" if record["diverged"] else ("[green]solved" if record["solved"] else "done")
            progress.update(
                bars[index], completed=configs[index].steps, visible=True,
                description=f"{configs[index].clipper} seed {configs[index].seed} {status}",
            )
            progress.advance(overall)

        return run_many(configs, jobs=jobs, on_progress=on_progress, on_done=on_done)


def _print_summary(rows, meta) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = rows[0]["metric_name"] if rows else "metric"
    table = Table(title=f"gradclip compare — {meta['task']} ({meta['optimizer']}, lr={meta['lr']}, {meta['steps']} steps)")
    # Skipped steps (SkipOnSpike, nonfinite="skip") get a column only when some run skipped.
    skips = any(row["skip_rate_mean"] > 0 for row in rows)
    columns = ["clipper", metric, "solved", "diverged", "eval loss (median)", "clip rate"]
    columns += ["skip rate"] * skips + ["wall time (s)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "clipper" else "right")
    for row in rows:
        loss = row["eval_loss_median"]
        cells = [
            row["clipper"],
            f"{row['metric_mean']:.3f}",
            f"{row['solved']}/{row['runs']}",
            f"{row['diverged']}/{row['runs']}",
            "—" if math.isnan(loss) else f"{loss:.4g}",
            f"{row['clip_rate_mean']:.1%}",
        ]
        cells += [f"{row['skip_rate_mean']:.1%}"] * skips + [f"{row['wall_time_mean']:.1f}"]
        table.add_row(*cells)
    # Outside a terminal rich assumes 80 columns and would truncate the clipper specs.
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"log file {str(path)!r} does not exist")
    records = []
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{number}: not JSON ({error.msg})") from error
            if not isinstance(record, dict) or "norm" not in record:
                raise UsageError(f"{path}:{number}: expected a Monitor record with a 'norm' field")
            norm = record["norm"]
            # null is how Monitor logs write a non-finite norm; anything else must be a number.
            if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float))):
                raise UsageError(f"{path}:{number}: 'norm' must be a number or null, got {norm!r}")
            records.append(record)
    if not records:
        raise UsageError(f"log file {str(path)!r} holds no records")
    return records


def _suggest(args: argparse.Namespace) -> int:
    # The library's range: a quantile of 1 (the largest norm seen) is a valid, if loose, choice.
    if not (0.0 < args.quantile <= 1.0):
        raise UsageError(f"--quantile must be in (0, 1], got {args.quantile}")
    records = _read_log(args.log)
    norms = [r["norm"] for r in records]  # nulls included: the suggestion counts them as dropped
    import gradclip

    try:
        suggestion = gradclip.suggest_threshold(norms, quantile=args.quantile)
    except GradClipError as error:  # e.g. every norm is null, or a negative norm
        raise UsageError(f"{args.log}: {error}") from error
    # Checked before anything is printed, so a bad --out never leaves half an answer.
    out = _check_writable_file(args.out or args.log.with_suffix(".hist.png"))
    print(suggestion)
    from gradclip.experiments.plots import plot_norm_histogram

    plot_norm_histogram(norms, suggestion, out)
    print(f"histogram: {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    records = _read_log(args.log)
    out = _check_writable(args.out or args.log.parent)
    from gradclip.experiments.plots import plot_logged_run

    for path in plot_logged_run(records, out, args.log.stem):
        print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gradclip.bench import main as bench_main

    return bench_main(list(args.options))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.options = rest  # the harness parses (and checks) its own options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"compare": _compare, "suggest": _suggest, "report": _report, "bench": _bench}
    try:
        return handlers[args.command](args)
    except UsageError as error:
        print(f"gradclip {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover - python -m gradclip.cli
    sys.exit(main())
