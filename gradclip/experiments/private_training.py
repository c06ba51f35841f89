"""The DP-SGD training of a private run: the loop of ``gradclip compare --private``.

:class:`DPSGD` is the loop over a fixed training set (also ``benchmarks/dp_digits.py``'s);
:func:`train_private` runs it for one comparison run and records what the runner records. What
runs, and whether it may, is :mod:`gradclip.experiments.private`'s business (the spec and the
checks made before any run starts); the task checks both modules share live here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gradclip.experiments.tasks.base import Task, TaskError

__all__ = ["DPSGD", "check_example_losses", "checked_training_set", "example_rows", "train_private"]


def check_example_losses(name: str, losses: Any, examples: int) -> None:
    """Refuse anything but one loss per example (a 1-D tensor of ``examples`` entries).

    Raises:
        TaskError: Naming the task and what ``example_losses()`` returned.
    """
    import torch

    if not isinstance(losses, torch.Tensor) or losses.shape != (examples,):
        got = f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise TaskError(
            f"task {name!r}: example_losses() returned {got} for {examples} examples; it must return a 1-D tensor "
            "with one loss per example (e.g. F.cross_entropy(..., reduction='none'))"
        )


def example_rows(data: tuple, index: Any) -> tuple:
    """The rows ``index`` of every tensor of a training set."""
    return tuple(tensor[index] for tensor in data)


def checked_training_set(task: Task, name: str) -> tuple:
    """The task's training tensors, checked: a tuple of tensors sharing their first dimension."""
    import torch

    data = task.training_set()
    if data is None:
        raise TaskError(
            f"task {name!r} cannot train privately: it declares no training set (Task.training_set) to sample "
            "examples from; tasks that do: digits, or your own Task with training_set() and example_losses()"
        )
    data = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not data or not all(isinstance(t, torch.Tensor) and t.dim() >= 1 and len(t) == len(data[0]) for t in data):
        raise TaskError(
            f"task {name!r}: training_set() must return tensors sharing their first (example) dimension, got "
            f"{[tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in data]}"
        )
    if len(data[0]) == 0:
        raise TaskError(f"task {name!r}: training_set() holds no examples")
    return data


class DPSGD:
    """DP-SGD over a fixed training set (Abadi et al. 2016): the loop ``gradclip compare
    --private`` runs, and ``benchmarks/dp_digits.py`` too.

    Each step of :meth:`run` draws a Poisson batch (each example joins with probability
    ``q = B / N``), clips every example's gradient with ``clipper``
    (:class:`~gradclip.torch.PerSample`, hooks on ``model`` until :meth:`remove`), and lets
    :class:`~gradclip.torch.DPOptimizer` add ``N(0, σ²C²)``, divide by ``B`` and step ``optimizer``.

    Args:
        model: The model (a ``torch.nn.Module``).
        optimizer: The optimizer of its parameters.
        clipper: The per-example clipper (``GlobalNorm(C)``, ``Norm(C)``, ``QuantileNorm``).
        data: The training set: tensors sharing their first (example) dimension.
        noise_multiplier: σ, ``>= 0``.
        expected_batch_size: B, ``1 <= B <= N``.
        mode: :class:`~gradclip.torch.PerSample`'s mode.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.
        noise_generator: A seeded ``torch.Generator`` for the noise (None: from torch's global seed).

    Raises:
        InvalidArgumentError: From :class:`~gradclip.torch.PerSample` and
            :class:`~gradclip.torch.DPOptimizer` (a refused clipper or layer, σ < 0...).
    """

    def __init__(
        self, model: Any, optimizer: Any, clipper: Any, data: tuple, *, noise_multiplier: float,
        expected_batch_size: int, mode: str = "auto", accountant: str = "rdp", noise_generator: Any = None,
    ):
        from gradclip.torch import DPOptimizer, PerSample

        self.data = data
        self.sample_rate = expected_batch_size / len(data[0])
        self.per_sample = PerSample(model, clipper, mode=mode)
        self.optimizer = DPOptimizer(
            optimizer, self.per_sample, noise_multiplier, expected_batch_size, sample_rate=self.sample_rate,
            accountant=accountant, generator=noise_generator,
        )

    def run(self, example_losses: Callable[[tuple], Any], steps: int, batch_generator: Any = None) -> Iterator[tuple]:
        """Take ``steps`` DP-SGD steps, yielding after each.

        Args:
            example_losses: ``batch -> losses``: one loss per example of ``batch`` (a tuple of
                rows of the training set; empty for an empty Poisson batch).
            steps: Optimizer steps.
            batch_generator: A seeded ``torch.Generator`` for the Poisson draws.

        Yields:
            ``(index, losses, info)``: the batch's example indices, its losses and the
            per-example :class:`~gradclip.ClipInfo`, after the step was taken.
        """
        import torch

        from gradclip.torch import PoissonBatchSampler

        for index in PoissonBatchSampler(len(self.data[0]), self.sample_rate, steps=steps, generator=batch_generator):
            self.optimizer.zero_grad()
            losses = example_losses(example_rows(self.data, torch.as_tensor(index, dtype=torch.long)))
            info = self.optimizer.backward(losses)
            self.optimizer.step()
            yield index, losses, info

    def epsilon(self, delta: float) -> float:
        """ε spent so far at δ (``inf`` without noise)."""
        return self.optimizer.epsilon(delta)

    def remove(self) -> None:
        """Take PerSample's hooks off the model."""
        self.per_sample.remove()


