"""Parity with ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``.

fp32/fp64: bit-for-bit equal to torch (same kernels), except for the deviations documented in
``gradclip/torch/clip.py``, each of which has its own named test below. fp16/bf16: torch takes the
norm in the gradient's own precision, so both are compared against an fp64 reference instead, and
torch's overflow is asserted as an expectation of its own.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity with torch.nn.utils needs torch")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from _reference import ref_global_clip, ref_global_norm  # noqa: E402

NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
EXACT_DTYPES = [torch.float32, torch.float64]
LOW_DTYPES = [torch.float16, torch.bfloat16]
FOREACH = [None, True, False]
SHAPES = [(3, 4), (7,), (2, 3, 5), (257,), (16, 33)]


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def _random_grads(seed, dtype, shapes=SHAPES, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=generator, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _max_norm_for(grads, norm_type, seed):
    """A threshold well away from the norm (either side), avoiding the documented 1e-6 band."""
    norm = ref_global_norm(grads, norm_type)
    return norm * (0.3 if seed % 3 else 1.7)


def _three_ways(grads, max_norm, norm_type, foreach, single):
    """(torch, gct.clip_grad_norm_, GlobalNorm.clip_) results: (norm, [grads])."""
    results = []
    for which in ("torch", "gct", "clipper"):
        params = _params(grads)
        target = params[0] if single else params
        if which == "torch":
            norm = torch.nn.utils.clip_grad_norm_(target, max_norm, norm_type, foreach=foreach)
        elif which == "gct":
            norm = gct.clip_grad_norm_(target, max_norm, norm_type, foreach=foreach)
        else:
            norm = gradclip.GlobalNorm(max_norm, norm_type=norm_type).clip_(target).norm
        results.append((norm, [p.grad for p in params]))
    return results


@pytest.mark.parametrize("single", [False, True], ids=["list", "single"])
@pytest.mark.parametrize("foreach", FOREACH, ids=["foreach-auto", "foreach-on", "foreach-off"])
@pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_clip_grad_norm_bitwise_fp32_fp64(norm_type, dtype, foreach, single):
    for seed in range(6):
        grads = _random_grads(seed, dtype, SHAPES[:1] if single else SHAPES)
        max_norm = _max_norm_for(grads, norm_type, seed)
        (n_ref, g_ref), (n_gct, g_gct), (n_cl, g_cl) = _three_ways(grads, max_norm, norm_type, foreach, single)
        assert n_gct.dtype == n_ref.dtype == dtype
        assert torch.equal(n_gct, n_ref), (seed, n_gct, n_ref)
        assert torch.equal(n_cl, n_ref), (seed, n_cl, n_ref)
        for a, b, c in zip(g_ref, g_gct, g_cl):
            assert b.dtype == dtype
            assert torch.equal(a, b), f"seed {seed}: max diff {(a - b).abs().max().item()}"
            assert torch.equal(a, c), f"seed {seed}: max diff {(a - c).abs().max().item()}"


@pytest.mark.parametrize("foreach", FOREACH, ids=["foreach-auto", "foreach-on", "foreach-off"])
@pytest.mark.parametrize("dtype", EXACT_DTYPES + LOW_DTYPES, ids=str)
def test_clip_grad_value_bitwise_all_dtypes(dtype, foreach):
    # Clamping is exact in every dtype, so even fp16/bf16 must match torch bit for bit.
    grads = _random_grads(7, dtype)
    for clip_value in (0.0, 0.5, 2.0, 100.0):
        for single in (False, True):
            ref, ours, via_clipper = _params(grads), _params(grads), _params(grads)
            pick = (lambda ps: ps[0]) if single else (lambda ps: ps)
            torch.nn.utils.clip_grad_value_(pick(ref), clip_value, foreach=foreach)
            assert gct.clip_grad_value_(pick(ours), clip_value, foreach=foreach) is None
            gradclip.Value(clip_value=clip_value).clip_(pick(via_clipper))
            for a, b, c in zip(ref, ours, via_clipper):
                assert torch.equal(a.grad, b.grad)
                assert torch.equal(a.grad, c.grad)
                assert b.grad.dtype == dtype


def test_mixed_dtypes_in_one_list_match_torch():
    grads = _random_grads(11, torch.float32, SHAPES[:2]) + _random_grads(12, torch.float64, SHAPES[2:])
    for norm_type in NORM_TYPES:
        max_norm = _max_norm_for(grads, norm_type, 1)
        (n_ref, g_ref), (n_gct, g_gct), (n_cl, g_cl) = _three_ways(grads, max_norm, norm_type, None, False)
        torch.testing.assert_close(n_gct, n_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(n_cl, n_ref, rtol=1e-6, atol=0)
        for a, b, c in zip(g_ref, g_gct, g_cl):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)
            torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-12)


def test_under_threshold_is_identity_like_torch():
    grads = _random_grads(3, torch.float32)
    max_norm = ref_global_norm(grads) * 2.0
    (n_ref, g_ref), (n_gct, g_gct), _ = _three_ways(grads, max_norm, 2.0, None, False)
    assert torch.equal(n_ref, n_gct)
    for original, a, b in zip(grads, g_ref, g_gct):
        assert torch.equal(original, a) and torch.equal(original, b)


def test_empty_parameters_like_torch():
    assert torch.equal(gct.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    no_grad = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(gct.clip_grad_norm_([no_grad], 1.0), torch.nn.utils.clip_grad_norm_([no_grad], 1.0))
    assert no_grad.grad is None
    assert gct.clip_grad_value_([no_grad], 1.0) is None


def test_module_and_generator_inputs_like_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model(torch.randn(8, 5)).pow(2).sum().mul(10).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref = _params(grads)
    n_ref = torch.nn.utils.clip_grad_norm_(iter(ref), 0.5)
    assert n_ref.item() > 0.5
    n_ours = gct.clip_grad_norm_((p for p in model.parameters()), 0.5)
    assert torch.equal(n_ours, n_ref)
    for a, b in zip(ref, model.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_error_if_nonfinite_raises_runtime_error_like_torch():
    grads = _random_grads(5, torch.float32)
    grads[1][0] = float("nan")
    ref, ours = _params(grads), _params(grads)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="#1"):
        gct.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    for original, p in zip(grads, ours):  # nothing was modified (NaN compares equal to NaN here)
        torch.testing.assert_close(p.grad, original, equal_nan=True, rtol=0, atol=0)


# -- low precision: compare against an fp64 reference -------------------------------------------


@pytest.mark.parametrize("foreach", FOREACH, ids=["foreach-auto", "foreach-on", "foreach-off"])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
def test_clip_grad_norm_low_precision_against_fp64(norm_type, dtype, foreach):
    # fp16 keeps 11 bits, bf16 8: one rounding of the result plus the scale.
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for seed in range(4):
        grads = _random_grads(seed, dtype)
        max_norm = _max_norm_for(grads, norm_type, seed)
        expected, expected_norm, _ = ref_global_clip(grads, max_norm, norm_type)
        (n_ref, g_ref), (n_gct, g_gct), (n_cl, g_cl) = _three_ways(grads, max_norm, norm_type, foreach, False)
        # gradclip accumulates in fp32: its norm is far closer to the truth than torch's own.
        assert n_gct.dtype == torch.float32
        assert n_gct.item() == pytest.approx(expected_norm, rel=1e-5)
        assert torch.equal(n_gct, n_cl)
        assert n_ref.item() == pytest.approx(expected_norm, rel=tol)
        for want, a, b, c in zip(expected, g_ref, g_gct, g_cl):
            assert b.dtype == dtype and c.dtype == dtype
            np.testing.assert_allclose(b.double().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())
            assert torch.equal(b, c)
            np.testing.assert_allclose(a.double().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("foreach", FOREACH, ids=["foreach-auto", "foreach-on", "foreach-off"])
def test_deviation_fp16_overflow_torch_zeroes_gradclip_clips(foreach):
    """Named expectation: torch's fp16 norm overflows to inf above 65504 and zeroes every gradient."""
    # norm = 5000 * sqrt(1000) ≈ 158114 > 65504, the largest fp16 value.
    grads = [torch.full((1000,), 5000.0, dtype=torch.float16), torch.full((3,), -1.0, dtype=torch.float16)]
    (n_ref, g_ref), (n_gct, g_gct), _ = _three_ways(grads, 1.0, 2.0, foreach, False)
    # torch: norm inf, coefficient 1/(inf) = 0, everything becomes 0.
    assert torch.isinf(n_ref)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in g_ref)
    # gradclip: the fp32 norm is finite and the gradients are scaled to norm ≈ 1.
    expected, expected_norm, _ = ref_global_clip(grads, 1.0)
    assert n_gct.item() == pytest.approx(expected_norm, rel=1e-5)
    for want, got in zip(expected, g_gct):
        assert torch.isfinite(got).all()
        np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-3, atol=1e-7)


