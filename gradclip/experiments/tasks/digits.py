"""The MLP tasks on scikit-learn's bundled 8x8 digits: ``digits`` (the seeds' 64-128-10
classifier) and ``spikes`` (the same with x100 to x1000 gradient spikes at random steps).
"""

from __future__ import annotations

import math

from gradclip.experiments.tasks.base import Task, TaskDefaults

__all__ = ["DigitsTask", "SpikesTask"]


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
