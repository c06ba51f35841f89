"""Training tasks for ``gradclip compare``; every one runs offline on a few CPU cores.

* ``adding`` and ``temporal-order`` — the synthetic long-range RNN problems used by Pascanu,
  Mikolov & Bengio (2013, "On the difficulty of training recurrent neural networks", section 5.1),
  taken from Hochreiter & Schmidhuber (1997), with a tanh RNN. Success criteria: the adding
  problem when test MSE < 0.01, temporal order when test accuracy reaches 99 %.
* ``digits`` — the seeds' classifier: a 64-128-10 MLP on scikit-learn's bundled 8x8 digits.
* ``spikes`` — ``digits`` with the gradient multiplied by x100 to x1000 at random steps, the
  failure adaptive clippers (ZClip, AutoClip, SkipOnSpike) are built for.
* ``charlm`` — a small character-level LSTM language model trained on source text that ships
  with Python's standard library (so nothing is downloaded).

A task builds its model for a seed, hands out batches for a step, computes the loss, and
evaluates a metric at the end. Every random draw comes from generators seeded by the run's seed,
so results are reproducible.

Divergence is judged on each task's own scale. Every task names the loss of a trivial predictor
(:attr:`Task.reference_loss`: predicting the mean target, or uniform class probabilities); a
run *diverged* when its training loss or its held-out loss is non-finite or exceeds
:data:`DIVERGENCE_FACTOR` times that loss. A fixed cut-off such as 1e6 would let a regression
run whose error is ten thousand times the trivial predictor's count as stable.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from gradclip._core.errors import InvalidArgumentError, UnknownNameError

__all__ = ["Task", "TASKS", "check_options", "make_task", "task_names", "TaskDefaults", "DIVERGENCE_FACTOR"]

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


# -- Pascanu et al. 2013 synthetic tasks ------------------------------------------------------
class _TanhRNN:
    """A single-layer tanh RNN reading a sequence and predicting from its last hidden state."""

    @staticmethod
    def build(inputs: int, hidden: int, outputs: int):
        import torch

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = torch.nn.RNN(inputs, hidden, nonlinearity="tanh", batch_first=True)
                self.head = torch.nn.Linear(hidden, outputs)

            def forward(self, x):
                return self.head(self.rnn(x)[0][:, -1])

        return Model()


class AddingTask(Task):
    """The adding problem: sum the two marked values of a sequence of uniform numbers.

    Each step is a pair (value ~ U[0, 1], marker in {0, 1}); one marker falls in the first half,
    one in the second; the target is the sum of the two marked values. Predicting the mean gives
    a test MSE of 1/6 ≈ 0.167 (the variance of a sum of two U[0, 1]); the task counts as solved
    below 0.01, and a run diverged above 1000 x 1/6 ≈ 167 (or at a non-finite loss).

    Its defaults (SGD with momentum 0.9 at lr 0.2, length 10) sit where the exploding-gradient
    problem shows: without clipping the first large gradient throws the RNN into divergence,
    with global-norm clipping at 1.0 it learns.
    """

    name = "adding"
    metric_name = "success"
    defaults = TaskDefaults(steps=4000, lr=0.2, optimizer="sgd", quick_steps=40)
    description = "tanh RNN, sum of two marked numbers (Pascanu et al. 2013)"
    batch_size = 64
    criterion = 0.01
    reference_loss = 1.0 / 6.0
    reference_text = "predicting the mean target (MSE 1/6)"

    def __init__(self, seed: int, seq_len: int = 10, hidden: int = 32):
        super().__init__(seed)
        self.seq_len, self.hidden = seq_len, hidden

    def _sample(self, n: int, generator):
        import torch

        length = self.seq_len
        values = torch.rand(n, length, generator=generator)
        markers = torch.zeros(n, length)
        first = torch.randint(0, max(1, length // 2), (n,), generator=generator)
        second = torch.randint(length // 2, length, (n,), generator=generator)
        rows = torch.arange(n)
        markers[rows, first] = 1.0
        markers[rows, second] = 1.0
        return torch.stack([values, markers], dim=-1), (values * markers).sum(1, keepdim=True)

    def model(self):
        return _TanhRNN.build(2, self.hidden, 1)

    def batch(self, step):
        return self._sample(self.batch_size, self.generator)

    def loss(self, model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    def evaluate(self, model):
        import torch
        import torch.nn.functional as F

        x, y = self._sample(2000, torch.Generator().manual_seed(10_000 + self.seed))
        with torch.no_grad():
            mse = F.mse_loss(model(x), y).item()
        # "success" is 1 when the test error meets the criterion, else 0: a rate over seeds.
        # NaN (a diverged model) compares False, so it counts as a failure.
        return {"loss": mse, "success": float(mse < self.criterion)}

    def solved(self, metric):
        return metric >= 1.0


class TemporalOrderTask(Task):
    """The temporal order problem: classify the order of two symbols hidden among distractors.

    Sequences of one-hot symbols from {a, b, c, d} (noise) hold X or Y at one position in
    [10 %, 20 %] of the length and X or Y at one position in [50 %, 60 %]; the class is the pair
    (XX, XY, YX, YY). Chance is 25 %; solved at 99 % test accuracy. Uniform probabilities give a
    cross-entropy of ln 4 ≈ 1.39; a run diverged above 1000 x ln 4.
    """

    name = "temporal-order"
    metric_name = "accuracy"
    defaults = TaskDefaults(steps=1500, lr=0.1, optimizer="sgd", quick_steps=40)
    description = "tanh RNN, order of two symbols among noise (Pascanu et al. 2013)"
    batch_size = 64
    symbols = 6  # a, b, c, d (noise), X, Y
    min_seq_len = 10
    reference_loss = math.log(4)
    reference_text = "uniform probabilities over the 4 classes (ln 4)"

    def __init__(self, seed: int, seq_len: int = 20, hidden: int = 32):
        super().__init__(seed)
        self.seq_len, self.hidden = seq_len, hidden

    def _sample(self, n: int, generator):
        import torch

        length = self.seq_len
        tokens = torch.randint(0, 4, (n, length), generator=generator)
        first = torch.randint(int(0.1 * length), int(0.2 * length) + 1, (n,), generator=generator)
        second = torch.randint(int(0.5 * length), int(0.6 * length) + 1, (n,), generator=generator)
        a = torch.randint(0, 2, (n,), generator=generator)
        b = torch.randint(0, 2, (n,), generator=generator)
        rows = torch.arange(n)
        tokens[rows, first] = 4 + a
        tokens[rows, second] = 4 + b
        x = torch.nn.functional.one_hot(tokens, self.symbols).float()
        return x, 2 * a + b

    def model(self):
        return _TanhRNN.build(self.symbols, self.hidden, 4)

    def batch(self, step):
        return self._sample(self.batch_size, self.generator)

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model):
        import torch
        import torch.nn.functional as F

        x, y = self._sample(2000, torch.Generator().manual_seed(10_000 + self.seed))
        with torch.no_grad():
            logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(), "accuracy": (logits.argmax(1) == y).float().mean().item()}

    def solved(self, metric):
        return metric >= 0.99


# -- the seeds' digits classifier -------------------------------------------------------------
class DigitsTask(Task):
    """The seeds' classifier: a 64-128-10 MLP on scikit-learn's bundled 8x8 digits.

    1,797 images ship inside scikit-learn; a fixed 75/25 split (from the seed) gives the held-out
    accuracy. Solved at 90 % test accuracy. Uniform probabilities give a cross-entropy of
    ln 10 ≈ 2.30; a run diverged above 1000 x ln 10.
    """

    name = "digits"
    metric_name = "accuracy"
    defaults = TaskDefaults(steps=400, lr=0.1, optimizer="sgd", quick_steps=30)
    description = "64-128-10 MLP on scikit-learn digits (the seeds' classifier)"
    batch_size = 64
    reference_loss = math.log(10)
    reference_text = "uniform probabilities over the 10 classes (ln 10)"

    def __init__(self, seed: int):
        super().__init__(seed)
        import numpy as np
        import torch
        from sklearn.datasets import load_digits

        data = load_digits()
        order = np.random.default_rng(seed).permutation(len(data.target))
        x = torch.tensor(data.data[order] / 16.0, dtype=torch.float32)
        y = torch.tensor(data.target[order], dtype=torch.long)
        cut = int(0.75 * len(y))
        self.x_train, self.y_train, self.x_test, self.y_test = x[:cut], y[:cut], x[cut:], y[cut:]

    def model(self):
        import torch

        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))

    def batch(self, step):
        import torch

        index = torch.randint(0, len(self.y_train), (self.batch_size,), generator=self.generator)
        return self.x_train[index], self.y_train[index]

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model):
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            logits = model(self.x_test)
        return {
            "loss": F.cross_entropy(logits, self.y_test).item(),
            "accuracy": (logits.argmax(1) == self.y_test).float().mean().item(),
        }


class SpikesTask(DigitsTask):
    """``digits`` with gradient spikes: at about 3 % of steps the gradient is multiplied by a
    factor drawn log-uniformly from [100, 1000], after backward and before clipping.

    This imitates the loss spikes of large-model training (bad batches, numerical blow-ups):
    without clipping one spike throws the weights far away; global-norm clipping bounds the
    damage; spike-aware clippers (ZClip, AutoClip, SkipOnSpike) keep the threshold near the usual
    norm so a spike is cut back to an ordinary step. Divergence is judged as for ``digits``
    (a loss above 1000 x ln 10, or non-finite).
    """

    name = "spikes"
    description = "digits with x100-x1000 gradient spikes at random steps"
    spike_probability = 0.03

    def __init__(self, seed: int):
        super().__init__(seed)
        import torch

        spike_generator = torch.Generator().manual_seed(20_000 + seed)
        horizon = 100_000
        self._spike_draws = torch.rand(horizon, generator=spike_generator)
        self._spike_factors = 10 ** (2 + torch.rand(horizon, generator=spike_generator))
        # No spike during the first steps: every method sees a clean start.
        self._spike_draws[:20] = 1.0

    def perturb(self, model, step):
        if step >= len(self._spike_draws) or self._spike_draws[step] >= self.spike_probability:
            return 1.0
        factor = float(self._spike_factors[step])
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        return factor


# -- character LSTM language model ------------------------------------------------------------
def _stdlib_text(limit: int = 200_000) -> str:
    """Plain English text that ships with every Python: the standard library's docstrings."""
    import difflib
    import inspect
    import json
    import textwrap

    import codecs

    # Importing ``this`` prints the Zen of Python; its rot13 source text is all we want.
    with contextlib.redirect_stdout(io.StringIO()):
        import this

    parts = [codecs.decode(this.s, "rot13")]
    for module in (textwrap, difflib, json, inspect):
        for _name, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc and (inspect.isfunction(member) or inspect.isclass(member)):
                parts.append(doc)
    return "\n\n".join(parts)[:limit]


