"""Lightning: clip with any gradclip clipper inside ``Trainer.fit`` (bf16 autocast on CPU).

    python examples/lightning_callback.py --steps 50 --clipper zclip
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch

import gradclip
from gradclip.lightning import GradClipCallback
from gradclip.monitor import JsonlWriter


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))

    def training_step(self, batch, batch_index):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1).float(), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--clipper", default="global_norm", help=f"one of {gradclip.available()}")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--out", default="runs/lightning")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = x.sum(dim=1) + 0.1 * torch.randn(256, generator=generator)
    y[::17] *= 30  # outliers: gradient spikes
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    model = Regressor()
    monitor = gradclip.Monitor(model, every=10, writers=[JsonlWriter(os.path.join(args.out, "clip.jsonl"))])
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        precision=args.precision,
        callbacks=[GradClipCallback(gradclip.get(args.clipper), monitor=monitor)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    trainer.fit(model, loader)
    monitor.close()
    summary = monitor.summary()
    print(f"steps: {summary['steps']}, clip rate: {summary['clip_rate']:.0%}")
    print({k: float(v) for k, v in trainer.callback_metrics.items()})


if __name__ == "__main__":
    main()
