"""One NaN or inf element under each non-finite policy (gradclip/clippers/nonfinite.py).

``propagate``: tensors holding NaN/inf pass through as they are (per-tensor methods still clip the
finite tensors); ``raise``: NonFiniteError naming the tensors, nothing modified; ``zero``: the bad
elements become 0, then the rest is clipped; ``skip``: nothing modified, ``info.skip`` set.
Finite elements never become NaN under any policy, and ``info.finite`` describes the gradients
as given: False under every policy, ``"zero"`` included.
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
        if policy != "zero":  # "zero": test_zero_reports_the_gradients_as_given_and_clips_the_rest
            assert not bool(info.finite)
        assert bool(info.skip) == (policy == "skip")
        assert not math.isnan(float(info.coef))
        if policy == "zero":
            assert math.isfinite(float(info.norm))


#: Every clipper with a "zero" policy: name -> factory(policy) (params for AGC come separately).
ZERO_CLIPPERS = {
    **{name: factory for name, (factory, _, _) in METHODS.items()},
    "ZClip": lambda policy: gradclip.ZClip(warmup_steps=2, nonfinite=policy),
    "AutoClip": lambda policy: gradclip.AutoClip(percentile=50.0, nonfinite=policy),
    "AdaGC": lambda policy: gradclip.AdaGC(start_clip_steps=1, nonfinite=policy),
    "QuantileNorm": lambda policy: gradclip.QuantileNorm(initial_norm=2.0, nonfinite=policy),
    "AGC": lambda policy: gradclip.AGC(clip_factor=0.1, nonfinite=policy),
    "NonFinite": lambda policy: gradclip.NonFinite(policy),
}
@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ZERO_CLIPPERS)
def test_zero_reports_the_gradients_as_given_and_clips_the_rest(name, backend):
    """Under "zero", info.finite is False (a Monitor counts the step) while everything else —
    gradients, norm, threshold, coefficient, state — is what the same clipper gives for the
    gradients with their non-finite elements replaced by 0 beforehand."""
    warm = [(np.ones(s, np.float32) * 0.7) for s in [(4,), (3, 3), (5,)]]
    params = [np.full(w.shape, 2.0, np.float32) for w in warm]
    data = _data(np.nan)
    zeroed = [np.where(np.isfinite(d), d, 0.0).astype(np.float32) for d in data]
    kwargs = {"params": _backend(params, backend)} if name == "AGC" else {}
    zero, reference = ZERO_CLIPPERS[name]("zero"), ZERO_CLIPPERS[name]("propagate" if name != "NonFinite" else "zero")
    for clipper in (zero, reference):
        clipper.clip(_backend(warm, backend), **kwargs)
        clipper.clip(_backend([w * 1.1 for w in warm], backend), **kwargs)
    out, info = zero.clip(_backend(data, backend), **kwargs)
    want, expected = reference.clip(_backend(zeroed, backend), **kwargs)
    assert not bool(info.finite)
    for o, w in zip(out, want):
        np.testing.assert_array_equal(to_numpy(o), to_numpy(w))
    got, exp = info.to_dict(), expected.to_dict()
    assert exp["finite"] is True and got.pop("finite") is False and exp.pop("finite") is True
    if name == "NonFinite":  # it reports the norm as given and whether zeroing changed anything
        assert math.isnan(got["norm"]) and got["clipped"] and not exp["clipped"]
    else:
        assert got == exp
        assert zero.state_dict()["state"] == reference.state_dict()["state"]


def test_zero_policy_steps_are_counted_by_the_monitor():
    torch = pytest.importorskip("torch", reason="the Monitor observes torch models")
    model = torch.nn.Linear(3, 2)
    monitor = gradclip.Monitor(model, warn=False)
    clipper = gradclip.ZClip(warmup_steps=2, nonfinite="zero")
    for step in range(5):
        model.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        if step in (1, 3):
            model.weight.grad[0, 0] = float("nan")
        monitor.observe(clipper.clip_(model))
        assert torch.isfinite(model.weight.grad).all()
    assert monitor.summary()["nonfinite_steps"] == 2


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


class _ReducedNorm:
    """numpy Ops whose reduced norm comes back non-finite although every local element is
    finite: under a process group (``distributed``) another rank's NaN, in one process an
    overflow."""

    def __init__(self, inner, reduced, distributed):
        self._inner, self._reduced, self.distributed = inner, reduced, distributed

    def combine_norms(self, norms, norm_type):
        return self._inner.scalar(self._reduced)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize(
    "reduced,distributed,pattern",
    [
        (math.nan, True, r"every gradient element on this rank is finite: the non-finite values .* on another rank"),
        (math.inf, False, "overflowed the accumulator although every element is finite"),
    ],
    ids=["process-group", "one-process"],
)
def test_raise_with_every_local_element_finite_names_the_cause(reduced, distributed, pattern):
    """audit of issue 8: ranks without the NaN used to blame an overflow."""
    from gradclip._core.ops import get_ops
    from gradclip.clippers.nonfinite import measurement

    grads = [np.ones(3, np.float32), np.full(2, 2.0, np.float32)]
    ops = _ReducedNorm(get_ops(grads), reduced, distributed)
    with pytest.raises(gradclip.NonFiniteError, match=pattern) as caught:
        measurement(ops, grads, 2.0, "raise", ["a", "b"], "GlobalNorm")
    assert caught.value.offenders == [] and str(caught.value).startswith("GlobalNorm: ")
    if distributed:
        assert "although every element is finite" not in str(caught.value)
    assert np.array_equal(grads[0], np.ones(3, np.float32))


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
