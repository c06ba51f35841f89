"""One NaN or inf element under each non-finite policy (gradclip/clippers/nonfinite.py).

``propagate``: tensors holding NaN/inf pass through as they are (per-tensor methods still clip the
finite tensors); ``raise``: NonFiniteError naming the tensors, nothing modified; ``zero``: the bad
elements become 0, then the rest is clipped; ``skip``: nothing modified, ``info.skip`` set.
Finite elements never become NaN under any policy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip
from _reference import (
    as64,
    ref_average_norm,
    ref_block_rms,
    ref_global_clip,
    ref_norm,
    ref_norm_sign,
    to_numpy,
)

POLICIES = ["propagate", "raise", "zero", "skip"]
BAD_VALUES = [math.nan, math.inf, -math.inf]
BACKENDS = ["numpy", "torch"]

# name -> (factory(policy), reference on float64 lists, whether the method works per tensor)
METHODS = {
    "GlobalNorm": (lambda policy: gradclip.GlobalNorm(1.0, nonfinite=policy), lambda g: ref_global_clip(g, 1.0)[0], False),
    "GlobalNorm-inf": (
        lambda policy: gradclip.GlobalNorm(1.0, norm_type=math.inf, nonfinite=policy),
        lambda g: ref_global_clip(g, 1.0, math.inf)[0],
        False,
    ),
    "Norm": (lambda policy: gradclip.Norm(1.0, nonfinite=policy), lambda g: ref_norm(g, 1.0), True),
    "AverageNorm": (lambda policy: gradclip.AverageNorm(0.1, nonfinite=policy), lambda g: ref_average_norm(g, 0.1), True),
    "BlockRMS": (lambda policy: gradclip.BlockRMS(0.5, nonfinite=policy), lambda g: ref_block_rms(g, 0.5), True),
    "NormSign": (lambda policy: gradclip.NormSign(1.0, nonfinite=policy), lambda g: ref_norm_sign(g, 1.0), False),
}
BAD_TENSOR = 1


def _data(bad):
    rng = np.random.default_rng(5)
    data = [(rng.standard_normal(s) * 3).astype(np.float32) for s in [(4,), (3, 3), (5,)]]
    data[BAD_TENSOR].reshape(-1)[2] = bad
    return data


def _backend(arrays, backend):
    if backend == "numpy":
        return [a.copy() for a in arrays]
    torch = pytest.importorskip("torch", reason="torch backend")
    return [torch.from_numpy(a.copy()) for a in arrays]


def _in_place_target(grads, backend):
    """What clip_ takes: NumPy arrays themselves, torch parameters holding the tensors as .grad."""
    if backend == "numpy":
        return grads, grads
    torch = pytest.importorskip("torch", reason="torch backend")
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        params.append(p)
    return params, [p.grad for p in params]


def _expected(method, policy, data):
    _, reference, per_tensor = METHODS[method]
    if policy in ("skip", "raise"):
        return as64(data)
    if policy == "zero":
        return reference([np.where(np.isfinite(d), d, 0.0) for d in as64(data)])
    # propagate
    if per_tensor:
        return [d.copy() if not np.isfinite(d).all() else reference([d])[0] for d in as64(data)]
    return as64(data)


def _check(out, want):
    for o, w in zip(out, want):
        o = to_numpy(o)
        np.testing.assert_array_equal(np.isnan(o), np.isnan(w))
        np.testing.assert_allclose(o, w, rtol=2e-6, atol=1e-7, equal_nan=True)


@pytest.mark.filterwarnings("error")  # handled non-finite values must not warn (NumPy "invalid value")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD_VALUES, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_policy_functional_and_in_place(method, policy, bad, backend):
    data = _data(bad)
    want = _expected(method, policy, data)
    factory = METHODS[method][0]
    for in_place in (False, True):
        grads = _backend(data, backend)
        target, grads = _in_place_target(grads, backend)
        if policy == "raise":
            with pytest.raises(gradclip.NonFiniteError, match=f"#{BAD_TENSOR}") as caught:
                if in_place:
                    factory(policy).clip_(target)
                else:
                    factory(policy).clip(grads)
            assert caught.value.offenders == [f"#{BAD_TENSOR}"]
            _check(grads, want)  # nothing was modified
            continue
        if in_place:
            info = factory(policy).clip_(target)
            out = grads
        else:
            out, info = factory(policy).clip(grads)
            _check(grads, as64(data))  # functional: input untouched
        _check(out, want)
        # Finite elements never become NaN or inf.
        for o, d in zip(out, data):
            assert np.isfinite(to_numpy(o)[np.isfinite(d)]).all()
        assert bool(info.finite) == (policy == "zero")
        assert bool(info.skip) == (policy == "skip")
        assert not math.isnan(float(info.coef))
        if policy == "zero":
            assert math.isfinite(float(info.norm))


@pytest.mark.parametrize("method", list(METHODS))
def test_raise_names_module_parameters_and_leaves_gradients(method):
    torch = pytest.importorskip("torch", reason="parameter names come from a torch nn.Module")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).pow(2).sum().mul(100).backward()
    model[2].weight.grad[0, 1] = float("nan")
    model[0].bias.grad[1] = float("inf")
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    with pytest.raises(gradclip.NonFiniteError) as caught:
        METHODS[method][0]("raise").clip_(model)
    message = str(caught.value)
    assert "0.bias" in message and "2.weight" in message
    assert "0.weight" not in message and "2.bias" not in message
    assert sorted(caught.value.offenders) == ["0.bias", "2.weight"]
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, ValueError)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, before[name], rtol=0, atol=0, equal_nan=True)


def test_raise_names_dict_keys():
    grads = {"encoder": np.array([1.0, np.nan], np.float32), "head": np.array([2.0], np.float32)}
    with pytest.raises(gradclip.NonFiniteError, match="encoder") as caught:
        gradclip.GlobalNorm(1.0, nonfinite="raise").clip(grads)
    assert caught.value.offenders == ["encoder"]


def test_clip_grad_norm_propagate_never_creates_nan():
    torch = pytest.importorskip("torch", reason="torch drop-in")
    import gradclip.torch as gct

    for bad in BAD_VALUES:
        grads = [torch.tensor([3.0, 4.0]), torch.tensor([1.0, bad])]
        params = []
        for g in grads:
            p = torch.nn.Parameter(torch.zeros(2))
            p.grad = g.clone()
            params.append(p)
        norm = gct.clip_grad_norm_(params, 1.0)
        assert not torch.isfinite(norm)
        assert torch.equal(params[0].grad, grads[0])  # torch would write NaN (inf * 0) here
        torch.testing.assert_close(params[1].grad, grads[1], equal_nan=True, rtol=0, atol=0)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_overflow_with_finite_elements(backend):
    # Every element is finite, but the fp32 sum of squares overflows (1e20² = 1e40 > 3.4e38).
    data = [np.full((4,), 1e20, np.float32), np.array([1.0, 2.0], np.float32)]
    for policy in ("propagate", "skip", "zero"):
        grads = _backend(data, backend)
        out, info = gradclip.GlobalNorm(1.0, nonfinite=policy).clip(grads)
        assert not bool(info.finite)
        assert bool(info.skip) == (policy == "skip")
        _check(out, as64(data))  # left as they are, and never NaN
    target, grads = _in_place_target(_backend(data, backend), backend)
    with pytest.raises(gradclip.NonFiniteError, match="overflow"):
        gradclip.GlobalNorm(1.0, nonfinite="raise").clip_(target)
    _check(grads, as64(data))


@pytest.mark.parametrize("backend", BACKENDS)
def test_element_wise_methods_documented_non_finite_behaviour(backend):
    data = [np.array([np.nan, np.inf, -np.inf, 0.5, 3.0], np.float32)]
    out, info = gradclip.Value(-1.0, 1.0).clip(_backend(data, backend))
    _check(out, [np.array([np.nan, 1.0, -1.0, 0.5, 1.0])])  # NaN stays NaN, ±inf clamped
    assert not bool(info.finite)
    out, info = gradclip.ZeroOutliers(1.0).clip(_backend(data, backend))
    _check(out, [np.array([np.nan, 0.0, 0.0, 0.5, 0.0])])  # |NaN| > ε is false: kept
    assert not bool(info.finite)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_finite_under_every_policy_matches_plain(backend):
    data = _data(1.0)
    for method, (factory, reference, _) in METHODS.items():
        want = reference(as64(data))
        for policy in POLICIES:
            out, info = factory(policy).clip(_backend(data, backend))
            _check(out, want)
            assert bool(info.finite) and not bool(info.skip), (method, policy)
