"""AdaGC (Wang et al. 2025): per-tensor clipping against an EMA of each tensor's clipped norm."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from adaptive_helpers import to_np

torch = pytest.importorskip("torch")


def paper_adagc(steps, clip_ratio=1.04, beta=0.99, start=100, warm_max=1.0, eps=1e-6):
    """Algorithm 1 of arXiv:2502.11034 in float64, as published: γ starts at +inf, the running
    minimum and the EMA take every norm (zeros included)."""
    gamma = None
    out = []
    for t, grads in enumerate(steps):
        norms = np.asarray([np.linalg.norm(np.asarray(g, np.float64)) for g in grads])
        if gamma is None:
            gamma = np.full(len(grads), np.inf)
        if t < start:
            total = math.sqrt(float(np.sum(norms**2)))
            h = warm_max / (total + eps) if total > warm_max else 1.0
            clipped = [np.asarray(g, np.float64) * h for g in grads]
            gamma = np.minimum(gamma, norms * h)
        else:
            h = np.where(norms > clip_ratio * gamma, clip_ratio * gamma / (norms + eps), 1.0)
            clipped = [np.asarray(g, np.float64) * hi for g, hi in zip(grads, h)]
            gamma = beta * gamma + (1 - beta) * norms * h
        out.append((clipped, gamma.copy()))
    return out


def _sequence(n=40, seed=0, spike=30):
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(n):
        scale = 0.5 + 0.2 * math.sin(t)
        grads = [(rng.normal(size=s) * scale).astype(np.float32) for s in [(4, 3), (3,), (5,)]]
        if t == spike:
            grads[0] *= 40.0
        steps.append(grads)
    return steps


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_matches_the_papers_algorithm(framework):
    steps = _sequence()
    reference = paper_adagc(steps, start=10)
    clipper = gradclip.AdaGC(start_clip_steps=10)
    clipped = []
    for t, (grads, (expected, gamma)) in enumerate(zip(steps, reference)):
        inputs = grads
        if framework == "torch":
            grads = [torch.from_numpy(g) for g in grads]
        out, info = clipper.clip(grads)
        for o, e in zip(out, expected):
            np.testing.assert_allclose(to_np(o), e, rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
        np.testing.assert_allclose(clipper.state_dict()["state"]["gamma"], gamma, rtol=2e-5)
        # info.clipped says whether the paper's rule changed a tensor at this step.
        changed = any(not np.allclose(e, np.asarray(g, np.float64), rtol=1e-6, atol=0) for e, g in zip(expected, inputs))
        assert bool(info.clipped) == changed, f"step {t}"
        clipped.append(bool(info.clipped))
    assert clipped[30]  # the spike after warm-up


def test_warm_up_is_global_clipping_and_gamma_the_running_minimum():
    clipper = gradclip.AdaGC(start_clip_steps=5, warmup_max_norm=1.0)
    grads = [np.full(4, 3.0, np.float32), np.full(4, 4.0, np.float32)]  # global norm 10
    out, info = clipper.clip(grads)
    assert math.sqrt(sum(float(np.sum(o.astype(np.float64) ** 2)) for o in out)) == pytest.approx(1.0, rel=1e-5)
    assert float(info.threshold) == 1.0
    np.testing.assert_allclose(clipper.state_dict()["state"]["gamma"], [0.6, 0.8], rtol=1e-5)
    clipper.clip([g * np.float32(0.01) for g in grads])  # smaller: the minimum moves down
    np.testing.assert_allclose(clipper.state_dict()["state"]["gamma"], [0.06, 0.08], rtol=1e-5)


def test_after_warm_up_each_tensor_is_bounded_by_its_own_history():
    clipper = gradclip.AdaGC(start_clip_steps=2)
    small = [np.full(4, 0.1, np.float32), np.full(4, 0.1, np.float32)]
    clipper.clip(small)
    clipper.clip([s.copy() for s in small])
    gamma = np.asarray(clipper.state_dict()["state"]["gamma"])
    spike = [np.full(4, 50.0, np.float32), np.full(4, 0.1, np.float32)]
    out, info = clipper.clip(spike)
    assert np.linalg.norm(out[0]) == pytest.approx(1.04 * gamma[0], rel=1e-4)
    assert np.array_equal(out[1], spike[1])  # the quiet tensor is untouched
    assert bool(info.clipped)
    # The threshold reported bounds the clipped global norm.
    assert float(info.threshold) == pytest.approx(1.04 * math.sqrt(float(np.sum(gamma**2))), rel=1e-5)


def test_deviation_a_zero_gradient_during_warm_up_does_not_freeze_the_tensor():
    """The paper's running minimum makes γ = 0 for a tensor whose gradient is zero during
    warm-up (zero-initialised branch): afterwards it is clipped to zero for ever. Here zero
    norms do not update γ, and the tensor starts its γ from its first positive norm."""
    steps = [[np.ones(3, np.float32), np.zeros(3, np.float32)] for _ in range(3)]
    steps += [[np.ones(3, np.float32), np.full(3, 0.5, np.float32)] for _ in range(4)]
    paper = paper_adagc(steps, start=3)
    assert np.count_nonzero(paper[-1][0][1]) == 0  # frozen at zero in the paper's rule
    clipper = gradclip.AdaGC(start_clip_steps=3)
    for grads in steps:
        out, _ = clipper.clip(grads)
    np.testing.assert_allclose(out[1], 0.5)  # ours trains it
    state = clipper.state_dict()["state"]
    assert state["seen"] == [True, True] and state["gamma"][1] == pytest.approx(math.sqrt(0.75), rel=1e-5)


def test_nonfinite_steps_leave_the_state_alone():
    clipper = gradclip.AdaGC(start_clip_steps=2)
    clipper.clip([np.ones(2, np.float32)])
    before = clipper.state_dict()
    out, info = clipper.clip([np.asarray([np.nan, 1.0], np.float32)])
    assert not bool(info.finite) and clipper.state_dict() == before
    out, info = gradclip.AdaGC(nonfinite="skip").clip([np.asarray([np.inf], np.float32)])
    assert bool(info.skip)


def _advanced(start=2, steps=3):
    clipper = gradclip.AdaGC(start_clip_steps=start)
    for t in range(steps):
        clipper.clip([np.full(3, 0.5 + 0.1 * t, np.float32), np.zeros(2, np.float32), np.ones(4, np.float32)])
    return clipper


@pytest.mark.parametrize(
    "change,pattern",
    [
        ({"gamma": [0.0, 0.0, 1.0], "seen": [True, False, True]}, r"tensor #0 has seen=True with gamma=0\.0"),
        ({"gamma": [0.5, 2.0, 1.0], "seen": [True, False, True]}, r"tensor #1 has seen=False with gamma=2\.0"),
        ({"step": 0}, r"step is 0 but 2 tensor\(s\) are marked seen"),
    ],
    ids=["seen-with-zero-gamma", "unseen-with-gamma", "seen-before-any-step"],
)
def test_load_state_dict_refuses_states_that_cannot_arise(change, pattern):
    """Seen with γ = 0 would clip that tensor to zero for ever; none of these can come from a run."""
    clipper = _advanced()
    sd = clipper.state_dict()
    state = sd["state"]
    assert state["seen"] == [True, False, True] and state["gamma"][1] == 0.0
    with pytest.raises(gradclip.StateError, match=pattern):
        clipper.load_state_dict({**sd, "state": {**state, **change}})
    assert clipper.state_dict() == sd


def test_gamma_never_underflows_to_zero():
    """A positive norm whose clipped value underflows fp32 does not set γ (nor mark it seen)."""
    clipper = gradclip.AdaGC(start_clip_steps=1, warmup_max_norm=1e-38)
    tiny = np.asarray([1e-18], np.float32)  # its clipped norm, ~1e-56, underflows fp32
    big = np.asarray([1.0], np.float32)  # makes the warm-up coefficient ~1e-38
    clipper.clip([tiny, big])
    state = clipper.state_dict()["state"]
    assert state["seen"] == [False, True] and state["gamma"][0] == 0.0
    gradclip.AdaGC(start_clip_steps=1, warmup_max_norm=1e-38).load_state_dict(clipper.state_dict())  # consistent


def test_an_fp64_norm_beyond_fp32_never_stores_an_infinite_gamma():
    """An unseen fp64 tensor's first norm of 1e40 does not fit γ's fp32: it informs nothing
    (γ = inf would never clip again, and could not be saved and loaded); the next
    representable norm starts γ."""
    clipper = gradclip.AdaGC(start_clip_steps=1)
    seen_tensor = np.asarray([0.5], np.float64)
    clipper.clip([seen_tensor, np.zeros(1, np.float64)])  # warm-up: the second tensor stays unseen
    huge = np.asarray([1e40], np.float64)
    out, info = clipper.clip([seen_tensor, huge])
    assert out[1][0] == 1e40  # an unseen tensor has no bound yet (documented), and is not made inf
    state = clipper.state_dict()["state"]
    assert state["seen"] == [True, False] and state["gamma"] == [0.5, 0.0]
    assert state["step"] == 2 and bool(info.finite)
    restored = gradclip.AdaGC(start_clip_steps=1)
    restored.load_state_dict(clipper.state_dict())
    out, _ = restored.clip([seen_tensor, np.asarray([2.0], np.float64)])
    state = restored.state_dict()["state"]
    assert state["seen"] == [True, True] and state["gamma"][1] == 2.0 and out[1][0] == 2.0


def test_dtype_preserved_and_registry_default():
    out, _ = gradclip.AdaGC().clip([torch.ones(3, dtype=torch.bfloat16) * 100])
    assert out[0].dtype == torch.bfloat16
    clipper = gradclip.get("adagc")
    assert (clipper.clip_ratio, clipper.beta, clipper.start_clip_steps) == (1.04, 0.99, 100)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"clip_ratio": 0.0}, r"clip_ratio must be in \(0, inf\), got 0\.0"),
        ({"clip_ratio": float("inf")}, r"clip_ratio .* got inf"),
        ({"beta": 1.0}, r"beta must be in \[0, 1\), got 1\.0"),
        ({"beta": -0.5}, r"beta .* got -0\.5"),
        ({"start_clip_steps": 0}, r"start_clip_steps must be an integer >= 1, got 0"),
        ({"start_clip_steps": 10.0}, r"start_clip_steps .* got 10\.0"),
        ({"warmup_max_norm": 0.0}, r"warmup_max_norm must be in \(0, inf\), got 0\.0"),
        ({"warmup_max_norm": "1"}, r"warmup_max_norm must be a real number, got '1'"),
        ({"eps": -1e-6}, r"eps must be in \[0, inf\), got -1e-06"),
        ({"nonfinite": "x"}, r"nonfinite must be one of .*; got 'x'"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.AdaGC(**kwargs)
    assert str(excinfo.value).startswith("AdaGC: ")


def test_a_parameter_without_a_gradient_cannot_shift_the_thresholds():
    """Same tensor count, another parameter missing: positions would shift onto other tensors'
    γ silently; clip_ refuses, names the position, and changes nothing."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    clipper = gradclip.AdaGC(start_clip_steps=1)

    def backward(missing):
        model.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        getattr(model[int(missing[0])], missing[2:]).grad = None

    backward("0.bias")
    clipper.clip_(model)
    state = clipper.state_dict()
    backward("1.bias")  # three gradients again: 0.bias now sits where 1.weight's γ is
    grads = [p.grad.clone() if p.grad is not None else None for p in model.parameters()]
    with pytest.raises(gradclip.StateError, match=r"AdaGC\.clip_: .*position 1 held 1\.weight \[3, 3\] and now holds 0\.bias \[3\]"):
        clipper.clip_(model)
    assert clipper.state_dict() == state
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    # The same layout as before passes; reset() (or loading a checkpoint) starts afresh.
    backward("0.bias")
    clipper.clip_(model)
    clipper.reset()
    backward("1.bias")
    clipper.clip_(model)