def test_deviation_norm_just_under_max_norm_is_left_alone():
    """Named expectation: torch scales by max_norm/(norm+1e-6) even when norm <= max_norm."""
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)  # norm exactly 5
    max_norm = 5.0 + 5e-7  # the norm is under max_norm by less than torch's eps
    (n_ref, g_ref), (n_gct, g_gct), (n_cl, g_cl) = _three_ways([g], max_norm, 2.0, None, False)
    assert torch.equal(n_ref, n_gct)
    assert not torch.equal(g_ref[0], g), "torch scales a norm that is under max_norm"
    assert torch.equal(g_gct[0], g) and torch.equal(g_cl[0], g)


def test_deviation_inf_max_norm_with_inf_norm():
    """Named expectation: torch computes inf/inf = NaN and writes NaN everywhere."""
    grads = [torch.tensor([1.0, float("inf")]), torch.tensor([2.0, -3.0])]
    (n_ref, g_ref), (n_gct, g_gct), _ = _three_ways(grads, math.inf, 2.0, None, False)
    assert torch.isinf(n_ref) and torch.isinf(n_gct)
    assert torch.isnan(g_ref[1]).all()
    assert torch.equal(g_gct[0], grads[0]) and torch.equal(g_gct[1], grads[1])


def test_deviation_negative_max_norm_is_rejected():
    """Named expectation: torch flips the gradients' signs for a negative max_norm; gradclip refuses."""
    grads = _random_grads(1, torch.float32)
    ref, ours = _params(grads), _params(grads)
    torch.nn.utils.clip_grad_norm_(ref, -1.0)
    assert (ref[0].grad * grads[0] <= 0).all()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"max_norm.*-1\.0"):
        gct.clip_grad_norm_(ours, -1.0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, grads))


