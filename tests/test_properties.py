"""Property tests (hypothesis): bounds, direction, identity under the threshold, structure and
grouping invariance, idempotence."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import gradclip
from _reference import ref_global_norm, ref_norm_of, to_numpy

SETTINGS = settings(max_examples=60, deadline=None)
NORM_TYPES = [1.0, 2.0, 3.0, math.inf]
RTOL = 1e-5  # fp32 norms of at most a few hundred elements


def _float_arrays(min_value=-1e3, max_value=1e3):
    element = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=32)
    array = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=12), elements=element)
    return st.lists(array, min_size=1, max_size=5)


grads_lists = _float_arrays()
thresholds = st.floats(1e-3, 1e3, allow_nan=False)
norm_types = st.sampled_from(NORM_TYPES)


def fp32_floor(grads, norm_type: float) -> float:
    """The absolute error an fp32 norm may carry from p-th powers below fp32's normal range.

    Norms accumulate ``|x|**p`` in fp32 (DESIGN.md rule 2, as torch does): a power below
    2**-126 is a denormal or 0, so each of the ``n`` elements may lose up to 2**-126 of the sum,
    and the norm up to ``(n * 2**-126) ** (1/p)`` (p-th roots are subadditive for p >= 1). For
    p = 3 that is about 1e-12: tiny gradients' norms are only that exact (docs/reliability.md,
    documented limits). The max norm has no powers.
    """
    if norm_type == math.inf:
        return 0.0
    count = sum(int(np.size(g)) for g in grads)
    return (count * 2.0**-126) ** (1.0 / norm_type)


def _torch():
    return pytest.importorskip("torch", reason="torch variant of the property")


def _copy(grads):
    return [g.copy() for g in grads]


@SETTINGS
@given(grads=grads_lists, max_norm=thresholds, norm_type=norm_types)
def test_global_norm_bound(grads, max_norm, norm_type):
    out, info = gradclip.GlobalNorm(max_norm, norm_type=norm_type).clip(grads)
    before = ref_global_norm(grads, norm_type)
    after = ref_global_norm(out, norm_type)
    assert after <= max_norm * (1 + RTOL) + 1e-30
    if before > max_norm * (1 + RTOL):
        # eps = 1e-6: the clipped norm is max_norm * norm / (norm + eps), just under max_norm.
        assert after == pytest.approx(max_norm * before / (before + 1e-6), rel=RTOL)
        assert bool(info.clipped)
    assert float(info.norm) == pytest.approx(before, rel=RTOL, abs=fp32_floor(grads, norm_type))


@SETTINGS
@given(grads=grads_lists, max_norm=thresholds, norm_type=norm_types)
def test_per_tensor_bounds(grads, max_norm, norm_type):
    out, _ = gradclip.Norm(max_norm, norm_type=norm_type).clip(grads)
    for o in out:
        assert ref_norm_of(o, norm_type) <= max_norm * (1 + RTOL)
    out, _ = gradclip.AverageNorm(max_norm).clip(grads)
    for o in out:
        assert ref_norm_of(o, 2.0) / o.size <= max_norm * (1 + RTOL)
    out, _ = gradclip.BlockRMS(max_norm).clip(grads)
    for o in out:
        assert ref_norm_of(o, 2.0) / math.sqrt(o.size) <= max_norm * (1 + RTOL)
    out, _ = gradclip.Value(clip_value=max_norm).clip(grads)
    for o in out:
        assert np.abs(o).max() <= np.float32(max_norm)
    out, _ = gradclip.ZeroOutliers(max_norm).clip(grads)
    for o in out:
        assert np.abs(o).max() <= max_norm


@SETTINGS
@given(grads=grads_lists, max_norm=thresholds, norm_type=norm_types)
def test_global_clipping_keeps_direction(grads, max_norm, norm_type):
    out, info = gradclip.GlobalNorm(max_norm, norm_type=norm_type).clip(grads)
    coef = float(info.coef)
    assert 0.0 <= coef <= 1.0
    flat_in = np.concatenate([g.reshape(-1) for g in grads]).astype(np.float64)
    flat_out = np.concatenate([o.reshape(-1) for o in out]).astype(np.float64)
    np.testing.assert_allclose(flat_out, flat_in * coef, rtol=1e-6, atol=1e-6 * np.abs(flat_in * coef).max(initial=0))
    assert np.all(np.sign(flat_out) * np.sign(flat_in) >= 0)  # no sign flips
    n_in, n_out = np.linalg.norm(flat_in), np.linalg.norm(flat_out)
    if n_out > 1e-30:
        assert np.dot(flat_in, flat_out) / (n_in * n_out) == pytest.approx(1.0, abs=1e-6)


@SETTINGS
@given(grads=grads_lists, factor=st.floats(1.0, 100.0), norm_type=norm_types)
def test_under_threshold_leaves_gradients_bit_for_bit(grads, factor, norm_type):
    # The library's own fp32 norm as threshold: "at" the threshold (factor 1) is also untouched.
    norm = float(gradclip.global_norm(grads, norm_type))
    clipper = gradclip.GlobalNorm(norm * factor, norm_type=norm_type)
    before = _copy(grads)
    out, info = clipper.clip(grads)
    for o, b in zip(out, before):
        np.testing.assert_array_equal(o, b)
    assert float(info.coef) == 1.0 and not bool(info.clipped)
    clipper.clip_(grads)  # in place, too
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b)

    per_tensor = max(float(gradclip.global_norm([g], norm_type)) for g in grads)
    averages = max(float(gradclip.global_norm([g])) / g.size for g in grads)
    rms = max(float(gradclip.global_norm([g])) / math.sqrt(g.size) for g in grads)
    largest = max(float(np.abs(g).max()) for g in grads)
    for untouched in (
        # global_norm([g]) recombines one norm ((n**p)**(1/p)), which may differ from n by an ulp.
        gradclip.Norm(per_tensor * factor * (1 + 1e-6), norm_type=norm_type),
        gradclip.AverageNorm(averages * factor * (1 + 1e-6)),
        gradclip.BlockRMS(rms * factor * (1 + 1e-6)),
        gradclip.NormSign(float(gradclip.global_norm(grads)) * factor),
        gradclip.Value(clip_value=largest * factor),
        gradclip.ZeroOutliers(largest * factor),
    ):
        out, info = untouched.clip(grads)
        for o, b in zip(out, before):
            np.testing.assert_array_equal(o, b)
        assert float(info.coef) == 1.0 and not bool(info.clipped), untouched


@SETTINGS
@given(grads=grads_lists, factor=st.floats(1.0, 100.0))
def test_under_threshold_bit_for_bit_torch(grads, factor):
    torch = _torch()
    tensors = [torch.from_numpy(g.copy()) for g in grads]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        low = [t.to(dtype) for t in tensors]
        norm = float(gradclip.global_norm(low))
        params = []
        for t in low:
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t.clone()
            params.append(p)
        info = gradclip.GlobalNorm(norm * factor).clip_(params)
        assert all(torch.equal(p.grad, t) for p, t in zip(params, low))
        assert info.coef.item() == 1.0


_CLIPPERS = [
    lambda: gradclip.GlobalNorm(1.0),
    lambda: gradclip.GlobalNorm(0.5, norm_type=math.inf),
    lambda: gradclip.Norm(1.0),
    lambda: gradclip.AverageNorm(0.05),
    lambda: gradclip.BlockRMS(0.5),
    lambda: gradclip.NormSign(2.0),
    lambda: gradclip.ZeroOutliers(1.0),
    lambda: gradclip.Value(-0.5, 2.0),
    lambda: gradclip.chain(gradclip.Value(clip_value=3.0), gradclip.GlobalNorm(1.0)),
]


@SETTINGS
@given(grad=_float_arrays(-10, 10).map(lambda gs: gs[0]), which=st.integers(0, len(_CLIPPERS) - 1))
def test_single_tensor_equals_list_of_one(grad, which):
    single, info_single = _CLIPPERS[which]().clip(grad)
    listed, info_listed = _CLIPPERS[which]().clip([grad])
    assert isinstance(single, np.ndarray) and isinstance(listed, list)
    np.testing.assert_array_equal(single, listed[0])
    for a, b in zip(info_single, info_listed):
        np.testing.assert_array_equal(a, b)
    # In place on one array versus a list of one.
    a, b = grad.copy(), grad.copy()
    _CLIPPERS[which]().clip_(a)
    _CLIPPERS[which]().clip_([b])
    np.testing.assert_array_equal(a, b)


@SETTINGS
@given(grad=_float_arrays(-10, 10).map(lambda gs: gs[0]), which=st.integers(0, len(_CLIPPERS) - 1))
def test_single_tensor_equals_list_of_one_torch(grad, which):
    torch = _torch()
    t = torch.from_numpy(grad)
    single, _ = _CLIPPERS[which]().clip(t)
    listed, _ = _CLIPPERS[which]().clip([t])
    assert torch.equal(single, listed[0])
    p, q = torch.nn.Parameter(torch.zeros_like(t)), torch.nn.Parameter(torch.zeros_like(t))
    p.grad, q.grad = t.clone(), t.clone()
    _CLIPPERS[which]().clip_(p)
    _CLIPPERS[which]().clip_([q])
    assert torch.equal(p.grad, q.grad)


@SETTINGS
@given(grads=grads_lists, norm_type=norm_types, split=st.integers(0, 5), data=st.data())
def test_grouping_does_not_change_the_norm(grads, norm_type, split, data):
    whole = float(gradclip.global_norm(grads, norm_type))
    first, second = grads[:split], grads[split:]
    parts = [float(gradclip.global_norm(part, norm_type)) for part in (first, second)]
    if norm_type == math.inf:
        combined = max(parts)
    else:
        combined = sum(p**norm_type for p in parts) ** (1.0 / norm_type)
    floor = fp32_floor(grads, norm_type)
    assert combined == pytest.approx(whole, rel=RTOL, abs=floor)
    order = data.draw(st.permutations(range(len(grads))))
    shuffled = float(gradclip.global_norm([grads[i] for i in order], norm_type))
    assert shuffled == pytest.approx(whole, rel=RTOL, abs=floor)
    # Dict input groups nothing differently either.
    as_dict = float(gradclip.global_norm({f"p{i}": g for i, g in enumerate(grads)}, norm_type))
    assert as_dict == pytest.approx(whole, rel=RTOL, abs=floor)


@SETTINGS
@given(grads=grads_lists, norm_type=norm_types, mask=st.lists(st.booleans(), min_size=5, max_size=5))
# Found by CI: cubes of 3.4e-19 underflow fp32 (the fp32 norm is 0, as torch's); fp64 is exact.
@example(grads=[np.full(2, 3.449486e-19, np.float32)], norm_type=3.0, mask=[True, False, False, False, False])
def test_dtype_groups_do_not_change_the_norm_torch(grads, norm_type, mask):
    torch = _torch()
    base = [torch.from_numpy(g.copy()) for g in grads]
    mixed = [t.double() if m else t for t, m in zip(base, mask)]
    all64 = [t.double() for t in base]
    expected = ref_global_norm(grads, norm_type)
    for tensors in (base, mixed, all64):
        # Exact to RTOL when every tensor is fp64 (fp64 accumulation); else within fp32's floor.
        floor = 0.0 if tensors is all64 else fp32_floor(grads, norm_type)
        got = gradclip.global_norm(tensors, norm_type)
        assert got.item() == pytest.approx(expected, rel=RTOL, abs=floor)
        params = []
        for t in tensors:
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t.clone()
            params.append(p)
        info = gradclip.GlobalNorm(1.0, norm_type=norm_type).clip_(params)
        assert info.norm.item() == pytest.approx(expected, rel=RTOL, abs=floor)
        assert ref_global_norm([p.grad for p in params], norm_type) <= 1.0 + RTOL


@SETTINGS
@given(grads=grads_lists, threshold=thresholds)
def test_element_wise_methods_are_idempotent(grads, threshold):
    for clipper in (gradclip.Value(clip_value=threshold), gradclip.ZeroOutliers(threshold)):
        once, _ = clipper.clip(grads)
        twice, info = clipper.clip(once)
        for a, b in zip(once, twice):
            np.testing.assert_array_equal(a, b)
        assert not bool(info.clipped)


@SETTINGS
@given(grads=grads_lists, max_norm=thresholds)
def test_global_norm_is_idempotent_up_to_rounding(grads, max_norm):
    once, _ = gradclip.GlobalNorm(max_norm).clip(grads)
    twice, info = gradclip.GlobalNorm(max_norm).clip(once)
    # If the first result's fp32 norm rounds up past max_norm, the second pass scales by
    # max_norm / (max_norm + eps): a relative change of at most eps / max_norm (eps = 1e-6).
    rtol = 1e-6 / max_norm + 1e-6
    for a, b in zip(once, twice):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=0)
    assert float(info.coef) >= 1 - rtol


@SETTINGS
@given(grads=grads_lists, max_norm=thresholds)
def test_finite_inputs_give_finite_outputs(grads, max_norm):
    assume(all(np.isfinite(g).all() for g in grads))
    for clipper in (
        gradclip.GlobalNorm(max_norm),
        gradclip.Norm(max_norm),
        gradclip.AverageNorm(max_norm),
        gradclip.BlockRMS(max_norm),
        gradclip.NormSign(max_norm),
        gradclip.GlobalNorm(0.0),
        gradclip.Norm(0.0),
    ):
        out, info = clipper.clip(grads)
        assert all(np.isfinite(o).all() for o in out), clipper
        # consecutive_skips is None from a bare clip (only the wrappers that own the step count it).
        assert info.consecutive_skips is None
        assert all(np.isfinite(to_numpy(v)).all() for v in info[:6]), clipper
