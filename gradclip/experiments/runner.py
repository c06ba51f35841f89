"""Running experiments: one training run, and many on local processes or a Ray cluster.

A run trains one task under one clipper for one seed and records, per step, the training loss,
the pre-clip gradient norm, the threshold used, whether clipping acted and whether the optimizer
step was skipped. The gradient norm is measured even without clipping (``"none"`` runs under
``GlobalNorm(max_norm=inf)``, which never changes a gradient), so the traces are comparable. A
run stops early when it diverges: a non-finite parameter, or a loss the task calls diverged
(:meth:`~gradclip.experiments.Task.is_diverged`: non-finite or above 1000 times the trivial
predictor's loss); the held-out loss at the end is judged the same way.

Every run ends in a record with a ``status``: ``"ok"``, ``"diverged"``, ``"failed"`` (the task
raised; the record holds the error and its traceback) or ``"killed"`` (its process or Ray worker
died). A task that breaks the contract (a loss that is not a scalar, metrics without the
metric) raises :class:`~gradclip.experiments.TaskError` instead, which stops the comparison.

Runs are pinned to one thread and to the same kernels on every x86-64 machine
(:mod:`~gradclip.experiments.environment`); ``jobs > 1`` runs them in separate processes, one
run per process at a time, so a run that kills its process is reported and the others go on.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gradclip._core.errors import InvalidArgumentError, NonFiniteError
from gradclip.experiments.environment import cpu_capability, pinned_torch
from gradclip.experiments.loading import TaskSource, resolve_source
from gradclip.experiments.spec import parse_spec
from gradclip.experiments.tasks import TASKS, check_task_options
from gradclip.experiments.tasks.base import OPTIMIZERS, Task, TaskError
from gradclip.experiments.train import Diverged, Report, TrainTask

__all__ = ["RunConfig", "run_one", "run_many", "failed_record", "OPTIMIZERS", "BACKENDS", "STATUSES"]

#: Where runs execute: local processes, or tasks on a Ray cluster.
BACKENDS = ("local", "ray")
#: How a run can end.
STATUSES = ("ok", "diverged", "failed", "killed")

_HISTORY_KEYS = ("loss", "norm", "threshold", "clipped", "skipped", "spike")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run (a run is reproducible from its config).

    Attributes:
        task: The task's label: a built-in name, or the reference it was loaded from.
        clipper: Clipper spec text (``"global_norm:max_norm=1.0"``, ``"none"``).
        seed: Seed for the model, the data and any random clipping.
        steps: Optimizer steps.
        lr: Learning rate (None for a train function, which picks its own).
        optimizer: ``"sgd"`` (momentum 0.9), ``"adam"`` or ``"adamw"`` (None for a train
            function).
        task_options: Task keyword options (``seq_len``...).
        source: Where a worker finds a task that is not built in (None: ``task`` is a
            built-in name).
    """

    task: str
    clipper: str
    seed: int
    steps: int
    lr: float | None
    optimizer: str | None
    task_options: dict[str, Any] = field(default_factory=dict)
    source: TaskSource | None = field(default=None, repr=False, compare=False)
    private: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        """The config as plain data, as it appears in every record (``source`` left out;
        ``private`` only for a private run)."""
        return {
            "task": self.task,
            "clipper": self.clipper,
            "seed": self.seed,
            "steps": self.steps,
            "lr": self.lr,
            "optimizer": self.optimizer,
            "task_options": dict(self.task_options),
            **({"private": dict(self.private)} if self.private is not None else {}),
        }


# Task lookups are cached per process: a worker runs many configs of one task, and a task
# file is executed once, not once per run.
_RESOLVED: dict[tuple, Any] = {}


def _target(config: RunConfig) -> Any:
    if config.source is None:
        if config.task not in TASKS:
            raise TaskError(f"unknown task {config.task!r}; valid tasks: {', '.join(TASKS)}")
        return TASKS[config.task]
    source = config.source
    key = (source.kind, source.reference, source.path, source.code, source.attribute, id(source.obj))
    if key not in _RESOLVED:
        _RESOLVED[key] = resolve_source(source)
    return _RESOLVED[key]


