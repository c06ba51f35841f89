"""``charlm``: a small character-level LSTM language model trained on text that ships with
Python's standard library (so nothing is downloaded).
"""

from __future__ import annotations

import contextlib
import io
import math

from gradclip.experiments.tasks.base import Task, TaskDefaults

__all__ = ["CharLMTask"]


def _stdlib_text(limit: int = 200_000) -> str:
    """Plain English text that ships with every Python: the standard library's docstrings."""
    import difflib
    import inspect
    import json
    import textwrap

    import codecs

    # Importing ``this`` prints the Zen of Python; its rot13 source text is all we want.
    with contextlib.redirect_stdout(io.StringIO()):
        import this

    parts = [codecs.decode(this.s, "rot13")]
    for module in (textwrap, difflib, json, inspect):
        for _name, member in inspect.getmembers(module):
            doc = inspect.getdoc(member)
            if doc and (inspect.isfunction(member) or inspect.isclass(member)):
                parts.append(doc)
    return "\n\n".join(parts)[:limit]


class CharWindowTask(Task):
    """The part a character-level task shares: random training windows of ``seq_len + 1``
    characters, next-character cross-entropy, and evaluation on up to ``eval_windows`` disjoint
    held-out windows (loss and accuracy). Subclasses set ``train_data``, ``test_data``,
    ``seq_len``, ``batch_size`` and ``generator``."""

    #: How many held-out windows :meth:`evaluate` reads.
    eval_windows = 64

    def _windows(self, data, starts):
        import torch

        offsets = torch.arange(self.seq_len + 1)
        chunk = data[starts[:, None] + offsets[None, :]]
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, step):
        import torch

        starts = torch.randint(0, len(self.train_data) - self.seq_len - 1, (self.batch_size,), generator=self.generator)
        return self._windows(self.train_data, starts)

    def loss(self, model, batch):
        import torch.nn.functional as F

        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model):
        import torch
        import torch.nn.functional as F

        count = min(self.eval_windows, (len(self.test_data) - 1) // self.seq_len)
        starts = torch.arange(count) * self.seq_len
        x, y = self._windows(self.test_data, starts)
        with torch.no_grad():
            logits = model(x)
        return {
            "loss": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item(),
            "accuracy": (logits.argmax(-1) == y).float().mean().item(),
        }



class CharLMTask(CharWindowTask):
    """A one-layer LSTM character language model on the standard library's docstrings.

    Metric: next-character accuracy on the last 10 % of the text; "solved" at 45 % (a unigram
    model gets about 15 %). The reported loss is held-out cross-entropy in nats per character.
    Uniform probabilities over the vocabulary give ln(vocabulary size) ≈ 4.4 nats; a run
    diverged above 1000 times that.
    """

    name = "charlm"
    metric_name = "accuracy"
    defaults = TaskDefaults(steps=300, lr=0.005, optimizer="adam", quick_steps=15)
    description = "LSTM character language model on stdlib docstrings"
    batch_size = 32

    def __init__(self, seed: int, seq_len: int = 64, hidden: int = 128):
        super().__init__(seed)
        import torch

        text = _stdlib_text()
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train_data, self.test_data = data[:cut], data[cut:]
        self.seq_len, self.hidden = seq_len, hidden
        self.reference_loss = math.log(len(self.vocab))
        self.reference_text = f"uniform probabilities over the {len(self.vocab)} characters (ln {len(self.vocab)})"

    def model(self):
        import torch

        vocab, hidden = len(self.vocab), self.hidden

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, 32)
                self.lstm = torch.nn.LSTM(32, hidden, batch_first=True)
                self.head = torch.nn.Linear(hidden, vocab)

            def forward(self, x):
                return self.head(self.lstm(self.embed(x))[0])

        return Model()

    def solved(self, metric):
        return metric >= 0.45
