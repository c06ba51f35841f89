"""NonFinite: the non-finite policy as a clipper of its own, with counters."""

from __future__ import annotations

import numpy as np
import pytest

import gradclip
from adaptive_helpers import snapshot

torch = pytest.importorskip("torch")

GOOD = [np.ones(3, np.float32), np.full((2, 2), 2.0, np.float32)]


def _bad():
    return [np.asarray([1.0, np.nan, 2.0], np.float32), np.full((2, 2), 2.0, np.float32)]


def test_skip_flags_the_step_and_leaves_gradients_alone():
    clipper = gradclip.NonFinite()
    out, info = clipper.clip(_bad())
    assert bool(info.skip) and not bool(info.finite)
    assert np.isnan(out[0][1]) and np.array_equal(out[1], _bad()[1])
    out, info = clipper.clip([g.copy() for g in GOOD])
    assert not bool(info.skip) and bool(info.finite)
    assert all(np.array_equal(o, g) for o, g in zip(out, GOOD))
    assert clipper.state_dict()["state"] == {"consecutive": 0, "total": 1}


def test_max_consecutive_follows_optax_apply_if_finite():
    """optax: a step is skipped while the run of non-finite steps (itself included) is
    <= max_consecutive_errors; past that the update goes through."""
    clipper = gradclip.NonFinite(max_consecutive=2)
    flags = [bool(clipper.clip(_bad())[1].skip) for _ in range(4)]
    assert flags == [True, True, False, False]
    clipper.clip([g.copy() for g in GOOD])  # a finite step resets the run
    assert bool(clipper.clip(_bad())[1].skip)
    assert clipper.state_dict()["state"] == {"consecutive": 1, "total": 5}
    zero_limit = gradclip.NonFinite(max_consecutive=0)
    assert not bool(zero_limit.clip(_bad())[1].skip)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_zero_replaces_nonfinite_elements(framework):
    grads = [np.asarray([1.0, np.nan, -np.inf], np.float32)]
    if framework == "torch":
        grads = [torch.from_numpy(grads[0])]
    clipper = gradclip.NonFinite("zero")
    (out,), info = clipper.clip(grads)
    assert list(np.asarray(out)) == [1.0, 0.0, 0.0]
    assert bool(info.clipped) and not bool(info.finite) and not bool(info.skip)
    assert clipper.state_dict()["state"]["total"] == 1


def test_raise_names_the_tensors_and_changes_nothing():
    clipper = gradclip.NonFinite("raise")
    clipper.clip([g.copy() for g in GOOD])
    before = snapshot(clipper)
    bad = _bad()
    with pytest.raises(gradclip.NonFiniteError, match="#0") as excinfo:
        clipper.clip_(bad)
    assert excinfo.value.offenders == ["#0"]
    assert snapshot(clipper) == before and np.isnan(bad[0][1])


def test_propagate_only_counts():
    clipper = gradclip.NonFinite("propagate")
    out, info = clipper.clip(_bad())
    assert not bool(info.skip) and np.isnan(out[0][1])
    assert clipper.state_dict()["state"]["total"] == 1


def test_in_a_chain_before_an_adaptive_clipper():
    clipper = gradclip.chain(gradclip.NonFinite("zero"), gradclip.AutoClip(history=4))
    clipper.clip(_bad())
    out, info = clipper.clip([np.asarray([1.0, np.inf, 2.0], np.float32), GOOD[1].copy()])
    assert np.all(np.isfinite(out[0]))
    links = clipper.state_dict()["state"]["links"]
    assert links[0]["state"]["total"] == 2 and links[1]["state"]["count"] == 2


def test_registry_default():
    clipper = gradclip.get("non_finite")
    assert clipper.policy == "skip" and clipper.max_consecutive is None


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"policy": "ignore"}, r"policy must be one of 'propagate', 'raise', 'zero', 'skip'; got 'ignore'"),
        ({"policy": None}, r"policy must be one of .*; got None"),
        ({"max_consecutive": -1}, r"max_consecutive must be an integer >= 0 or None, got -1"),
        ({"max_consecutive": 2.5}, r"max_consecutive .* got 2\.5"),
        ({"policy": "zero", "max_consecutive": 3}, r"max_consecutive applies to policy='skip' only"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.NonFinite(**kwargs)
    assert str(excinfo.value).startswith("NonFinite: ")
