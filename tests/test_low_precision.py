"""fp16/bf16 gradients: norms accumulate in fp32 (DESIGN.md rule 2), results keep the gradient dtype."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from _reference import ref_global_clip, ref_global_norm, to_numpy

torch = pytest.importorskip("torch", reason="fp16/bf16 tests run on torch tensors (NumPy has no bf16)")
import gradclip.torch as gct  # noqa: E402

LOW = [torch.float16, torch.bfloat16]


def _param(values, dtype):
    p = torch.nn.Parameter(torch.zeros(len(values), dtype=dtype))
    p.grad = torch.tensor(values, dtype=dtype)
    return p


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_fp16_300_with_max_norm_1_becomes_1(dtype):
    # In place, through the clipper and through the torch drop-in.
    for clip in (
        lambda p: gradclip.GlobalNorm(1.0).clip_([p]),
        lambda p: gct.clip_grad_norm_([p], 1.0),
        lambda p: gradclip.Norm(1.0).clip_([p]),
    ):
        p = _param([300.0], dtype)
        result = clip(p)
        assert p.grad.dtype == dtype
        assert p.grad.item() == pytest.approx(1.0, rel=1e-2), "never 0 or inf"
        norm = result if isinstance(result, torch.Tensor) else result.norm
        assert norm.dtype == torch.float32 and norm.item() == 300.0
    # Functionally.
    out, info = gradclip.GlobalNorm(1.0).clip([torch.tensor([300.0], dtype=dtype)])
    assert out[0].dtype == dtype and out[0].item() == pytest.approx(1.0, rel=1e-2)
    assert info.coef.item() == pytest.approx(1 / 300, rel=1e-5)


def test_fp16_300_numpy():
    out, info = gradclip.GlobalNorm(1.0).clip([np.array([300.0], np.float16)])
    assert out[0].dtype == np.float16
    assert float(out[0][0]) == pytest.approx(1.0, rel=1e-3)
    assert info.norm.dtype == np.float32 and float(info.norm) == 300.0
    g = np.array([300.0, -300.0], np.float16)
    gradclip.GlobalNorm(1.0).clip_(g)
    assert g.dtype == np.float16
    np.testing.assert_allclose(g.astype(np.float64), [1 / math.sqrt(2), -1 / math.sqrt(2)], rtol=1e-3)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_fp16_gradients_of_5000_give_a_finite_norm(foreach):
    grads = [torch.full((1000,), 5000.0, dtype=torch.float16), torch.full((10, 10), -5000.0, dtype=torch.float16)]
    exact = ref_global_norm(grads)  # 5000 * sqrt(1100) ≈ 165831 > 65504 = fp16 max
    assert exact > 65504
    norm = gradclip.global_norm(grads)
    assert torch.isfinite(norm) and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(exact, rel=1e-6)
    assert gct.get_total_norm(grads, foreach=foreach).item() == pytest.approx(exact, rel=1e-6)
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    returned = gct.clip_grad_norm_(params, 1.0, foreach=foreach)
    assert returned.item() == pytest.approx(exact, rel=1e-6)
    expected, _, _ = ref_global_clip(grads, 1.0)
    for p, want in zip(params, expected):
        assert p.grad.dtype == torch.float16 and torch.isfinite(p.grad).all()
        np.testing.assert_allclose(to_numpy(p.grad), want, rtol=1e-3)
    for p in params:
        assert torch.isfinite(p.grad).all()
    info = gradclip.GlobalNorm(1.0).clip_(params)
    assert info.norm.item() == pytest.approx(1.0, rel=1e-3)  # already clipped: now ≈ 1


def test_fp16_5000_numpy():
    grads = [np.full((1000,), 5000.0, np.float16)]
    norm = gradclip.global_norm(grads)
    assert np.isfinite(norm) and float(norm) == pytest.approx(5000 * math.sqrt(1000), rel=1e-6)
    out, _ = gradclip.Norm(1.0).clip(grads)
    assert out[0].dtype == np.float16 and np.isfinite(out[0]).all()
    assert ref_global_norm(out) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("foreach", [None, True, False])
def test_bf16_ones_5120_norm_within_0_1_percent(foreach):
    grads = [torch.ones(5120, dtype=torch.bfloat16)]
    exact = math.sqrt(5120)
    # Summing 5120 ones in bf16 stalls at 256 (256 + 1 rounds to 256); fp32 accumulation is exact.
    measured = [
        gradclip.global_norm(grads),
        gct.get_total_norm(grads, foreach=foreach),
        gradclip.GlobalNorm(1e9).clip(grads)[1].norm,
        gradclip.Norm(1e9).clip(grads)[1].norm,
        gradclip.BlockRMS(1e9).clip(grads)[1].norm,
    ]
    params = [torch.nn.Parameter(torch.zeros(5120, dtype=torch.bfloat16))]
    params[0].grad = grads[0].clone()
    measured.append(gct.clip_grad_norm_(params, 1e9, foreach=foreach))
    for norm in measured:
        assert norm.dtype == torch.float32
        assert abs(norm.item() - exact) / exact < 1e-3
    # The 1-norm too (a plain sum): 5120, where bf16 would stop at 256.
    assert gradclip.global_norm(grads, 1.0).item() == pytest.approx(5120.0, rel=1e-3)
    # And clipping it to 1 gives a norm within 0.1 % of 1 (up to bf16's rounding of each element).
    out, _ = gradclip.GlobalNorm(1.0).clip(grads)
    assert out[0].dtype == torch.bfloat16
    assert ref_global_norm(out) == pytest.approx(1.0, rel=4e-3)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_every_clipper_keeps_the_low_precision_dtype(dtype):
    generator = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=generator) * 400).to(dtype) for s in [(8, 8), (100,), (3,)]]
    for clipper in (
        gradclip.GlobalNorm(1.0),
        gradclip.GlobalNorm(1.0, norm_type=math.inf),
        gradclip.Norm(1.0),
        gradclip.AverageNorm(0.01),
        gradclip.BlockRMS(0.5),
        gradclip.NormSign(1.0),
        gradclip.ZeroOutliers(300.0),
        gradclip.Value(-1.0, 2.0),
    ):
        out, info = clipper.clip(grads)
        assert all(o.dtype == dtype and torch.isfinite(o).all() for o in out), clipper
        assert info.norm.dtype == torch.float32 and torch.isfinite(info.norm), clipper
        assert info.norm.item() == pytest.approx(ref_global_norm(grads, clipper.config().get("norm_type", 2.0)), rel=1e-5)
        params = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            params.append(p)
        clipper.clip_(params)
        for p, o in zip(params, out):
            assert p.grad.dtype == dtype
            assert torch.equal(p.grad, o), clipper  # in place and functional agree bit for bit


def test_fp16_per_tensor_norm_above_fp16_range():
    g = torch.full((4096,), 60000.0, dtype=torch.float16)  # norm 3.84e6, far above 65504
    for clipper, bound in ((gradclip.Norm(2.0), 2.0), (gradclip.BlockRMS(0.5), 0.5 * 64), (gradclip.AverageNorm(1e-3), 4.096)):
        out, info = clipper.clip([g])
        assert torch.isfinite(out[0]).all() and torch.isfinite(info.norm)
        assert ref_global_norm(out) == pytest.approx(bound, rel=2e-3), clipper


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_clip_grad_norm_single_low_precision_tensor(dtype, foreach):
    # torch.nn.utils.clip_grad_norm_ takes one tensor as well as a list; so does the drop-in.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    values = (torch.randn(257, generator=torch.Generator().manual_seed(3)) * 40).to(dtype)
    single = _param(values.tolist(), dtype)
    listed = _param(values.tolist(), dtype)
    reference = _param(values.tolist(), dtype)
    expected, exact, _ = ref_global_clip([values], 1.0)
    norm = gct.clip_grad_norm_(single, 1.0, foreach=foreach)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    assert norm.item() == pytest.approx(exact, rel=1e-5)  # fp32 accumulation: close to exact
    assert single.grad.dtype == dtype
    np.testing.assert_allclose(to_numpy(single.grad), expected[0], rtol=tol, atol=tol * np.abs(expected[0]).max())
    # A single tensor and [tensor] are the same call, bit for bit.
    assert torch.equal(gct.clip_grad_norm_([listed], 1.0, foreach=foreach), norm)
    assert torch.equal(listed.grad, single.grad)
    # torch's own drop-in agrees within the dtype's rounding (its norm is the low-precision one).
    torch_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0, foreach=foreach)
    assert torch_norm.item() == pytest.approx(exact, rel=tol)
    np.testing.assert_allclose(to_numpy(reference.grad), to_numpy(single.grad), rtol=tol, atol=tol * np.abs(expected[0]).max())


@pytest.mark.parametrize("threshold, dtype", [(1e5, torch.float16), (1e39, torch.bfloat16)], ids=["fp16", "bf16"])
def test_norm_sign_refuses_a_threshold_the_dtype_cannot_hold(threshold, dtype):
    """ε·sign(g) with ε beyond the dtype's range would write inf into every element of a clipped
    step: refused up front, from the dtype alone (whatever this step's norm)."""
    p = _param([3e4, -3e4, 0.0], dtype)
    before = p.grad.clone()
    clipper = gradclip.NormSign(threshold)
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        clipper.clip_([p])
    message = str(caught.value)
    assert message.startswith("NormSign:") and f"threshold={threshold!r}" in message
    assert str(dtype).replace("torch.", "") in message and "largest finite value" in message
    assert torch.equal(p.grad, before)
    # NumPy fp16 too; and a representable threshold, or inf (never clips), works.
    with pytest.raises(gradclip.InvalidArgumentError):
        gradclip.NormSign(1e5).clip([np.full(3, 4e4, dtype=np.float16)])
    assert gradclip.NormSign(math.inf).clip_([p]).clipped.item() is False
    info = gradclip.NormSign(6e4).clip_([_param([6e4, -6e4], torch.float16)])
    assert bool(info.clipped)