def train_private(
    task: Task, model: Any, optimizer: Any, clipper: Any, settings: Mapping[str, Any], steps: int, seed: int,
    report: Callable[[int], None] | None = None,
) -> tuple[dict[str, list], bool, dict[str, Any]]:
    """Train a task's model with :class:`DPSGD` for ``steps`` steps (the runner's loop for a
    private run) and record what the runner records.

    Args:
        task: The run's task (with :meth:`~gradclip.experiments.Task.training_set` and
            :meth:`~gradclip.experiments.Task.example_losses`).
        model: Its model.
        optimizer: The optimizer the task configured.
        clipper: The run's per-example clipper.
        settings: From :func:`plan_private`.
        steps: Optimizer steps.
        seed: The run's seed (the noise; the batches come from the task's generator, seeded by it).
        report: Called with the number of steps done, every 10 steps.

    Returns:
        ``(history, diverged, privacy)``: the per-step traces the runner records (``loss``: the
        batch's mean loss, None for an empty batch; ``norm``: the median per-example gradient
        norm; ``threshold``: C; ``clipped``: the fraction of examples clipped), whether the run
        diverged, and the record's privacy fields (``epsilon`` spent at ``delta``,
        ``noise_multiplier``, ``sample_rate``).

    Raises:
        TaskError: ``example_losses`` returned something else than one loss per example.
    """
    import torch

    def losses_of(batch: tuple) -> Any:
        losses = task.example_losses(model, batch)
        check_example_losses(task.name, losses, len(batch[0]))
        return losses

    sigma = settings["noise_multiplier"]
    private = DPSGD(
        model, optimizer, clipper, checked_training_set(task, task.name), noise_multiplier=sigma,
        expected_batch_size=settings["expected_batch_size"], mode=settings["mode"], accountant=settings["accountant"],
        noise_generator=torch.Generator().manual_seed(10_000 + seed),
    )
    history: dict[str, list] = {key: [] for key in ("loss", "norm", "threshold", "clipped", "skipped", "spike")}
    diverged = False
    try:
        for step, (index, losses, info) in enumerate(private.run(losses_of, steps, task.generator)):
            empty = len(index) == 0
            loss = None if empty else float(losses.detach().mean())
            history["loss"].append(loss)
            history["norm"].append(None if empty else float(info.norm.median()))
            history["threshold"].append(float(info.threshold))
            history["clipped"].append(0.0 if empty else float(info.clipped.float().mean()))
            history["skipped"].append(False)
            history["spike"].append(1.0)
            if (loss is not None and task.is_diverged(loss)) or not all(torch.isfinite(p).all() for p in model.parameters()):
                diverged = True
                break
            if report is not None and (step + 1) % 10 == 0:
                report(step + 1)
    finally:
        private.remove()
    privacy = {
        "epsilon": private.epsilon(settings["delta"]),
        "delta": settings["delta"],
        "noise_multiplier": sigma,
        "sample_rate": private.sample_rate,
    }
    return history, diverged, privacy
