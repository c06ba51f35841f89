"""Your own PyTorch training loop as a ``gradclip compare`` task (the train-function form).

The loop stays yours; it clips with the ``clipper`` it is given, calls ``report`` after every
optimizer step and returns its held-out metrics. Compare a sweep of fixed thresholds with the
adaptive clippers on it::

    gradclip compare --task examples/tasks/torch_loop.py:task \\
        --sweep "global_norm:max_norm=logspace(0.1,10,5)" --clipper none --clipper zclip --clipper adagc

The problem: a small MLP classifying points of three interleaved spirals, trained with SGD and
momentum at a learning rate high enough that the gradient norm matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gradclip.experiments import TrainTask

CLASSES = 3


def spirals(seed: int, count: int = 1500):
    """Three interleaved noisy spirals, the same for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=generator)
    radius = torch.rand(count, generator=generator)
    angle = 4.0 * radius + labels * (2 * math.pi / CLASSES) + 0.2 * torch.randn(count, generator=generator)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return points, labels


def train(clipper, seed: int, steps: int, report) -> dict[str, float]:
    """Train for ``steps`` optimizer steps under ``clipper``; return held-out accuracy and loss."""
    torch.manual_seed(seed)
    x, y = spirals(seed)
    x_test, y_test = spirals(10_000 + seed, 600)
    model = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, CLASSES))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    batches = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, len(y), (64,), generator=batches)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        # The clipper under comparison, between backward and step; the loss is a signal that
        # loss-watching clippers (SkipOnSpike(signal="loss")) use and the others ignore.
        info = clipper.clip_(model, loss=loss.detach())
        if not bool(info.skip):              # spike skippers ask for the step to be skipped
            optimizer.step()
        report(step, loss.detach(), info)    # the loss, and what the clipper did
    with torch.no_grad():
        logits = model(x_test)
    return {
        "accuracy": (logits.argmax(1) == y_test).float().mean().item(),
        "loss": F.cross_entropy(logits, y_test).item(),
    }


#: What ``--task examples/tasks/torch_loop.py:task`` names: the function and its metadata.
task = TrainTask(
    train,
    name="spirals-torch-loop",
    metric_name="accuracy",
    steps=400,
    quick_steps=20,
    reference_loss=math.log(CLASSES),       # uniform guesses: a loss 1000x this is divergence
    reference_text=f"uniform probabilities over the {CLASSES} classes (ln {CLASSES})",
    solved_at=0.9,
    description="MLP on three spirals, your own torch loop",
    default_clippers=("none", "global_norm:max_norm=1.0", "zclip", "adagc"),
)
