"""The lighter task form: a ``train(clipper, seed, steps, report) -> metrics`` function.

Where :class:`~gradclip.experiments.Task` hands the runner a model, batches and a loss, a train
function keeps its own loop — a ``transformers.Trainer``, a Keras ``model.fit``, an optax loop,
or any PyTorch loop — and only promises to:

1. clip with the ``clipper`` it is given (``clipper.clip_(model, loss=loss)``,
   ``gradclip.keras.ClippingOptimizer(optimizer, clipper)``, ``clipper.as_optax()``,
   ``gradclip.transformers.GradClipCallback(clipper)``...), passing the step's loss where the
   loop has it, as the runner's own loop does: ``skip_on_spike:signal=loss`` decides on it and
   raises without it;
2. seed everything from ``seed`` and take ``steps`` optimizer steps;
3. call ``report(step, loss, info)`` after each step with the training loss (a scalar) and,
   where it has one, the step's :class:`~gradclip.ClipInfo` (or a dict with ``norm``,
   ``threshold``, ``clipped``, ``skip``): this fills the traces, the plots, the progress bars
   and divergence detection;
4. return its held-out metrics as a dict of numbers: ``{"accuracy": 0.93, "loss": 0.21}``.

``report`` raises :class:`Diverged` when the loss is non-finite or beyond the divergence limit;
let it propagate (out of ``model.fit`` or ``trainer.train()`` too): the runner records a
diverged run. For ``none`` the clipper is ``GlobalNorm(max_norm=inf)``: it measures the norm
and leaves every gradient bit for bit unchanged, so a train function needs no special case.

Wrap the function in :class:`TrainTask` (or decorate it with :func:`train_task`) to name its
metric, default steps and divergence scale; a bare function works too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gradclip.experiments.tasks.base import DIVERGENCE_FACTOR, TaskError

__all__ = ["TrainTask", "train_task", "Report", "Diverged", "TrainFunction"]

#: ``train(clipper, seed, steps, report) -> metrics``.
TrainFunction = Callable[[Any, int, int, "Report"], Mapping[str, Any]]

_HISTORY_KEYS = ("loss", "norm", "threshold", "clipped", "skipped", "spike")


class Diverged(Exception):
    """Raised by :class:`Report` when a run's loss is non-finite or beyond the divergence limit.

    Attributes:
        step: The step whose loss diverged.
        loss: That loss.
        limit: The divergence limit (``inf`` when the task declares no reference loss).
    """

    def __init__(self, step: int, loss: float, limit: float):
        super().__init__(f"loss {loss:.4g} at step {step} is past the divergence limit {limit:.4g}")
        self.step, self.loss, self.limit = step, loss, limit


def _scalar(where: str, value: Any) -> float:
    """``value`` as a float when it is a scalar (a Python number or any framework's 0-d array),
    else a :class:`TaskError` naming what it is."""
    if isinstance(value, bool) or isinstance(value, (str, bytes, list, tuple, dict, set)) or value is None:
        raise TaskError(f"{where} must be a scalar number, got {type(value).__name__} {value!r:.60}")
    shape = getattr(value, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise TaskError(
            f"{where} must be a scalar, got {type(value).__name__} of shape {tuple(shape)}; "
            "reduce it (e.g. .mean()) before reporting"
        )
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise TaskError(f"{where} must be a scalar number, got {type(value).__name__}: {error}") from None


def _info_fields(info: Any) -> tuple[float, float, bool, bool]:
    """(norm, threshold, clipped, skip) from a ClipInfo, a dict or None."""
    if info is None:
        return math.nan, math.nan, False, False
    if hasattr(info, "to_dict"):
        info = info.to_dict()
    if not isinstance(info, Mapping):
        raise TaskError(
            f"report(step, loss, info): info must be a gradclip.ClipInfo, a dict or None, got {type(info).__name__}"
        )

    def number(key: str) -> float:
        value = info.get(key)
        return math.nan if value is None else _scalar(f"report(): info[{key!r}]", value)

    return number("norm"), number("threshold"), bool(info.get("clipped", False)), bool(info.get("skip", False))


class Report:
    """The ``report(step, loss, info=None)`` callable a train function receives.

    Args:
        limit: The divergence limit (``inf``: only a non-finite loss diverges).
        on_step: Called with the number of steps done (progress bars).

    Attributes:
        history: Per-step lists ``loss``, ``norm``, ``threshold``, ``clipped``, ``skipped``,
            ``spike`` (as :func:`~gradclip.experiments.runner.run_one` records them).
        limit: The divergence limit.
    """

    def __init__(self, limit: float = math.inf, on_step: Callable[[int], None] | None = None):
        self.limit = limit
        self.history: dict[str, list] = {key: [] for key in _HISTORY_KEYS}
        self._on_step = on_step

    def __call__(self, step: int, loss: Any, info: Any = None) -> None:
        """Record one optimizer step.

        Args:
            step: The step's index (0-based).
            loss: The step's training loss: a scalar (Python number or 0-d array/tensor).
            info: The step's :class:`~gradclip.ClipInfo`, a dict with ``norm``, ``threshold``,
                ``clipped``, ``skip``, or None.

        Raises:
            TaskError: ``loss`` is not a scalar, or ``info`` is neither a ClipInfo nor a dict.
            Diverged: The loss is non-finite or beyond :attr:`limit`; the run stops.
        """
        value = _scalar("the loss passed to report()", loss)
        norm, threshold, clipped, skip = _info_fields(info)
        for key, item in zip(_HISTORY_KEYS, (value, norm, threshold, clipped, skip, 1.0)):
            self.history[key].append(item)
        if self._on_step is not None and (len(self.history["loss"]) % 10 == 0):
            self._on_step(len(self.history["loss"]))
        if not math.isfinite(value) or value > self.limit:
            raise Diverged(int(step), value, self.limit)


@dataclass(frozen=True)
class TrainTask:
    """A train function with what the comparison needs to know about it.

    Args:
        train: ``train(clipper, seed, steps, report) -> metrics`` (see the module's
            documentation).
        name: Name in reports (default: the function's name).
        metric_name: The key of the returned metrics to rank by. None: the one key besides
            ``"loss"`` (or ``"loss"`` itself, lower being better, when it is the only key).
        greater_is_better: Whether a larger metric is better.
        steps: Optimizer steps of a full run.
        quick_steps: Optimizer steps of a ``--quick`` run.
        reference_loss: The loss of a trivial predictor; a loss above
            ``DIVERGENCE_FACTOR * reference_loss`` counts as divergence. None: only a
            non-finite loss does.
        reference_text: What that trivial predictor is, for reports.
        solved_at: A run is solved when its metric reaches this (``>=``, or ``<=`` when
            smaller is better). None: no success criterion (``solved`` counts nothing).
        description: One line for reports.
        default_clippers: Clipper specs ``gradclip compare`` runs by default.

    A ``TrainTask`` is itself callable like its function.
    """

    train: TrainFunction
    name: str | None = None
    metric_name: str | None = None
    greater_is_better: bool = True
    steps: int = 100
    quick_steps: int = 10
    reference_loss: float | None = None
    reference_text: str = "a trivial predictor"
    solved_at: float | None = None
    description: str = ""
    default_clippers: tuple[str, ...] | None = field(default=None)

    def __post_init__(self):
        if not callable(self.train):
            raise TaskError(f"TrainTask: train must be callable, got {type(self.train).__name__}")
        if self.name is None:
            object.__setattr__(self, "name", getattr(self.train, "__name__", "train"))
        for key in ("steps", "quick_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TaskError(f"TrainTask: {key} must be an integer >= 1, got {value!r}")
        if self.reference_loss is not None and not (
            isinstance(self.reference_loss, (int, float)) and math.isfinite(self.reference_loss) and self.reference_loss > 0
        ):
            raise TaskError(f"TrainTask: reference_loss must be a finite number > 0 or None, got {self.reference_loss!r}")

    def __call__(self, clipper: Any, seed: int, steps: int, report: Report) -> Mapping[str, Any]:
        return self.train(clipper, seed, steps, report)

    @property
    def divergence_limit(self) -> float:
        """``DIVERGENCE_FACTOR * reference_loss``, or ``inf`` without a reference loss."""
        return math.inf if self.reference_loss is None else DIVERGENCE_FACTOR * self.reference_loss

    def metric_of(self, metrics: Any) -> tuple[str, bool, float, float]:
        """Check a train function's result and pick its metric.

        Returns:
            ``(metric_name, greater_is_better, metric, eval_loss)`` (``eval_loss`` NaN when the
            metrics hold no ``"loss"``).

        Raises:
            TaskError: Not a mapping, no metric, a metric that is not a number.
        """
        where = f"task {self.name!r}: train() returned"
        if not isinstance(metrics, Mapping):
            raise TaskError(f"{where} {type(metrics).__name__}; it must return a dict of metrics like {{'accuracy': 0.9}}")
        name, greater = self.metric_name, self.greater_is_better
        if name is None:
            others = [k for k in metrics if k != "loss"]
            if len(others) == 1:
                name = others[0]
            elif not others and "loss" in metrics:
                name, greater = "loss", False
            else:
                raise TaskError(
                    f"{where} metrics {sorted(metrics)}; name the one to rank by with "
                    "TrainTask(train, metric_name=...)"
                )
        if name not in metrics:
            raise TaskError(f"{where} metrics {sorted(metrics)} without its metric {name!r}")
        metric = _scalar(f"{where} metric {name!r}, which", metrics[name])
        loss = _scalar(f"{where} 'loss', which", metrics["loss"]) if "loss" in metrics else math.nan
        return name, greater, metric, loss

    def solved(self, metric: float, greater_is_better: bool) -> bool:
        """Whether ``metric`` meets :attr:`solved_at` (False without a criterion)."""
        if self.solved_at is None or not math.isfinite(metric):
            return False
        return metric >= self.solved_at if greater_is_better else metric <= self.solved_at

    def diverged_metric(self, greater_is_better: bool) -> float:
        """The metric a diverged run counts with: 0 when greater is better, else the reference
        loss (NaN without one)."""
        if greater_is_better:
            return 0.0
        return math.nan if self.reference_loss is None else float(self.reference_loss)


def train_task(**metadata: Any) -> Callable[[TrainFunction], TrainTask]:
    """Decorator: ``@train_task(metric_name="accuracy", steps=200)`` turns a train function into
    a :class:`TrainTask` (the decorated name still calls the function).

    Args:
        **metadata: :class:`TrainTask`'s keyword arguments.
    """

    def wrap(function: TrainFunction) -> TrainTask:
        return TrainTask(function, **metadata)

    return wrap
