"""AGC: unit-wise adaptive gradient clipping (Brock et al. 2021)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import gradclip
from adaptive_helpers import to_np

torch = pytest.importorskip("torch")


def reference_agc(grads, params, clip_factor=0.01, eps=1e-3, kept=0):
    """float64 NumPy transcription of the paper's rule, units along axis ``kept`` for ndim >= 2."""
    out = []
    for g, p in zip(grads, params):
        g64, p64 = np.asarray(g, np.float64), np.asarray(p, np.float64)
        if g64.ndim <= 1:
            axes = None
        else:
            axes = tuple(d for d in range(g64.ndim) if d != kept % g64.ndim)
        g_norm = np.sqrt(np.sum(g64 * g64, axis=axes, keepdims=True))
        p_norm = np.sqrt(np.sum(p64 * p64, axis=axes, keepdims=True))
        limit = clip_factor * np.maximum(p_norm, eps)
        out.append(np.where(g_norm > limit, g64 * limit / np.maximum(g_norm, 1e-6), g64))
    return out


def _case(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(5, 3, 2, 2), (5,), (7, 4), (7,), ()]
    params = [np.array(rng.normal(size=s), dtype=np.float32) for s in shapes]
    grads = [np.array(rng.normal(size=s) * 0.01, dtype=np.float32) for s in shapes]
    grads[0][2] *= 300.0
    grads[2][[1, 5]] *= 300.0
    grads[3] *= 100.0
    return params, grads


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_matches_the_papers_rule_unit_by_unit(framework):
    params, grads = _case()
    expected = reference_agc(grads, params, clip_factor=0.02)
    if framework == "torch":
        params = [torch.from_numpy(p) for p in params]
        grads = [torch.from_numpy(g) for g in grads]
    out, info = gradclip.AGC(clip_factor=0.02).clip(grads, params=params)
    for o, e in zip(out, expected):
        np.testing.assert_allclose(to_np(o), e, rtol=2e-6, atol=1e-12)
    assert bool(info.clipped)
    assert float(info.threshold) == pytest.approx(0.02)
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in map(to_np, grads)))
    assert float(info.norm) == pytest.approx(norm, rel=1e-6)
    after = math.sqrt(sum(float(np.sum(e**2)) for e in expected))
    assert float(info.coef) == pytest.approx(after / norm, rel=1e-5)


def test_clipped_units_end_exactly_at_their_limit_and_others_are_bit_identical():
    params, grads = _case()
    out, _ = gradclip.AGC(clip_factor=0.02).clip(grads, params=params)
    w, g, o = params[2].astype(np.float64), grads[2], out[2]
    for row in range(7):
        limit = 0.02 * max(np.linalg.norm(w[row]), 1e-3)
        if np.linalg.norm(g[row].astype(np.float64)) > limit:
            assert np.linalg.norm(o[row].astype(np.float64)) == pytest.approx(limit, rel=1e-5)
        else:
            assert np.array_equal(o[row], g[row])


def test_under_the_limit_gradients_are_untouched_bit_for_bit():
    params, grads = _case()
    small = [np.asarray(g * np.float32(1e-6)) for g in grads]
    model_out, info = gradclip.AGC(clip_factor=0.5).clip(small, params=params)
    for o, g in zip(model_out, small):
        assert np.array_equal(o, g)
    assert not bool(info.clipped) and float(info.coef) == 1.0


def test_zero_weights_use_the_eps_floor():
    """A zero-initialised bias can still move: its gradient may reach clip_factor * eps."""
    (out,), _ = gradclip.AGC(clip_factor=0.1, eps=1e-3).clip([np.full(4, 5.0, np.float32)], params=[np.zeros(4, np.float32)])
    assert np.linalg.norm(out) == pytest.approx(1e-4, rel=1e-5)


def test_clip_in_place_on_a_model_finds_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    model(torch.randn(8, 4)).pow(2).sum().mul(1e3).backward()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    grads = [p.grad.numpy().copy() for p in model.parameters()]
    info = gradclip.AGC().clip_(model)
    assert bool(info.clipped)
    for p, e in zip(model.parameters(), reference_agc(grads, params)):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=2e-6, atol=1e-12)


def test_exclude_by_name_pattern():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    model(torch.randn(8, 4)).pow(2).sum().mul(1e3).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    gradclip.AGC(exclude=("2.*",)).clip_(model)
    assert torch.equal(model[2].weight.grad, before["2.weight"])
    assert torch.equal(model[2].bias.grad, before["2.bias"])
    assert not torch.equal(model[0].weight.grad, before["0.weight"])


def test_exclude_accepts_a_single_pattern_and_matches_dict_keys():
    params, grads = _case()
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"]
    out, _ = gradclip.AGC(exclude="fc.*").clip(dict(zip(names, grads)), params=dict(zip(names, params)))
    assert np.array_equal(out["fc.weight"], grads[2]) and np.array_equal(out["fc.bias"], grads[3])
    assert not np.array_equal(out["conv.weight"], grads[0])


def test_an_exclude_pattern_matching_nothing_warns_once():
    params, grads = _case()
    clipper = gradclip.AGC(exclude=("head.*",))
    with pytest.warns(RuntimeWarning, match=r"'head\.\*' matches no parameter"):
        clipper.clip(grads, params=params)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipper.clip(grads, params=params)


