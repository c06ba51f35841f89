"""Training tasks for ``gradclip compare``; every one runs offline on a few CPU cores.

* ``adding`` and ``temporal-order`` — the synthetic long-range RNN problems used by Pascanu,
  Mikolov & Bengio (2013, "On the difficulty of training recurrent neural networks", section 5.1),
  taken from Hochreiter & Schmidhuber (1997), with a tanh RNN. Success criteria: the adding
  problem when test MSE < 0.01, temporal order when test accuracy reaches 99 %.
* ``digits`` — the seeds' classifier: a 64-128-10 MLP on scikit-learn's bundled 8x8 digits.
* ``spikes`` — ``digits`` with the gradient multiplied by x100 to x1000 at random steps, the
  failure adaptive clippers (ZClip, AutoClip, SkipOnSpike) are built for.
* ``badbatch`` — ``digits`` where about 3 % of the batches are bad (every label wrong, inputs
  unnormalised): loss spikes from the data, the failure loss-aware skipping
  (``SkipOnSpike(signal="loss")``, OLMo-core's rule) is built for.
* ``charlm`` — a small character-level LSTM language model trained on source text that ships
  with Python's standard library (so nothing is downloaded).
* ``gpt`` — a small decoder-only transformer on the same text, trained with AdamW at a learning
  rate where unclipped runs spike: the setting of ZClip and AdaGC.

A task builds its model for a seed, hands out batches for a step, computes the loss, and
evaluates a metric at the end. Every random draw comes from generators seeded by the run's seed,
so results are reproducible.

Divergence is judged on each task's own scale (:mod:`~gradclip.experiments.tasks.base`).

Layout: :mod:`~gradclip.experiments.tasks.base` (the :class:`Task` contract and divergence),
:mod:`~gradclip.experiments.tasks.rnn` (``adding``, ``temporal-order``),
:mod:`~gradclip.experiments.tasks.digits` (``digits``, ``spikes``),
:mod:`~gradclip.experiments.tasks.badbatch` (``badbatch``),
:mod:`~gradclip.experiments.tasks.charlm` (``charlm``), :mod:`~gradclip.experiments.tasks.gpt`
(``gpt``); this module holds the registry. Your own tasks need no registration: see
:class:`~gradclip.experiments.Task` and ``gradclip compare --task path/to/file.py:factory``.
"""

from __future__ import annotations

import inspect
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError
from gradclip.experiments.tasks.badbatch import BadBatchTask
from gradclip.experiments.tasks.base import DIVERGENCE_FACTOR, Task, TaskDefaults, TaskError
from gradclip.experiments.tasks.charlm import CharLMTask, _stdlib_text
from gradclip.experiments.tasks.digits import DigitsTask, SpikesTask
from gradclip.experiments.tasks.gpt import GPTTask
from gradclip.experiments.tasks.rnn import AddingTask, TemporalOrderTask

__all__ = [
    "Task",
    "TASKS",
    "check_options",
    "check_task_options",
    "make_task",
    "task_names",
    "TaskDefaults",
    "TaskError",
    "DIVERGENCE_FACTOR",
]

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (AddingTask, TemporalOrderTask, DigitsTask, SpikesTask, CharLMTask, GPTTask, BadBatchTask)
}


def task_names() -> list[str]:
    """The task names ``gradclip compare --task`` accepts."""
    return list(TASKS)


def make_task(name: str, seed: int, **options: Any) -> Task:
    """Build a task by name for a seed.

    Args:
        name: One of :func:`task_names`.
        seed: The run's seed.
        **options: Task options (``seq_len`` for the sequence tasks).

    Raises:
        UnknownNameError: Unknown task; the message lists the valid ones.
    """
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    cls = TASKS[name]
    options = {k: v for k, v in options.items() if v is not None}
    check_options(name, options)
    return cls(seed, **options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """Validate a task's options before any run starts (``gradclip compare`` calls it up front).

    Args:
        name: A task name.
        options: Task keyword options, e.g. ``{"seq_len": 50}``.

    Raises:
        UnknownNameError: Unknown task.
        InvalidArgumentError: An option the task does not take (``seq_len`` for ``digits``), or a
            sequence length below the task's minimum (temporal order needs 10 positions to place
            its two symbols in the 10-20 % and 50-60 % windows).
    """
    if name not in TASKS:
        raise UnknownNameError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    check_task_options(TASKS[name], options)


def check_task_options(cls: type[Task], options: dict[str, Any]) -> None:
    """Validate options against a :class:`Task` subclass's constructor (built in or yours).

    A task class may also check the values of its own options up front with a classmethod
    ``check_option_values(options)`` (``badbatch`` does), so a bad value stops the comparison
    before any run starts instead of failing every run.

    Raises:
        InvalidArgumentError: An option the constructor does not take, a ``seq_len`` below
            the task's :attr:`~Task.min_seq_len`, or a value the task's
            ``check_option_values`` rejects.
    """
    name = cls.name
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "seed"})
    for key, value in options.items():
        if key not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise InvalidArgumentError(f"task {name!r} has no option {key!r} (it takes: {takes})")
        if key == "seq_len" and (isinstance(value, bool) or not isinstance(value, int) or value < cls.min_seq_len):
            raise InvalidArgumentError(
                f"seq_len must be an integer >= {cls.min_seq_len} for task {name!r}, got {value!r}"
            )
    check_values = getattr(cls, "check_option_values", None)
    if check_values is not None:
        check_values(options)
