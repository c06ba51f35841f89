"""Models and the torch.func reference shared by the per-example clipping tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


class TinyTransformer(nn.Module):
    """Embedding (with padding), MultiheadAttention, LayerNorm, an MLP over (B, T, d), a head."""

    def __init__(self, vocab: int = 23, d: int = 16, heads: int = 2, classes: int = 5, tied: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab if tied else classes, bias=not tied)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        h, _ = self.attn(x, x, x, need_weights=False)
        x = self.ln1(x + h)
        x = self.ln2(x + self.fc2(torch.tanh(self.fc1(x))))
        return self.head(x).mean(1)


class SmallCNN(nn.Module):
    """Conv2d (stride, padding, groups), GroupNorm, a pooled Linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, groups=2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(x.mean(dim=(2, 3)))


def per_example_grads(model: nn.Module, loss_fn, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{name: (B, *shape)}`` per-example gradients of the trainable parameters by torch.func.

    The model gets ``inputs[0]``; ``loss_fn(output, *inputs)`` maps one example's batched
    output (batch 1) to its loss.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in model.named_buffers()}

    def one(p, *example):
        batched = tuple(x.unsqueeze(0) for x in example)
        out = functional_call(model, (p, buffers), (batched[0],))
        return loss_fn(out, *batched).sum()

    return vmap(grad(one), in_dims=(None, *([0] * len(inputs))))(params, *inputs)


def clipped_sum(samples: dict[str, torch.Tensor], max_norm: float, eps: float = 1e-6):
    """Reference ``Σ_i c_i g_i`` with ``c_i = min(1, C / (‖g_i‖ + eps))`` over all parameters."""
    flat = torch.cat([g.flatten(1) for g in samples.values()], 1)
    norms = flat.norm(dim=1)
    coef = torch.where(norms > max_norm, max_norm / (norms + eps), torch.ones_like(norms))
    return norms, {n: torch.tensordot(coef, g, dims=1) for n, g in samples.items()}
