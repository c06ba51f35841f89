"""The torch backend's fast paths against its reference path (gradclip/backends/torch.py).

The fast paths (``foreach=None``): blocked CPU norms for large contiguous tensors (fp16/bf16
widened through a scratch buffer), small CPU tensors of one shape stacked and reduced row by row,
one foreach call for the rest, grouping reused between ``norms`` and ``scale``, norms stacked per
group, and the torch forms of the clip coefficient and ``isfinite``. The reference path is ``foreach=False``:
``torch.linalg.vector_norm`` per tensor, which is what ``torch.nn.utils.clip_grad_norm_``
computes. Every comparison is also made against the exact norm in fp64, because torch's own
whole-tensor reduction loses accuracy with length (the fast path is closer to the truth there).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch", reason="the fast paths are the torch backend's")

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from gradclip._core.ops import Ops, get_ops  # noqa: E402
from gradclip.backends.torch import (  # noqa: E402
    BLOCKED_MIN_NUMEL,
    BLOCKED_MIN_NUMEL_WIDE,
    CHUNK,
    ROW,
    STACK_MAX_NUMEL,
    TorchOps,
)
from gradclip.clippers.norm import clip_coefficient  # noqa: E402
from _host_reads import record_host_reads  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NORM_TYPES = [0.5, 1.0, 2.0, 3.0, math.inf]
#: Relative tolerance against the exact norm of the values as stored: fp32 accumulation, fp64's.
TOLERANCE = {torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float32: 1e-6, torch.float64: 1e-12}


def _tolerance(dtype, norm_type):
    """p other than 1, 2, inf goes through pow() in fp32 and back: ten times looser."""
    return TOLERANCE[dtype] * (1 if norm_type in (1.0, 2.0, math.inf) else 10)


def _threshold(dtype):
    """Elements from which a CPU tensor of ``dtype`` takes the blocked norm."""
    return BLOCKED_MIN_NUMEL if dtype in (torch.float16, torch.bfloat16) else BLOCKED_MIN_NUMEL_WIDE


def _tensors(dtype, seed=0):
    """Large and small tensors: blocked (with and without a short last row), foreach, edge cases."""
    generator = torch.Generator().manual_seed(seed)
    large = _threshold(dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return [
        randn(large + 3 * ROW + 17),      # blocked, a short last row
        randn(large // ROW, ROW),         # blocked, whole rows only, 2-D
        randn(300),                       # small: the foreach call
        randn(0),                         # empty
        randn(()),                        # 0-d
        randn(large // 16, 17).t(),       # transposed: dense, blocked in memory order
        randn(7, 5),
        randn(large - 1),                 # just under the threshold: torch's kernel
        randn(2, 3, large // 768 + 1, 128).to(memory_format=torch.channels_last),  # dense, blocked
        randn(2 * large + 2)[::2],        # large with gaps: torch's kernel
    ]


#: Positions in _tensors that keep torch's kernels on the fast path (bit-for-bit the reference).
TORCH_KERNEL = [2, 3, 4, 6, 7, 9]


def _exact(tensor, norm_type):
    values = tensor.detach().double().abs().flatten()
    if values.numel() == 0:
        return 0.0
    if norm_type == math.inf:
        return float(values.max())
    return float(values.pow(norm_type).sum().pow(1.0 / norm_type))


def _relative(a, b):
    return abs(a - b) / abs(b) if b else abs(a)


def _norms(tensors, foreach):
    return get_ops(tensors, foreach=foreach, framework="torch").norms(tensors, norm_type=2.0)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_blocked_norms_match_the_reference_path_and_the_exact_norm(dtype, norm_type):
    tensors = _tensors(dtype)
    ops_fast = get_ops(tensors, framework="torch")
    ops_ref = get_ops(tensors, foreach=False, framework="torch")
    fast = ops_fast.norms(tensors, norm_type)
    reference = ops_ref.norms(tensors, norm_type)
    assert fast.dtype == reference.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fast.shape == (len(tensors),)
    tolerance = _tolerance(dtype, norm_type)
    for index, tensor in enumerate(tensors):
        if index in TORCH_KERNEL:  # accuracy is torch's there: same result as the reference
            if dtype in (torch.float32, torch.float64):
                assert torch.equal(fast[index], reference[index]), index
            else:  # foreach kernel against vector_norm, both accumulating in fp32
                assert _relative(float(fast[index]), float(reference[index])) <= 1e-6, index
            continue
        exact = _exact(tensor, norm_type)
        assert _relative(float(fast[index]), exact) <= tolerance, (index, tuple(tensor.shape))
        # The reference itself drifts from the exact value on long tensors: the fast path is
        # within the tolerance of it, or closer to the exact value than it is.
        reference_error = _relative(float(reference[index]), exact)
        assert _relative(float(fast[index]), float(reference[index])) <= tolerance + reference_error * 1.01, index
    total_fast = float(ops_fast.combine_norms(fast, norm_type))
    total_ref = float(ops_ref.combine_norms(reference, norm_type))
    total_exact = _exact_global(tensors, norm_type)
    assert _relative(total_fast, total_ref) <= tolerance + _relative(total_ref, total_exact) * 1.01


def _exact_global(tensors, norm_type):
    norms = [_exact(t, norm_type) for t in tensors]
    if norm_type == math.inf:
        return max(norms)
    return sum(n**norm_type for n in norms) ** (1.0 / norm_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fp32_below_the_threshold_keeps_torch_kernels_bit_for_bit(dtype):
    """Below BLOCKED_MIN_NUMEL_WIDE nothing changes: fp32/fp64 norms equal torch's exactly."""
    generator = torch.Generator().manual_seed(1)
    tensors = [torch.randn(1000, generator=generator, dtype=dtype) for _ in range(50)]
    tensors.append(torch.randn(BLOCKED_MIN_NUMEL_WIDE - 1, generator=generator, dtype=dtype))
    fast = _norms(tensors, None)
    assert torch.equal(fast, torch.stack(torch._foreach_norm(tensors, 2.0)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_long_tensor_is_fp32_accurate_where_torch_is_not(dtype):
    """4M elements: within 1e-6 of the exact norm (torch's whole-tensor reduction: ~1e-4)."""
    tensor = torch.randn(1 << 22, generator=torch.Generator().manual_seed(3)).to(dtype)
    exact = _exact(tensor, 2.0)
    assert _relative(float(_norms([tensor], None)[0]), exact) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_larger_than_the_scratch_buffer(dtype):
    """Several scratch-sized pieces and a short last piece; fp16 beyond fp16's range squared."""
    tensor = (torch.randn(CHUNK + ROW + 5, generator=torch.Generator().manual_seed(4)) * 300).to(dtype)
    exact = _exact(tensor, 2.0)
    assert exact > 65504  # the norm itself overflows fp16: it must not become inf
    for norm_type in (1.0, 2.0, math.inf):
        got = float(_norms([tensor], None)[0]) if norm_type == 2.0 else float(
            get_ops([tensor], framework="torch").norms([tensor], norm_type)[0])
        assert _relative(got, _exact(tensor, norm_type)) <= 1e-6, norm_type


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf], ids=str)
def test_nonfinite_values_propagate_like_the_reference(dtype, bad, norm_type):
    tensors = _tensors(dtype)
    tensors[0][5 * ROW // 2] = bad      # inside a whole row of a blocked tensor
    tensors[1][3, 7] = bad              # the other blocked tensor
    fast = get_ops(tensors, framework="torch").norms(tensors, norm_type)
    reference = get_ops(tensors, foreach=False, framework="torch").norms(tensors, norm_type)
    assert torch.equal(torch.isnan(fast), torch.isnan(reference))
    assert torch.equal(torch.isinf(fast), torch.isinf(reference))
    # Both together: NaN wins, as in one reduction over the whole tensor.
    tensors[0][0] = math.nan
    tensors[0][1] = math.inf
    assert math.isnan(float(get_ops(tensors, framework="torch").norms(tensors, 2.0)[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf], ids=str)
def test_global_norm_fast_path_equals_reference_path(dtype, norm_type, make_torch_params):
    """GlobalNorm.clip_ (fast paths) against the drop-in on torch's reference loop."""
    tensors = [t * 10 for t in _tensors(dtype, seed=7)]
    fast, reference = make_torch_params(tensors), make_torch_params(tensors)
    n_fast = gradclip.GlobalNorm(1.0, norm_type=norm_type).clip_(fast).norm
    n_ref = gct.clip_grad_norm_(reference, 1.0, norm_type, foreach=False)
    tolerance = _tolerance(dtype, norm_type)
    exact = _exact_global(tensors, norm_type)
    assert _relative(float(n_fast), exact) <= tolerance
    assert _relative(float(n_fast), float(n_ref)) <= tolerance + _relative(float(n_ref), exact) * 1.01
    if dtype in (torch.float32, torch.float64):
        tolerance += _relative(float(n_ref), exact) * 1.01  # the coefficients differ as much
    for a, b in zip(fast, reference):
        if dtype in (torch.float16, torch.bfloat16):
            # One rounding of the same coefficient (within 1e-6) into the gradient's precision.
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-2, atol=0)
        else:
            torch.testing.assert_close(a.grad, b.grad, rtol=tolerance, atol=0)


@pytest.mark.parametrize("policy", ["propagate", "zero", "skip"])
def test_nonfinite_policies_behave_the_same_on_the_fast_path(policy, make_torch_params):
    tensors = [t * 10 for t in _tensors(torch.float32, seed=9)]
    tensors[0][100] = math.nan
    fast, reference = make_torch_params(tensors), make_torch_params(tensors)
    info_fast = gradclip.GlobalNorm(1.0, nonfinite=policy).clip_(fast)
    ops = TorchOps([p.grad for p in reference], inplace=True, foreach=False)
    with ops.context():
        _, _, info_ref = gradclip.GlobalNorm(1.0, nonfinite=policy).run(
            ops, [p.grad for p in reference], None, None, [f"#{i}" for i in range(len(reference))])
    assert bool(info_fast.finite) == bool(info_ref.finite)
    assert bool(info_fast.skip) == bool(info_ref.skip)
    # The coefficients differ by the reference kernel's own error on the long tensor.
    rtol = 1e-6
    if policy == "zero":
        exact = _exact_global([torch.nan_to_num(t, nan=0.0) for t in tensors], 2.0)
        assert _relative(float(info_fast.norm), exact) <= 1e-6
        rtol += _relative(float(info_ref.norm), exact) * 1.01
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=0, equal_nan=True)


