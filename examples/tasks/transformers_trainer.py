"""A Hugging Face ``transformers.Trainer`` as a ``gradclip compare`` task.

The model is a tiny transformer classifier defined here (nothing is downloaded). The Trainer's
own clipping is off (``max_grad_norm=0``); ``gradclip.transformers.GradClipCallback`` clips with
the clipper under comparison, and a second callback reports each logged step::

    gradclip compare --task examples/tasks/transformers_trainer.py:task --clipper none \\
        --sweep "global_norm:max_norm=logspace(0.1,10,5)" --clipper zclip
"""

from __future__ import annotations

import math
import tempfile

from gradclip.experiments import TrainTask

VOCAB, LENGTH = 40, 16


def _modules():
    """The model and data classes (transformers is imported when a run starts, not at import)."""
    import torch
    import transformers

    class TinyConfig(transformers.PretrainedConfig):
        model_type = "gradclip_example_tiny_transformer"

        def __init__(self, vocab=VOCAB, hidden=32, **kwargs):
            super().__init__(**kwargs)
            self.vocab, self.hidden = vocab, hidden

    class TinyTransformer(transformers.PreTrainedModel):
        """Embeddings, one encoder layer, mean pooling, a linear head: a real Trainer model."""

        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab, config.hidden)
            self.encoder = torch.nn.TransformerEncoderLayer(config.hidden, 4, 64, dropout=0.0, batch_first=True)
            self.head = torch.nn.Linear(config.hidden, 2)
            self.post_init()

        def _init_weights(self, module):
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.data.normal_(0.0, 0.3)

        def forward(self, input_ids=None, labels=None):
            logits = self.head(self.encoder(self.embed(input_ids)).mean(dim=1))
            loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
            return {"loss": loss, "logits": logits}

    class Sequences(torch.utils.data.Dataset):
        """Label: does token 0 appear before token 1 (a task that needs attention)."""

        def __init__(self, seed, count):
            generator = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(2, VOCAB, (count, LENGTH), generator=generator)
            a = torch.randint(0, LENGTH, (count,), generator=generator)
            b = (a + torch.randint(1, LENGTH, (count,), generator=generator)) % LENGTH
            rows = torch.arange(count)
            self.ids[rows, a], self.ids[rows, b] = 0, 1
            self.labels = (a < b).long()

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    return torch, transformers, TinyConfig, TinyTransformer, Sequences


def train(clipper, seed: int, steps: int, report) -> dict[str, float]:
    """``Trainer.train`` for ``steps`` optimizer steps under ``clipper``; held-out accuracy."""
    torch, transformers, TinyConfig, TinyTransformer, Sequences = _modules()
    from gradclip.transformers import GradClipCallback

    transformers.set_seed(seed)
    clip = GradClipCallback(clipper)

    class Report(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:  # logging_steps=1: one entry per optimizer step
                report(state.global_step - 1, logs["loss"], clip.last_info)

    with tempfile.TemporaryDirectory() as scratch:
        args = transformers.TrainingArguments(
            output_dir=scratch, max_steps=steps, per_device_train_batch_size=32, learning_rate=3e-3,
            max_grad_norm=0.0,  # the callback clips instead
            logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
            seed=seed, data_seed=seed, dataloader_num_workers=0,
        )
        model = TinyTransformer(TinyConfig())
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Sequences(seed, 2048))
        clip.attach(trainer)  # first, so the Report callback sees this step's clip info
        trainer.add_callback(Report())
        trainer.remove_callback(transformers.PrinterCallback)  # no log dicts on stdout
        trainer.train()
    test = Sequences(10_000 + seed, 512)
    with torch.no_grad():
        out = model(input_ids=test.ids, labels=test.labels)
    return {"accuracy": (out["logits"].argmax(1) == test.labels).float().mean().item(), "loss": out["loss"].item()}


task = TrainTask(
    train,
    name="transformers-trainer",
    metric_name="accuracy",
    steps=150,
    quick_steps=10,
    reference_loss=math.log(2),
    reference_text="predicting 1/2 (ln 2)",
    solved_at=0.9,
    description="tiny transformer classifier, transformers.Trainer with GradClipCallback",
)