def _clipper(config: RunConfig):
    spec = parse_spec(config.clipper)
    clipper = spec.build()
    if clipper is None:
        import gradclip

        # Measures the norm, never changes a gradient: "none" runs through the same code path.
        return gradclip.GlobalNorm(max_norm=math.inf)
    # A clipper drawing a random stream with its seed left unset (Subset) takes the run's seed,
    # so a run is reproducible; in a chain each such link does.
    links = spec.links or (spec,)
    built = clipper.clippers if spec.links else (clipper,)
    if not any(map(_unseeded, built)):
        return clipper
    texts = [_seeded(link.text, config.seed) if _unseeded(one) else link.text for link, one in zip(links, built)]
    return parse_spec("+".join(texts)).build()


def _unseeded(clipper) -> bool:
    """Whether a clipper has a ``seed`` setting left at None."""
    settings = clipper.config()
    return "seed" in settings and settings["seed"] is None


def _seeded(text: str, seed: int) -> str:
    """A single clipper's canonical spec text with ``seed=`` added."""
    return f"{text}{',' if ':' in text else ':'}seed={seed}"


#: The clipper specs already used once in this process (see :func:`_warm_up`).
_WARM: set[str] = set()


def _warm_up(config: RunConfig) -> None:
    """Give a clipper its first use in this process outside the timed part of a run.

    The first ``clip_`` in a process pays one-time costs (the backend's lazy imports, dispatch
    caches, autograd's first backward): timed, they would be charged to whichever clipper a
    worker happens to run first. A fresh clipper built from the same spec clips a throwaway
    one-layer model once per spec and process; the run's own clipper, model and random streams
    are untouched (the global generator's state is put back).
    """
    if config.clipper in _WARM:
        return
    _WARM.add(config.clipper)
    import torch

    state = torch.random.get_rng_state()
    try:
        spare = torch.nn.Linear(4, 2)
        spare(torch.ones(3, 4)).square().sum().backward()
        _clipper(config).clip_(spare, loss=torch.tensor(1.0))
    except Exception:  # noqa: BLE001 - best effort: the run itself reports any real error
        pass
    finally:
        torch.random.set_rng_state(state)


