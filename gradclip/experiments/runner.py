"""Running experiments: one training run, and many in parallel with progress bars.

A run trains one task under one clipper for one seed and records, per step, the training loss,
the pre-clip gradient norm, the threshold used, whether clipping acted and whether the optimizer
step was skipped. The gradient norm is measured even without clipping (``"none"``), so the
traces are comparable. A run stops early when it diverges: a non-finite parameter, or a loss the
task calls diverged (:meth:`~gradclip.experiments.tasks.Task.is_diverged`: non-finite or above
1000 times the trivial predictor's loss); the held-out loss at the end is judged the same way.
Runs are independent processes (spawned, one torch thread each) so ``--jobs`` uses the cores
without contention.
"""

from __future__ import annotations

import math
import multiprocessing
import queue as queue_module
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from gradclip.experiments.spec import parse_spec
from gradclip.experiments.tasks import make_task

__all__ = ["RunConfig", "run_one", "run_many", "OPTIMIZERS"]

OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one run (a run is reproducible from its config).

    Attributes:
        task: Task name.
        clipper: Clipper spec text (``"global_norm:max_norm=1.0"``, ``"none"``).
        seed: Seed for the model, the data and any random clipping.
        steps: Optimizer steps.
        lr: Learning rate.
        optimizer: ``"sgd"`` (momentum 0.9), ``"adam"`` or ``"adamw"``.
        task_options: Task keyword options (``seq_len``...).
    """

    task: str
    clipper: str
    seed: int
    steps: int
    lr: float
    optimizer: str
    task_options: dict[str, Any] = field(default_factory=dict)


def _optimizer(name: str, parameters, lr: float):
    import torch

    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    return torch.optim.AdamW(parameters, lr=lr)


def run_one(config: RunConfig, report: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train one task under one clipper and return its record.

    Args:
        config: The run's configuration.
        report: Called with the number of steps done, every few steps (progress bars).

    Returns:
        A JSON-serialisable dict: the config, ``metric_name``/``metric`` (0 for a diverged
        run), ``solved``, ``diverged``, ``divergence_limit`` and ``reference_loss`` (see
        :class:`~gradclip.experiments.tasks.Task`), ``eval_loss`` (held-out, NaN when the model
        is not finite), ``final_train_loss`` (mean of the last 5 % of the steps run),
        ``steps_run``, ``clip_rate``, ``skip_rate``, ``wall_time`` and per-step ``history``
        lists (``loss``, ``norm``, ``threshold``, ``clipped``, ``skipped``, ``spike``).
    """
    import torch

    import gradclip

    torch.manual_seed(config.seed)
    task = make_task(config.task, config.seed, **config.task_options)
    model = task.model()
    optimizer = _optimizer(config.optimizer, model.parameters(), config.lr)
    spec = parse_spec(config.clipper)
    clipper = spec.build()
    if clipper is not None and "seed" in clipper.config() and clipper.config()["seed"] is None:
        clipper = parse_spec(f"{spec.text}{',' if spec.kwargs else ':'}seed={config.seed}").build()
    history: dict[str, list] = {"loss": [], "norm": [], "threshold": [], "clipped": [], "skipped": [], "spike": []}
    diverged = False
    started = time.perf_counter()
    for step in range(config.steps):
        batch = task.batch(step)
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, batch)
        loss.backward()
        spike = task.perturb(model, step)
        if clipper is None:
            norm = float(gradclip.global_norm([p.grad for p in model.parameters() if p.grad is not None]))
            threshold, clipped, skip = math.inf, False, False
        else:
            # Reading the info every step syncs; on a CPU that costs nothing and the traces need it.
            info = clipper.clip_(model).to_dict()
            norm, threshold, clipped, skip = info["norm"], info["threshold"], info["clipped"], info["skip"]
        loss_value = float(loss.detach())
        history["loss"].append(loss_value)
        history["norm"].append(norm)
        history["threshold"].append(threshold)
        history["clipped"].append(bool(clipped))
        history["skipped"].append(bool(skip))
        history["spike"].append(spike)
        if not skip:
            optimizer.step()
        if task.is_diverged(loss_value) or not all(torch.isfinite(p).all() for p in model.parameters()):
            diverged = True
            break
        if report is not None and (step + 1) % 10 == 0:
            report(step + 1)
    evaluation = task.evaluate(model)
    # A model whose training loss stayed in range can still be wild on held-out data.
    diverged = diverged or task.is_diverged(evaluation["loss"])
    metric = evaluation[task.metric_name]
    if diverged or not math.isfinite(metric):
        metric = 0.0
    steps_run = len(history["loss"])
    tail = history["loss"][-max(1, steps_run // 20):]
    if report is not None:
        report(config.steps)
    return {
        **asdict(config),
        "metric_name": task.metric_name,
        "metric": metric,
        "solved": bool(task.solved(metric)) and not diverged,
        "diverged": diverged,
        "divergence_limit": task.divergence_limit,
        "reference_loss": task.reference_loss,
        "reference_text": task.reference_text,
        "eval_loss": evaluation["loss"],
        "final_train_loss": sum(tail) / len(tail),
        "steps_run": steps_run,
        "clip_rate": sum(history["clipped"]) / max(1, steps_run),
        "skip_rate": sum(history["skipped"]) / max(1, steps_run),
        "wall_time": time.perf_counter() - started,
        "history": history,
    }


def _worker_init() -> None:
    # One thread per process: --jobs processes share the cores instead of oversubscribing them.
    import torch

    torch.set_num_threads(1)


def _run_in_worker(index: int, config: RunConfig, progress) -> tuple[int, dict[str, Any]]:
    def report(done: int) -> None:
        progress.put((index, done))

    return index, run_one(config, report)


def run_many(
    configs: Sequence[RunConfig],
    jobs: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every config, ``jobs`` at a time, and return the records in config order.

    Args:
        configs: The runs.
        jobs: Processes to use; 1 runs in this process.
        on_progress: Called with ``(run index, steps done)`` as runs advance.
        on_done: Called with ``(run index, record)`` when a run finishes.

    Returns:
        One record per config (see :func:`run_one`), in the order of ``configs``.
    """
    results: list[dict[str, Any] | None] = [None] * len(configs)
    if jobs <= 1:
        import torch

        # One thread, as in the worker processes (same numbers either way), then the caller's
        # setting back: a library call must not leave the process slower than it found it.
        threads = torch.get_num_threads()
        _worker_init()
        try:
            for index, config in enumerate(configs):
                results[index] = run_one(config, (lambda done, i=index: on_progress(i, done)) if on_progress else None)
                if on_done:
                    on_done(index, results[index])
        finally:
            torch.set_num_threads(threads)
        return results  # type: ignore[return-value]
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        progress = manager.Queue()
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
            futures = [pool.submit(_run_in_worker, i, c, progress) for i, c in enumerate(configs)]
            pending = set(futures)
            while pending:
                for future in [f for f in pending if f.done()]:
                    pending.discard(future)
                    index, record = future.result()
                    results[index] = record
                    if on_done:
                        on_done(index, record)
                try:
                    while True:
                        index, done = progress.get(timeout=0.1)
                        if on_progress:
                            on_progress(index, done)
                except queue_module.Empty:
                    pass
    return results  # type: ignore[return-value]