def test_get_total_norm_matches_torch():
    for norm_type in NORM_TYPES:
        for dtype in EXACT_DTYPES:
            tensors = _random_grads(2, dtype)
            assert torch.equal(
                gct.get_total_norm(tensors, norm_type), torch.nn.utils.get_total_norm(tensors, norm_type)
            )


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf], ids=str)
def test_drop_ins_keep_torch_kernels_on_large_and_many_small_tensors(norm_type):
    """The drop-ins promise torch's results: no blocked or stacked CPU norms there. GlobalNorm's
    own default path takes them (a named deviation: closer to the exact norm, not torch's bits)."""
    from gradclip.backends.torch import BLOCKED_MIN_NUMEL_WIDE

    generator = torch.Generator().manual_seed(21)
    grads = [torch.randn(BLOCKED_MIN_NUMEL_WIDE * 2 + 7, generator=generator)]
    grads += [torch.randn(64, generator=generator) * (i + 1) for i in range(40)]
    ref, ours, get_total = _params(grads), _params(grads), [g.clone() for g in grads]
    n_ref = torch.nn.utils.clip_grad_norm_(ref, 1.0, norm_type)
    n_ours = gct.clip_grad_norm_(ours, 1.0, norm_type)
    assert torch.equal(n_ours, n_ref)
    assert torch.equal(gct.get_total_norm(get_total, norm_type), torch.nn.utils.get_total_norm(get_total, norm_type))
    for a, b in zip(ref, ours):
        assert torch.equal(a.grad, b.grad)
    # The deviation, by design: GlobalNorm's norm is within 1e-6 of the exact value.
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]), norm_type)
    ours_clipper = _params(grads)
    norm = gradclip.GlobalNorm(1.0, norm_type=norm_type).clip_(ours_clipper).norm
    assert abs(float(norm) - float(exact)) <= 1e-6 * float(exact)


# -- torch's own wording, warnings and the torch >= 2.6 API (issue 14) ----------------------------


def test_error_if_nonfinite_message_contains_torchs_wording_after_gradclips_detail():
    grads = _random_grads(6, torch.float32)
    grads[2][0] = float("inf")
    ours = _params(grads)
    with pytest.raises(gradclip.NonFiniteError) as caught:
        gct.clip_grad_norm_(ours, 1.0, norm_type=3.0, error_if_nonfinite=True)
    message = str(caught.value)
    assert message.startswith("clip_grad_norm_: non-finite gradient values (NaN or inf) in #2;")
    assert "The total norm of order 3.0 for gradients from `parameters` is non-finite, so it cannot be clipped" in message
    assert caught.value.offenders == ["#2"] and isinstance(caught.value, RuntimeError)
    with pytest.raises(RuntimeError, match=r"The total norm of order inf for gradients"):
        gct.get_total_norm([p.grad for p in ours], norm_type="inf", error_if_nonfinite=True)


