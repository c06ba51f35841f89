"""``gradclip.experiments.compare``: train one task under many clippers and seeds, from Python.

::

    from gradclip.experiments import compare, sweep, logspace

    result = compare(
        "my_task.py:make",                        # or a Task subclass, a train function...
        ["none", "zclip", "adagc"] + sweep("global_norm", max_norm=logspace(0.1, 10, 5)),
        seeds=3, jobs=2, out="runs/mine",
    )
    print(result.verdict.recommendation)

It is what ``gradclip compare`` runs: :func:`plan_comparison` checks every input before anything
runs or is written, :func:`run_comparison` runs the plan (locally or on Ray), streams each
record into ``results.jsonl`` as it arrives, and writes the summary, plots and reports at the
end. A task that breaks the contract stops the comparison and leaves nothing in the run
directory.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradclip._core.errors import GradClipError, InvalidArgumentError
from gradclip.experiments.loading import LoadedTask, check_picklable, load_task
from gradclip.experiments import runner as _runner
from gradclip.experiments.private import PRIVATE_CLIPPERS, epsilon_of, plan_private
from gradclip.experiments.runner import BACKENDS, OPTIMIZERS, RunConfig
from gradclip.experiments.sweep import expand
from gradclip.experiments.tasks import check_task_options
from gradclip.experiments.tasks.base import TaskError
from gradclip.experiments.verdict import Verdict, judge

__all__ = ["compare", "plan_comparison", "run_comparison", "Comparison", "Plan", "DEFAULT_CLIPPERS"]

#: The clippers of the default comparison: none, the fixed global norm of Pascanu et al., value
#: clipping, and two adaptive thresholds. ZClip gets a ``max_grad_norm`` cap because its first
#: ``warmup_steps`` only gather statistics: uncapped, the adding RNN diverges before ZClip starts
#: to act (run ``--clipper zclip`` to see it).
DEFAULT_CLIPPERS = (
    "none",
    "global_norm:max_norm=1.0",
    "value:clip_value=0.1",
    "zclip:max_grad_norm=1.0",
    "autoclip",
)


@dataclass(frozen=True)
class Plan:
    """A checked comparison, ready to run.

    Attributes:
        task: The :class:`~gradclip.experiments.loading.LoadedTask`.
        clippers: The clipper specs (canonical, sweeps expanded).
        configs: One :class:`~gradclip.experiments.runner.RunConfig` per clipper and seed.
        meta: The settings, for the reports' header.
        out: The run directory (None: write nothing).
        jobs, backend, ray_address, resources: Where the runs go.
    """

    task: LoadedTask
    clippers: list[str]
    configs: list[RunConfig]
    meta: dict[str, Any]
    out: Path | None
    jobs: int
    backend: str
    ray_address: str | None
    resources: dict[str, float] | None


@dataclass
class Comparison:
    """What a comparison produced.

    Attributes:
        records: One record per run (:func:`~gradclip.experiments.runner.run_one`).
        rows: The summary, one row per clipper (:func:`~gradclip.experiments.report.summarise`).
        verdict: The :class:`~gradclip.experiments.verdict.Verdict`.
        meta: The settings.
        out: The run directory, or None.
        files: The files written, by kind (``results``, ``summary``, ``report_md``...).
    """

    records: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    verdict: Verdict
    meta: dict[str, Any]
    out: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _seeds(seeds: Any) -> list[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return list(range(_positive_int("seeds", seeds)))
    if isinstance(seeds, (list, tuple, range)) and seeds:
        values = list(seeds)
        if all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values) and len(set(values)) == len(values):
            return values
    raise InvalidArgumentError(f"seeds must be a count >= 1 or a list of distinct integers >= 0, got {seeds!r}")


def plan_comparison(
    task: Any,
    clippers: Sequence[str] | str | None = None,
    *,
    sweep: Sequence[str] | str | None = None,
    seeds: int | Sequence[int] = 3,
    steps: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    quick: bool = False,
    task_options: dict[str, Any] | None = None,
    jobs: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    resources: dict[str, float] | str | None = None,
    out: str | Path | None = None,
    private: Any = None,
) -> Plan:
    """Check a comparison's inputs and build its runs; nothing runs and nothing is written.

    Args: as :func:`compare`.

    Returns:
        The :class:`Plan`.

    Raises:
        TaskError: The task cannot be loaded (import error, missing attribute, wrong kind of
            object) or cannot be sent to worker processes.
        InvalidArgumentError: A bad clipper spec, sweep, seed count, step count, learning rate,
            optimizer, option, backend, resource or privacy spec, or a clipper private training
            refuses (ZClip, AutoClip, AdaGC, none...).
        TaskError: With ``private``: the task cannot train privately (a layer without a
            per-example rule, no training set or per-example losses).
    """
    loaded = task if isinstance(task, LoadedTask) else load_task(task)
    # One spec given as a string is one clipper, not a list of one-letter specs.
    if isinstance(clippers, str):
        clippers = [clippers]
    if isinstance(sweep, str):
        sweep = [sweep]
    specs = expand(list(clippers) if clippers else None, sweep)
    if not specs:
        # A private comparison's default: clippers DP-SGD accepts (the usual list holds ZClip...).
        specs = list(PRIVATE_CLIPPERS if private is not None else loaded.default_clippers or DEFAULT_CLIPPERS)
        specs = expand(specs, None)
    seed_list = _seeds(seeds)
    if quick and isinstance(seeds, int):
        seed_list = seed_list[:2]  # a smoke run: at most two seeds
    if steps is not None:
        _positive_int("steps", steps)
    steps = steps or (loaded.quick_steps if quick else loaded.steps)
    jobs = _positive_int("jobs", jobs)
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    options = {k: v for k, v in (task_options or {}).items() if v is not None}
    if loaded.is_train_function:
        for name, value in (("lr", lr), ("optimizer", optimizer)):
            if value is not None:
                raise InvalidArgumentError(
                    f"{name} applies to Task tasks; {loaded.label!r} is a train function, which sets up its own optimizer"
                )
        if options:
            raise InvalidArgumentError(f"task {loaded.label!r} is a train function: it takes no options, got {sorted(options)}")
        lr_value, optimizer_value = None, None
    else:
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0):
            raise InvalidArgumentError(f"lr must be a finite number > 0, got {lr!r}")
        if optimizer is not None and optimizer not in OPTIMIZERS:
            raise InvalidArgumentError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        check_task_options(loaded.target, options)
        lr_value = float(lr) if lr is not None else loaded.defaults.lr
        optimizer_value = optimizer or loaded.defaults.optimizer
    settings, privacy = None, None
    if private is not None:
        if loaded.is_train_function:
            raise InvalidArgumentError(
                f"private applies to Task tasks; {loaded.label!r} is a train function, which runs its own loop "
                "(use gradclip.torch.PerSample and DPOptimizer inside it)"
            )
        settings, privacy = plan_private(private, loaded.target, options, specs, steps)
    if backend == "ray":
        from gradclip.experiments.ray_backend import parse_resources

        resources = parse_resources(resources)
    elif resources is not None:
        raise InvalidArgumentError("resources apply to backend='ray' only")
    elif jobs > 1:
        check_picklable(loaded)
    source = None if loaded.source.kind == "builtin" else loaded.source
    configs = [
        RunConfig(loaded.label, spec, seed, steps, lr_value, optimizer_value, dict(options), source, settings)
        for spec in specs
        for seed in seed_list
    ]
    meta = {
        "task": loaded.label,
        "steps": steps,
        "lr": lr_value,
        "optimizer": optimizer_value,
        "seeds": len(seed_list),
        **options,
    }
    if privacy is not None:
        meta["private"] = privacy
    if backend != "local":
        meta["backend"] = backend
    return Plan(loaded, specs, configs, meta, Path(out) if out is not None else None, jobs, backend, ray_address, resources)


class _RunDirectory:
    """The run directory while a comparison runs: records stream into ``results.jsonl``; on a
    task error everything written is removed again (and the directory, if it was created here)."""

    def __init__(self, out: Path | None, label: str = "out"):
        self.out = out
        self.created = False
        self.stream = None
        if out is None:
            return
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".gradclip-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as error:
            raise InvalidArgumentError(f"{label} {str(out)!r} is not a writable directory: {error.strerror or error}") from error

    def add(self, record: dict[str, Any]) -> None:
        from gradclip.monitor.writers import json_safe

        if self.out is None:
            return
        if self.stream is None:
            self.stream = (self.out / "results.jsonl").open("w")
        self.stream.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.stream.flush()  # a long comparison's finished runs survive a crash of this process

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def discard(self) -> None:
        self.close()
        if self.out is None:
            return
        with contextlib.suppress(OSError):
            (self.out / "results.jsonl").unlink(missing_ok=True)
        if self.created:
            with contextlib.suppress(OSError):
                self.out.rmdir()  # only when empty: never remove what someone else put there


def run_comparison(
    plan: Plan,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    out_label: str = "out",
) -> Comparison:
    """Run a :class:`Plan` and write its outputs (when it has a run directory).

    Args:
        plan: From :func:`plan_comparison`.
        on_progress: ``(run index, steps done)``.
        on_done: ``(run index, record)`` as each run ends.
        out_label: How error messages name the run directory (the CLI's ``--out``).

    Returns:
        The :class:`Comparison`.

    Raises:
        TaskError: A run found the task breaking the contract; the run directory was left as
            it was found.
        InvalidArgumentError: The run directory cannot be written.
    """
    from gradclip.experiments.report import summarise, write_outputs

    directory = _RunDirectory(plan.out, out_label)

    def done(index: int, record: dict[str, Any]) -> None:
        directory.add(record)
        if on_done:
            on_done(index, record)

    try:
        records = _runner.run_many(
            plan.configs, jobs=min(plan.jobs, len(plan.configs)), on_progress=on_progress, on_done=done,
            backend=plan.backend, ray_address=plan.ray_address, resources=plan.resources,
        )
    except KeyboardInterrupt:
        directory.close()  # the runs that finished stay in results.jsonl
        raise
    except BaseException:
        directory.discard()
        raise
    directory.close()
    meta = dict(plan.meta)
    capabilities = sorted({r["cpu_capability"] for r in records if r.get("cpu_capability")})
    if capabilities:
        meta["kernels"] = "/".join(capabilities)
    verdict = judge(records)
    files = write_outputs(records, plan.out, meta, verdict) if plan.out is not None else {}
    rows = summarise(records)
    spent = epsilon_of(records)
    for row in rows if spent else ():
        row["epsilon"] = spent.get(row["clipper"], math.nan)  # the largest over the clipper's seeds
    return Comparison(records, rows, verdict, meta, plan.out, files)


def compare(
    task: Any,
    clippers: Sequence[str] | str | None = None,
    *,
    sweep: Sequence[str] | str | None = None,
    seeds: int | Sequence[int] = 3,
    steps: int | None = None,
    lr: float | None = None,
    optimizer: str | None = None,
    quick: bool = False,
    task_options: dict[str, Any] | None = None,
    jobs: int = 1,
    backend: str = "local",
    ray_address: str | None = None,
    resources: dict[str, float] | str | None = None,
    out: str | Path | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    private: Any = None,
) -> Comparison:
    """Train ``task`` under each clipper and seed and compare them.

    Args:
        task: A built-in task name (``"adding"``, ``"gpt"``...), ``"path/to/file.py:factory"``,
            ``"package.module:factory"``, a :class:`~gradclip.experiments.Task` subclass, a
            :class:`~gradclip.experiments.TrainTask` or a ``train(clipper, seed, steps,
            report)`` function (see :mod:`gradclip.experiments.loading`).
        clippers: Clipper specs (``"global_norm:max_norm=1.0"``, ``"zclip"``, ``"none"``), or
            one spec as a string (``"zclip+skip_on_spike"`` is one chained clipper). Default, when ``sweep`` is not given either: the task's own default list, else
            :data:`DEFAULT_CLIPPERS`.
        sweep: Sweep texts (``"global_norm:max_norm=logspace(0.1,10,5)"``), or one as a string,
            expanded after ``clippers`` (see :func:`~gradclip.experiments.sweep`).
        seeds: How many seeds (0, 1, ...), or the seeds themselves.
        steps: Optimizer steps per run (default: the task's).
        lr: Learning rate (Task tasks; default: the task's).
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (Task tasks; default: the task's).
        quick: A smoke run: the task's ``quick_steps`` and at most two seeds.
        task_options: Keyword options of a Task's constructor (``{"seq_len": 20}``).
        jobs: Local processes (1: in this process).
        backend: ``"local"`` or ``"ray"``.
        ray_address: ``backend="ray"``: the cluster (``ray.init(address=...)``).
        resources: ``backend="ray"``: what each run asks for (``{"cpu": 1, "gpu": 1}``).
        out: The run directory for results.jsonl, summary.csv, plots and reports (None: write
            nothing).
        on_progress: ``(run index, steps done)``.
        on_done: ``(run index, record)`` as each run ends.
        private: Train every run with DP-SGD (:mod:`~gradclip.experiments.private`): a spec
            ``"noise_multiplier=1.1"`` or ``"epsilon=3,delta=1e-5"`` (or a dict of those keys).
            Each record then holds ``epsilon`` (spent, at ``delta``), ``noise_multiplier`` and
            ``sample_rate``, each summary row ``epsilon``. The clippers default to
            :data:`~gradclip.experiments.private.PRIVATE_CLIPPERS`. None: ordinary training
            (the non-private baseline).

    Returns:
        The :class:`Comparison`: records, summary rows, the verdict, the files written.

    Raises:
        TaskError: The task cannot be loaded, breaks the contract while running (a loss that
            is not a scalar...), or cannot train privately (a layer without a per-example rule);
            nothing is left in ``out``.
        InvalidArgumentError: Any other bad argument (a clipper DP-SGD refuses, a privacy spec
            out of range...), before anything runs.
    """
    plan = plan_comparison(
        task, clippers, sweep=sweep, seeds=seeds, steps=steps, lr=lr, optimizer=optimizer, quick=quick,
        task_options=task_options, jobs=jobs, backend=backend, ray_address=ray_address, resources=resources, out=out,
        private=private,
    )
    return run_comparison(plan, on_progress=on_progress, on_done=on_done)


# Re-exported for the CLI's error handling: everything compare() raises on bad input.
BAD_INPUT = (GradClipError, TaskError)
