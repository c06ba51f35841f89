"""Scale invariance: multiplying the loss by 1e-3 ... 1e3 leaves AutoClip's and ZClip's clip
decisions unchanged (their thresholds are percentiles and z-scores of the norms themselves)."""

from __future__ import annotations

import pytest

import gradclip

torch = pytest.importorskip("torch")

SCALES = [1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3]
STEPS = 60


def _decisions(make_clipper, scale):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    clipper = make_clipper()
    decisions = []
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 8, generator=generator)
        if step in (23, 37, 38, 51):
            x = x * 12.0  # gradient spikes
        y = torch.randn(16, 1, generator=generator)
        model.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y) * scale
        loss.backward()
        decisions.append(bool(clipper.clip_(model).clipped))
    return decisions


@pytest.mark.parametrize(
    "make_clipper",
    [
        lambda: gradclip.AutoClip(),
        lambda: gradclip.AutoClip(percentile=50.0, history=16),
        lambda: gradclip.ZClip(warmup_steps=10),
        lambda: gradclip.ZClip(warmup_steps=10, mode="percentile", z_thresh=1.5),
    ],
    ids=["autoclip", "autoclip_window", "zclip", "zclip_percentile"],
)
def test_clip_decisions_do_not_depend_on_the_loss_scale(make_clipper):
    reference = _decisions(make_clipper, 1.0)
    assert any(reference) and not all(reference)  # the decisions are not trivial
    for scale in SCALES:
        assert _decisions(make_clipper, scale) == reference, f"loss scale {scale}"
