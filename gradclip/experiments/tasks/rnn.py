"""The synthetic long-range RNN problems of Pascanu, Mikolov & Bengio (2013, "On the difficulty of
training recurrent neural networks", section 5.1), taken from Hochreiter & Schmidhuber (1997),
with a tanh RNN: ``adding`` (solved at test MSE < 0.01) and ``temporal-order`` (solved at 99 %
test accuracy).
"""

from __future__ import annotations

import math

from gradclip.experiments.tasks.base import Task, TaskDefaults

__all__ = ["AddingTask", "TemporalOrderTask"]


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
