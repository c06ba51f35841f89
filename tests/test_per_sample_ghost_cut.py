"""Ghost mode's cut: the first pass frees the graph above a layer's input, exactly.

With a cut at the input ``h`` of one call, ghost mode's first pass does not retain the graph
above ``h``; the layers above it get their clipped sum book-keeping style and the layers below
a backward from ``h`` with each row of the first pass's gradient scaled by its example's
coefficient. Every case is checked against torch.func per-example gradients in fp64 (1e-10),
with the cut at every layer where it may go, chosen automatically, and refused where it is not
safe (a skip connection around it).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn

import gradclip
import gradclip.torch as gct
import gradclip.torch.per_sample as per_sample_module
from tests._per_sample_models import clipped_sum, per_example_grads


def _cnn() -> nn.Sequential:
    # Wide early activations, a narrow head: the shape where the automatic cut pays.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 5),
    )


def _mlp() -> nn.Sequential:
    # The last layer's weight is the first's (tied across any cut between them); the middle
    # layer is frozen (no unit of its own, but part of both passes' graphs).
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6),
        nn.Linear(6, 6, bias=False),
    )
    model[6].weight = model[0].weight
    model[2].requires_grad_(False)
    return model


class _Residual(nn.Module):
    """``c(b(tanh(a(x))) + a(x))``: a skip connection around ``b``'s input."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(torch.tanh(h)) + h)


def _data(model: nn.Module, g: torch.Generator) -> torch.Tensor:
    if isinstance(model[0] if isinstance(model, nn.Sequential) else model.a, nn.Conv2d):
        return torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64)
    width = 6 if isinstance(model, nn.Sequential) else 5
    return torch.randn(6, width, generator=g, dtype=torch.float64)


def _check(model: nn.Module, cut, monkeypatch) -> list:
    """Run ghost mode with ``cut`` against torch.func; returns the cuts the step took."""
    torch.manual_seed(0)
    with torch.no_grad():  # move normalization layers off weight 1, bias 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = _data(model, torch.Generator().manual_seed(1))
    loss = lambda out, x: out.pow(2).sum(-1)
    ref = per_example_grads(model, loss, x)
    ordered = torch.cat([r.flatten(1) for r in ref.values()], 1).norm(dim=1).sort().values
    bound = float(ordered[1:3].mean())  # some examples clipped, the others not
    norms, want = clipped_sum(ref, bound)
    taken = []
    find_cut = per_sample_module.find_cut
    monkeypatch.setattr(per_sample_module, "find_cut", lambda *a: taken.append(find_cut(*a)) or taken[-1])
    ps = gct.PerSample(model, gradclip.GlobalNorm(bound), mode="ghost", cut=cut)
    info = ps.backward(loss(model(x), x))
    torch.testing.assert_close(info.norm, norms, rtol=1e-10, atol=1e-10)
    assert bool((info.coef < 1).any()) and bool((info.coef == 1).any())
    names = dict(model.named_parameters())
    assert set(want) == {n for n, p in names.items() if p.requires_grad}
    for name in want:
        torch.testing.assert_close(names[name].grad, want[name], rtol=1e-10, atol=1e-10, msg=name)
    for name, p in names.items():
        if not p.requires_grad:
            assert p.grad is None, name
    return taken


CNN_CUTS = [1, 3, 4, 6, 9]  # every module with parameters but the first (whose input is data)
MLP_CUTS = [4, 5]  # above the frozen layer: the tied weight on both sides


@pytest.mark.parametrize("index", CNN_CUTS)
def test_cut_cnn_matches_torch_func_fp64(index, monkeypatch):
    model = _cnn().double()
    taken = _check(model, model[index], monkeypatch)
    assert taken and taken[0] is not None and len(taken[0].upper) == sum(
        1 for m in list(model)[index:] if any(p.requires_grad for p in m.parameters(recurse=False))
    )


@pytest.mark.parametrize("index", MLP_CUTS)
def test_cut_mlp_tied_weight_and_frozen_layer_fp64(index, monkeypatch):
    model = _mlp().double()
    taken = _check(model, model[index], monkeypatch)
    assert taken and taken[0] is not None


def test_cut_below_frozen_layer_fp64(monkeypatch):
    # The frozen layer and the Tanh between it and the cut are above the cut: their graph is
    # traversed once; the tied weight's lower use gets the rows scaled at the cut.
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()
    model[2].requires_grad_(False)
    model[4].weight = model[0].weight
    taken = _check(model, model[4], monkeypatch)
    assert taken[0] is not None and [c.unit.module for c in taken[0].upper] == [model[4]]


def test_auto_cut_on_cnn_fp64(monkeypatch):
    model = _cnn().double()
    taken = _check(model, "auto", monkeypatch)
    assert taken and taken[0] is not None  # wide early layers: the estimate says cut


def test_no_cut_around_skip_connection_fp64(monkeypatch):
    # The graph above b's input also reaches a(x) through the skip: a pass that freed it would
    # free part of the lower graph too. No cut; the result is still exact.
    model = _Residual().double()
    taken = _check(model, model.b, monkeypatch)
    assert taken == [None]


def test_cut_off_is_one_retained_pass(monkeypatch):
    model = _cnn().double()
    taken = _check(model, None, monkeypatch)
    assert taken == []  # never looked for


def test_cut_argument_checked():
    model = _cnn()
    with pytest.raises(gradclip.InvalidArgumentError, match="cut must be one of the model's modules"):
        gct.PerSample(model, gradclip.GlobalNorm(1.0), mode="ghost", cut=model[2])  # ReLU: no parameters
    with pytest.raises(gradclip.InvalidArgumentError, match="cut must be 'auto', None or a module"):
        gct.PerSample(model, gradclip.GlobalNorm(1.0), mode="ghost", cut="last")