def test_a_chain_that_loads_a_checkpoint_forgets_its_links_tensor_layout():
    """The layout AdaGC remembers is that of its own state: loading a checkpoint (here through a
    Chain, which validates its links on copies first) replaces the state, so the layout the
    links saw before must not be held against the loaded state's tensors."""
    import torch

    def params(shapes):
        out = []
        for shape in shapes:
            p = torch.nn.Parameter(torch.zeros(shape))
            p.grad = torch.ones(shape)
            out.append(p)
        return out

    saved = gradclip.chain(gradclip.AdaGC(start_clip_steps=1), gradclip.GlobalNorm(10.0))
    saved.clip_(params([(2,), (3,)]))
    checkpoint = saved.state_dict()
    resumed = gradclip.chain(gradclip.AdaGC(start_clip_steps=1), gradclip.GlobalNorm(10.0))
    resumed.clip_(params([(4, 4), (4,), (5,)]))  # another model first
    resumed.load_state_dict(checkpoint)
    info = resumed.clip_(params([(2,), (3,)]))  # the checkpoint's tensors
    assert bool(info.finite)
    reference = gradclip.chain(gradclip.AdaGC(start_clip_steps=1), gradclip.GlobalNorm(10.0))
    reference.load_state_dict(checkpoint)
    reference.clip_(params([(2,), (3,)]))
    assert resumed.state_dict() == reference.state_dict()
