"""Parity with Opacus 1.6 (hooks mode): the clipped summed gradient, fp32, within 1e-5 relative.

The transformer uses ``opacus.layers.DPMultiheadAttention`` (Opacus cannot hook
``nn.MultiheadAttention``); gradclip's rules see it as the Linear layers it is built from.
"""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule
from opacus.layers import DPMultiheadAttention
from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
from torch import nn
from torch.nn import functional as F

import gradclip
import gradclip.torch as gct
from tests._per_sample_models import SmallCNN


class DPTransformer(nn.Module):
    def __init__(self, vocab=50, d=32, heads=4, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = DPMultiheadAttention(d, heads, batch_first=True)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.ln2 = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        x = self.emb(ids)
        h, _ = self.attn(x, x, x, need_weights=False)
        x = self.ln1(x + h)
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        return self.head(x.mean(1))


def _opacus_clipped_sum(model, inputs, targets, max_norm):
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    opt = OpacusDPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=max_norm,
        expected_batch_size=len(targets), loss_reduction="sum",
    )
    with warnings.catch_warnings():  # Opacus: "full backward hook is firing..." on the first layer
        warnings.simplefilter("ignore", UserWarning)
        F.cross_entropy(gsm(inputs), targets, reduction="sum").backward()
    opt.clip_and_accumulate()
    return {n: p.summed_grad for n, p in gsm._module.named_parameters()}


@pytest.mark.parametrize("mode", ["bk", "ghost", "instantiate"])
@pytest.mark.parametrize("which", ["transformer", "cnn"])
def test_clipped_sum_matches_opacus_hooks(which, mode):
    torch.manual_seed(0)
    if which == "transformer":
        model, inputs = DPTransformer(), torch.randint(0, 50, (8, 12))
        targets = torch.randint(0, 5, (8,))
    else:
        model, inputs = SmallCNN(), torch.randn(8, 1, 12, 12)
        targets = torch.randint(0, 10, (8,))
    max_norm = 0.5
    want = _opacus_clipped_sum(model, inputs, targets, max_norm)
    ps = gct.PerSample(model, gradclip.GlobalNorm(max_norm), mode=mode)
    info = ps.backward(F.cross_entropy(model(inputs), targets, reduction="none"))
    assert bool((info.norm > max_norm).any())
    got = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    ref = torch.cat([want[n].flatten() for n, _ in model.named_parameters()])
    # Relative to the whole gradient: some tensors (the key bias of attention, which softmax
    # cancels) are rounding noise around zero in both.
    assert float((got - ref).norm() / ref.norm()) < 1e-5
    scale = float(ref.abs().max())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-5 * scale, msg=name)
