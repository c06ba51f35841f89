"""Every per-example rule against torch.func per-example gradients, in fp64 (1e-10).

Each case is a small model built around one layer (with the variations the rule must handle);
the reference is ``vmap(grad)`` over the whole model, and the check covers the per-example norms
(``info.norm``) and the clipped sum written into ``p.grad``, in every mode.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import gradclip
import gradclip.torch as gct
from tests._per_sample_models import (
    SmallCNN,
    TinyTransformer,
    clipped_sum,
    per_example_grads,
)

MODES = ["auto", "bk", "ghost", "instantiate", "vmap"]
C = 0.3


class Head(nn.Module):
    """``layer`` then a fixed random projection to a scalar per example."""

    def __init__(self, layer: nn.Module, pool: bool = True):
        super().__init__()
        self.layer, self.pool = layer, pool

    def forward(self, x):
        out = self.layer(x)
        out = out[0] if isinstance(out, tuple) else out
        weights = torch.sin(torch.arange(out[0].numel(), dtype=out.dtype)).view(out[0].shape)
        return (out * weights).flatten(1).sum(1).pow(2) if self.pool else out


class WithParameter(nn.Module):
    """A module with its own parameter and no rule (auto/vmap take torch.func)."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(x) * self.scale


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=False, kdim=8, vdim=8)

    def forward(self, x):  # x: (B, T, 8); attention runs sequence-first
        seq = x.transpose(0, 1)
        mask = torch.zeros(x.shape[0], x.shape[1], dtype=torch.bool)
        mask[:, -1] = True
        return self.attn(seq, seq, seq, key_padding_mask=mask, need_weights=False)[0].transpose(0, 1)


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 11, (5, 6), generator=g)
    ids[0, :2] = 3  # repeated ids and the padding id
    ids[1, 1:4] = 3
    rms = [("rmsnorm", lambda: nn.RMSNorm((3, 4)), lambda: r(5, 2, 3, 4))] if hasattr(nn, "RMSNorm") else []
    return [
        ("linear-2d", lambda: nn.Linear(7, 3), lambda: r(5, 7)),
        ("linear-4d", lambda: nn.Linear(4, 3), lambda: r(5, 2, 3, 4)),
        ("linear-wide", lambda: nn.Linear(2, 2), lambda: r(5, 9, 2)),  # 2T² > pd: instantiated
        ("linear-ghost", lambda: nn.Linear(16, 16), lambda: r(5, 3, 16)),  # pd > T(p + d): ghost norm
        ("embedding", lambda: nn.Embedding(11, 4, padding_idx=3), lambda: ids),
        ("embedding-noncontig", lambda: nn.Embedding(11, 4), lambda: ids.t().contiguous().t()),
        ("conv1d", lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), lambda: r(5, 4, 11)),
        ("conv2d", lambda: nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding="same" if False else 1), lambda: r(5, 2, 6, 5)),
        ("conv2d-same", lambda: nn.Conv2d(2, 2, 4, padding="same", padding_mode="reflect"), lambda: r(5, 2, 6, 6)),
        ("conv2d-groups", lambda: nn.Conv2d(4, 4, 3, groups=4, padding_mode="circular", padding=1), lambda: r(5, 4, 5, 5)),
        ("conv3d", lambda: nn.Conv3d(2, 4, 2, stride=(1, 2, 1), dilation=(2, 1, 1), groups=2), lambda: r(5, 2, 5, 4, 3)),
        # Eight input channels per group or more: instantiated by the folded weight-gradient kernel
        # (native symmetric padding; an asymmetric 'same' padded first); 3-d as well.
        ("conv2d-folded", lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1), lambda: r(5, 8, 7, 7)),
        ("conv2d-folded-same", lambda: nn.Conv2d(16, 4, 4, padding="same", groups=2), lambda: r(5, 16, 5, 5)),
        ("conv3d-folded", lambda: nn.Conv3d(8, 2, 2, stride=2, padding=1), lambda: r(5, 8, 3, 4, 4)),
        # Two positions, T²(p + d) < pd: ghost-normed, the clipped sum by the conv's own kernel.
        ("conv1d-ghost", lambda: nn.Conv1d(8, 8, 3, dilation=2), lambda: r(5, 8, 6)),
        # Outputs rewritten in place afterwards (a new grad_fn on the same tensor): each rule
        # still gets the gradient of the output its module returned.
        ("inplace-after", lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(inplace=True)),
         lambda: r(5, 2, 5, 5)),
        ("inplace-after-linear", lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.ReLU(inplace=True)),
         lambda: r(5, 2, 4)),
        ("layernorm", lambda: nn.LayerNorm((3, 4)), lambda: r(5, 2, 3, 4)),
        ("groupnorm", lambda: nn.GroupNorm(2, 4), lambda: r(5, 4, 3, 2)),
        ("mha", MHA, lambda: r(5, 4, 8)),
        *rms,
    ]


