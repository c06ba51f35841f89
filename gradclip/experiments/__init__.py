"""The experiment runner behind ``gradclip compare``: train one task under many clippers.

The seeds' advice is to try clipping ranges experimentally; this package does it with evidence:
the same model and data, several clippers and seeds, in parallel, reported side by side, with a
verdict — the best fixed threshold in hindsight and how far each adaptive clipper lands from it.

Bring your own task in one of two forms:

* a :class:`Task` subclass — the runner owns the PyTorch loop, your class gives the model for a
  seed, the batches, the loss, the held-out evaluation and the reference loss for divergence;
* a :class:`TrainTask` (or a bare ``train(clipper, seed, steps, report) -> metrics`` function)
  — your own loop, ``transformers.Trainer``, Keras ``model.fit`` or optax, clipping with the
  clipper it is given and reporting each step's loss.

Then ``gradclip compare --task my_task.py:factory`` or, from Python,
``compare(task, clippers, seeds=3, jobs=2, out="runs/mine")``.

* :mod:`~gradclip.experiments.tasks` — the built-in offline tasks and the :class:`Task` contract.
* :mod:`~gradclip.experiments.train` — the train-function form.
* :mod:`~gradclip.experiments.loading` — finding a task from ``file.py:factory``/``module:factory``.
* :mod:`~gradclip.experiments.spec`, :mod:`~gradclip.experiments.sweep` — clipper specs and sweeps.
* :mod:`~gradclip.experiments.runner` — one run, many on local processes
  (:mod:`~gradclip.experiments.pool`) or Ray (:mod:`~gradclip.experiments.ray_backend`), pinned
  to the same threads and kernels everywhere (:mod:`~gradclip.experiments.environment`).
* :mod:`~gradclip.experiments.verdict` — the verdict; :mod:`~gradclip.experiments.report` —
  results.jsonl, summary.csv, plots, report.md/.html.
* :mod:`~gradclip.experiments.compare` — :func:`compare`, the whole comparison.

Importing this package imports no deep-learning framework.
"""

from gradclip.experiments.compare import Comparison, compare
from gradclip.experiments.sweep import linspace, logspace, sweep
from gradclip.experiments.tasks.base import DIVERGENCE_FACTOR, Task, TaskDefaults, TaskError
from gradclip.experiments.train import Diverged, Report, TrainTask, train_task
from gradclip.experiments.verdict import Verdict, judge

__all__ = [
    "Task",
    "TaskDefaults",
    "TaskError",
    "TrainTask",
    "train_task",
    "Report",
    "Diverged",
    "compare",
    "Comparison",
    "sweep",
    "logspace",
    "linspace",
    "Verdict",
    "judge",
    "DIVERGENCE_FACTOR",
]