@pytest.mark.parametrize("axis,kept", [(-1, -1), (1, 1), ((0,), 0)])
def test_axis_override(axis, kept):
    params, grads = _case()
    out, _ = gradclip.AGC(clip_factor=0.02, axis=axis).clip(grads[2:4], params=params[2:4])
    for o, e in zip(out, reference_agc(grads[2:4], params[2:4], clip_factor=0.02, kept=kept)):
        np.testing.assert_allclose(o, e, rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_is_preserved(dtype):
    params, grads = _case()
    p = [torch.from_numpy(x).to(dtype) for x in params]
    g = [torch.from_numpy(x).to(dtype) for x in grads]
    out, info = gradclip.AGC(clip_factor=0.02).clip(g, params=p)
    assert all(o.dtype == dtype for o in out)
    expected = reference_agc([x.double().numpy() for x in g], [x.double().numpy() for x in p], clip_factor=0.02)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for o, e in zip(out, expected):
        np.testing.assert_allclose(o.double().numpy(), e, rtol=tol, atol=tol * 1e-3)


def test_nonfinite_policies():
    params, grads = _case()
    grads[0][1, 0, 0, 0] = np.nan
    out, info = gradclip.AGC(clip_factor=0.02).clip(grads, params=params)
    assert not bool(info.finite)
    assert np.isnan(out[0][1, 0, 0, 0]) and np.array_equal(out[0][1], grads[0][1], equal_nan=True)
    assert not np.array_equal(out[0][2], grads[0][2])  # a finite unit is still clipped
    out, info = gradclip.AGC(clip_factor=0.02, nonfinite="skip").clip(grads, params=params)
    assert bool(info.skip) and all(np.array_equal(o, g, equal_nan=True) for o, g in zip(out, grads))
    out, info = gradclip.AGC(clip_factor=0.02, nonfinite="zero").clip(grads, params=params)
    # info.finite describes the gradients as given; the zeroed ones are clipped.
    assert not bool(info.finite) and out[0][1, 0, 0, 0] == 0 and bool(info.clipped)
    zeroed = [np.where(np.isfinite(g), g, 0.0).astype(np.float32) for g in grads]
    want, _ = gradclip.AGC(clip_factor=0.02).clip(zeroed, params=params)
    assert all(np.array_equal(o, w) for o, w in zip(out, want))
    with pytest.raises(gradclip.NonFiniteError, match="#0"):
        gradclip.AGC(nonfinite="raise").clip(grads, params=params)


def test_registry_default():
    assert isinstance(gradclip.get("agc"), gradclip.AGC)
    assert gradclip.get("agc").clip_factor == 0.01


# -- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"clip_factor": 0.0}, r"clip_factor must be in \(0, inf\), got 0\.0"),
        ({"clip_factor": -1}, r"clip_factor .* got -1"),
        ({"clip_factor": float("inf")}, r"clip_factor .* got inf"),
        ({"clip_factor": float("nan")}, r"clip_factor .* got nan"),
        ({"clip_factor": "0.01"}, r"clip_factor must be a real number, got '0\.01'"),
        ({"eps": 0.0}, r"eps must be in \(0, inf\), got 0\.0"),
        ({"eps": -1e-3}, r"eps .* got -0\.001"),
        ({"exclude": 3}, r"exclude must be a sequence of parameter-name patterns, got 3"),
        ({"exclude": ["fc.*", 2]}, r"exclude must hold non-empty parameter-name patterns \(str\), got 2"),
        ({"exclude": [""]}, r"exclude .* got ''"),
        ({"axis": 1.5}, r"axis must be None, an int or a tuple of ints .* got 1\.5"),
        ({"axis": True}, r"axis .* got True"),
        ({"axis": (0, 0)}, r"axis must not repeat an axis, got \(0, 0\)"),
        ({"nonfinite": "ignore"}, r"nonfinite must be one of .*; got 'ignore'"),
    ],
)
def test_bad_constructor_arguments_name_the_argument_and_value(kwargs, pattern):
    with pytest.raises(gradclip.InvalidArgumentError, match=pattern) as excinfo:
        gradclip.AGC(**kwargs)
    assert str(excinfo.value).startswith("AGC: ")


def _untouched(grads, copies):
    return all(np.array_equal(g, c) for g, c in zip(grads, copies))


def test_missing_params_is_refused_and_nothing_changes():
    params, grads = _case()
    copies = [g.copy() for g in grads]
    with pytest.raises(gradclip.InvalidArgumentError, match="pass params="):
        gradclip.AGC().clip(grads)
    with pytest.raises(gradclip.InvalidArgumentError, match="its own gradient"):
        gradclip.AGC().clip_(grads)  # NumPy arrays have no separate weights
    assert _untouched(grads, copies)


def test_shape_mismatch_and_axis_out_of_range_are_refused_before_any_write():
    params, grads = _case()
    model_params = [torch.nn.Parameter(torch.from_numpy(p)) for p in params]
    for p, g in zip(model_params, grads):
        p.grad = torch.from_numpy(g.copy())
    copies = [p.grad.clone() for p in model_params]
    with pytest.raises(gradclip.InvalidArgumentError, match=re.escape("axis 5 is out of range for #0 of shape (5, 3, 2, 2)")):
        gradclip.AGC(axis=5).clip_(model_params)
    assert all(torch.equal(p.grad, c) for p, c in zip(model_params, copies))
    bad_params = list(params)
    bad_params[2] = np.zeros((4, 7), np.float32)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"shape \(4, 7\) but its gradient has shape \(7, 4\)"):
        gradclip.AGC().clip(grads, params=bad_params)