@pytest.mark.parametrize(("dtype", "scalar", "norm_type", "magnitude"), [
    (torch.float64, 2e200, 2.0, "1e154"),   # fp64 squares overflow past ~1.3e154
    (torch.float64, 2e200, 3.5, "1e88"),
    (torch.float32, 2e20, 2.0, "1e19"),     # fp32 squares past ~1.8e19
])
def test_overflow_message_gives_the_limit_of_the_gradients_dtype(dtype, scalar, norm_type, magnitude):
    param = torch.nn.Parameter(torch.ones(10, dtype=dtype))
    param.grad = torch.full((10,), scalar, dtype=dtype)
    with pytest.raises(gradclip.NonFiniteError, match=rf"overflowed the accumulator.*beyond ~{magnitude} in magnitude"):
        gct.clip_grad_norm_([param], 1.0, norm_type=norm_type, error_if_nonfinite=True)
    assert torch.equal(param.grad, torch.full((10,), scalar, dtype=dtype))


@pytest.mark.parametrize("call", [
    lambda params: gct.clip_grad_norm_(params, 1.0),
    lambda params: gct.clip_grads_with_norm_(params, 1.0, torch.tensor(5.0)),
], ids=["clip_grad_norm_", "clip_grads_with_norm_"])
def test_an_exhausted_generator_warns_once_as_torch_does(call):
    model = torch.nn.Linear(3, 2)
    params = model.parameters()
    list(params)
    with pytest.warns(UserWarning, match=r"^`parameters` is an empty generator, no gradient clipping will occur\.$") as record:
        call(params)
    assert len(record) == 1
    fresh = model.parameters()  # a generator that still yields warns nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(fresh)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", FOREACH, ids=["foreach-auto", "foreach-on", "foreach-off"])
def test_clip_grads_with_norm_equals_torchs(norm_type, foreach):
    grads = _random_grads(7, torch.float32)
    ref, ours = _params(grads), _params(grads)
    total = torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type, foreach=foreach)
    ours_total = gct.get_total_norm([p.grad for p in ours], norm_type, foreach=foreach)
    assert torch.equal(total, ours_total)
    max_norm = float(total) * 0.3
    torch.nn.utils.clip_grads_with_norm_(ref, max_norm, total, foreach=foreach)
    assert gct.clip_grads_with_norm_(ours, max_norm, ours_total, foreach=foreach) is None
    for a, b in zip(ref, ours):
        assert torch.equal(a.grad, b.grad)


def test_clip_grads_with_norm_keeps_the_documented_deviations():
    grads = _random_grads(8, torch.float32)
    band, nonfinite, number = _params(grads), _params(grads), _params(grads)
    norm = gct.get_total_norm([p.grad for p in band])
    gct.clip_grads_with_norm_(band, float(norm), norm)  # at the threshold: untouched (torch scales)
    gct.clip_grads_with_norm_(nonfinite, 1.0, torch.tensor(float("inf")))  # torch zeroes everything
    gct.clip_grads_with_norm_(number, float(norm) / 2, float(norm))  # a Python number is a norm too
    for original, a, b in zip(grads, band, nonfinite):
        assert torch.equal(a.grad, original) and torch.equal(b.grad, original)
    reference = _params(grads)
    gct.clip_grads_with_norm_(reference, float(norm) / 2, norm)
    for a, b in zip(number, reference):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize(("total_norm", "match"), [
    (torch.ones(2), r"total_norm must be a one-element floating-point tensor .* shape \(2,\)"),
    (torch.tensor(3), r"total_norm must be a one-element floating-point tensor .*torch\.int64"),
    (-1.0, r"total_norm must be >= 0 \(a norm\), got -1\.0"),
    ("5", r"total_norm must be a tensor or a real number .* got str"),
])
def test_clip_grads_with_norm_refuses_a_bad_total_norm_and_changes_nothing(total_norm, match):
    grads = _random_grads(9, torch.float32)
    params = _params(grads)
    with pytest.raises(gradclip.InvalidArgumentError, match=match):
        gct.clip_grads_with_norm_(params, 1.0, total_norm)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"clip_grads_with_norm_: max_norm must be in \[0, inf\]"):
        gct.clip_grads_with_norm_(params, -1.0, torch.tensor(2.0))
    for original, p in zip(grads, params):
        assert torch.equal(p.grad, original)