class CharLMTask(Task):
    """A one-layer LSTM character language model on the standard library's docstrings.

    Metric: next-character accuracy on the last 10 % of the text; "solved" at 45 % (a unigram
    model gets about 15 %). The reported loss is held-out cross-entropy in nats per character.
    Uniform probabilities over the vocabulary give ln(vocabulary size) ≈ 4.4 nats; a run
    diverged above 1000 times that.
    """

    name = "charlm"
    metric_name = "accuracy"
    defaults = TaskDefaults(steps=300, lr=0.005, optimizer="adam", quick_steps=15)
    description = "LSTM character language model on stdlib docstrings"
    batch_size = 32

    def __init__(self, seed: int, seq_len: int = 64, hidden: int = 128):
        super().__init__(seed)
        import torch

        text = _stdlib_text()
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train_data, self.test_data = data[:cut], data[cut:]
        self.seq_len, self.hidden = seq_len, hidden
        self.reference_loss = math.log(len(self.vocab))
        self.reference_text = f"uniform probabilities over the {len(self.vocab)} characters (ln {len(self.vocab)})"

    def model(self):
        import torch

        vocab, hidden = len(self.vocab), self.hidden

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, 32)
                self.lstm = torch.nn.LSTM(32, hidden, batch_first=True)
                self.head = torch.nn.Linear(hidden, vocab)

            def forward(self, x):
                return self.head(self.lstm(self.embed(x))[0])

        return Model()

    def _windows(self, data, starts):
        import torch

        offsets = torch.arange(self.seq_len + 1)
        chunk = data[starts[:, None] + offsets[None, :]]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step):
        import torch

        starts = torch.randint(0, len(self.train_data) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        return self._windows(self.train_data, starts)

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model):
        import torch
        import torch.nn.functional as F

        count = min(64, (len(self.test_data) - 1) // self.seq_len)
        starts = torch.arange(count) * self.seq_len
        x, y = self._windows(self.test_data, starts)
        with torch.no_grad():
            logits = model(x)
        return {
            "loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item(),
            "accuracy": (logits.argmax(-1) == y).float().mean().item(),
        }

    def solved(self, metric):
        return metric >= 0.45


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (AddingTask, TemporalOrderTask, DigitsTask, SpikesTask, CharLMTask)
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
    cls = TASKS[name]
    accepted = sorted(set(inspect.signature(cls.__init__).parameters) - {"self", "seed"})
    for key, value in options.items():
        if key not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise InvalidArgumentError(f"task {name!r} has no option {key!r} (it takes: {takes})")
        if key == "seq_len" and (isinstance(value, bool) or not isinstance(value, int) or value < cls.min_seq_len):
            raise InvalidArgumentError(
                f"seq_len must be an integer >= {cls.min_seq_len} for task {name!r}, got {value!r}"
            )

