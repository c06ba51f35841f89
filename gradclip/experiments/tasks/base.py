"""The task contract: :class:`Task` (model, batches, loss, held-out metric for a seed), its tuned
:class:`TaskDefaults`, how divergence is judged, and :class:`TaskError` for a task that breaks
the contract.

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

from gradclip._core.errors import InvalidArgumentError

__all__ = ["Task", "TaskDefaults", "TaskError", "DIVERGENCE_FACTOR", "OPTIMIZERS", "make_optimizer"]

#: A run diverged when a loss exceeds this many times the task's :attr:`Task.reference_loss`.
#: An untrained model starts within about 10x of it (an adding RNN that outputs 0 has MSE 7/6);
#: the worst stable run of the default comparison (value clipping, which oscillates without
#: learning) peaks near 60x, and runs that blow up pass 1e4x. 1000x sits an order of magnitude
#: from both.
DIVERGENCE_FACTOR = 1000.0

#: The optimizers the runner builds for a :class:`Task` (``--optimizer``).
OPTIMIZERS = ("sgd", "adam", "adamw")


class TaskError(InvalidArgumentError):
    """A task that cannot be used: it cannot be imported, its factory returns the wrong thing,
    or it breaks the contract while running (a loss that is not a scalar, metrics without the
    metric). ``gradclip compare`` prints its one-line message and exits with status 2; a
    comparison that meets one stops and leaves nothing in its run directory."""


@dataclass(frozen=True)
class TaskDefaults:
    """Training settings a task is tuned for (overridable on the command line).

    Attributes:
        steps: Optimizer steps of a full run.
        lr: Learning rate.
        optimizer: ``"sgd"`` (momentum 0.9), ``"adam"`` or ``"adamw"``.
        quick_steps: Optimizer steps of a ``--quick`` smoke run.
    """

    steps: int
    lr: float
    optimizer: str
    quick_steps: int


def make_optimizer(name: str, parameters: Any, lr: float) -> Any:
    """The runner's optimizers: ``sgd`` (momentum 0.9), ``adam``, ``adamw`` (PyTorch defaults).

    Args:
        name: One of :data:`OPTIMIZERS`.
        parameters: The model's parameters.
        lr: Learning rate.

    Returns:
        A ``torch.optim.Optimizer``.

    Raises:
        InvalidArgumentError: An unknown name.
    """
    import torch

    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr)
    raise InvalidArgumentError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


class Task(ABC):
    """One training problem, trained by the runner's own PyTorch loop.

    Subclass it to compare clippers on your own model (``gradclip compare --task
    my_task.py:MyTask``). The runner builds one instance per run, ``MyTask(seed)``, then::

        task.begin_run(steps)                              # optional: the run's length
        model = task.model()
        optimizer = task.configure_optimizer(model.parameters(), optimizer_name, lr)
        for step in range(steps):
            loss = task.loss(model, task.batch(step))     # a scalar tensor
            loss.backward()
            task.perturb(model, step)                      # optional fault injection
            info = clipper.clip_(model, loss=loss)         # the clipper under comparison
            optimizer.step()                               # skipped when info.skip
        metrics = task.evaluate(model)                     # {"loss": ..., metric_name: ...}

    and stops early when a loss diverges (:meth:`is_diverged`). Draw every random number from
    generators seeded by ``seed`` (``self.generator`` is one): runs are then reproducible and
    the clippers see the same data.

    A run's clipper is never ``None``: for ``none`` it is ``GlobalNorm(max_norm=inf)``, which
    measures the gradient norm and leaves every gradient bit for bit unchanged.

    Class attributes:
        name: The task's name in reports.
        metric_name: The key of :meth:`evaluate`'s result that the comparison ranks by.
        greater_is_better: Whether a larger metric is better (accuracy: yes; a loss or
            perplexity metric: no).
        defaults: The :class:`TaskDefaults` the task is tuned for.
        description: One line for ``--help`` and reports.
        reference_loss: The loss of a trivial predictor, the scale divergence is judged on
            (uniform class probabilities: ``ln(classes)``).
        reference_text: What that trivial predictor is, for reports.
        default_clippers: The clipper specs ``gradclip compare`` runs when none are given
            (None: the command's own default list).
        min_seq_len: The shortest ``seq_len`` option the task accepts (sequence tasks only).
    """

    name: str = "task"
    metric_name: str = "accuracy"
    greater_is_better: bool = True
    defaults = TaskDefaults(steps=500, lr=0.1, optimizer="sgd", quick_steps=30)
    description: str = ""
    #: The shortest ``seq_len`` the task accepts (sequence tasks only).
    min_seq_len: int = 2
    #: The loss of a trivial predictor, the scale divergence is judged on.
    reference_loss: float = 1.0
    #: What that trivial predictor is, for reports.
    reference_text: str = "a trivial predictor"
    #: Clipper specs ``gradclip compare`` runs on this task by default (None: the CLI's own).
    default_clippers: tuple[str, ...] | None = None
    #: Examples per training batch: the expected batch size of private training (``gradclip
    #: compare --private``, Poisson sampling at ``batch_size / N``). None: not declared.
    batch_size: int | None = None

    def __init__(self, seed: int):
        import torch

        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)

    @abstractmethod
    def model(self) -> Any:
        """Build the model (a ``torch.nn.Module``, parameters initialised from the run's seed)."""

    @abstractmethod
    def batch(self, step: int) -> Any:
        """The training batch of ``step`` (anything :meth:`loss` accepts)."""

    @abstractmethod
    def loss(self, model: Any, batch: Any) -> Any:
        """The training loss on a batch: a scalar (0-d) tensor that ``backward()`` is called on."""

    @abstractmethod
    def evaluate(self, model: Any) -> dict[str, float]:
        """Held-out evaluation after training: ``{"loss": ..., metric_name: ...}`` as floats."""

    def solved(self, metric: float) -> bool:
        """Whether ``metric`` meets the task's success criterion (default: accuracy >= 0.9)."""
        return metric >= 0.9

    def configure_optimizer(self, parameters: Any, name: str, lr: float) -> Any:
        """Build the optimizer of a run (override for other settings, e.g. AdamW's betas).

        Args:
            parameters: ``model.parameters()``.
            name: The optimizer chosen (``--optimizer`` or :attr:`defaults`).
            lr: The learning rate chosen.

        Returns:
            A ``torch.optim.Optimizer``.
        """
        return make_optimizer(name, parameters, lr)

    @property
    def diverged_metric(self) -> float:
        """The metric a diverged run counts with: 0 when greater is better, else
        :attr:`reference_loss` (the trivial predictor's score)."""
        return 0.0 if self.greater_is_better else self.reference_loss

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

    def begin_run(self, steps: int) -> None:
        """Called once before the first step with the run's length (default: nothing).

        A task whose point is a perturbation (``spikes``, ``badbatch``) uses it so that a short
        run (``--quick``) meets at least one; runs that meet one anyway are left as they are.
        """
        del steps

    # -- private training (gradclip compare --private; gradclip.experiments.private) ----------
    def training_set(self) -> Any:
        """The training examples as tensors sharing their first dimension (``(x, y)``), which
        private training draws Poisson batches from; None (the default): the task cannot train
        privately (its batches are not draws from a fixed set of examples)."""
        return None

    def example_losses(self, model: Any, batch: Any) -> Any:
        """One loss per example of ``batch`` (a tuple of rows of :meth:`training_set`): a 1-D
        tensor, which per-example clipping differentiates example by example.

        Raises:
            TaskError: The task defines no per-example losses (the default).
        """
        del model, batch
        raise TaskError(f"task {self.name!r} defines no example_losses(model, batch); private training needs one loss per example")
