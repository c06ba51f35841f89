"""``gradclip.get("none")``: clipping off as a clipper like any other (measures, reports, changes
nothing), in code as on the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradclip
from gradclip.experiments.spec import parse_spec


def test_get_none_measures_and_reports_the_norm_and_changes_nothing():
    clipper = gradclip.get("none")
    assert isinstance(clipper, gradclip.NoClip) and clipper.name == "none"
    assert "none" in gradclip.available()
    grads = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]
    out, info = clipper.clip(grads)
    for a, b in zip(out, grads):
        np.testing.assert_array_equal(a, b)
    assert info.to_dict() == {"norm": 13.0, "threshold": math.inf, "coef": 1.0, "clipped": False,
                              "finite": True, "skip": False}
    assert gradclip.get("none", norm_type=math.inf).clip(grads)[1].to_dict()["norm"] == 12.0


def test_non_finite_gradients_pass_through_and_are_reported():
    grads = [np.array([1.0, np.nan], np.float32)]
    out, info = gradclip.NoClip().clip(grads)
    assert np.isnan(out[0][1]) and out[0][0] == 1.0
    assert not info.to_dict()["finite"] and not info.to_dict()["skip"]


def test_torch_in_place_fold_and_checkpoint():
    torch = pytest.importorskip("torch")
    import gradclip.torch as gct

    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).pow(2).sum().mul(1e3).backward()
    before = [p.grad.clone() for p in model.parameters()]
    info = gradclip.get("none").clip_(model)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in before]))
    torch.testing.assert_close(info.norm, expected)
    # Folded into a fused optimizer, no gradient scale at all: the step is the bare step.
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(model.state_dict())
    for p, b in zip(twin.parameters(), before):
        p.grad = b.clone()
    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, fused=True), gradclip.get("none"))
    bare = torch.optim.AdamW(twin.parameters(), lr=0.1, fused=True)
    opt.step()
    bare.step()
    assert opt.folded
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    state = opt.clipper.state_dict()
    assert json.loads(json.dumps(state)) == state and state["config"] == {"norm_type": 2.0}


def test_bad_norm_type_is_refused_clearly():
    with pytest.raises(gradclip.InvalidArgumentError, match=r"NoClip: norm_type"):
        gradclip.get("none", norm_type=0)


def test_the_command_line_keeps_its_none_spec():
    spec = parse_spec("none")
    assert spec.name == "none" and spec.build() is None  # the runner's "no clipping" entry
    with pytest.raises(gradclip.InvalidArgumentError, match="'none' takes no parameters"):
        parse_spec("none:norm_type=1")


def test_the_command_line_lists_none_once_among_the_valid_names():
    with pytest.raises(gradclip.UnknownNameError) as caught:
        parse_spec("nope")
    names = str(caught.value).split("valid names: ")[1].split(", ")
    assert names[0] == "none" and names.count("none") == 1 and set(names) == set(gradclip.available())
