"""Cases for checking one backend's Ops primitives against the NumPy reference backend.

Each case is ``(id, dtypes, fn)``: ``fn(ops, conv, dtype)`` calls primitives of ``ops`` on inputs
built with ``conv(float64_numpy_array, dtype)`` and returns an array, a number, or a (nested)
list/tuple of them. ``tests/test_tf_backend.py`` and ``tests/test_jax_backend.py`` run every case
on their backend and on NumPy and compare the results (values and dtypes).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["CASES", "case_ids", "compare"]

FLOATS = ("float16", "bfloat16", "float32", "float64")
F32 = ("float32",)

_rng = np.random.default_rng(7)
A = _rng.normal(size=(4, 3)) * 3.0
B = _rng.normal(size=(5,))
C = _rng.normal(size=(2, 3, 2, 2))
EMPTY = np.zeros((0,))
SPECIAL = np.array([1.5, -2.5, np.inf, -np.inf, np.nan, 0.0, 0.25])


def _grads(conv, dtype, arrays=(A, B, C)):
    return [conv(a, dtype) for a in arrays]


CASES = []


def case(name, dtypes=FLOATS):
    def register(fn):
        CASES.append((name, dtypes, fn))
        return fn

    return register


for _p in (1.0, 2.0, 3.0, math.inf):

    @case(f"norms-p{_p}")
    def _norms(ops, conv, dtype, p=_p):
        return ops.norms(_grads(conv, dtype, (A, B, EMPTY, C)), p)

    @case(f"global_norm-p{_p}")
    def _global(ops, conv, dtype, p=_p):
        return ops.global_norm(_grads(conv, dtype), p)


@case("norms-of-specials")
def _norms_special(ops, conv, dtype):
    return [ops.norms([conv(SPECIAL[:4], dtype), conv(SPECIAL[4:], dtype)], p) for p in (1.0, 2.0, math.inf)]


@case("global_norm-fp16-overflow", ("float16",))
def _overflow(ops, conv, dtype):
    return ops.global_norm([conv(np.full((4,), 300.0), dtype), conv(np.full((2,), 6e4), dtype)], 2.0)


@case("global_norm-mixed-dtypes", F32)
def _mixed(ops, conv, dtype):
    return ops.global_norm([conv(A, "float16"), conv(B, "bfloat16"), conv(C, "float32")], 2.0)


@case("global_norm-empty-list", F32)
def _empty_list(ops, conv, dtype):
    return ops.global_norm([], 2.0)


@case("combine_norms")
def _combine(ops, conv, dtype):
    norms = ops.norms(_grads(conv, dtype), 2.0)
    return [ops.combine_norms(norms, p) for p in (1.0, 2.0, 3.0, math.inf)]


@case("scale")
def _scale(ops, conv, dtype):
    return ops.scale(_grads(conv, dtype), ops.scalar(0.37, "float32"))


@case("scale-by-one-is-exact")
def _scale_one(ops, conv, dtype):
    return ops.scale(_grads(conv, dtype), ops.scalar(1.0, "float32"))


@case("scale_each")
def _scale_each(ops, conv, dtype):
    return ops.scale_each(_grads(conv, dtype), ops.array([0.5, 1.0, 0.125], "float32"))


@case("clamp")
def _clamp(ops, conv, dtype):
    grads = _grads(conv, dtype, (A, SPECIAL))
    return [ops.clamp(grads, -1.0, 0.5), ops.clamp(grads, 0.5, 1.5), ops.clamp(grads, -math.inf, 1.0),
            ops.clamp(grads, -math.inf, math.inf)]


@case("zero_above")
def _zero_above(ops, conv, dtype):
    return ops.zero_above(_grads(conv, dtype, (A, SPECIAL)), 1.5)


@case("sign_where")
def _sign_where(ops, conv, dtype):
    grads = _grads(conv, dtype, (A, SPECIAL[[0, 1, 5, 6]]))
    return [ops.sign_where(grads, 0.25, ops.scalar(True, "bool")), ops.sign_where(grads, 0.25, ops.scalar(False, "bool"))]


@case("zero_nonfinite")
def _zero_nonfinite(ops, conv, dtype):
    return ops.zero_nonfinite(_grads(conv, dtype, (A, SPECIAL)))


@case("finite_each")
def _finite_each(ops, conv, dtype):
    return [ops.finite_each(_grads(conv, dtype, (A, SPECIAL, EMPTY))), ops.finite_each([])]


@case("extrema")
def _extrema(ops, conv, dtype):
    return [ops.extrema(_grads(conv, dtype, (A, EMPTY, C))), ops.extrema([])]


@case("numel")
def _numel(ops, conv, dtype):
    return [ops.numel(g) for g in _grads(conv, dtype, (A, EMPTY, C, np.float64(2.0).reshape(())))]


@case("scalar-math", F32)
def _scalar_math(ops, conv, dtype):
    x = ops.scalar(2.0, "float32")
    y = ops.scalar(3.0, "float32")
    return [ops.where(x > y, x, y), ops.minimum(x, y), ops.maximum(x, y), ops.sqrt(x), ops.exp(x),
            ops.log(x), ops.isfinite(ops.scalar(math.inf)), ops.stack([x, y]), ops.stack([]),
            ops.any(ops.array([False, True], "bool")), ops.to_host(x), ops.to_list(ops.array([1.0, 2.5])),
            ops.array([[1, 2], [3, 4]], "int64")]


@case("small-vector-math", F32)
def _vector_math(ops, conv, dtype):
    x = ops.array([3.5, -1.25, 2.0, 7.0, 0.5], "float32")
    return [ops.sum(x), ops.sum(x > 1.0), ops.arange(4), ops.cast(x, "int64"), ops.cast(x, "float64"),
            ops.floor(x), ops.sort(x), ops.take(x, ops.array([4, 0, 0], "int64")), ops.cumsum(x),
            ops.cumsum(ops.array([1, 2, 3], "int64")), ops.sort(ops.array([2.0, math.inf, -1.0], "float32"))]


@case("unit_norms")
def _unit_norms(ops, conv, dtype):
    c = conv(C, dtype)
    a = conv(A, dtype)
    scalar = conv(np.float64(-3.0).reshape(()), dtype)
    return ops.unit_norms([c, c, c, c, a, a, scalar, conv(EMPTY, dtype)],
                          [None, (), (0,), (0, 3), (1,), (0,), None, None])


@case("scale_units")
def _scale_units(ops, conv, dtype):
    grads = _grads(conv, dtype, (A, C))
    coefs = ops.unit_norms(grads, [(0,), (0,)])
    return ops.scale_units(grads, [1.0 / (1.0 + k) for k in coefs])


@case("flat_concat_split_as")
def _flat_concat_split_as(ops, conv, dtype):
    arrays = ops.unit_norms(_grads(conv, dtype, (A, C, B)), [(0,), (1, 3), None])
    arrays.append(conv(EMPTY, "float32"))
    flat = ops.flat_concat(arrays)
    return flat, ops.split_as(flat * 2.0, arrays), ops.flat_concat([])


@case("uniform", F32)
def _uniform(ops, conv, dtype):
    return ops.uniform(ops.scalar(123456789, "int64"), ops.scalar(42, "int64"), [(3, 4), (5,), (), (0, 2)])


@case("select")
def _select(ops, conv, dtype):
    grads = _grads(conv, dtype, (A, B))
    masks = [conv(A, "float32") > 0.0, ops.scalar(True, "bool")]
    replacements = [conv(A * 0.5, dtype), conv(np.zeros_like(B), dtype)]
    return ops.select(grads, replacements, masks)


def case_ids():
    """``(case index, dtype)`` pairs with readable ids, for ``pytest.mark.parametrize``."""
    params, ids = [], []
    for index, (name, dtypes, _fn) in enumerate(CASES):
        for dtype in dtypes:
            params.append((index, dtype))
            ids.append(f"{name}-{dtype}")
    return params, ids


def compare(result, expected, rtol: float, where: str = "result", x32: bool = False) -> None:
    """Assert ``result`` (any backend) equals ``expected`` (NumPy): structure, dtypes, values.

    Args:
        rtol: Relative tolerance for floats (NaN matches NaN, inf matches inf).
        x32: Accept int32 for int64 and float32 for float64 (JAX without ``jax_enable_x64``).
    """
    from _frameworks import dtype_name, to64

    if isinstance(expected, (list, tuple)):
        assert isinstance(result, (list, tuple)), f"{where}: expected a sequence, got {type(result).__name__}"
        assert len(result) == len(expected), f"{where}: length {len(result)} != {len(expected)}"
        for i, (r, e) in enumerate(zip(result, expected)):
            compare(r, e, rtol, f"{where}[{i}]", x32)
        return
    if isinstance(expected, (bool, int, float)) and not hasattr(expected, "dtype"):
        assert not hasattr(result, "shape") or result.shape == (), f"{where}: expected a number"
        if isinstance(expected, float):
            np.testing.assert_allclose(float(result), expected, rtol=rtol, err_msg=where)
        else:
            assert result == expected, f"{where}: {result!r} != {expected!r}"
        return
    got, want = dtype_name(result), dtype_name(expected)
    if x32 and ({got, want} == {"int32", "int64"} or {got, want} == {"float32", "float64"}):
        pass
    else:
        assert got == want, f"{where}: dtype {got} != {want}"
    r64, e64 = to64(result), to64(expected)
    assert r64.shape == e64.shape, f"{where}: shape {r64.shape} != {e64.shape}"
    scale = float(np.max(np.abs(e64[np.isfinite(e64)]))) if np.isfinite(e64).any() else 1.0
    np.testing.assert_allclose(r64, e64, rtol=rtol, atol=rtol * scale * 1e-3, equal_nan=True, err_msg=where)
