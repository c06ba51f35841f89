"""Hugging Face transformers: clip with any gradclip clipper inside ``Trainer.train``.

The model is defined here (nothing is downloaded). The Trainer's own clipping is turned off with
``max_grad_norm=0``; the callback clips in ``on_pre_optimizer_step`` (transformers >= 4.45) and
adds ``grad_norm``, ``grad_norm_clipped``, ``clip_coef``, ``clip_threshold`` and ``clip_rate`` to
the Trainer's logs.

    python examples/transformers_callback.py --steps 20 --clipper autoclip
"""

from __future__ import annotations

import argparse

import torch
import transformers

import gradclip
from gradclip.transformers import GradClipCallback


class TinyConfig(transformers.PretrainedConfig):
    model_type = "gradclip_example_tiny"

    def __init__(self, vocab=50, hidden=16, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.hidden = vocab, hidden


class TinyClassifier(transformers.PreTrainedModel):
    """Bag-of-embeddings classifier: enough to have real gradients, small enough for a CPU."""

    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab, config.hidden)
        self.head = torch.nn.Linear(config.hidden, 2)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            module.weight.data.normal_(0.0, 0.5)

    def forward(self, input_ids=None, labels=None):
        logits = self.head(self.embed(input_ids).mean(dim=1))
        loss = torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class Sequences(torch.utils.data.Dataset):
    def __init__(self, n=256, length=12, vocab=50):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = (self.ids < vocab // 2).sum(dim=1).gt(length // 2).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--clipper", default="global_norm", help=f"one of {gradclip.available()}")
    parser.add_argument("--out", default="runs/transformers")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TinyClassifier(TinyConfig())
    monitor = gradclip.Monitor(model, every=10)
    training_args = transformers.TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=5e-2,
        max_grad_norm=0.0,  # the callback clips instead
        logging_steps=5,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=Sequences())
    # attach() puts the callback first, so reporting callbacks (TensorBoard, W&B) see its keys.
    GradClipCallback(gradclip.get(args.clipper), monitor=monitor).attach(trainer)
    trainer.train()
    monitor.close()
    for entry in trainer.state.log_history:
        if "grad_norm" in entry:
            values = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items() if k != "step"}
            print(f"logged at step {entry['step']}: {values}")
    print(monitor.suggest())


if __name__ == "__main__":
    main()