def test_many_small_and_few_large_in_mixed_dtypes_keep_their_order():
    generator = torch.Generator().manual_seed(11)
    tensors = []
    for i in range(400):
        dtype = (torch.float32, torch.bfloat16, torch.float64, torch.float16)[i % 4]
        size = _threshold(dtype) + 3 if i % 97 == 0 else 1 + i % 50
        tensors.append(torch.randn(size, generator=generator).to(dtype))
    fast = get_ops(tensors, framework="torch").norms(tensors, 2.0)
    reference = get_ops(tensors, foreach=False, framework="torch").norms(tensors, 2.0)
    assert fast.dtype == torch.float64  # one fp64 gradient: fp64 accumulation for all
    for index, tensor in enumerate(tensors):
        assert _relative(float(fast[index]), _exact(tensor, 2.0)) <= 1e-6, index
        if tensor.numel() < _threshold(tensor.dtype):  # torch's kernels, in the right places
            assert fast[index] == reference[index], index


def test_grouping_is_reused_for_the_same_list_and_redone_for_new_tensors():
    tensors = [torch.ones(3), torch.ones(4, dtype=torch.float64)]
    ops = TorchOps(tensors, inplace=True)
    first = ops._groups(tensors)
    assert ops._groups(tensors) is first
    # The same list object, now holding another tensor: grouped again, results follow it.
    tensors[0] = torch.full((5,), 2.0)
    assert ops._groups(tensors) is not first
    torch.testing.assert_close(ops.norms(tensors, 2.0), torch.tensor([math.sqrt(20), 2.0], dtype=torch.float64))
    scaled = ops.scale(tensors, torch.tensor(0.5, dtype=torch.float64))
    assert scaled[0] is tensors[0] and torch.equal(tensors[0], torch.ones(5))


