"""AdaClip and AdaGN: Stable-SPAM's gradient stabilisers against its published reference code.

The reference is TianjinYellow/StableSPAM, ``galore_torch/stablespam.py`` at commit
6a66da1ea7005f7fe7bc570b7968144b42163bed: the gradient part of ``StableSPAM.step`` (AdaClip, then
AdaGN, then the momentum reset every ``update_proj_gap`` steps, which resets the per-tensor step
counter) is transcribed below as :class:`ReferenceStableSpam`, line for line. The registry's
conformance suite runs both clippers on every backend, dtype and compiled path; the deviations
named in :mod:`gradclip.clippers.stable_spam` are ``test_deviation_*``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")


class ReferenceStableSpam:
    """StableSPAM.step's treatment of the gradients (``total_T=None``: ``scale = 1``), per
    parameter tensor, with its state; returns the gradients Adam would see."""

    def __init__(self, gamma1=0.7, gamma2=0.9, theta=0.999, eps=1e-8, update_proj_gap=0):
        self.gamma1, self.gamma2, self.theta, self.eps = gamma1, gamma2, theta, eps
        self.update_proj_gap, self.total_steps, self.state = update_proj_gap, 0, {}

    @torch.no_grad()
    def step(self, grads):
        self.total_steps += 1
        scale = 1.0
        out = []
        for index, grad in enumerate(grads):
            grad = grad.clone()
            state = self.state.setdefault(index, {})
            if "exp_avg" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(grad)
                state["exp_avg_sq"] = torch.zeros_like(grad)
                state["m_norm_t"] = 0
                state["v_norm_t"] = 0
                state["m_max_t"] = 0
            max_gradient = torch.max(grad.abs())
            m_max_t = state["m_max_t"]
            state["step"] += 1
            m_max_t = self.theta * m_max_t + (1 - self.theta) * max_gradient
            m_max_hat = m_max_t / (1 - self.theta ** state["step"])
            mask = grad.abs() > m_max_hat
            if mask.sum() > 0:
                grad[mask] = grad[mask] / max_gradient * m_max_hat
            state["m_max_t"] = m_max_t
            grad_norm = torch.norm(grad)
            m_norm_t, v_norm_t = state["m_norm_t"], state["v_norm_t"]
            m_norm_t = self.gamma1 * scale * m_norm_t + (1 - self.gamma1 * scale) * grad_norm
            v_norm_t = self.gamma2 * v_norm_t + (1 - self.gamma2) * grad_norm**2
            m_norm_hat = m_norm_t / (1 - (self.gamma1 * scale) ** state["step"])
            v_norm_hat = v_norm_t / (1 - self.gamma2 ** state["step"])
            c_norm_t = m_norm_hat / (torch.sqrt(v_norm_hat) + self.eps)
            if grad_norm > 0:
                grad = grad / grad_norm * c_norm_t
            state["m_norm_t"], state["v_norm_t"] = m_norm_t, v_norm_t
            if self.update_proj_gap != 0:
                if self.total_steps % self.update_proj_gap == 0:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                    state["step"] = 1
            out.append(grad)
        return out


SHAPES = [(8, 6), (8,), (3, 4, 5)]


def _grads(steps=80, seed=0, spikes=(25, 26, 60)):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        scale = 1.0 + 0.3 * math.sin(step / 7.0)
        grads = [torch.randn(s, generator=generator) * scale for s in SHAPES]
        if step in spikes:
            grads[step % len(SHAPES)].view(-1)[step % 5] *= 200.0
        out.append(grads)
    return out


def _ours(**kwargs):
    return gradclip.chain(gradclip.AdaClip(theta=kwargs.get("theta", 0.999)), gradclip.AdaGN(eps=kwargs.get("eps", 1e-8)))


def test_the_chain_matches_stable_spam_step_by_step():
    """AdaClip then AdaGN equal the reference's gradient path at every step, to fp32 rounding
    (the bias corrections are computed another way: see the module docstring)."""
    reference, ours = ReferenceStableSpam(), _ours()
    clipped_elements = 0
    for step, grads in enumerate(_grads()):
        expected = reference.step(grads)
        got, info = ours.clip([g.clone() for g in grads])
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-7, msg=lambda m, s=step: f"step {s}: {m}")
        clipped_elements += bool(info.clipped)
    assert clipped_elements > 0


def test_adaclip_alone_matches_the_reference_clip():
    """AdaClip's output is the reference's gradient right after its masking (AdaGN off: checked
    through the reference's state, m_max_t, and the clip decisions)."""
    reference = ReferenceStableSpam()
    clipper = gradclip.AdaClip()
    decisions = []
    for grads in _grads(steps=40):
        reference.step(grads)
        before = [g.clone() for g in grads]
        out, info = clipper.clip(before)
        expected_peaks = [float(reference.state[i]["m_max_t"] / (1 - 0.999 ** reference.state[i]["step"])) for i in range(3)]
        assert clipper.state_dict()["state"]["peak"] == pytest.approx(expected_peaks, rel=2e-6)
        for g, o, peak in zip(grads, out, expected_peaks):
            mask = g.abs() > peak
            expected = torch.where(mask, g / g.abs().max() * peak, g)
            torch.testing.assert_close(o, expected, rtol=2e-6, atol=0)
        decisions.append(bool(info.clipped))
    assert any(decisions) and not all(decisions)


def test_a_steady_gradient_is_never_clipped():
    """The estimate of a constant input is exactly that input, so the largest element of a
    steady gradient is not clipped by a rounding unit (a divided fp32 EMA can land below it)."""
    clipper = gradclip.AdaClip()
    g = np.array([1.0, -2.0, 3.0], np.float32)
    for _ in range(200):
        (out,), info = clipper.clip([g.copy()])
        assert not bool(info.clipped) and np.array_equal(out, g)


def test_adagn_scales_each_tensor_to_the_ratio_of_its_norm_statistics():
    clipper = gradclip.AdaGN(gamma1=0.5, gamma2=0.5, eps=0.0)
    norms = []
    for scale in (3.0, 1.0):
        out, info = clipper.clip([np.array([scale * 3.0, scale * 4.0], np.float32), np.zeros(2, np.float32)])
        norms.append(float(np.linalg.norm(out[0])))
        assert np.array_equal(out[1], [0.0, 0.0])  # a zero norm stays zero
    # Step 1: m̂ = 15, v̂ = 225: norm 1. Step 2 (norm 5): the raw EMAs are m = 0.5·7.5 + 0.5·5,
    # v = 0.5·112.5 + 0.5·25, both corrected by 1 - 0.5² = 0.75.
    assert norms[0] == pytest.approx(1.0, rel=1e-6)
    assert norms[1] == pytest.approx((6.25 / 0.75) / math.sqrt(68.75 / 0.75), rel=1e-6)
    assert float(info.threshold) == pytest.approx(norms[1], rel=1e-6)


def test_adagn_global_scope_is_one_foldable_coefficient():
    global_scope = gradclip.AdaGN(scope="global")
    assert global_scope.one_coefficient and not global_scope.per_tensor_state
    assert not gradclip.AdaGN().one_coefficient and gradclip.AdaGN().per_tensor_state
    grads = [np.array([3.0, 4.0], np.float32), np.array([12.0], np.float32)]
    out, info = global_scope.clip([g.copy() for g in grads])
    # First step: scaled to norm m̂ / (√v̂ + eps) = 13 / (13 + 1e-8): direction kept.
    assert float(info.coef) == pytest.approx(1.0 / 13.0, rel=1e-6)
    np.testing.assert_allclose(np.concatenate(out), np.concatenate(grads) / 13.0, rtol=1e-6)
    model = torch.nn.Linear(3, 1)
    model(torch.ones(2, 3)).sum().backward()
    folded = gradclip.AdaGN(scope="global").fold_(model)
    total = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters()))
    assert float(folded.coef) == pytest.approx(1.0 / total, rel=1e-5)