CASES = _cases()


def _perturb(model: nn.Module) -> None:
    # Normalization layers start at weight 1, bias 0; move them so every term matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule_matches_torch_func_fp64(case, mode):
    torch.manual_seed(1)
    _, make, data = case
    model = Head(make()).double()
    _perturb(model)
    x = data()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = per_example_grads(model, lambda out, x: out, x)
    # A bound between two norms: some examples are clipped, the others keep coef 1.
    ordered = torch.cat([g.flatten(1) for g in ref.values()], 1).norm(dim=1).sort().values
    bound = float(ordered[1:3].mean())
    norms, want = clipped_sum(ref, bound)
    ps = gct.PerSample(model, gradclip.GlobalNorm(bound), mode=mode)
    info = ps.backward(model(x))
    assert info.norm.shape == (x.shape[0],)
    torch.testing.assert_close(info.norm, norms, rtol=1e-10, atol=1e-10)
    assert bool((info.coef < 1).any()) and bool((info.coef == 1).any())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-10, msg=name)
        if mode == "instantiate":
            torch.testing.assert_close(p.grad_sample, ref[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_tied_frozen_and_custom_parameters(mode):
    torch.manual_seed(2)
    model = TinyTransformer(tied=True).double()
    model.ln1.weight.requires_grad_(False)  # frozen: skipped, never given a gradient
    ids = torch.randint(0, 23, (4, 5))
    loss = lambda out, ids: out.pow(2).sum(-1)
    with sdpa_kernel([SDPBackend.MATH]):
        ref = per_example_grads(model, loss, ids)
    norms, want = clipped_sum(ref, C)
    ps = gct.PerSample(model, gradclip.GlobalNorm(C), mode=mode)
    info = ps.backward(loss(model(ids), ids))
    torch.testing.assert_close(info.norm, norms, rtol=1e-10, atol=1e-10)
    assert model.ln1.weight.grad is None
    names = dict(model.named_parameters())  # the tied weight appears once
    assert "head.weight" not in names
    assert set(want) == {n for n, p in names.items() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(names[name].grad, want[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("mode", ["auto", "vmap"])
def test_module_without_rule_goes_through_torch_func(mode):
    torch.manual_seed(3)
    model = Head(WithParameter(4)).double()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    ref = per_example_grads(model, lambda out, x: out, x)
    norms, want = clipped_sum(ref, C)
    info = gct.PerSample(model, gradclip.GlobalNorm(C), mode=mode).backward(model(x))
    torch.testing.assert_close(info.norm, norms, rtol=1e-10, atol=1e-10)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["bk", "ghost", "instantiate"])
def test_module_without_rule_refused_without_fallback(mode):
    with pytest.raises(gradclip.InvalidArgumentError, match=r"layer \(WithParameter\).*mode='auto'"):
        gct.PerSample(Head(WithParameter(4)), gradclip.GlobalNorm(1.0), mode=mode)


@pytest.mark.parametrize("mode", ["bk", "ghost", "auto"])
def test_per_layer_norm_clipper(mode):
    torch.manual_seed(4)
    model = SmallCNN().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    loss = lambda out, x, y: nn.functional.cross_entropy(out, y, reduction="none")
    ref = per_example_grads(model, loss, x, y)
    bound = 0.05
    ps = gct.PerSample(model, gradclip.Norm(bound), mode=mode)
    info = ps.backward(loss(model(x), x, y))
    for name, p in model.named_parameters():
        per = ref[name].flatten(1).norm(dim=1)
        coef = torch.where(per > bound, bound / per, torch.ones_like(per))
        torch.testing.assert_close(p.grad, torch.tensordot(coef, ref[name], dims=1), rtol=1e-9, atol=1e-12)
    total = torch.cat([g.flatten(1) for g in ref.values()], 1).norm(dim=1)
    torch.testing.assert_close(info.norm, total, rtol=1e-10, atol=1e-10)
    assert info.coef.shape == (4,) and bool((info.coef < 1).all())


CHUNKED = [c for c in CASES if c[0] in ("conv2d", "conv1d-ghost", "layernorm", "inplace-after")]


@pytest.mark.parametrize("case", CHUNKED, ids=[c[0] for c in CHUNKED])
def test_rules_one_chunk_of_examples_at_a_time(case, monkeypatch):
    # Patches and recomputed normalizations are built a chunk of examples at a time to bound
    # memory; with one example per chunk the results are the same.
    from gradclip.torch import per_sample_rules

    monkeypatch.setattr(per_sample_rules, "_CHUNK_ELEMENTS", 1)
    test_rule_matches_torch_func_fp64(case, "bk")
