"""A ``gradclip.experiments.Task`` subclass: the runner owns the PyTorch loop.

The class gives the model for a seed, the batches, the loss and the held-out evaluation, and the
loss of a trivial predictor that divergence is judged against; the runner trains it under each
clipper with the optimizer and learning rate of ``defaults`` (or ``--optimizer``/``--lr``)::

    gradclip compare --task examples/tasks/torch_task.py:Regression \\
        --sweep "global_norm:max_norm=logspace(0.1,10,5)" --clipper none --clipper zclip --clipper adagc

The problem: a deep tanh MLP fitting a smooth function of 8 inputs, with SGD and momentum at a
learning rate where the first large gradients throw unclipped runs out of range.
"""

from __future__ import annotations

import torch

from gradclip.experiments import Task, TaskDefaults


class Regression(Task):
    """Fit ``y = sin(x·w) + 0.5·(x·v)²`` with a 4-layer tanh MLP; metric: held-out R²."""

    name = "regression"
    metric_name = "r2"                 # the key of evaluate() the comparison ranks by
    greater_is_better = True
    defaults = TaskDefaults(steps=300, lr=0.05, optimizer="sgd", quick_steps=20)
    description = "4-layer tanh MLP regression"
    reference_loss = 1.0               # the targets are standardised: predicting 0 has MSE 1
    reference_text = "predicting the mean target (MSE 1)"

    def __init__(self, seed: int, width: int = 64):
        super().__init__(seed)         # seeds torch and self.generator
        directions = torch.Generator().manual_seed(1234)  # one problem for every seed
        self.w, self.v = torch.randn(8, generator=directions), torch.randn(8, generator=directions) / 3
        self.x_test, self.y_test = self._sample(1000, torch.Generator().manual_seed(10_000 + seed))
        self.width = width

    def _sample(self, count, generator):
        x = torch.randn(count, 8, generator=generator)
        y = torch.sin(x @ self.w) + 0.5 * (x @ self.v) ** 2
        return x, ((y - 0.5) / 0.75).unsqueeze(1)  # roughly zero mean, unit variance

    def model(self):
        layers, width = [], 8
        for _ in range(4):
            layers += [torch.nn.Linear(width, self.width), torch.nn.Tanh()]
            width = self.width
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1))

    def batch(self, step):
        return self._sample(64, self.generator)

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)   # a scalar tensor

    def evaluate(self, model):
        with torch.no_grad():
            mse = torch.nn.functional.mse_loss(model(self.x_test), self.y_test).item()
        variance = self.y_test.var(unbiased=False).item()
        return {"loss": mse, "r2": 1.0 - mse / variance}

    def solved(self, metric):
        return metric >= 0.9
