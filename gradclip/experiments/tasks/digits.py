"""The MLP tasks on scikit-learn's bundled 8x8 digits: ``digits`` (the seeds' 64-128-10
classifier) and ``spikes`` (the same with x100 to x1000 gradient spikes at random steps).
"""

from __future__ import annotations

import math
from typing import Any

from gradclip.experiments.tasks.base import Task, TaskDefaults

__all__ = ["DigitsTask", "SpikesTask", "fault_schedule", "ensure_fault"]

#: Steps covered by a fault schedule (more than any run takes).
FAULT_HORIZON = 100_000
#: Steps at the start of a run that never carry a fault: every method sees a clean start.
CLEAN_START = 20


def fault_schedule(seed: int, salt: int) -> tuple[Any, Any]:
    """Two seeded uniform draws per step, for injecting faults at random steps.

    A fault fires at ``step`` when ``draws[step] < probability``; ``uniform[step]`` sizes it.
    The generator is seeded by ``salt + seed``, apart from the data's and the model's, so every
    clipper of a seed meets the same faults at the same steps, and two kinds of fault (another
    ``salt``) fall independently.

    Args:
        seed: The run's seed.
        salt: Added to the seed, one value per kind of fault.

    Returns:
        ``(draws, uniform)``: two float32 tensors of :data:`FAULT_HORIZON` draws in [0, 1);
        ``draws`` is 1 for the first :data:`CLEAN_START` steps, so no fault fires there.
    """
    import torch

    generator = torch.Generator().manual_seed(salt + seed)
    draws = torch.rand(FAULT_HORIZON, generator=generator)
    uniform = torch.rand(FAULT_HORIZON, generator=generator)
    draws[:CLEAN_START] = 1.0
    return draws, uniform


def ensure_fault(draws: Any, probability: float, steps: int) -> Any:
    """``draws`` (from :func:`fault_schedule`) with at least one fault in a run of ``steps``.

    A run whose schedule fires a fault within its steps (every full-length run of the built-in
    tasks' seeds does) keeps it unchanged. A shorter one, such as a ``--quick`` smoke run that
    would end before its first fault, gets one: at the step after :data:`CLEAN_START` (or, in a
    run that short, at its middle) whose draw is smallest, so it is the same for every clipper
    of a seed and sized by that step's own draw. ``probability`` 0 (faults off) adds none.

    Returns:
        ``draws`` itself, or a copy with one draw set to 0.
    """
    if probability <= 0 or steps <= 0 or bool((draws[:steps] < probability).any()):
        return draws
    start = min(CLEAN_START, steps // 2)
    step = start + int(draws[start:steps].argmin())
    draws = draws.clone()
    draws[step] = 0.0
    return draws


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

    def training_set(self):
        return self.x_train, self.y_train

    def example_losses(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        return F.cross_entropy(model(x), y, reduction="none")

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
    factor drawn log-uniformly from [100, 1000], after backward and before clipping; a run too
    short to meet one by chance (``--quick``) meets one (:func:`ensure_fault`).

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
        self._spike_draws, uniform = fault_schedule(seed, salt=20_000)
        self._spike_factors = 10 ** (2 + uniform)

    def begin_run(self, steps):
        # A run too short to meet a spike by chance (--quick) still meets one.
        self._spike_draws = ensure_fault(self._spike_draws, self.spike_probability, steps)

    def perturb(self, model, step):
        if step >= len(self._spike_draws) or self._spike_draws[step] >= self.spike_probability:
            return 1.0
        factor = float(self._spike_factors[step])
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(factor)
        return factor
