"""State of the adaptive and stateful clippers: checkpoints, validation, one update per step.

* Train 60 steps, checkpoint at step 30 into a fresh process, continue: thresholds, skip flags
  and gradients equal those of the uninterrupted run, bit for bit.
* ``state_dict()`` is plain data: strict JSON and ``torch.load(weights_only=True)``.
* ``load_state_dict`` rejects malformed or mismatched input with a :class:`StateError` and leaves
  the clipper exactly as it was.
* A second ``clip_``/``clip`` on the same, unchanged gradients raises (``allow_repeat=True`` is
  the documented escape); the pure ``init``/``update`` API works for every clipper.
"""

from __future__ import annotations

import copy
import json
import pathlib
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradclip
from adaptive_helpers import checkpoint_cases, grads_at, run_steps, snapshot, to_np, torch_params

torch = pytest.importorskip("torch")

TESTS_DIR = pathlib.Path(__file__).resolve().parent

_SCRIPT = textwrap.dedent(
    """
    import json, pickle, sys
    sys.path.insert(0, {tests!r})
    import torch
    import adaptive_helpers as h

    phase, workdir = sys.argv[1], sys.argv[2]
    if phase == "first":
        clippers = h.checkpoint_cases()
        first = h.run_steps(clippers, 0, 30)
        states = {{name: c.state_dict() for name, c in clippers.items()}}
        torch.save(states, workdir + "/ckpt.pt")
        with open(workdir + "/ckpt.json", "w") as f:
            json.dump(states, f, allow_nan=False)
        # This process goes on uninterrupted: the reference for the resumed run (a random key
        # drawn here, by Subset(seed=None), is then the same in both).
        rest = h.run_steps(clippers, 30, 60)
        with open(workdir + "/uninterrupted.pkl", "wb") as f:
            pickle.dump({{"first": first, "rest": rest}}, f)
    else:
        states = torch.load(workdir + "/ckpt.pt", weights_only=True)
        with open(workdir + "/ckpt.json") as f:
            assert json.load(f) == states
        clippers = h.checkpoint_cases()
        for name, clipper in clippers.items():
            clipper.load_state_dict(states[name])
        resumed = h.run_steps(clippers, 30, 60)
        with open(workdir + "/resumed.pkl", "wb") as f:
            pickle.dump(resumed, f)
    """
).format(tests=str(TESTS_DIR))


def _assert_same_run(expected, actual, label):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert len(expected[name]) == len(actual[name])
        for step, ((t1, s1, g1), (t2, s2, g2)) in enumerate(zip(expected[name], actual[name])):
            where = f"{label}: {name} step {step}"
            assert (t1 == t2) or (np.isnan(t1) and np.isnan(t2)), where
            assert s1 == s2, where
            for a, b in zip(g1, g2):
                np.testing.assert_array_equal(a, b, err_msg=where)


