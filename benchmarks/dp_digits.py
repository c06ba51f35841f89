"""DP-SGD evidence: test accuracy on scikit-learn's digits at ε ∈ {1, 3, 8}, gradclip vs Opacus.

    python benchmarks/dp_digits.py            # prints the README's table (about a minute on CPU)

Both private trainers get the same model initialisation, the same Poisson batches (q = 64/N),
the same clipping bound C = 1, and σ from Opacus' RDP accountant for the target ε at δ = 1e-5
over the run's steps; gradclip runs ``PerSample(mode="bk")`` + ``DPOptimizer`` through
``gradclip.experiments.private_training.DPSGD`` (the loop of ``gradclip compare --private``), Opacus its
``GradSampleModule`` (hooks) + ``DPOptimizer``. The noise draws differ (each library's own
generator), so accuracies agree up to seed noise; three seeds are averaged. Non-private is the
same model and schedule with mean loss and no clipping.
"""

from __future__ import annotations

import statistics
import sys
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import gradclip
from gradclip.experiments.private_training import DPSGD
from gradclip.torch import PoissonBatchSampler
from gradclip.torch.accounting import Accountant, noise_multiplier_for

EPOCHS, BATCH, LR, C, DELTA = 15, 64, 0.5, 1.0, 1e-5


def _data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def _model(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Tanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 16, 10),
    )


def _batches(n: int, q: float, steps: int, seed: int):
    # The Poisson batches DPSGD draws from the same seed: the Opacus and non-private runs get them too.
    return list(PoissonBatchSampler(n, q, steps=steps, generator=torch.Generator().manual_seed(seed)))


def train(kind: str, trainer: str, epsilon: float | None, seed: int) -> tuple[float, float]:
    """Test accuracy and the ε spent (inf for non-private)."""
    xtr, xte, ytr, yte = _data()
    n = len(ytr)
    q = BATCH / n
    steps = int(EPOCHS / q)
    torch.manual_seed(seed)
    model = _model(kind)
    batches = _batches(n, q, steps, seed)
    sigma = noise_multiplier_for(epsilon, DELTA, q, steps) if epsilon is not None else 0.0
    spent = float("inf")
    if trainer == "nonprivate":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for idx in batches:
            if len(idx) == 0:
                continue
            opt.zero_grad()
            F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
            opt.step()
    elif trainer == "gradclip":
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=LR), gradclip.GlobalNorm(C), (xtr, ytr),
                   noise_multiplier=sigma, expected_batch_size=BATCH, mode="bk",
                   noise_generator=torch.Generator().manual_seed(seed))
        for _ in dp.run(lambda batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none"), steps,
                        batch_generator=torch.Generator().manual_seed(seed)):
            pass
        dp.remove()
        spent = dp.epsilon(DELTA)
    else:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        gsm = GradSampleModule(model)
        opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=sigma, max_grad_norm=C,
                          expected_batch_size=BATCH)
        accountant = Accountant("rdp")
        for idx in batches:
            opt.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # Opacus needs at least one example to run its hooks; an empty Poisson batch
                # still takes a noised step of zero gradients.
                for p in gsm.parameters():
                    p.grad_sample = torch.zeros(0, *p.shape)
            else:
                F.cross_entropy(gsm(xtr[idx]), ytr[idx]).backward()
            opt.step()
            accountant.step(sigma, q)
        spent = accountant.epsilon(DELTA)
    model.eval()
    with torch.no_grad():
        accuracy = (model(xte).argmax(1) == yte).float().mean().item()
    return accuracy, spent


def main() -> int:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = ["| model | ε (δ=1e-5) | σ | gradclip accuracy | Opacus accuracy | non-private |", "|---|---|---|---|---|---|"]
    seeds = (0, 1, 2)
    xtr = _data()[0]
    q = BATCH / len(xtr)
    steps = int(EPOCHS / q)
    for kind in ("mlp", "cnn"):
        plain = statistics.mean(train(kind, "nonprivate", None, s)[0] for s in seeds)
        for eps in (1.0, 3.0, 8.0):
            ours = [train(kind, "gradclip", eps, s) for s in seeds]
            theirs = [train(kind, "opacus", eps, s) for s in seeds]
            sigma = noise_multiplier_for(eps, DELTA, q, steps)
            rows.append(
                f"| {kind} | {statistics.mean(e for _, e in ours):.2f} | {sigma:.2f} | "
                f"{100 * statistics.mean(a for a, _ in ours):.1f}% | {100 * statistics.mean(a for a, _ in theirs):.1f}% | "
                f"{100 * plain:.1f}% |"
            )
            print(rows[-1], flush=True)
    print(f"\n{EPOCHS} epochs, expected batch {BATCH} (q={q:.4f}, {steps} steps), C={C}, lr={LR}, 3 seeds")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
