"""Monitor an ordinary training loop and ask for a threshold, as ``gradclip suggest LOG`` does.

Any clipper, clipped in place after ``backward()``; the Monitor keeps its values on the device
and writes a JSON Lines log every ``--every`` steps. At the end the log is read back and
``gradclip.suggest_threshold`` recommends a ``max_norm``, explaining why.

    python examples/monitor_and_suggest.py --steps 300 --clipper zclip
"""

from __future__ import annotations

import argparse
import os

import torch

import gradclip
from gradclip.monitor import JsonlWriter, read_log


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--clipper", default="global_norm", help=f"one of {gradclip.available()}")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--out", default="runs/monitor")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    clipper = gradclip.get(args.clipper)
    log = os.path.join(args.out, "clip.jsonl")

    with gradclip.Monitor(model, every=args.every, writers=[JsonlWriter(log)]) as monitor:
        generator = torch.Generator().manual_seed(1)
        for step in range(args.steps):
            x = torch.randn(64, 8, generator=generator)
            target = torch.randint(0, 4, (64,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(x) * (10.0 if step % 50 == 10 else 1.0), target)
            loss.backward()
            info = clipper.clip_(model)
            monitor.observe(info)
            optimizer.step()
            optimizer.zero_grad()

    records = read_log(log)
    print(f"{len(records)} steps logged to {log}; keys: {sorted(records[0])}")
    suggestion = gradclip.suggest_threshold([r["norm"] for r in records], quantile=0.9,
                                            current_threshold=records[-1]["threshold"])
    print(f"suggested max_norm: {suggestion.max_norm:.4g}")
    print(suggestion)


if __name__ == "__main__":
    main()