def test_checkpoint_at_step_30_resumes_in_a_fresh_process_exactly(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(_SCRIPT)
    for phase in ("first", "second"):
        subprocess.run([sys.executable, str(script), phase, str(tmp_path)], check=True, timeout=240)
    with open(tmp_path / "uninterrupted.pkl", "rb") as f:
        uninterrupted = pickle.load(f)
    with open(tmp_path / "resumed.pkl", "rb") as f:
        resumed = pickle.load(f)
    _assert_same_run(uninterrupted["rest"], resumed, "resumed vs uninterrupted")
    # The seeded cases are also reproducible across processes from scratch.
    here = run_steps({k: v for k, v in checkpoint_cases().items() if k != "subset_random_key"}, 0, 30)
    there = {k: v for k, v in uninterrupted["first"].items() if k != "subset_random_key"}
    _assert_same_run(there, here, "process vs process")
    # Something happened in the run: spikes were flagged, thresholds moved, NaN steps passed.
    assert any(s for _, s, _ in resumed["skip_on_spike"])
    assert len({t for t, _, _ in resumed["autoclip"]}) > 10


# -- plain data -----------------------------------------------------------------------------
def _advanced(name, steps=24):
    clipper = checkpoint_cases()[name]
    run_steps({name: clipper}, 0, steps)
    return clipper


STATEFUL = [name for name in checkpoint_cases() if name not in ("agc", "chain")]


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_is_strict_json_and_loads_with_weights_only(name, tmp_path):
    clipper = _advanced(name)
    state = clipper.state_dict()
    text = json.dumps(state, allow_nan=False)  # no NaN/inf anywhere
    assert json.loads(text) == state
    torch.save(state, tmp_path / "s.pt")
    assert torch.load(tmp_path / "s.pt", weights_only=True) == state
    twin = checkpoint_cases()[name]
    twin.load_state_dict(json.loads(text))
    assert twin.state_dict() == state


@pytest.mark.parametrize("name", STATEFUL)
def test_state_dict_before_first_step_is_none_and_loads(name):
    clipper = checkpoint_cases()[name]
    state = clipper.state_dict()
    assert state["state"] is None
    clipper.load_state_dict(state)


# -- rejection leaves everything as it was --------------------------------------------------
def _bad_variants(state_dict):
    """(label, bad state_dict) pairs derived from a good one."""
    sd = copy.deepcopy(state_dict)
    yield "not a mapping", [sd]
    yield "wrong format", {**sd, "format": "other"}
    yield "wrong version", {**sd, "version": 999}
    yield "other clipper", {**sd, "clipper": "global_norm"}
    config = copy.deepcopy(sd["config"])
    first = next(iter(config))
    config[first] = "changed"
    yield "other config", {**sd, "config": config}
    yield "state not a mapping", {**sd, "state": [1, 2]}
    fields = sd["state"]
    yield "missing field", {**sd, "state": {k: v for k, v in list(fields.items())[1:]}}
    yield "extra field", {**sd, "state": {**fields, "extra": 1}}
    for key, value in fields.items():
        yield f"{key}: string", {**sd, "state": {**fields, key: "x"}}
        if isinstance(value, list) and value:
            yield f"{key}: one short", {**sd, "state": {**fields, key: value[:-1]}}
            if isinstance(value[0], float):
                yield f"{key}: NaN", {**sd, "state": {**fields, key: [float("nan")] + value[1:]}}
                yield f"{key}: negative", {**sd, "state": {**fields, key: [-1.0] + value[1:]}}
        elif isinstance(value, bool):
            yield f"{key}: int for bool", {**sd, "state": {**fields, key: 3}}
        elif isinstance(value, int):
            yield f"{key}: negative", {**sd, "state": {**fields, key: -1}}
            yield f"{key}: bool", {**sd, "state": {**fields, key: True}}
            yield f"{key}: float", {**sd, "state": {**fields, key: 1.5}}
        elif isinstance(value, float):
            yield f"{key}: inf", {**sd, "state": {**fields, key: float("inf")}}
            yield f"{key}: negative", {**sd, "state": {**fields, key: -1.0}}
        elif isinstance(value, dict):  # Subset's inner checkpoint
            inner = copy.deepcopy(value)
            inner["clipper"] = "autoclip" if inner["clipper"] != "autoclip" else "zclip"
            yield f"{key}: other inner clipper", {**sd, "state": {**fields, key: inner}}


def _inconsistent_variants(name, state_dict):
    """Well-typed states that no run can reach (each would clip to zero or stall for ever)."""
    sd = copy.deepcopy(state_dict)
    fields = sd["state"]
    if name.startswith("zclip"):
        yield "zclip: zero mean after warm-up", {**sd, "state": {**fields, "mean": 0.0, "var": 0.0}}
        yield "zclip: a zero warm-up norm", {**sd, "state": {**fields, "warmup": [0.0] + fields["warmup"][1:]}}
    elif name == "skip_on_spike":
        yield "skip_on_spike: a zero in the window", {**sd, "state": {**fields, "window": [0.0] + fields["window"][1:]}}
    elif name == "adagc":
        yield "adagc: seen with gamma 0", {**sd, "state": {**fields, "gamma": [0.0] + fields["gamma"][1:]}}
        unseen = [False] + fields["seen"][1:]
        yield "adagc: unseen with gamma > 0", {**sd, "state": {**fields, "seen": unseen}}


@pytest.mark.parametrize("name", STATEFUL)
def test_load_state_dict_rejects_bad_input_and_changes_nothing(name):
    clipper = _advanced(name)
    twin = _advanced(name)
    before = snapshot(clipper)
    count = 0
    for label, bad in [*_bad_variants(before), *_inconsistent_variants(name, before)]:
        with pytest.raises(gradclip.StateError):
            clipper.load_state_dict(bad)
        assert clipper.state_dict() == before, label
        count += 1
    assert count >= 10
    # And it continues exactly as the twin that never saw a bad checkpoint.
    _assert_same_run(run_steps({name: twin}, 24, 30), run_steps({name: clipper}, 24, 30), "after rejections")


def test_state_errors_name_the_field_and_the_problem():
    clipper = _advanced("autoclip_window")
    sd = clipper.state_dict()
    with pytest.raises(gradclip.StateError, match=r"'history'.*list of 16"):
        clipper.load_state_dict({**sd, "state": {**sd["state"], "history": [0.0] * 3}})
    with pytest.raises(gradclip.StateError, match=r"config"):
        gradclip.AutoClip(history=8).load_state_dict(sd)
    sketch = _advanced("autoclip")
    sd = sketch.state_dict()
    with pytest.raises(gradclip.StateError, match="inconsistent"):
        sketch.load_state_dict({**sd, "state": {**sd["state"], "count": sd["state"]["count"] + 1}})
    # No norm counted yet, but extremes recorded: a state no run produces (the running maximum
    # starts from the first norm only because an empty sketch holds low == high == 0).
    before = snapshot(sketch)
    empty = {"bins": [0] * len(sd["state"]["bins"]), "count": 0, "low": 0.0, "high": 1.0, "anchor": 0.0}
    with pytest.raises(gradclip.StateError, match="inconsistent"):
        sketch.load_state_dict({**sd, "state": empty})
    assert snapshot(sketch) == before


def test_adagc_state_for_other_tensors_is_refused_at_call_time():
    clipper = gradclip.AdaGC(start_clip_steps=2)
    run_steps({"a": clipper}, 0, 3)
    before = snapshot(clipper)
    params = torch_params(grads_at(5)[:3])
    grads_before = [p.grad.clone() for p in params]
    with pytest.raises(gradclip.StateError, match="built for 6 tensor"):  # clip_ checks names and shapes first
        clipper.clip_(params)
    assert snapshot(clipper) == before
    for p, g in zip(params, grads_before):
        assert torch.equal(p.grad, g)


# -- one update per optimizer step ------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _backward(model, seed, set_to_none=True):
    model.zero_grad(set_to_none=set_to_none)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
    model(x).pow(2).sum().backward()


@pytest.mark.parametrize("name", STATEFUL)
def test_second_clip_in_place_on_unchanged_gradients_raises_and_changes_nothing(name):
    clipper = checkpoint_cases()[name]
    if clipper.needs_params:
        pytest.skip("stateless")
    model = _model()
    _backward(model, 0)
    clipper.clip_(model)
    before = snapshot(clipper)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(gradclip.StateError, match="allow_repeat=True"):
        clipper.clip_(model)
    assert snapshot(clipper) == before
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_new_gradients_after_backward_pass(set_to_none):
    clipper = gradclip.ZClip(warmup_steps=3)
    model = _model()
    for step in range(6):
        _backward(model, step, set_to_none=set_to_none)
        clipper.clip_(model)
    assert clipper.state_dict()["state"]["step"] == 6


def test_gradient_accumulation_into_the_same_tensors_counts_as_new():
    clipper = gradclip.AutoClip(history=4)
    model = _model()
    _backward(model, 0)
    clipper.clip_(model)
    x = torch.randn(3, 4)
    model(x).pow(2).sum().backward()  # accumulates into the existing .grad tensors
    clipper.clip_(model)


def test_allow_repeat_is_the_documented_escape():
    clipper = gradclip.AutoClip(history=4)
    model = _model()
    _backward(model, 0)
    clipper.clip_(model)
    clipper.clip_(model, allow_repeat=True)
    assert clipper.state_dict()["state"]["count"] == 2


def test_functional_clip_on_the_same_arrays_raises_too():
    clipper = gradclip.QuantileNorm()
    grads = [np.ones(3, np.float32), np.full((2, 2), 2.0, np.float32)]
    clipper.clip(grads)
    before = snapshot(clipper)
    with pytest.raises(gradclip.StateError):
        clipper.clip(grads)
    assert snapshot(clipper) == before
    grads[1][0, 0] = 3.0  # written in place: new gradients
    clipper.clip(grads)
    clipper.clip(grads, allow_repeat=True)
    clipper = gradclip.QuantileNorm()
    torch_grads = [torch.ones(3)]
    clipper.clip(torch_grads)
    with pytest.raises(gradclip.StateError):
        clipper.clip(torch_grads)
    torch_grads[0].mul_(2)
    clipper.clip(torch_grads)


def test_numpy_in_place_repeat_is_detected_and_new_contents_pass():
    clipper = gradclip.ZClip(warmup_steps=2)
    grads = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    clipper.clip_(grads)
    with pytest.raises(gradclip.StateError):
        clipper.clip_(grads)
    np.copyto(grads[0], np.ones((2, 3), np.float32))
    clipper.clip_(grads)


def test_stateless_clippers_may_repeat():
    model = _model()
    _backward(model, 0)
    for clipper in (gradclip.GlobalNorm(1.0), gradclip.AGC(), gradclip.chain(gradclip.Value(clip_value=1.0), gradclip.Norm(1.0))):
        clipper.clip_(model)
        clipper.clip_(model)


def test_chain_with_a_stateful_link_is_guarded():
    clipper = gradclip.chain(gradclip.GlobalNorm(5.0), gradclip.AutoClip(history=3))
    model = _model()
    _backward(model, 0)
    clipper.clip_(model)
    with pytest.raises(gradclip.StateError):
        clipper.clip_(model)


def test_reset_and_load_state_dict_forget_the_last_gradients():
    clipper = gradclip.AutoClip(history=4)
    model = _model()
    _backward(model, 0)
    clipper.clip_(model)
    saved = clipper.state_dict()
    clipper.reset()
    clipper.clip_(model)  # a fresh start may see them again
    clipper.load_state_dict(saved)
    clipper.clip_(model)


def test_pure_update_never_checks():
    clipper = gradclip.ZClip(warmup_steps=2)
    grads = [np.ones(3, np.float32)]
    state = clipper.init(grads)
    for _ in range(4):
        _, state, _ = clipper.update(grads, state)
    assert int(state.step) == 4


# -- the pure API ---------------------------------------------------------------------------
# An unseeded Subset draws a fresh random key per instance by design: two instances differ.
@pytest.mark.parametrize("name", [name for name in STATEFUL if name != "subset_random_key"])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_pure_init_update_equals_the_stateful_object(name, framework):
    stateful, pure = checkpoint_cases()[name], checkpoint_cases()[name]
    state = None
    for step in range(16):
        arrays = grads_at(step, spikes=(9,), nan_steps=(4,))
        if framework == "torch":
            arrays = [torch.from_numpy(a) for a in arrays]
        if state is None:
            state = pure.init(arrays)
        expected, info = stateful.clip(arrays)
        got, state, pure_info = pure.update(arrays, state)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(to_np(a), to_np(b))
        assert to_np(info.threshold) == to_np(pure_info.threshold) or np.isnan(to_np(info.threshold))
    assert type(state) is stateful.state_type
