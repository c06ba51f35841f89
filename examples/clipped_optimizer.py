"""ClippedOptimizer: AMP, clipping folded into a fused AdamW step, and a Monitor.

Trains a small regression network on synthetic data whose gradients spike every 25 steps.
``ClippedOptimizer`` unscales the GradScaler's gradients once, clips with ``GlobalNorm``, skips a
step on overflow and otherwise steps; with a fused optimizer the clip coefficient is folded into
the optimizer's own step (no extra pass over the gradients). The Monitor writes JSON Lines, CSV
and TensorBoard logs, then suggests a threshold from what it saw.

    python examples/clipped_optimizer.py --steps 200 --out runs/clipped
    tensorboard --logdir runs/clipped/tb
"""

from __future__ import annotations

import argparse
import os

import torch

import gradclip
import gradclip.torch as gct
from gradclip.monitor import CsvWriter, JsonlWriter, TensorBoardWriter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    # Above the typical norms of this task (median ~1), below its spikes (~1000): clipping tames
    # the outliers and leaves ordinary steps alone (the early steps, far from the fit, clip too).
    parser.add_argument("--max-norm", type=float, default=5.0)
    parser.add_argument("--accumulation-steps", type=int, default=1)
    parser.add_argument("--out", default="runs/clipped_optimizer")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(device)
    # fused=True lets ClippedOptimizer fold the clip coefficient into the optimizer's step.
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    scaler = torch.amp.GradScaler(device)
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16

    monitor = gradclip.Monitor(
        model,
        every=20,  # one host-device sync per 20 steps
        writers=[
            JsonlWriter(os.path.join(args.out, "clip.jsonl")),
            CsvWriter(os.path.join(args.out, "clip.csv")),
            TensorBoardWriter(os.path.join(args.out, "tb")),
        ],
    )
    opt = gct.ClippedOptimizer(
        optimizer,
        gradclip.GlobalNorm(args.max_norm),
        scaler=scaler,
        accumulation_steps=args.accumulation_steps,
        monitor=monitor,
    )

    generator = torch.Generator().manual_seed(1)
    true_w = torch.randn(16, 1, generator=generator)
    for step in range(args.steps * args.accumulation_steps):
        x = torch.randn(32, 16, generator=generator)
        y = x @ true_w + 0.1 * torch.randn(32, 1, generator=generator)
        if step % 25 == 3:
            y = y * 50  # an outlier batch (4% of them): a gradient spike that clipping should tame
        x, y = x.to(device), y.to(device)
        with torch.autocast(device, dtype=amp_dtype):
            loss = torch.nn.functional.mse_loss(model(x).float(), y) / args.accumulation_steps
        scaler.scale(loss).backward()
        opt.step()
        if opt.stepped:
            scaler.update()
        opt.zero_grad()

    monitor.close()
    summary = monitor.summary()
    print(f"folded into the fused step: {opt.folded}")
    print(f"steps: {summary['steps']}, clipped: {summary['clip_rate']:.0%}, non-finite: {summary['nonfinite_steps']}")
    print(f"pre-clip norm percentiles: {summary['norm_percentiles']}")
    print(monitor.suggest(quantile=0.9))
    torch.save(opt.state_dict(), os.path.join(args.out, "optimizer.pt"))


if __name__ == "__main__":
    main()
