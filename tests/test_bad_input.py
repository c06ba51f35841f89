"""Bad input gets a clear error naming the function called, the argument, the bad value and the
valid range, and loses nothing (DESIGN.md rule 7); some odd but valid inputs (empty lists,
all-None) are not errors."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import gradclip
from gradclip._core import errors

BAD_NUMBERS = [-1.0, -1e-9, math.nan, -math.inf]


def _grads():
    return [np.array([3.0, -4.0], np.float32), np.array([[0.5, 2.0]], np.float32)]


def _same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def _message_names(excinfo, where, argument, value, valid):
    """The message starts with the function (or class) called and names the argument, the bad
    value and the valid range."""
    message = str(excinfo.value)
    assert message.startswith(f"{where}: "), message
    assert argument in message, message
    assert repr(value) in message, message
    assert valid in message, message


# -- thresholds -----------------------------------------------------------------------------

# (constructor taking the threshold, the class named in the message, the argument, its range)
THRESHOLD_CONSTRUCTORS = [
    (lambda v: gradclip.GlobalNorm(v), "GlobalNorm", "max_norm", "[0, inf]"),
    (lambda v: gradclip.GlobalNorm(1.0, eps=v), "GlobalNorm", "eps", "[0, inf)"),
    (lambda v: gradclip.Norm(v), "Norm", "max_norm", "[0, inf]"),
    (lambda v: gradclip.AverageNorm(v), "AverageNorm", "max_norm", "[0, inf]"),
    (lambda v: gradclip.BlockRMS(v), "BlockRMS", "threshold", "[0, inf]"),
    (lambda v: gradclip.NormSign(v), "NormSign", "threshold", "[0, inf]"),
    (lambda v: gradclip.ZeroOutliers(v), "ZeroOutliers", "threshold", "[0, inf]"),
    (lambda v: gradclip.Value(clip_value=v), "Value", "clip_value", "[0, inf]"),
    (lambda v: gradclip.get("global_norm", max_norm=v), "GlobalNorm", "max_norm", "[0, inf]"),
    (lambda v: gradclip.get("block_rms", threshold=v), "BlockRMS", "threshold", "[0, inf]"),
]


@pytest.mark.parametrize("value", BAD_NUMBERS, ids=str)
@pytest.mark.parametrize(
    "construct,where,argument,valid", THRESHOLD_CONSTRUCTORS, ids=[f"{w}-{a}" for _, w, a, _ in THRESHOLD_CONSTRUCTORS]
)
def test_negative_or_nan_threshold_in_constructor(construct, where, argument, valid, value):
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        construct(value)
    _message_names(caught, where, argument, value, valid)
    assert isinstance(caught.value, ValueError)  # except ValueError keeps working


def test_nan_is_reported_as_not_allowed():
    # "must be in [-inf, inf], got nan" read as if NaN were outside the range.
    for construct, argument in (
        (lambda: gradclip.Value(math.nan, 1.0), "min_value"),
        (lambda: gradclip.Value(-1.0, math.nan), "max_value"),
        (lambda: gradclip.GlobalNorm(math.nan), "max_norm"),
    ):
        with pytest.raises(gradclip.InvalidArgumentError) as caught:
            construct()
        message = str(caught.value)
        assert f"{argument} must not be NaN" in message and message.endswith("got nan"), message
        assert "must be in" not in message, message


@pytest.mark.parametrize("value", [True, "1.0", None, [1.0]], ids=repr)
def test_non_number_threshold(value):
    with pytest.raises(gradclip.InvalidArgumentError, match="max_norm"):
        gradclip.GlobalNorm(value)


BAD_NORM_TYPES = [0.0, -1.0, math.nan, -math.inf]

# The one-shot functions are wrappers over the classes; their errors name the function the user
# called ("clip_grad_norm_: max_norm ..."), never the class underneath ("GlobalNorm: ...").
# (function, call(grads, bad value), argument, valid range, bad values)
ONE_SHOT_FUNCTIONS = [
    ("clip_by_norm", lambda g, v: gradclip.clip_by_norm(g, v), "max_norm", "[0, inf]", BAD_NUMBERS),
    ("clip_by_norm", lambda g, v: gradclip.clip_by_norm(g, 1.0, v), "norm_type", "(0, inf]", BAD_NORM_TYPES),
    ("clip_by_global_norm", lambda g, v: gradclip.clip_by_global_norm(g, v), "max_norm", "[0, inf]", BAD_NUMBERS),
    (
        "clip_by_global_norm",
        lambda g, v: gradclip.clip_by_global_norm(g, 1.0, v),
        "norm_type",
        "(0, inf]",
        BAD_NORM_TYPES,
    ),
    ("zero_outliers", lambda g, v: gradclip.zero_outliers(g, v), "threshold", "[0, inf]", BAD_NUMBERS),
    # Negative bounds are valid for clip_by_value; NaN is not (min > max is tested below).
    ("clip_by_value", lambda g, v: gradclip.clip_by_value(g, v, 1.0), "min_value", "[-inf, inf]", [math.nan]),
    ("clip_by_value", lambda g, v: gradclip.clip_by_value(g, -1.0, v), "max_value", "[-inf, inf]", [math.nan]),
    ("global_norm", lambda g, v: gradclip.global_norm(g, v), "norm_type", "(0, inf]", BAD_NORM_TYPES),
    ("clip_weights_", lambda g, v: gradclip.clip_weights_(g, v, 1.0), "min_value", "[-inf, inf]", [math.nan]),
]


@pytest.mark.parametrize(
    "function,call,argument,valid,value",
    [(f, c, a, r, v) for f, c, a, r, values in ONE_SHOT_FUNCTIONS for v in values],
    ids=[f"{f}-{a}-{v}" for f, _, a, _, values in ONE_SHOT_FUNCTIONS for v in values],
)
def test_one_shot_functions_name_themselves_in_errors(function, call, argument, valid, value):
    grads, before = _grads(), _grads()
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        call(grads, value)
    _message_names(caught, function, argument, value, valid)
    _same(grads, before)


# (function, call(parameters, bad value), argument, valid range, bad values)
TORCH_FUNCTIONS = [
    ("clip_grad_norm_", lambda gct, ps, v: gct.clip_grad_norm_(ps, v), "max_norm", "[0, inf]", BAD_NUMBERS),
    ("clip_grad_norm_", lambda gct, ps, v: gct.clip_grad_norm_(ps, 1.0, v), "norm_type", "(0, inf]", BAD_NORM_TYPES),
    ("clip_grad_value_", lambda gct, ps, v: gct.clip_grad_value_(ps, v), "clip_value", "[0, inf]", BAD_NUMBERS),
    (
        "get_total_norm",
        lambda gct, ps, v: gct.get_total_norm([p.grad for p in ps], v),
        "norm_type",
        "(0, inf]",
        BAD_NORM_TYPES,
    ),
    ("GlobalNorm", lambda gct, ps, v: gradclip.GlobalNorm(v).clip_(ps), "max_norm", "[0, inf]", BAD_NUMBERS),
]


@pytest.mark.parametrize(
    "function,call,argument,valid,value",
    [(f, c, a, r, v) for f, c, a, r, values in TORCH_FUNCTIONS for v in values],
    ids=[f"{f}-{a}-{v}" for f, _, a, _, values in TORCH_FUNCTIONS for v in values],
)
def test_torch_drop_ins_name_themselves_and_keep_gradients(function, call, argument, valid, value):
    torch = pytest.importorskip("torch", reason="torch drop-ins")
    import gradclip.torch as gct

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, -4.0, 12.0])
    before = p.grad.clone()
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        call(gct, [p], value)
    _message_names(caught, function, argument, value, valid)
    assert torch.equal(p.grad, before)


def test_errors_raised_while_clipping_name_the_function():
    # Not only argument checks: errors found in the gradients name the function called too.
    torch = pytest.importorskip("torch", reason="torch drop-ins")
    import gradclip.torch as gct

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, math.inf])
    before = p.grad.clone()
    for function, call in (
        ("clip_grad_norm_", lambda: gct.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)),
        ("get_total_norm", lambda: gct.get_total_norm([p.grad], error_if_nonfinite=True)),
    ):
        with pytest.raises(gradclip.NonFiniteError) as caught:
            call()
        assert str(caught.value).startswith(f"{function}: non-finite"), str(caught.value)
        assert caught.value.offenders == ["#0"]  # the exception keeps its attributes
        assert torch.equal(p.grad, before)
    mixed = [np.ones(2, np.float32), torch.ones(2)]
    for function, call in (
        ("clip_by_global_norm", lambda: gradclip.clip_by_global_norm(mixed, 1.0)),
        ("clip_by_value", lambda: gradclip.clip_by_value(mixed, -1.0, 1.0)),
        ("clip_by_norm", lambda: gradclip.clip_by_norm(mixed, 1.0)),
        ("zero_outliers", lambda: gradclip.zero_outliers(mixed, 1.0)),
        ("global_norm", lambda: gradclip.global_norm(mixed)),
    ):
        with pytest.raises(gradclip.BackendError) as caught:
            call()
        assert str(caught.value).startswith(f"{function}: "), str(caught.value)
    with pytest.raises(gradclip.BackendError) as caught:
        gct.clip_grad_norm_(["not a parameter"], 1.0)
    assert str(caught.value).startswith("clip_grad_norm_: ")


def test_collection_names_the_item_that_is_not_an_array():
    """A list of arrays is recognised by type (cached); an object whose shape and dtype are set on
    the instance only counts as an array too, decided per object; anything else is refused by
    its position."""
    from gradclip._core.tree import _all_arrays, collect_gradients

    class Wrapped:  # shape and dtype on the instance, not the class
        def __init__(self):
            self.shape, self.dtype = (2,), np.float32

    class Plain:
        pass

    arrays = [np.zeros(2, np.float32), np.ones(3, np.float32)]
    assert _all_arrays(arrays) and _all_arrays(arrays + [Wrapped()])
    assert not _all_arrays(arrays + [Wrapped(), Plain()])
    with pytest.raises(gradclip.BackendError, match=r"^clip: #2 is a .*Plain, not a parameter or array"):
        collect_gradients(arrays + [Plain()], "clip")
    collected = collect_gradients(arrays + [arrays[0]])  # the same array twice: kept once
    assert collected.names == ["#0", "#1"] and collected.seen == 2


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
    "call,where",
    [
        (lambda g: gradclip.Value(2.0, 1.0), "Value"),
        (lambda g: gradclip.clip_by_value(g, 2.0, 1.0), "clip_by_value"),
        (lambda g: gradclip.clip_weights_(g, 2.0, 1.0), "clip_weights_"),
        (lambda g: gradclip.get("value", min_value=2.0, max_value=1.0), "Value"),
    ],
    ids=["Value", "clip_by_value", "clip_weights_", "get"],
)
def test_min_value_above_max_value(call, where):
    grads, before = _grads(), _grads()
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        call(grads)
    message = str(caught.value)
    assert message.startswith(f"{where}: "), message
    assert "min_value must be <= max_value" in message and "2.0" in message and "1.0" in message
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


# In-place calls on NumPy arrays, one of them read-only: each would change the first array.
READ_ONLY_CALLS = [
    ("GlobalNorm", lambda a: gradclip.GlobalNorm(1.0).clip_(a)),
    ("Norm", lambda a: gradclip.Norm(1.0).clip_(a)),
    ("Value", lambda a: gradclip.Value(-1.0, 1.0).clip_(a)),
    ("ZeroOutliers", lambda a: gradclip.ZeroOutliers(1.0).clip_(a)),
    ("NormSign", lambda a: gradclip.NormSign(1.0).clip_(a)),
    ("chain", lambda a: gradclip.chain(gradclip.Value(clip_value=5.0), gradclip.GlobalNorm(1.0)).clip_(a)),
    ("clip_weights_", lambda a: gradclip.clip_weights_(a, -1.0, 1.0)),
]


@pytest.mark.parametrize("call", [c for _, c in READ_ONLY_CALLS], ids=[n for n, _ in READ_ONLY_CALLS])
def test_read_only_numpy_array_fails_before_any_write(call):
    # Before the check, GlobalNorm scaled the first array, then NumPy's bare ValueError
    # ("assignment destination is read-only") left the gradients half clipped.
    arrays = [np.array([30.0, -40.0], np.float32), np.array([[0.5, 20.0]], np.float32)]
    arrays[1].flags.writeable = False
    before = [a.copy() for a in arrays]
    with pytest.raises(errors.ReadOnlyArrayError) as caught:
        call(arrays)
    message = str(caught.value)
    assert "#1 (shape (1, 2), float32)" in message and "read-only" in message, message
    assert "#0" not in message and "nothing was changed" in message
    assert isinstance(caught.value, gradclip.BackendError) and isinstance(caught.value, ValueError)
    _same(arrays, before)


def test_read_only_numpy_array_keeps_adaptive_state():
    clipper = gradclip.ZClip(warmup_steps=1)
    clipper.clip_([np.array([3.0, 4.0], np.float32)])
    saved = clipper.state_dict()
    frozen = np.array([300.0, 400.0], np.float32)
    frozen.flags.writeable = False
    with pytest.raises(errors.ReadOnlyArrayError):
        clipper.clip_([np.array([1.0], np.float32), frozen])
    assert clipper.state_dict() == saved  # the failed step did not advance the state


def test_read_only_numpy_arrays_are_fine_functionally():
    frozen = np.array([30.0, -40.0], np.float32)
    frozen.flags.writeable = False
    out, info = gradclip.GlobalNorm(1.0).clip([frozen])
    assert float(info.norm) == 50.0 and out[0] is not frozen
    np.testing.assert_array_equal(frozen, [30.0, -40.0])


def test_chain_arguments():
    with pytest.raises(gradclip.InvalidArgumentError, match="at least one"):
        gradclip.chain()
    with pytest.raises(gradclip.InvalidArgumentError, match=r"#1.*str"):
        gradclip.chain(gradclip.GlobalNorm(1.0), "norm")


def test_update_params_structure_mismatch():
    grads = _grads()
    with pytest.raises(gradclip.InvalidArgumentError, match="params"):
        gradclip.GlobalNorm(1.0).update(grads, None, params=grads[:1])


# -- the error classes ---------------------------------------------------------------------------

# Each error class and the built-in exceptions it is documented to be (gradclip/_core/errors.py).
DOCUMENTED_BASES = {
    "GradClipError": (Exception,),
    "InvalidArgumentError": (ValueError,),
    "UnknownNameError": (errors.InvalidArgumentError, ValueError),
    "BackendError": (TypeError,),
    "SparseGradientError": (errors.BackendError, TypeError),
    "ReadOnlyArrayError": (errors.BackendError, TypeError, ValueError),
    "NonFiniteError": (ValueError, RuntimeError),
    "StateError": (ValueError,),
    "DivergenceError": (RuntimeError,),
}


def test_error_classes_subclass_gradclip_error_and_the_documented_builtins():
    assert set(errors.__all__) == set(DOCUMENTED_BASES)
    for name, bases in DOCUMENTED_BASES.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.GradClipError), name
        for base in bases:
            assert issubclass(cls, base), f"{name} should be a {base.__name__}"
    # A bad value is not a bad type and vice versa (except where documented).
    assert not issubclass(errors.InvalidArgumentError, TypeError)
    assert not issubclass(errors.BackendError, ValueError)
    assert not issubclass(errors.DivergenceError, ValueError)  # a run that diverged, not a bad value


def test_error_classes_are_exported():
    for name in errors.__all__:
        assert getattr(gradclip, name) is getattr(errors, name)
        assert name in gradclip.__all__


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