def _summary_fields(history: dict[str, list], started: float) -> dict[str, Any]:
    steps_run = len(history["loss"])
    tail = history["loss"][-max(1, steps_run // 20):]
    finite_tail = [x for x in tail if x is not None]
    return {
        "final_train_loss": sum(finite_tail) / len(finite_tail) if finite_tail else math.nan,
        "steps_run": steps_run,
        "clip_rate": sum(history["clipped"]) / max(1, steps_run),
        "skip_rate": sum(history["skipped"]) / max(1, steps_run),
        "wall_time": time.perf_counter() - started,
        "history": history,
    }


def failed_record(config: RunConfig, status: str, error: str, trace: str | None = None, **known: Any) -> dict[str, Any]:
    """The record of a run that did not finish: ``status`` ``"failed"`` or ``"killed"``.

    Args:
        config: The run's config.
        status: ``"failed"`` (the task raised) or ``"killed"`` (its process died).
        error: One line saying what happened.
        trace: The traceback, when there is one.
        **known: Fields already known (``metric_name``, ``history``...).

    Returns:
        A record with the keys of :func:`run_one`'s, the metric and losses NaN.
    """
    history = known.pop("history", None) or {key: [] for key in _HISTORY_KEYS}
    record = {
        **config.public(),
        "metric_name": None,
        "greater_is_better": True,
        "metric": math.nan,
        "solved": False,
        "diverged": False,
        "divergence_limit": math.nan,
        "reference_loss": math.nan,
        "reference_text": "",
        "eval_loss": math.nan,
        "status": status,
        "error": error,
        "traceback": trace,
        "cpu_capability": cpu_capability(),
        **_summary_fields(history, time.perf_counter()),
        "wall_time": known.pop("wall_time", 0.0),
    }
    record.update(known)
    return record


def _check_loss(task_name: str, loss: Any) -> None:
    """A Task's loss must be a scalar tensor that backward() can start from."""
    import torch

    if not isinstance(loss, torch.Tensor):
        raise TaskError(f"task {task_name!r}: loss() returned {type(loss).__name__}; it must return a scalar torch tensor")
    if loss.ndim != 0:
        raise TaskError(
            f"task {task_name!r}: loss() returned a tensor of shape {tuple(loss.shape)}; it must be a scalar "
            "(0-d): reduce it, e.g. with .mean()"
        )


def _run_task(cls: type[Task], config: RunConfig, report: Callable[[int], None] | None) -> dict[str, Any]:
    import torch

    torch.manual_seed(config.seed)
    check_task_options(cls, config.task_options)
    task = cls(config.seed, **config.task_options)
    task.begin_run(config.steps)
    model = task.model()
    optimizer = task.configure_optimizer(model.parameters(), config.optimizer, config.lr)
    clipper = _clipper(config)
    _warm_up(config)
    # The clock starts here: the task, its data, the model and every import are ready, so a
    # worker's one-time start-up is not charged to whichever clipper it happens to run first.
    started = time.perf_counter()
    if config.private is not None:
        # DP-SGD's own loop: Poisson batches, per-example clipping, noise (experiments.private_training).
        from gradclip.experiments.private_training import train_private

        history, diverged, privacy = train_private(
            task, model, optimizer, clipper, config.private, config.steps, config.seed, report
        )
        return {**_evaluated(task, config, model, history, diverged, started, report), **privacy}
    history: dict[str, list] = {key: [] for key in _HISTORY_KEYS}
    diverged = False
    try:
        for step in range(config.steps):
            batch = task.batch(step)
            optimizer.zero_grad(set_to_none=True)
            loss = task.loss(model, batch)
            _check_loss(config.task, loss)
            loss.backward()
            spike = task.perturb(model, step)
            # The loss goes along as a signal (SkipOnSpike(signal="loss") decides on it; the other
            # clippers ignore it). Reading the info every step syncs; on a CPU that costs nothing
            # and the traces need it.
            info = clipper.clip_(model, loss=loss.detach()).to_dict()
            loss_value = float(loss.detach())
            history["loss"].append(loss_value)
            history["norm"].append(info["norm"])
            history["threshold"].append(info["threshold"])
            history["clipped"].append(bool(info["clipped"]))
            history["skipped"].append(bool(info["skip"]))
            history["spike"].append(spike)
            if not info["skip"]:
                optimizer.step()
            if task.is_diverged(loss_value) or not all(torch.isfinite(p).all() for p in model.parameters()):
                diverged = True
                break
            if report is not None and (step + 1) % 10 == 0:
                report(step + 1)
    except NonFiniteError:
        # A clipper with nonfinite="raise" met NaN/inf gradients: the run blew up.
        diverged = True
    return _evaluated(task, config, model, history, diverged, started, report)


def _evaluated(
    task: Task, config: RunConfig, model: Any, history: dict[str, list], diverged: bool, started: float,
    report: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Evaluate a trained Task's model and build the run's record."""
    evaluation = task.evaluate(model)
    if not isinstance(evaluation, dict) or task.metric_name not in evaluation or "loss" not in evaluation:
        raise TaskError(
            f"task {config.task!r}: evaluate() returned {evaluation!r:.80}; it must return a dict with "
            f"'loss' and {task.metric_name!r}"
        )
    # A model whose training loss stayed in range can still be wild on held-out data.
    eval_loss = float(evaluation["loss"])
    diverged = diverged or task.is_diverged(eval_loss)
    metric = float(evaluation[task.metric_name])
    if diverged or not math.isfinite(metric):
        metric = task.diverged_metric
    if report is not None:
        report(config.steps)
    return {
        **config.public(),
        "metric_name": task.metric_name,
        "greater_is_better": task.greater_is_better,
        "metric": metric,
        "solved": bool(task.solved(metric)) and not diverged,
        "diverged": diverged,
        "divergence_limit": task.divergence_limit,
        "reference_loss": task.reference_loss,
        "reference_text": task.reference_text,
        "eval_loss": eval_loss,
        "status": "diverged" if diverged else "ok",
        "error": None,
        "traceback": None,
        "cpu_capability": cpu_capability(),
        **_summary_fields(history, started),
    }


def _run_train(task: TrainTask, config: RunConfig, report: Callable[[int], None] | None) -> dict[str, Any]:
    started = time.perf_counter()
    if config.task_options:
        raise TaskError(f"task {config.task!r} is a train function: it takes no options, got {sorted(config.task_options)}")
    tracker = Report(task.divergence_limit, report)
    diverged, metrics = False, None
    try:
        metrics = task(_clipper(config), config.seed, config.steps, tracker)
    except Diverged:
        diverged = True
    except NonFiniteError:
        diverged = True
    if metrics is not None:
        metric_name, greater, metric, eval_loss = task.metric_of(metrics)
    else:
        metric_name, greater = task.metric_name or "metric", task.greater_is_better
        metric, eval_loss = math.nan, math.nan
    if not diverged and math.isfinite(eval_loss) and eval_loss > task.divergence_limit:
        diverged = True
    if diverged or not math.isfinite(metric):
        metric = task.diverged_metric(greater)
    if report is not None:
        report(config.steps)
    return {
        **config.public(),
        "metric_name": metric_name,
        "greater_is_better": greater,
        "metric": metric,
        "solved": task.solved(metric, greater) and not diverged,
        "diverged": diverged,
        "divergence_limit": task.divergence_limit,
        "reference_loss": math.nan if task.reference_loss is None else float(task.reference_loss),
        "reference_text": task.reference_text if task.reference_loss is not None else "",
        "eval_loss": eval_loss,
        "status": "diverged" if diverged else "ok",
        "error": None,
        "traceback": None,
        "cpu_capability": cpu_capability(),
        **_summary_fields(tracker.history, started),
    }


def run_one(config: RunConfig, report: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one task under one clipper and return its record.

    Args:
        config: The run's configuration.
        report: Called with the number of steps done, every few steps (progress bars).

    Returns:
        A JSON-serialisable dict: the config, ``metric_name``/``metric`` (the task's
        ``diverged_metric`` for a diverged run), ``greater_is_better``, ``solved``,
        ``diverged``, ``status`` (``"ok"``, ``"diverged"``, ``"failed"``), ``error`` and
        ``traceback`` (a failed run's), ``divergence_limit`` and ``reference_loss`` (see
        :class:`~gradclip.experiments.Task`), ``eval_loss`` (held-out, NaN when unknown),
        ``final_train_loss`` (mean of the last 5 % of the steps run), ``steps_run``,
        ``clip_rate``, ``skip_rate``, ``wall_time`` (seconds of training and evaluation; for a
        Task from when its data, model, optimizer and clipper are built and the clipper has
        been used once in this process, so a worker's start-up is charged to no run; a train
        function's whole call, its own set-up included), ``cpu_capability`` (the kernels PyTorch
        ran) and per-step ``history`` lists (``loss``, ``norm``, ``threshold``, ``clipped``,
        ``skipped``, ``spike``).

    Raises:
        TaskError: The task cannot be found or breaks the contract (a loss that is not a
            scalar, an evaluation or metrics without the metric).
    """
    started = time.perf_counter()
    target = _target(config)
    with pinned_torch():
        try:
            if isinstance(target, TrainTask):
                return _run_train(target, config, report)
            return _run_task(target, config, report)
        except (TaskError, KeyboardInterrupt):
            raise
        except Exception as error:  # the task itself failed: reported, never dropped
            return failed_record(
                config, "failed", f"{type(error).__name__}: {error}", traceback.format_exc(),
                wall_time=time.perf_counter() - started,
            )


def run_many(
    configs: Sequence[RunConfig],
    jobs: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    backend: str = "local",
    ray_address: str | None = None,
    resources: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run every config and return the records in config order.

    Args:
        configs: The runs.
        jobs: ``backend="local"``: processes to use (1 runs in this process); ignored by Ray,
            which schedules by ``resources``.
        on_progress: Called with ``(run index, steps done)`` as runs advance.
        on_done: Called with ``(run index, record)`` as each run ends, in the order they end.
        backend: ``"local"`` or ``"ray"``.
        ray_address: ``backend="ray"``: the cluster's address for ``ray.init(address=...)``
            (None: a running local instance, or a new one).
        resources: ``backend="ray"``: what each run asks for: ``{"cpu": 1, "gpu": 0.5,
            "memory": 2e9, "my_resource": 1}``.

    Returns:
        One record per config (see :func:`run_one`), in the order of ``configs``; runs that
        failed or were killed have records with that ``status``.

    Raises:
        TaskError: A task broke the contract; the other runs were stopped.
        InvalidArgumentError: A bad ``jobs`` or ``backend``.
    """
    if backend not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgumentError(f"jobs must be an integer >= 1, got {jobs!r}")
    if backend == "ray":
        from gradclip.experiments.ray_backend import run_ray

        return run_ray(configs, address=ray_address, resources=resources, on_progress=on_progress, on_done=on_done)
    if jobs > 1 and len(configs) > 1:
        from gradclip.experiments.pool import run_pool

        return run_pool(configs, min(jobs, len(configs)), on_progress=on_progress, on_done=on_done)
    results: list[dict[str, Any]] = []
    for index, config in enumerate(configs):
        progress = (lambda done, i=index: on_progress(i, done)) if on_progress else None
        results.append(run_one(config, progress))
        if on_done:
            on_done(index, results[-1])
    return results
