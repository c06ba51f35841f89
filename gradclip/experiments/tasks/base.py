"""The task contract: :class:`Task` (model, batches, loss, held-out metric for a seed), its tuned
:class:`TaskDefaults`, and how divergence is judged.

Divergence is judged on each task's own scale. Every task names the loss of a trivial predictor
(:attr:`Task.reference_loss`: predicting the mean target, or uniform class probabilities); a
run *diverged* when its training loss or its held-out loss is non-finite or exceeds
:data:`DIVERGENCE_FACTOR` times that loss. A fixed cut-off such as 1e6 would let a regression
run whose error is ten thousand times the trivial predictor's count as stable.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

__all__ = ["Task", "TaskDefaults", "DIVERGENCE_FACTOR"]

#: A run diverged when a loss exceeds this many times the task's :attr:`Task.reference_loss`.
#: An untrained model starts within about 10x of it (an adding RNN that outputs 0 has MSE 7/6);
#: the worst stable run of the default comparison (value clipping, which oscillates without
#: learning) peaks near 60x, and runs that blow up pass 1e4x. 1000x sits an order of magnitude
#: from both.
DIVERGENCE_FACTOR = 1000.0


@dataclass(frozen=True)
class TaskDefaults:
    """Training settings a task is tuned for (overridable on the command line)."""

    steps: int
    lr: float
    optimizer: str
    quick_steps: int


class Task(ABC):
    """One training problem.

    Subclasses define the model, the data, the loss and the metric. ``metric_name`` is
    ``"accuracy"`` or ``"success"``; ``solved`` tells whether the metric meets the task's
    success criterion. ``reference_loss`` is the loss of a trivial predictor (described by
    ``reference_text``); :meth:`is_diverged` compares losses against
    :data:`DIVERGENCE_FACTOR` times it.
    """

    name: str = "task"
    metric_name: str = "accuracy"
    defaults = TaskDefaults(steps=500, lr=0.1, optimizer="sgd", quick_steps=30)
    description: str = ""
    #: The shortest ``seq_len`` the task accepts (sequence tasks only).
    min_seq_len: int = 2
    #: The loss of a trivial predictor, the scale divergence is judged on.
    reference_loss: float = 1.0
    #: What that trivial predictor is, for reports.
    reference_text: str = "a trivial predictor"

    def __init__(self, seed: int):
        import torch

        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)

    @abstractmethod
    def model(self) -> Any:
        """Build the model (parameters initialised from the run's seed)."""

    @abstractmethod
    def batch(self, step: int) -> tuple[Any, Any]:
        """The training batch of ``step``."""

    @abstractmethod
    def loss(self, model: Any, batch: tuple[Any, Any]) -> Any:
        """The scalar training loss on a batch."""

    @abstractmethod
    def evaluate(self, model: Any) -> dict[str, float]:
        """Held-out evaluation: ``{"loss": ..., metric_name: ...}``."""

    def solved(self, metric: float) -> bool:
        """Whether ``metric`` meets the task's success criterion."""
        return metric >= 0.9

    @property
    def divergence_limit(self) -> float:
        """The loss above which a run counts as diverged: ``DIVERGENCE_FACTOR * reference_loss``."""
        return DIVERGENCE_FACTOR * self.reference_loss

    def is_diverged(self, loss: float) -> bool:
        """Whether a loss (training or held-out) shows divergence: non-finite, or beyond
        :attr:`divergence_limit`."""
        return not math.isfinite(loss) or loss > self.divergence_limit

    def perturb(self, model: Any, step: int) -> float:
        """Hook between backward and clipping; returns the factor applied to the gradient (1)."""
        del model, step
        return 1.0