# -- deviations ---------------------------------------------------------------------------------------
def test_deviation_statistics_survive_the_momentum_reset():
    """update_proj_gap = 1000 (the reference's default): at step 1000 the reference resets its
    step counter to 1, so at step 1001 AdaClip's threshold is m_max_t / (1 - θ²), hundreds of
    times the running maximum, and a x100 element passes unclipped. Here the threshold stays
    near the running maximum and brings that element back to it."""
    generator = torch.Generator().manual_seed(3)
    grads = [[torch.randn(4, generator=generator), torch.randn(3, generator=generator)] for _ in range(1001)]
    grads[1000][0][0] = 100.0 * float(grads[1000][0].abs().max())
    reference = ReferenceStableSpam(update_proj_gap=1000)
    clipper = gradclip.AdaClip()
    for g in grads:
        reference_out = reference.step(g)
        (ours, _), info = clipper.clip([x.clone() for x in g])
    state = reference.state[0]
    assert state["step"] == 2  # reset to 1 after step 1000, then counted once
    inflated = float(state["m_max_t"] / (1 - 0.999 ** state["step"]))
    assert inflated > 100 * clipper.state_dict()["state"]["peak"][0]
    # The spike's element against the others: untouched by the reference (its AdaGN divides
    # every element by the same norm), brought near the running maximum here.
    ratio = lambda t: float(t[0].abs() / t[1:].abs().max())  # noqa: E731
    assert ratio(reference_out[0]) == pytest.approx(ratio(grads[1000][0]), rel=1e-5)
    assert ratio(grads[1000][0]) > 50.0 and ratio(ours) < 5.0 and bool(info.clipped)


