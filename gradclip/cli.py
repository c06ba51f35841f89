"""The ``gradclip`` command line: ``compare``, ``suggest``, ``report``, ``bench``.

``gradclip compare`` is the product's main job: train one task under several clippers and seeds,
in parallel, and report side by side, opening with a verdict (the best fixed threshold in
hindsight and how far each adaptive clipper landed from it). With no arguments it runs a default
comparison on the adding problem that finishes in one to two minutes on two cores. ``--task``
takes a built-in task or your own (``path/to/file.py:factory``, ``package.module:factory``),
``--sweep`` a range of thresholds, ``--backend ray`` a Ray cluster, ``--private`` DP-SGD with ε
reported beside the metric (``--private epsilon=3`` or ``--private noise_multiplier=1.1``).

Exit codes: 0 success, 2 usage error (unknown task or clipper, a task that cannot be imported or
breaks the contract, bad parameter, unwritable output directory, a missing optional
dependency), 1 anything else. ``gradclip compare`` exits 1 when no run finished (every run
failed or was killed: there is nothing to compare); when only some runs failed it exits 0, and
the table's ``failed`` column, the verdict's note and the ``failed run:`` lines name them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from gradclip._core.errors import GradClipError

__all__ = ["main", "build_parser", "DEFAULT_CLIPPERS", "EXTRAS"]

#: The clippers of the default comparison (see :data:`gradclip.experiments.compare.DEFAULT_CLIPPERS`).
DEFAULT_CLIPPERS = (
    "none",
    "global_norm:max_norm=1.0",
    "value:clip_value=0.1",
    "zclip:max_grad_norm=1.0",
    "autoclip",
)

#: The extra (``pip install 'gradclip[EXTRA]'``) that brings each optional module.
EXTRAS = {
    "rich": "cli",
    "matplotlib": "cli",
    "sklearn": "cli",
    "torch": "torch",
    "tensorflow": "tf",
    "keras": "tf",
    "jax": "jax",
    "optax": "jax",
    "ray": "ray",
    "transformers": "transformers",
    "accelerate": "transformers",
    "lightning": "lightning",
    "tensorboard": "tensorboard",
    "opacus": "privacy",
}

#: The optional modules each command needs whatever it is asked to do.
_NEEDS = {"compare": ("rich", "matplotlib"), "suggest": ("matplotlib",), "report": ("matplotlib",), "bench": ("torch",)}
#: Built-in tasks' own needs (digits, spikes and badbatch load scikit-learn's bundled digits).
_TASK_NEEDS = {"digits": ("sklearn",), "spikes": ("sklearn",), "badbatch": ("sklearn",)}


class UsageError(Exception):
    """A problem with the command line; exits with status 2."""


def _missing(modules) -> UsageError | None:
    """A one-line usage error naming the extras to install, or None when every module is there."""
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    if not absent:
        return None
    extras = sorted({EXTRAS.get(m, m) for m in absent}, key=lambda e: (e != "cli", e))
    return UsageError(
        f"this needs {', '.join(absent)}, which {'is' if len(absent) == 1 else 'are'} not installed: "
        f"pip install 'gradclip[{','.join(extras)}]'"
    )


def _require(*modules: str) -> None:
    error = _missing(modules)
    if error is not None:
        raise error


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

    compare = commands.add_parser(
        "compare", help="train one task under several clippers and compare",
        description="Train one task under several clippers and seeds and compare them; the table and the "
        "reports open with a verdict: the best fixed threshold in hindsight and each adaptive clipper's "
        "distance from it.",
    )
    compare.add_argument(
        "--task", default="adding", metavar="TASK",
        help="adding, temporal-order, digits, spikes, charlm, gpt, badbatch, or your own: path/to/file.py:factory or "
        "package.module:factory naming a gradclip.experiments.Task subclass, a TrainTask, a "
        "train(clipper, seed, steps, report) function, or a function returning one (default: adding)",
    )
    compare.add_argument(
        "--clipper",
        action="append",
        metavar="SPEC",
        help="clipper spec, e.g. global_norm:max_norm=1.0 or value:min_value=-0.5,max_value=0.5 "
        "or zclip or none; join specs with + to chain clippers, e.g. zclip+skip_on_spike:sigma=3 "
        "(repeatable; default: the task's list, for adding: %s)" % " ".join(DEFAULT_CLIPPERS),
    )
    compare.add_argument(
        "--sweep", action="append", metavar="SPEC",
        help="a clipper with a list of values: global_norm:max_norm=0.1,0.3,1,3,10 or "
        "global_norm:max_norm=logspace(0.1,10,5) (repeatable; any numeric argument)",
    )
    from gradclip.experiments.private import PRIVATE_CLIPPERS  # no framework imported

    compare.add_argument(
        "--private", metavar="SPEC",
        help="train with DP-SGD (Poisson batches of the task's batch size, per-example clipping by each clipper, "
        "Gaussian noise) and report epsilon: noise_multiplier=1.1 or epsilon=3 (sigma solved over the run's steps), "
        "plus delta= (default 1e-5, or 1/N beyond 1e5 examples), accountant=rdp|prv|gdp, mode=auto|bk|ghost|"
        "instantiate|vmap, batch_size=; the clippers must bound each example (global_norm, norm, quantile_norm; "
        f"default: {' '.join(PRIVATE_CLIPPERS)}). The non-private baseline: the same command without --private "
        "(needs gradclip[privacy])",
    )
    compare.add_argument("--seeds", type=int, default=3, help="seeds per clipper (default 3)")
    compare.add_argument("--steps", type=int, help="optimizer steps per run (default: the task's)")
    compare.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    compare.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="default: the task's (sgd = momentum 0.9)")
    compare.add_argument("--seq-len", type=int, help="sequence length for adding, temporal-order, charlm, gpt")
    compare.add_argument(
        "--task-option", action="append", metavar="KEY=VALUE", default=[],
        help="a keyword argument of the task's constructor, e.g. layers=4 for gpt (repeatable)",
    )
    compare.add_argument("--jobs", type=int, default=available_cores(), help="parallel processes (default: usable cores)")
    compare.add_argument("--backend", choices=("local", "ray"), default="local",
                         help="local processes (default) or Ray tasks (needs gradclip[ray])")
    compare.add_argument("--ray-address", metavar="ADDRESS",
                         help="--backend ray: the cluster, as for ray.init(address=...) (default: a local Ray)")
    compare.add_argument("--resources", metavar="NAME=AMOUNT,...",
                         help="--backend ray: what each run asks for, e.g. cpu=2,gpu=1 (default cpu=1)")
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


def _task_options(items: list[str]) -> dict[str, Any]:
    from gradclip.experiments.spec import _parse_value

    options = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"--task-option expects KEY=VALUE, got {item!r}")
        if key.strip() in options:  # a repeated key is a typo, not a request for the last value
            raise UsageError(f"--task-option {key.strip()} is given twice ({item!r}); give each key once")
        options[key.strip()] = _parse_value(value)
    return options


def _compare(args: argparse.Namespace) -> int:
    import datetime as _dt

    for name, value, low in (("--seeds", args.seeds, 1), ("--jobs", args.jobs, 1), ("--steps", args.steps, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.backend != "ray" and (args.ray_address or args.resources):
        raise UsageError("--ray-address and --resources apply to --backend ray")
    options = _task_options(args.task_option)
    if args.seq_len is not None:
        options["seq_len"] = args.seq_len

    from gradclip.experiments.compare import plan_comparison, run_comparison
    from gradclip.experiments.loading import load_task

    try:
        loaded = load_task(args.task)
    except GradClipError as error:
        raise UsageError(str(error)) from error
    # Everything this comparison needs, named at once (one pip command fixes it): the report's
    # libraries, PyTorch for a Task (the runner's loop), scikit-learn's digits, Ray.
    needs = list(_NEEDS["compare"])
    needs += ["torch"] * (not loaded.is_train_function)
    needs += list(_TASK_NEEDS.get(loaded.label, ())) if loaded.source.kind == "builtin" else []
    needs += ["ray"] * (args.backend == "ray")
    needs += ["opacus"] * (args.private is not None)  # its accountants give epsilon
    _require(*needs)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    target, _, attribute = loaded.label.rpartition(":")
    name = loaded.label if loaded.source.kind == "builtin" else f"{Path(target).stem.split('.')[-1]}-{attribute}"
    try:
        plan = plan_comparison(
            loaded,
            args.clipper, sweep=args.sweep, seeds=min(args.seeds, 2) if args.quick else args.seeds,
            steps=args.steps, lr=args.lr, optimizer=args.optimizer, quick=args.quick, task_options=options,
            jobs=args.jobs, backend=args.backend, ray_address=args.ray_address, resources=args.resources,
            out=args.out or Path("runs") / f"compare-{name}-{stamp}", private=args.private,
        )
    except GradClipError as error:
        message = str(error).replace("seq_len", "--seq-len")
        if message.startswith("private"):
            message = f"--{message}"  # the privacy spec's errors, named as the option was typed
        raise UsageError(message) from error
    show = not args.no_progress
    try:
        result = _run_with_progress(plan, run_comparison, show)
    except GradClipError as error:
        raise UsageError(str(error)) from error
    _print_verdict(result.verdict)
    from gradclip.experiments.private import epsilon_of

    _print_summary(result.rows, result.meta, epsilon_of(result.records))
    from gradclip.experiments.report import divergence_note, failure_lines

    print(divergence_note(result.records))
    for line in failure_lines(result.records):
        print(f"failed run: {line}")
    print(f"\nwrote {', '.join(p.name for p in result.files.values())} to {result.out}")
    finished = sum(r.get("status", "ok") in ("ok", "diverged") for r in result.records)
    if not finished:
        # Nothing to compare is a failure of the command (exit 1), not a result; some failed
        # runs among finished ones are a result, reported in the failed column (exit 0).
        print(
            f"gradclip compare: error: no run finished ({len(result.records)} of {len(result.records)} failed "
            "or were killed); see the failed runs above",
            file=sys.stderr,
        )
        return 1
    return 0


def _run_with_progress(plan, run_comparison, show: bool):
    configs = plan.configs
    if not show:
        return run_comparison(plan, out_label="--out")
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
            if record.get("status") in ("failed", "killed"):
                status = f"[red]{record['status']}"
            else:
                status = "[red]diverged" if record["diverged"] else ("[green]solved" if record["solved"] else "done")
            progress.update(
                bars[index], completed=configs[index].steps, visible=True,
                description=f"{configs[index].clipper} seed {configs[index].seed} {status}",
            )
            progress.advance(overall)

        return run_comparison(plan, on_progress=on_progress, on_done=on_done, out_label="--out")


def _print_verdict(verdict) -> None:
    # Plain lines, not a rich panel: they are read, copied and grepped.
    print("Verdict")
    for line in verdict.lines():
        print(f"  {line}")
    print()


def _print_summary(rows, meta, spent=None) -> None:
    from rich.console import Console
    from rich.table import Table

    from gradclip.experiments.private import describe_epsilon

    metric = rows[0]["metric_name"] if rows else "metric"
    training = f"{meta['optimizer']}, lr={meta['lr']}" if meta.get("optimizer") else "its own optimizer"
    # A private comparison names its noise in the title and gets an ε column (spent, at δ).
    private = f", {meta['private']}" if meta.get("private") else ""
    table = Table(title=f"gradclip compare — {meta['task']} ({training}, {meta['steps']} steps{private})")
    # Skipped steps (SkipOnSpike, nonfinite="skip") and failed runs get a column only when present.
    skips = any(row["skip_rate_mean"] > 0 for row in rows)
    failures = any(row["failed"] for row in rows)
    columns = ["clipper"] + ["ε"] * bool(spent) + [metric, "solved", "diverged"] + ["failed"] * failures
    columns += ["eval loss (median)", "clip rate"] + ["skip rate"] * skips + ["wall time (s)"]
    for column in columns:
        table.add_column(column, justify="left" if column == "clipper" else "right")

    def number(value: float, text: str) -> str:
        return "—" if value is None or math.isnan(value) else text.format(value)

    for row in rows:
        cells = [row["clipper"]] + [describe_epsilon(spent.get(row["clipper"], math.nan))] * bool(spent)
        cells += [
            number(row["metric_mean"], "{:.3f}"),
            f"{row['solved']}/{row['runs']}",
            f"{row['diverged']}/{row['runs']}",
        ]
        cells += [f"{row['failed']}/{row['runs']}"] * failures
        cells += [number(row["eval_loss_median"], "{:.4g}"), number(row["clip_rate_mean"], "{:.1%}")]
        cells += [number(row["skip_rate_mean"], "{:.1%}")] * skips + [number(row["wall_time_mean"], "{:.1f}")]
        table.add_row(*cells)
    # Outside a terminal rich assumes 80 columns and would truncate the clipper specs.
    Console(width=None if sys.stdout.isatty() else 140).print(table)


def _read_log(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        logs = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        hint = f" (there: {', '.join(logs)})" if logs else ""
        raise UsageError(
            f"{str(path)!r} is a directory; give the path of a Monitor JSON Lines log file (one JSON record "
            f"with a 'norm' field per line, e.g. {str(path / 'clip.jsonl')!r}){hint}"
        )
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
    _require(*_NEEDS["suggest"])
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
    _require(*_NEEDS["report"])
    records = _read_log(args.log)
    out = _check_writable(args.out or args.log.parent)
    from gradclip.experiments.plots import plot_logged_run

    for path in plot_logged_run(records, out, args.log.stem):
        print(f"wrote {path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    _require(*_NEEDS["bench"])
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
    saved = dict(os.environ)
    if args.command == "compare":
        # Before PyTorch is imported: the same threads and kernels on every machine
        # (gradclip.experiments.environment says why); worker processes inherit them.
        from gradclip.experiments.environment import apply_pinned_environment

        apply_pinned_environment()
    try:
        return handlers[args.command](args)
    except UsageError as error:
        print(f"gradclip {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        # An optional dependency imported deeper than the checks above: name its extra.
        root = (error.name or "").split(".")[0]
        if root not in EXTRAS:
            raise
        print(f"gradclip {args.command}: error: {_one_line(_missing([root]))}", file=sys.stderr)
        return 2
    finally:
        # main() called from Python (tests, notebooks) leaves the caller's environment as it was.
        if os.environ != saved:
            os.environ.clear()
            os.environ.update(saved)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


if __name__ == "__main__":  # pragma: no cover - python -m gradclip.cli
    sys.exit(main())
