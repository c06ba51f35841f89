"""Bad input gets a clear error naming the argument and the bad value, and loses nothing
(DESIGN.md rule 7); some odd but valid inputs (empty lists, all-None) are not errors."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest

import gradclip

BAD_NUMBERS = [-1.0, -1e-9, math.nan, -math.inf]


def _grads():
    return [np.array([3.0, -4.0], np.float32), np.array([[0.5, 2.0]], np.float32)]


def _same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _message_names(excinfo, argument, value):
    message = str(excinfo.value)
    assert argument in message, message
    assert repr(value) in message, message


# -- thresholds -----------------------------------------------------------------------------

# (constructor taking the threshold, the argument's name)
THRESHOLD_CONSTRUCTORS = [
    (lambda v: gradclip.GlobalNorm(v), "max_norm"),
    (lambda v: gradclip.GlobalNorm(1.0, eps=v), "eps"),
    (lambda v: gradclip.Norm(v), "max_norm"),
    (lambda v: gradclip.AverageNorm(v), "max_norm"),
    (lambda v: gradclip.BlockRMS(v), "threshold"),
    (lambda v: gradclip.NormSign(v), "threshold"),
    (lambda v: gradclip.ZeroOutliers(v), "threshold"),
    (lambda v: gradclip.Value(clip_value=v), "clip_value"),
    (lambda v: gradclip.get("global_norm", max_norm=v), "max_norm"),
    (lambda v: gradclip.get("block_rms", threshold=v), "threshold"),
]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=str)
@pytest.mark.parametrize("construct,argument", THRESHOLD_CONSTRUCTORS, ids=[a for _, a in THRESHOLD_CONSTRUCTORS])
def test_negative_or_nan_threshold_in_constructor(construct, argument, value):
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        construct(value)
    _message_names(caught, argument, value)
    assert isinstance(caught.value, ValueError)  # except ValueError keeps working


@pytest.mark.parametrize("value", [True, "1.0", None, [1.0]], ids=repr)
def test_non_number_threshold(value):
    with pytest.raises(gradclip.InvalidArgumentError, match="max_norm"):
        gradclip.GlobalNorm(value)


# (function(grads, bad value), argument)
FUNCTIONS = [
    (lambda g, v: gradclip.clip_by_norm(g, v), "max_norm"),
    (lambda g, v: gradclip.clip_by_global_norm(g, v), "max_norm"),
    (lambda g, v: gradclip.zero_outliers(g, v), "threshold"),
    # clip_by_value: a NaN bound, or a max_value below min_value = 1.0
    (lambda g, v: gradclip.clip_by_value(g, v, 1.0) if math.isnan(v) else gradclip.clip_by_value(g, 1.0, v), None),
]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=str)
@pytest.mark.parametrize("function,argument", FUNCTIONS, ids=["clip_by_norm", "clip_by_global_norm", "zero_outliers", "clip_by_value"])
def test_one_shot_functions_reject_bad_thresholds(function, argument, value):
    grads, before = _grads(), _grads()
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        function(grads, value)
    if argument is not None:
        _message_names(caught, argument, value)
    else:  # clip_by_value: a NaN bound, or max_value below min_value
        assert re.search("min_value|max_value", str(caught.value))
    _same(grads, before)


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=str)
def test_torch_drop_ins_reject_bad_thresholds_and_keep_gradients(value):
    torch = pytest.importorskip("torch", reason="torch drop-ins")
    import gradclip.torch as gct

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, -4.0, 12.0])
    before = p.grad.clone()
    for call, argument in (
        (lambda: gct.clip_grad_norm_([p], value), "max_norm"),
        (lambda: gct.clip_grad_value_([p], value), "clip_value"),
        (lambda: gradclip.GlobalNorm(value).clip_([p]), "max_norm"),
    ):
        with pytest.raises(gradclip.InvalidArgumentError) as caught:
            call()
        _message_names(caught, argument, value)
        assert torch.equal(p.grad, before)


def test_zero_max_norm_with_zero_gradients_is_not_nan():
    # optax gives NaN here (0 / 0); gradclip leaves the zero gradients as they are.
    grads = [np.zeros(3, np.float32)]
    for clipper in (gradclip.GlobalNorm(0.0), gradclip.GlobalNorm(0.0, eps=0.0), gradclip.Norm(0.0), gradclip.BlockRMS(0.0)):
        with np.errstate(all="raise"):
            out, info = clipper.clip(grads)
        np.testing.assert_array_equal(out[0], grads[0])
        assert float(info.coef) == 1.0 and float(info.norm) == 0.0
    # max_norm=0 with non-zero gradients clips them to zero.
    out, _ = gradclip.GlobalNorm(0.0).clip([np.array([1.0, 2.0], np.float32)])
    np.testing.assert_array_equal(out[0], [0.0, 0.0])


# -- ranges, names, policies, norm types ------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda g: gradclip.Value(2.0, 1.0),
        lambda g: gradclip.clip_by_value(g, 2.0, 1.0),
        lambda g: gradclip.clip_weights_(g, 2.0, 1.0),
        lambda g: gradclip.get("value", min_value=2.0, max_value=1.0),
    ],
    ids=["Value", "clip_by_value", "clip_weights_", "get"],
)
def test_min_value_above_max_value(call):
    grads, before = _grads(), _grads()
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        call(grads)
    message = str(caught.value)
    assert "min_value" in message and "max_value" in message and "2.0" in message and "1.0" in message
    _same(grads, before)


def test_value_argument_forms():
    with pytest.raises(gradclip.InvalidArgumentError, match="clip_value"):
        gradclip.Value(-1.0, 1.0, clip_value=1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match="max_value"):
        gradclip.Value(-1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"min_value.*nan"):
        gradclip.Value(math.nan, 1.0)
    with pytest.raises(gradclip.InvalidArgumentError, match=r"max_value.*nan"):
        gradclip.Value(-1.0, math.nan)


def test_unknown_clipper_name_lists_valid_names():
    with pytest.raises(gradclip.UnknownNameError) as caught:
        gradclip.get("global_nrom")
    message = str(caught.value)
    assert "'global_nrom'" in message
    for name in gradclip.available():
        assert name in message
    assert isinstance(caught.value, ValueError)
    with pytest.raises(gradclip.UnknownNameError):
        gradclip.get(None)


def test_unknown_argument_to_get_is_a_type_error():
    with pytest.raises(TypeError, match="max_nrom"):
        gradclip.get("global_norm", max_nrom=1.0)


@pytest.mark.parametrize(
    "construct",
    [
        lambda p: gradclip.GlobalNorm(1.0, nonfinite=p),
        lambda p: gradclip.Norm(1.0, nonfinite=p),
        lambda p: gradclip.AverageNorm(1.0, nonfinite=p),
        lambda p: gradclip.BlockRMS(1.0, nonfinite=p),
        lambda p: gradclip.NormSign(1.0, nonfinite=p),
    ],
    ids=["GlobalNorm", "Norm", "AverageNorm", "BlockRMS", "NormSign"],
)
@pytest.mark.parametrize("policy", ["ignore", "Skip", "", None, 1])
def test_unknown_nonfinite_policy(construct, policy):
    with pytest.raises(gradclip.UnknownNameError) as caught:
        construct(policy)
    message = str(caught.value)
    assert "nonfinite" in message and repr(policy) in message
    for valid in ("propagate", "raise", "zero", "skip"):
        assert repr(valid) in message


@pytest.mark.parametrize("norm_type", [0, 0.0, -1.0, -math.inf, math.nan, "fro", "-inf"], ids=repr)
def test_norm_type_must_be_positive(norm_type):
    grads, before = _grads(), _grads()
    calls = [
        lambda: gradclip.GlobalNorm(1.0, norm_type=norm_type),
        lambda: gradclip.Norm(1.0, norm_type=norm_type),
        lambda: gradclip.global_norm(grads, norm_type),
        lambda: gradclip.clip_by_norm(grads, 1.0, norm_type),
        lambda: gradclip.clip_by_global_norm(grads, 1.0, norm_type),
    ]
    for call in calls:
        with pytest.raises(gradclip.InvalidArgumentError) as caught:
            call()
        assert "norm_type" in str(caught.value) and repr(norm_type) in str(caught.value)
    _same(grads, before)


def test_norm_type_inf_spellings_accepted():
    grads = _grads()
    for spelling in (math.inf, "inf", "INF", float("inf")):
        assert float(gradclip.global_norm(grads, spelling)) == 4.0


def test_torch_norm_type_zero_rejected():
    torch = pytest.importorskip("torch", reason="torch drop-ins")
    import gradclip.torch as gct

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    for call in (lambda: gct.clip_grad_norm_([p], 1.0, norm_type=0), lambda: gct.get_total_norm([p.grad], 0)):
        with pytest.raises(gradclip.InvalidArgumentError, match=r"norm_type.*0"):
            call()
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))


# -- empty and None -----------------------------------------------------------------------------

ALL_CLIPPERS = [
    lambda: gradclip.GlobalNorm(1.0),
    lambda: gradclip.Norm(1.0),
    lambda: gradclip.AverageNorm(1.0),
    lambda: gradclip.BlockRMS(1.0),
    lambda: gradclip.NormSign(1.0),
    lambda: gradclip.ZeroOutliers(1.0),
    lambda: gradclip.Value(-1.0, 1.0),
    lambda: gradclip.chain(gradclip.Value(clip_value=1.0), gradclip.GlobalNorm(1.0)),
]


@pytest.mark.parametrize("grads", [[], [None, None], (), {"a": None}], ids=["empty", "all-none", "tuple", "dict"])
@pytest.mark.parametrize("factory", ALL_CLIPPERS)
def test_empty_and_all_none_give_norm_zero(factory, grads):
    out, info = factory().clip(grads)
    assert out == grads
    assert float(info.norm) == 0.0 and float(info.coef) == 1.0
    assert not bool(info.clipped) and bool(info.finite) and not bool(info.skip)
    out, state, info = factory().update(grads, None)
    assert out == grads and float(info.norm) == 0.0
    in_place = list(grads.values()) if isinstance(grads, dict) else list(grads)
    with pytest.warns(RuntimeWarning, match="no gradients"):
        info = factory().clip_(in_place)
    assert float(info.norm) == 0.0


def test_empty_one_shot_functions():
    assert float(gradclip.global_norm([])) == 0.0
    assert float(gradclip.global_norm([None])) == 0.0
    out, norm = gradclip.clip_by_global_norm([None, None], 1.0)
    assert out == [None, None] and float(norm) == 0.0
    assert gradclip.clip_by_value([], -1.0, 1.0) == []
    assert gradclip.clip_by_norm([], 1.0) == []
    assert gradclip.zero_outliers([None], 1.0) == [None]
    gradclip.clip_weights_([], -1.0, 1.0)


def test_torch_module_without_gradients():
    torch = pytest.importorskip("torch", reason="torch module")
    import gradclip.torch as gct

    model = torch.nn.Linear(3, 2)
    with pytest.warns(RuntimeWarning, match="before backward"):
        info = gradclip.GlobalNorm(1.0).clip_(model)
    assert info.norm.item() == 0.0 and isinstance(info.norm, torch.Tensor)
    assert gct.clip_grad_norm_(model.parameters(), 1.0).item() == 0.0
    assert all(p.grad is None for p in model.parameters())
    # Some parameters with gradients, some without: the None ones are ignored.
    model.weight.grad = torch.full((2, 3), 10.0)
    info = gradclip.GlobalNorm(1.0).clip_(model)
    assert model.bias.grad is None and info.norm.item() == pytest.approx(10 * math.sqrt(6))


# -- wrong types: mixed frameworks, sparse gradients, non-arrays ---------------------------------


def test_mixed_torch_and_numpy_is_a_backend_error():
    torch = pytest.importorskip("torch", reason="mixing needs torch")
    mixed = [np.array([3.0, 4.0], np.float32), torch.tensor([30.0, 40.0])]
    before = [mixed[0].copy(), mixed[1].clone()]
    for call in (
        lambda: gradclip.GlobalNorm(1.0).clip(mixed),
        lambda: gradclip.GlobalNorm(1.0).update(mixed, None),
        lambda: gradclip.GlobalNorm(1.0).clip_(mixed),
        lambda: gradclip.Value(-1.0, 1.0).clip_(mixed),
        lambda: gradclip.global_norm(mixed),
        lambda: gradclip.clip_by_value(mixed, -1.0, 1.0),
        lambda: gradclip.clip_by_global_norm(mixed, 1.0),
        lambda: gradclip.clip_weights_(mixed, -1.0, 1.0),
        lambda: gradclip.Norm(1.0).init(mixed),
    ):
        with pytest.raises(gradclip.BackendError) as caught:
            call()
        message = str(caught.value)
        assert "numpy" in message and "torch" in message
        assert isinstance(caught.value, TypeError)
        np.testing.assert_array_equal(mixed[0], before[0])
        assert torch.equal(mixed[1], before[1])


def _sparse_embedding(torch):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    linear = torch.nn.Linear(3, 1)
    model = torch.nn.Sequential(embedding, linear)
    model(torch.tensor([1, 2, 2, 7])).sum().mul(100).backward()
    assert embedding.weight.grad.is_sparse
    return model


@pytest.mark.parametrize(
    "call",
    [
        lambda m: gradclip.GlobalNorm(1.0).clip_(m),
        lambda m: gradclip.Norm(1.0).clip_(m),
        lambda m: gradclip.Value(-0.1, 0.1).clip_(m),
        lambda m: gradclip.ZeroOutliers(0.1).clip_(m),
        lambda m: gradclip.NormSign(0.1).clip_(m.parameters()),
        lambda m: gradclip.GlobalNorm(1.0).clip([p.grad for p in m.parameters()]),
        lambda m: gradclip.global_norm([p.grad for p in m.parameters()]),
        lambda m: __import__("gradclip.torch").torch.clip_grad_norm_(m.parameters(), 1.0),
        lambda m: __import__("gradclip.torch").torch.clip_grad_value_(m.parameters(), 0.1),
    ],
    ids=["GlobalNorm", "Norm", "Value", "ZeroOutliers", "NormSign", "clip", "global_norm", "clip_grad_norm_", "clip_grad_value_"],
)
def test_sparse_gradients_raise_and_are_not_dropped(call):
    torch = pytest.importorskip("torch", reason="sparse embeddings are a torch feature")
    model = _sparse_embedding(torch)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(gradclip.SparseGradientError) as caught:
        call(model)
    assert "sparse" in str(caught.value)
    assert isinstance(caught.value, gradclip.BackendError)
    for p, b in zip(model.parameters(), before):
        assert p.grad.layout == b.layout
        assert torch.equal(p.grad.to_dense(), b.to_dense())


@pytest.mark.parametrize("leaf", [1.0, "grad", object(), [1.0, 2.0]], ids=["float", "str", "object", "floats"])
def test_non_array_leaves(leaf):
    with pytest.raises(gradclip.BackendError):
        gradclip.GlobalNorm(1.0).clip([np.ones(2, np.float32), leaf])


def test_numpy_scalar_is_rejected_with_a_hint():
    with pytest.raises(gradclip.BackendError, match="asarray"):
        gradclip.GlobalNorm(1.0).clip([np.float32(3.0)])


def test_chain_arguments():
    with pytest.raises(gradclip.InvalidArgumentError, match="at least one"):
        gradclip.chain()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"#1.*str"):
        gradclip.chain(gradclip.GlobalNorm(1.0), "norm")


def test_update_params_structure_mismatch():
    grads = _grads()
    with pytest.raises(gradclip.InvalidArgumentError, match="params"):
        gradclip.GlobalNorm(1.0).update(grads, None, params=grads[:1])


def test_errors_do_not_use_assert():
    # python -O strips asserts; validation must survive it.
    import subprocess
    import sys

    code = (
        "import gradclip\n"
        "try:\n    gradclip.GlobalNorm(-1.0)\nexcept gradclip.InvalidArgumentError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "ok"


def test_no_warning_for_valid_calls():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        results = [c.clip(_grads()) for c in (gradclip.GlobalNorm(1.0), gradclip.Norm(1.0), gradclip.AverageNorm(1.0))]
    for out, info in results:
        assert bool(info.clipped) and all(np.isfinite(o).all() for o in out)