def test_deviation_a_nonfinite_tensor_does_not_poison_the_statistics():
    grads = _grads(steps=6, spikes=())
    grads[3][1].view(-1)[0] = math.inf
    reference, clipper = ReferenceStableSpam(), gradclip.AdaClip()
    for g in grads:
        reference.step(g)
        out, info = clipper.clip([x.clone() for x in g])
    assert math.isinf(float(reference.state[1]["m_max_t"]))  # for ever
    peaks = clipper.state_dict()["state"]["peak"]
    assert all(math.isfinite(p) and p > 0 for p in peaks)
    (_, inf_out, _), info = clipper.clip([x.clone() for x in grads[3]])
    assert math.isinf(float(inf_out.view(-1)[0])) and not bool(info.finite)  # left as it is


def test_deviation_bf16_gradients_are_computed_in_fp32():
    """bf16 in, bf16 out, the rule computed in fp32 and rounded once."""
    clipper_bf16, clipper_fp32 = gradclip.AdaClip(), gradclip.AdaClip()
    for step, grads in enumerate(_grads(steps=30)):
        g16 = [g.to(torch.bfloat16) for g in grads]
        out16, _ = clipper_bf16.clip([g.clone() for g in g16])
        out32, _ = clipper_fp32.clip([g.float() for g in g16])
        for a, b in zip(out16, out32):
            assert a.dtype == torch.bfloat16
            assert torch.equal(a, b.to(torch.bfloat16)), step


# -- state and bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,change,pattern",
    [
        ("ada_clip", {"debias": [1.0, 0.5, 0.5]}, r"'debias' holds 1.0|bias correction must be in \[0, 1\)"),
        ("ada_clip", {"peak": [1.0, 1.0], "debias": [0.1, 0.1, 0.1]}, r"'debias' must be a list of 2"),
        ("ada_clip", {"peak": [1.0, -1.0, 1.0]}, r"'peak' holds -1.0"),
        ("ada_clip", {"peak": [1.0, 1.0, 1.0], "debias": [0.1, 0.0, 0.1]}, r"entry #1 has peak=1.0 with debias=0.0"),
        ("ada_gn", {"debias_mean": [0.3, 0.0, 0.3]}, r"entry #1 has mean=.* with debias_mean=0.0"),
        ("ada_gn", {"square": [1.0, math.nan, 1.0]}, r"finite float"),
    ],
)
def test_bad_state_is_refused_and_nothing_changes(name, change, pattern):
    clipper = gradclip.get(name)
    clipper.clip([np.ones(s, np.float32) for s in SHAPES])
    good = clipper.state_dict()
    with pytest.raises(gradclip.StateError, match=pattern):
        clipper.load_state_dict({**good, "state": {**good["state"], **change}})
    assert clipper.state_dict() == good
    resumed = gradclip.get(name)
    resumed.load_state_dict(json.loads(json.dumps(good)))
    assert resumed.state_dict() == good


@pytest.mark.parametrize("name", ["ada_clip", "ada_gn"])
def test_the_state_refuses_another_tensor_layout(name):
    clipper = gradclip.get(name)
    state = clipper.init([np.ones(2, np.float32) for _ in range(3)])
    with pytest.raises(gradclip.StateError, match="tracks 3 tensor"):
        clipper.update([np.ones(2, np.float32) for _ in range(2)], state)
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    clipper.clip_(model)
    model.bias.grad = None
    with pytest.raises(gradclip.StateError, match="one threshold per tensor|keeps one"):
        clipper.clip_(model)


@pytest.mark.parametrize(
    "build,pattern",
    [
        (lambda: gradclip.AdaClip(theta=1.0), r"AdaClip: theta must be in \(0, 1\), got 1.0"),
        (lambda: gradclip.AdaClip(theta=0), r"AdaClip: theta must be in \(0, 1\), got 0"),
        (lambda: gradclip.AdaClip(nonfinite="drop"), r"AdaClip: nonfinite must be one of"),
        (lambda: gradclip.AdaGN(gamma1=1.5), r"AdaGN: gamma1 must be in \(0, 1\), got 1.5"),
        (lambda: gradclip.AdaGN(gamma2=-0.1), r"AdaGN: gamma2 must be in \(0, 1\), got -0.1"),
        (lambda: gradclip.AdaGN(eps=-1e-8), r"AdaGN: eps must be in \[0, inf\), got -1e-08"),
        (lambda: gradclip.AdaGN(scope="layer"), r"AdaGN: scope must be one of 'tensor', 'global'; got 'layer'"),
    ],
)
def test_bad_arguments(build, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern):
        build()
