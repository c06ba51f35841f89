"""Every stateless clipper and one-shot function against a plain NumPy float64 reference.

Each method runs on the NumPy and the torch backend, through the three entry points:
``clip`` (functional: inputs unchanged), ``update`` (pure: the clipper's own state unchanged) and
``clip_`` (in place).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gradclip
from _reference import (
    as64,
    ref_average_norm,
    ref_block_rms,
    ref_global_clip,
    ref_global_norm,
    ref_norm,
    ref_norm_sign,
    ref_value,
    ref_zero_outliers,
    to_numpy,
)

SHAPES = [(3, 4), (5,), (2, 2, 2), (1,), ()]
DTYPES = ["float32", "float64"]
BACKENDS = ["numpy", "torch"]
PATHS = ["clip", "update", "clip_"]


def _chain_ref(*refs):
    def run(grads):
        for ref in refs:
            grads = ref(grads)
        return grads

    return run


# (id, factory, reference on a list of float64 arrays, norm type reported in info.norm)
CASES = [
    ("value-symmetric", lambda: gradclip.Value(clip_value=0.7), lambda g: ref_value(g, -0.7, 0.7), 2.0),
    ("value-asymmetric", lambda: gradclip.Value(0.5, 1.5), lambda g: ref_value(g, 0.5, 1.5), 2.0),
    ("value-one-sided", lambda: gradclip.Value(-math.inf, 0.3), lambda g: ref_value(g, -math.inf, 0.3), 2.0),
    ("value-wide", lambda: gradclip.Value(-100.0, 100.0), lambda g: ref_value(g, -100, 100), 2.0),
    ("norm-l2", lambda: gradclip.Norm(1.5), lambda g: ref_norm(g, 1.5), 2.0),
    ("norm-l1", lambda: gradclip.Norm(2.0, norm_type=1.0), lambda g: ref_norm(g, 2.0, 1.0), 1.0),
    ("norm-l3", lambda: gradclip.Norm(1.0, norm_type=3.0), lambda g: ref_norm(g, 1.0, 3.0), 3.0),
    ("norm-inf", lambda: gradclip.Norm(0.8, norm_type=math.inf), lambda g: ref_norm(g, 0.8, math.inf), math.inf),
    ("norm-l0.5", lambda: gradclip.Norm(1.0, norm_type=0.5), lambda g: ref_norm(g, 1.0, 0.5), 0.5),
    ("global-l2", lambda: gradclip.GlobalNorm(1.0), lambda g: ref_global_clip(g, 1.0)[0], 2.0),
    ("global-l1", lambda: gradclip.GlobalNorm(2.0, norm_type=1), lambda g: ref_global_clip(g, 2.0, 1.0)[0], 1.0),
    ("global-l3", lambda: gradclip.GlobalNorm(1.0, norm_type=3), lambda g: ref_global_clip(g, 1.0, 3.0)[0], 3.0),
    # "Any p > 0": non-integer p, and p < 1 (a quasi-norm: sum |g|^p, then the 1/p power).
    ("global-l1.5", lambda: gradclip.GlobalNorm(1.0, norm_type=1.5), lambda g: ref_global_clip(g, 1.0, 1.5)[0], 1.5),
    ("global-l0.5", lambda: gradclip.GlobalNorm(1.0, norm_type=0.5), lambda g: ref_global_clip(g, 1.0, 0.5)[0], 0.5),
    ("global-l0.25", lambda: gradclip.GlobalNorm(2.0, norm_type=0.25), lambda g: ref_global_clip(g, 2.0, 0.25)[0], 0.25),
    (
        "global-inf",
        lambda: gradclip.GlobalNorm(0.5, norm_type=math.inf),
        lambda g: ref_global_clip(g, 0.5, math.inf)[0],
        math.inf,
    ),
    ("global-eps0", lambda: gradclip.GlobalNorm(1.0, eps=0.0), lambda g: ref_global_clip(g, 1.0, eps=0.0)[0], 2.0),
    ("global-untouched", lambda: gradclip.GlobalNorm(1e6), lambda g: ref_global_clip(g, 1e6)[0], 2.0),
    ("average-norm", lambda: gradclip.AverageNorm(0.3), lambda g: ref_average_norm(g, 0.3), 2.0),
    ("block-rms", lambda: gradclip.BlockRMS(0.6), lambda g: ref_block_rms(g, 0.6), 2.0),
    ("norm-sign", lambda: gradclip.NormSign(1.0), lambda g: ref_norm_sign(g, 1.0), 2.0),
    ("norm-sign-untouched", lambda: gradclip.NormSign(1e6), lambda g: ref_norm_sign(g, 1e6), 2.0),
    ("zero-outliers", lambda: gradclip.ZeroOutliers(1.0), lambda g: ref_zero_outliers(g, 1.0), 2.0),
    (
        "chain-value-global",
        lambda: gradclip.chain(gradclip.Value(clip_value=1.5), gradclip.GlobalNorm(2.0)),
        _chain_ref(lambda g: ref_value(g, -1.5, 1.5), lambda g: ref_global_clip(g, 2.0)[0]),
        2.0,
    ),
    (
        "chain-outliers-norm-rms",
        lambda: gradclip.chain(gradclip.ZeroOutliers(2.5), gradclip.Norm(1.0), gradclip.BlockRMS(0.4)),
        _chain_ref(lambda g: ref_zero_outliers(g, 2.5), lambda g: ref_norm(g, 1.0), lambda g: ref_block_rms(g, 0.4)),
        2.0,
    ),
    ("chain-single", lambda: gradclip.chain(gradclip.Norm(0.5)), lambda g: ref_norm(g, 0.5), 2.0),
]


def _data(seed: int, dtype: str) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s) * 1.5).astype(dtype) for s in SHAPES]


def _to_backend(arrays, backend):
    if backend == "numpy":
        return [np.array(a) for a in arrays]
    torch = pytest.importorskip("torch", reason="the torch backend needs torch")
    return [torch.from_numpy(np.array(a)) for a in arrays]


def _copies(arrays):
    return [a.clone() if hasattr(a, "clone") else a.copy() for a in arrays]


def _assert_same_bits(a, b):
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def _tolerance(dtype):
    return {"float32": 2e-6, "float64": 1e-12}[dtype]


def _assert_close(got, want, dtype):
    rtol = _tolerance(dtype)
    for g, w in zip(got, want):
        np.testing.assert_allclose(to_numpy(g), w, rtol=rtol, atol=rtol * max(1.0, float(np.abs(w).max(initial=0))))


def _run(path, clipper, grads, backend, make_torch_params):
    """Run one entry point; return (clipped list, info)."""
    if path == "clip":
        before = _copies(grads)
        out, info = clipper.clip(grads)
        for g, b in zip(grads, before):
            _assert_same_bits(g, b)  # functional: inputs unchanged
        return out, info
    if path == "update":
        before = _copies(grads)
        saved = copy.deepcopy(clipper.state_dict())
        state = clipper.init(grads)
        out, new_state, info = clipper.update(grads, state)
        assert type(new_state) is type(state)
        for g, b in zip(grads, before):
            _assert_same_bits(g, b)
        assert clipper.state_dict() == saved  # pure: the object's own state did not move
        return out, info
    if backend == "numpy":
        info = clipper.clip_(grads)
        return grads, info
    params = make_torch_params(grads)
    info = clipper.clip_(params)
    return [p.grad for p in params], info


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_clipper_matches_numpy_reference(case, dtype, backend, path, make_torch_params):
    _, factory, reference, norm_type = case
    for seed in range(3):
        data = _data(seed, dtype)
        grads = _to_backend(data, backend)
        expected = reference(as64(data))
        out, info = _run(path, factory(), grads, backend, make_torch_params)
        assert len(out) == len(data)
        for o, d in zip(out, data):
            assert tuple(o.shape) == d.shape
            assert str(o.dtype).replace("torch.", "") == dtype
            assert type(o).__module__.split(".")[0] == backend
        _assert_close(out, expected, dtype)
        # info.norm is the global norm of the incoming gradients.
        assert float(info.norm) == pytest.approx(ref_global_norm(data, norm_type), rel=1e-5)
        changed = any(not np.array_equal(to_numpy(o), d.astype(np.float64)) for o, d in zip(out, data))
        assert bool(info.clipped) == changed
        assert bool(info.finite) and not bool(info.skip)
        if not changed:
            assert float(info.coef) == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_fields_of_global_norm(backend):
    data = _data(0, "float32")
    grads = _to_backend(data, backend)
    _, info = gradclip.GlobalNorm(1.0).clip(grads)
    _, norm, coef = ref_global_clip(data, 1.0)
    assert float(info.norm) == pytest.approx(norm, rel=1e-6)
    assert float(info.coef) == pytest.approx(coef, rel=1e-6)
    assert float(info.threshold) == 1.0
    assert info.to_dict() == {
        "norm": pytest.approx(norm, rel=1e-6),
        "threshold": 1.0,
        "coef": pytest.approx(coef, rel=1e-6),
        "clipped": True,
        "finite": True,
        "skip": False,
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_structures_round_trip(backend):
    data = _data(1, "float32")
    grads = _to_backend(data, backend)
    tree = {"encoder": {"w": grads[0], "b": grads[1]}, "head": (grads[2], None), "skip": None}
    out, info = gradclip.GlobalNorm(1.0).clip(tree)
    expected = ref_global_clip([data[0], data[1], data[2]], 1.0)[0]
    assert set(out) == {"encoder", "head", "skip"} and out["skip"] is None
    assert isinstance(out["head"], tuple) and out["head"][1] is None
    _assert_close([out["encoder"]["w"], out["encoder"]["b"], out["head"][0]], expected, "float32")
    assert float(info.norm) == pytest.approx(ref_global_norm(data[:3]), rel=1e-6)
    clipped, state, _ = gradclip.Norm(0.5).update(tree, None)
    assert clipped["skip"] is None and state == gradclip.Norm(0.5).init(tree)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_shot_functions(backend, dtype):
    data = _data(2, dtype)
    for function, args, reference in [
        (gradclip.clip_by_value, (-0.5, 1.0), lambda g: ref_value(g, -0.5, 1.0)),
        (gradclip.clip_by_norm, (1.0,), lambda g: ref_norm(g, 1.0)),
        (gradclip.clip_by_norm, (1.0, math.inf), lambda g: ref_norm(g, 1.0, math.inf)),
        (gradclip.zero_outliers, (1.2,), lambda g: ref_zero_outliers(g, 1.2)),
    ]:
        grads = _to_backend(data, backend)
        before = _copies(grads)
        out = function(grads, *args)
        assert isinstance(out, list) and len(out) == len(grads)
        _assert_close(out, reference(as64(data)), dtype)
        for g, b in zip(grads, before):
            _assert_same_bits(g, b)

    for norm_type in (0.5, 1.0, 1.5, 2.0, 3.0, math.inf):
        grads = _to_backend(data, backend)
        before = _copies(grads)
        out, norm = gradclip.clip_by_global_norm(grads, 1.0, norm_type)
        expected, expected_norm, _ = ref_global_clip(data, 1.0, norm_type)
        _assert_close(out, expected, dtype)
        assert float(norm) == pytest.approx(expected_norm, rel=1e-6)
        for g, b in zip(grads, before):
            _assert_same_bits(g, b)
        measured = gradclip.global_norm(grads, norm_type)
        assert type(measured).__module__.split(".")[0] == backend
        assert float(measured) == pytest.approx(expected_norm, rel=1e-6)

    # A single array in, a single array out.
    single = _to_backend(data[:1], backend)[0]
    out = gradclip.clip_by_value(single, -0.1, 0.1)
    assert tuple(out.shape) == data[0].shape
    _assert_close([out], ref_value([data[0]], -0.1, 0.1), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_weights_in_place(backend, make_torch_params):
    data = _data(3, "float32")
    expected = ref_value(as64(data), -0.4, 0.25)
    if backend == "numpy":
        weights = [d.copy() for d in data]
        assert gradclip.clip_weights_(weights, -0.4, 0.25) is None
        _assert_close(weights, expected, "float32")
        single = data[0].copy()
        gradclip.clip_weights_(single, -0.4, 0.25)
        _assert_close([single], expected[:1], "float32")
        return
    torch = pytest.importorskip("torch", reason="torch parameters")
    params = [torch.nn.Parameter(torch.from_numpy(d.copy())) for d in data]
    grads = [torch.ones_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    gradclip.clip_weights_(params, -0.4, 0.25)
    _assert_close([p.detach() for p in params], expected, "float32")
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)  # gradients are not touched
        assert p.requires_grad and p.is_leaf


@pytest.mark.parametrize("backend", BACKENDS)
def test_clippers_accept_empty_tensors(backend):
    data = [np.zeros((0,), np.float32), np.array([3.0, 4.0], np.float32), np.zeros((2, 0), np.float32)]
    for _, factory, reference, norm_type in CASES:
        grads = _to_backend(data, backend)
        with np.errstate(all="raise"):
            out, info = factory().clip(grads)
        assert [tuple(o.shape) for o in out] == [d.shape for d in data]
        _assert_close(out, reference(as64(data)), "float32")
        assert float(info.norm) == pytest.approx(ref_global_norm(data, norm_type), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradients_are_left_alone(backend):
    data = [np.zeros((3,), np.float32), np.zeros((2, 2), np.float32)]
    for _, factory, reference, _ in CASES:
        grads = _to_backend(data, backend)
        with np.errstate(all="raise"):  # no NumPy warning (divide by zero) either
            out, info = factory().clip(grads)
        _assert_close(out, reference(as64(data)), "float32")
        assert float(info.norm) == 0.0
        assert all(np.isfinite(to_numpy(o)).all() for o in out)
        assert np.isfinite(float(info.coef))