def test_foreach_flags_keep_torch_kernels():
    """foreach=True / False are torch's kernels: bit-for-bit torch on large tensors too."""
    tensor = torch.randn(1 << 20, generator=torch.Generator().manual_seed(5))
    expected = torch.nn.utils.get_total_norm([tensor], 2.0, foreach=True)
    for foreach in (True, False):
        assert torch.equal(get_ops([tensor], foreach=foreach, framework="torch").norms([tensor], 2.0)[0], expected)


def test_fast_path_reads_no_value_on_the_host(make_torch_params):
    tensors = _tensors(torch.bfloat16) + _tensors(torch.float32)
    params = make_torch_params(tensors)
    with record_host_reads() as calls:
        gradclip.GlobalNorm(1.0).clip_(params)
        gradclip.GlobalNorm(1.0, norm_type=math.inf).clip_(params)
    assert calls == []


def test_fold_with_large_tensors_equals_the_unfolded_step():
    """P2's path: the norm of a fused AdamW fold comes from the blocked norms."""
    generator = torch.Generator().manual_seed(6)
    shapes = [(BLOCKED_MIN_NUMEL_WIDE + 1,), (BLOCKED_MIN_NUMEL_WIDE // 1024, 1024), (10,)]
    grads = [torch.randn(s, generator=generator) for s in shapes]
    results = []
    for fold in (True, False):
        params = [torch.nn.Parameter(torch.ones(s)) for s in shapes]
        optimizer = gct.ClippedOptimizer(torch.optim.AdamW(params, lr=0.1, fused=True), gradclip.GlobalNorm(1.0),
                                         fold=fold)
        for g, p in zip(grads, params):
            p.grad = g.clone()
        optimizer.step()
        assert optimizer.folded is fold
        results.append((params, optimizer.last_info.norm))
    (folded, n_folded), (plain, n_plain) = results
    torch.testing.assert_close(n_folded, n_plain, rtol=1e-6, atol=0)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_peak_extra_memory_does_not_grow_with_the_parameters(make_torch_params):
    """O(tensors): 8x the elements in the same number of tensors adds (almost) nothing."""
    from gradclip.bench import _peak_extra_bytes

    peaks, sizes = [], []
    for n in (CHUNK, 8 * CHUNK):  # the bf16 scratch buffer is at its cap (CHUNK elements) in both
        params = make_torch_params([torch.randn(n), torch.randn(n), torch.randn(n).bfloat16()])
        sizes.append(sum(p.grad.numel() * p.grad.element_size() for p in params))
        clipper = gradclip.GlobalNorm(1.0)
        peaks.append(_peak_extra_bytes(lambda: clipper.clip_(params), torch.device("cpu")))
        del params
    # What grows is the transient row norms of the fp32 tensor being reduced (4 bytes per ROW
    # elements) and one value per CHUNK bf16 elements.
    assert peaks[1] - peaks[0] <= 7 * CHUNK // ROW * 4 + 7 * 4 + 256, peaks
    assert (peaks[1] - peaks[0]) / (sizes[1] - sizes[0]) < 1e-3
    assert peaks[1] <= CHUNK * 4 + 8 * CHUNK // ROW * 4 + 64 * 1024, peaks


def _small_tensors(dtype, seed=12):
    """Small tensors, most sharing a shape with others, in an interleaved order: stacked rows."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    tensors = []
    for i in range(60):
        tensors.append(randn(768) * (i + 1))              # one shape, many tensors
        tensors.append(randn(3, 5))                       # another shape
        if i % 3 == 0:
            tensors.append(randn(()))                     # 0-d: rows of one element
        if i % 7 == 0:
            tensors.append(randn(5, 7).t())               # not contiguous: stacked as a copy
    tensors += [randn(STACK_MAX_NUMEL), randn(STACK_MAX_NUMEL), randn(STACK_MAX_NUMEL + 1)]
    tensors += [randn(11), randn(0), randn(0)]            # a shape of its own, empties
    return tensors


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stacked_small_norms_equal_torch_foreach_bit_for_bit(dtype, norm_type):
    tensors = _small_tensors(dtype)
    fast = get_ops(tensors, framework="torch").norms(tensors, norm_type)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    nonempty = [t for t in tensors if t.numel()]
    expected = iter(torch._foreach_norm(nonempty, norm_type, dtype=acc))
    for index, tensor in enumerate(tensors):
        want = next(expected) if tensor.numel() else torch.zeros((), dtype=acc)
        assert torch.equal(fast[index], want), (index, tuple(tensor.shape))


def test_stacking_goes_chunk_by_chunk_beyond_the_chunk_size():
    """More same-shape elements than CHUNK: several stacks, each bounded, the order kept."""
    count = CHUNK // STACK_MAX_NUMEL * 2 + 3
    generator = torch.Generator().manual_seed(13)
    tensors = [torch.randn(STACK_MAX_NUMEL, generator=generator) * (1 + i % 5) for i in range(count)]
    fast = get_ops(tensors, framework="torch").norms(tensors, 2.0)
    assert torch.equal(fast, torch.stack(torch._foreach_norm(tensors, 2.0)))


def test_many_small_tensors_take_memory_for_one_chunk_only(make_torch_params):
    """Stacking copies at most CHUNK elements at a time: 8x the tensors, no 8x the bytes."""
    from gradclip.bench import _peak_extra_bytes

    peaks = []
    for count in (CHUNK // 1000, 8 * CHUNK // 1000):
        params = make_torch_params([torch.randn(1000) for _ in range(count)])
        clipper = gradclip.GlobalNorm(1.0)
        peaks.append(_peak_extra_bytes(lambda: clipper.clip_(params), torch.device("cpu")))
        del params
    # A stack of at most CHUNK fp32 elements, and the norms themselves (a few bytes per tensor).
    assert peaks[1] <= CHUNK * 4 + 8 * CHUNK // 1000 * 64 + 64 * 1024, peaks


def test_torch_kernels_flag_keeps_torch_norms_everywhere():
    """The drop-ins' setting: torch's kernels for small and large CPU tensors alike."""
    tensors = _small_tensors(torch.float32)[:50] + [torch.randn(BLOCKED_MIN_NUMEL_WIDE + 5)]
    ops = get_ops(tensors, framework="torch", torch_kernels=True)
    assert torch.equal(ops.norms(tensors, 2.0), torch.stack(torch._foreach_norm(tensors, 2.0)))


class _GenericOps(TorchOps):
    """The torch Ops with the base's generic clip coefficient instead of torch's shorter one."""

    clip_coefficient = Ops.clip_coefficient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_clip_coefficient_equals_the_generic_formula_bit_for_bit(dtype):
    ops = get_ops([torch.zeros(1, dtype=dtype)], framework="torch")
    generic = _GenericOps([torch.zeros(1, dtype=dtype)])
    values = [0.0, 1e-45, 1e-30, 1e-7, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, 3e38, math.inf, math.nan]
    for norm in values:
        for threshold in [0.0, 1e-7, 0.5, 1.0, 1e30, math.inf]:
            for eps in (0.0, 1e-6):
                n, t = torch.tensor(norm, dtype=dtype), torch.tensor(threshold, dtype=dtype)
                fast, reference = ops.clip_coefficient(n, t, eps), clip_coefficient(generic, n, t, eps)
                assert fast.dtype == reference.dtype == dtype
                assert torch.equal(fast, reference) or (fast.isnan() and reference.isnan()), (norm, threshold, eps)
                # Rule 4: at or under the threshold, exactly 1.
                if not norm > threshold:
                    assert float(fast) == 1.0


def test_torch_isfinite_agrees_with_torch():
    ops = get_ops([torch.zeros(1)], framework="torch")
    for dtype in DTYPES:
        x = torch.tensor([0.0, -0.0, 1e-40, -3.0, 65504.0, math.inf, -math.inf, math.nan]).to(dtype)
        assert torch.equal(ops.isfinite(x), torch.isfinite(x)), dtype
    assert torch.equal(ops.isfinite(torch.tensor([True, False])), torch.tensor([True, True]))
    assert torch.equal(ops.isfinite(torch.tensor([3, -7])), torch.tensor([True, True]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_norms_match_the_cpu_reference(dtype):
    tensors = _tensors(dtype)
    on_cuda = [t.cuda() for t in tensors]
    fast = get_ops(on_cuda, framework="torch").norms(on_cuda, 2.0).cpu()
    for index, tensor in enumerate(tensors):
        assert _relative(float(fast[index]), _exact(tensor, 2.0)) <= 1e-5, index


def test_flat_concat_and_split_as_round_trip_in_order_and_shape():
    """AGC's per-unit rule runs on the units laid end to end, then split back (torch and NumPy)."""
    import numpy as np

    generator = torch.Generator().manual_seed(14)
    arrays = [torch.randn(3, 1, generator=generator), torch.randn((), generator=generator),
              torch.randn(0, generator=generator), torch.randn(1, 4, 1, generator=generator).double()]
    for ops, items in ((get_ops(arrays, framework="torch"), arrays), (get_ops([], framework="numpy"),
                                                                      [a.numpy() for a in arrays])):
        flat = ops.flat_concat(items)
        assert flat.shape == (8,) and str(flat.dtype).endswith("float64")  # the widest dtype
        back = ops.split_as(flat, items)
        assert [tuple(b.shape) for b in back] == [tuple(a.shape) for a in items]
        for b, a in zip(back, items):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a, dtype=np.float64))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_units_in_one_foreach_call_equals_mul_per_tensor_bit_for_bit(dtype):
    """In place, AGC's per-unit coefficients go through one ``_foreach_mul_`` call; it must
    equal ``mul_`` per tensor (fp32 coefficients broadcast over units, fp16/bf16 rounded once),
    for contiguous, channels-last and strided gradients."""
    generator = torch.Generator().manual_seed(15)

    def grads():
        g = torch.Generator().manual_seed(16)
        conv = torch.randn(8, 3, 3, 3, generator=g).to(dtype)
        strided = torch.randn(6, 10, generator=g).to(dtype).t()  # a transposed view
        return [conv, conv.clone().to(memory_format=torch.channels_last), strided, torch.randn(5, generator=g).to(dtype)]

    coefs = [torch.rand(8, 1, 1, 1, generator=generator), torch.rand(8, 1, 1, 1, generator=generator),
             torch.rand(10, 1, generator=generator), torch.rand(1, generator=generator)]
    fast = grads()
    ops = get_ops(fast, inplace=True, framework="torch")
    returned = ops.scale_units(fast, coefs)
    assert all(r is f for r, f in zip(returned, fast))  # in place: the same tensors
    reference = grads()
    for tensor, coef in zip(reference, coefs):
        tensor.mul_(coef)
    for f, r in zip(fast, reference):
        assert f.dtype == dtype and f.stride() == r.stride() and torch.equal(f, r)
    # Out of place the inputs stay as they were and the results are the same values.
    originals = grads()
    out = get_ops(originals, framework="torch").scale_units(originals, coefs)
    assert all(torch.equal(a, b) for a, b in zip(originals, grads()))
    assert all(torch.equal(o, r) for o, r in zip(out, reference))


def test_split_as_in_cpp_equals_split_and_view():
    """split_as on one device is torch's unflatten_dense_tensors: views of the vector in the
    given shapes, the same as torch.split + view."""
    like = [torch.empty(4, 1, 1, 1), torch.empty(()), torch.empty(0), torch.empty(3, 2)]
    vector = torch.arange(11, dtype=torch.float32)
    ops = get_ops(like, framework="torch")
    got = ops.split_as(vector, like)
    expected = [p.view(a.shape) for p, a in zip(torch.split(vector, [a.numel() for a in like]), like)]
    for g, e in zip(got, expected):
        assert g.shape == e.shape and torch.equal(g, e)
        assert g.numel() == 0 or g.data_ptr() == e.data_ptr()  # views, no copy
