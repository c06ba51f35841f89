"""``gpt``: a small decoder-only transformer, character level, on text that ships with Python,
trained with AdamW at a learning rate where unclipped training spikes.

This is the failure modern adaptive clippers were built for (ZClip, AdaGC, spike skipping):
gradient and loss spikes in transformer training at a high learning rate. The model is shaped
like GPT-1 — token and position embeddings, blocks of causal self-attention and a GELU MLP with
LayerNorm after each residual addition (post-LN) and a linear head — and small enough for a CPU.
Post-LN transformers are the ones known to need a learning-rate warm-up (Xiong et al. 2020, "On
Layer Normalization in the Transformer Architecture"); trained without one at a learning rate of
1e-2, their gradient norm spikes to ten to a hundred times its median. Each spike inflates
AdamW's second-moment estimate, which then shrinks every update for about 1/(1 - beta2) steps:
unclipped runs stall and end behind. ``layer_norm="pre"`` gives the GPT-2 arrangement, which
spikes far less.
"""

from __future__ import annotations

import math

from gradclip.experiments.tasks.base import TaskDefaults, make_optimizer
from gradclip.experiments.tasks.charlm import CharWindowTask, _stdlib_text

__all__ = ["GPTTask"]


class GPTTask(CharWindowTask):
    """A 4-layer, 64-wide, 4-head post-LN GPT over characters of the standard library's docstrings.

    AdamW (betas 0.9/0.95, weight decay 0.1, no warm-up) at a learning rate of 1e-2: unclipped
    runs meet gradient spikes of 10-100x the median norm and stall after each. Metric:
    next-character accuracy on the last 10 % of the text; "solved" at 40 % (a unigram model gets
    about 15 %; the same model with pre-LN blocks reaches about 51 % in these 400 steps, unclipped
    post-LN runs about 33 %). Uniform
    probabilities give ln(vocabulary size) ≈ 4.4 nats; a run diverged above 1000 times that (or
    at a non-finite loss).

    Options: ``seq_len`` (64), ``layers`` (4), ``width`` (64), ``heads`` (4), ``layer_norm``
    (``"post"`` or ``"pre"``).
    """

    name = "gpt"
    metric_name = "accuracy"
    defaults = TaskDefaults(steps=400, lr=1e-2, optimizer="adamw", quick_steps=15)
    description = "decoder-only transformer (char level, stdlib text), AdamW at a spiking learning rate"
    default_clippers = ("none", "global_norm:max_norm=1.0", "zclip", "adagc", "autoclip")
    batch_size = 16
    min_seq_len = 8
    eval_windows = 128

    def __init__(
        self, seed: int, seq_len: int = 64, layers: int = 4, width: int = 64, heads: int = 4, layer_norm: str = "post"
    ):
        super().__init__(seed)
        import torch

        from gradclip._core.errors import InvalidArgumentError

        if layer_norm not in ("post", "pre"):
            raise InvalidArgumentError(f"gpt: layer_norm must be 'post' or 'pre', got {layer_norm!r}")
        if isinstance(width, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
            raise InvalidArgumentError(f"gpt: width ({width!r}) must be a multiple of heads ({heads!r})")
        self.layer_norm = layer_norm

        text = _stdlib_text()
        self.vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(self.vocab)}
        data = torch.tensor([index[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(data))
        self.train_data, self.test_data = data[:cut], data[cut:]
        self.seq_len, self.layers, self.width, self.heads = seq_len, layers, width, heads
        self.reference_loss = math.log(len(self.vocab))
        self.reference_text = f"uniform probabilities over the {len(self.vocab)} characters (ln {len(self.vocab)})"

    def model(self):
        import torch
        import torch.nn.functional as F

        vocab, width, heads, context = len(self.vocab), self.width, self.heads, self.seq_len
        post = self.layer_norm == "post"

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.ln1 = torch.nn.LayerNorm(width)
                self.qkv = torch.nn.Linear(width, 3 * width)
                self.proj = torch.nn.Linear(width, width)
                self.ln2 = torch.nn.LayerNorm(width)
                self.mlp = torch.nn.Sequential(
                    torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width)
                )

            def attend(self, x):
                batch, length, _ = x.shape
                q, k, v = self.qkv(x).split(width, dim=-1)
                shape = (batch, length, heads, width // heads)
                q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
                attention = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                return self.proj(attention.transpose(1, 2).reshape(batch, length, width))

            def forward(self, x):
                if post:  # GPT-1: normalise after each residual addition
                    x = self.ln1(x + self.attend(x))
                    return self.ln2(x + self.mlp(x))
                x = x + self.attend(self.ln1(x))  # GPT-2: normalise each branch's input
                return x + self.mlp(self.ln2(x))

        layers = self.layers

        class GPT(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(vocab, width)
                self.position = torch.nn.Embedding(context, width)
                self.blocks = torch.nn.Sequential(*[Block() for _ in range(layers)])
                # Pre-LN leaves the residual stream unnormalised: one LayerNorm before the head.
                self.ln = torch.nn.Identity() if post else torch.nn.LayerNorm(width)
                self.head = torch.nn.Linear(width, vocab)

            def forward(self, x):
                positions = torch.arange(x.shape[1], device=x.device)
                return self.head(self.ln(self.blocks(self.embed(x) + self.position(positions))))

        return GPT()

    def configure_optimizer(self, parameters, name, lr):
        import torch

        if name == "adamw":
            # GPT-style settings: beta2 0.95 and weight decay 0.1, no warm-up (the spikes' cause).
            return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        return make_optimizer(name, parameters, lr)

    def solved(self, metric):
        return metric >= 0.40
