"""More parity between the drop-ins of ``gradclip.torch.clip`` and ``torch.nn.utils``.

* ``clip_grads_with_norm_`` forms its coefficient as torch does, in ``total_norm``'s dtype and on
  its device: bit for bit torch's result for every gradient dtype and ``total_norm`` dtype.
* ``max_norm``, ``norm_type`` and ``clip_value`` are read as torch's ``float()`` reads them (a
  numeric string, a Decimal, a one-element tensor or array); what it refuses, and what gradclip
  refuses on purpose (negative or NaN thresholds, ``norm_type <= 0``, bool), raises
  ``InvalidArgumentError`` naming the function, the argument and the value, gradients untouched.
* Complex gradients are refused by name (torch clips them; gradclip's backends take real
  floating-point arrays only), gradients untouched.
* A parameter listed twice is counted and scaled once (torch counts and scales it twice).
"""

from __future__ import annotations

import decimal
import fractions
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity with torch.nn.utils needs torch")
tnu = pytest.importorskip("torch.nn.utils")
if not hasattr(tnu, "clip_grads_with_norm_"):  # pragma: no cover - torch < 2.6
    pytest.skip("torch.nn.utils.clip_grads_with_norm_ needs torch >= 2.6", allow_module_level=True)

import gradclip
import gradclip.torch as gct

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(3, 4), (7,), (257,)]


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def _grads(dtypes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(shape, generator=generator, dtype=torch.float64) * 3).to(dtype)
        for shape, dtype in zip(SHAPES * len(dtypes), dtypes * len(SHAPES))
    ]


def _same_bits(ours, ref):
    for a, b in zip(ours, ref):
        assert a.grad.dtype == b.grad.dtype
        assert torch.equal(a.grad, b.grad), (a.grad.dtype, (a.grad.double() - b.grad.double()).abs().max().item())


# -- clip_grads_with_norm_: torch's coefficient, bit for bit ------------------------------------


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("norm_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtypes", [[d] for d in DTYPES] + [DTYPES], ids=lambda ds: "+".join(map(str, ds)))
@pytest.mark.parametrize("total", [7.0, 123.456, 3.3e-3])
def test_clip_grads_with_norm_matches_torch_bitwise(grad_dtypes, norm_dtype, foreach, total):
    grads = _grads(grad_dtypes)
    max_norm = 0.3 * total  # well under the norm: both clip (away from the documented 1e-6 band)
    ours, ref = _params(grads), _params(grads)
    tnu.clip_grads_with_norm_(ref, max_norm, torch.tensor(total, dtype=norm_dtype), foreach=foreach)
    assert gct.clip_grads_with_norm_(ours, max_norm, torch.tensor(total, dtype=norm_dtype), foreach=foreach) is None
    _same_bits(ours, ref)
    assert not torch.equal(ours[0].grad, grads[0])  # it did clip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_grads_with_norm_after_torchs_own_total_norm(dtype):
    grads = _grads([dtype], seed=3)
    ours, ref = _params(grads), _params(grads)
    total = tnu.get_total_norm([p.grad for p in ref])  # in the gradients' dtype, as torch computes it
    tnu.clip_grads_with_norm_(ref, 0.5, total)
    gct.clip_grads_with_norm_(ours, 0.5, total)
    _same_bits(ours, ref)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("norm_dtype", DTYPES, ids=str)
def test_clip_grads_with_norm_keeps_its_deviations_in_every_dtype(grad_dtype, norm_dtype):
    grads = _grads([grad_dtype], seed=5)
    under, band, nan, inf = (_params(grads) for _ in range(4))
    norm = torch.tensor(2.0, dtype=norm_dtype)
    gct.clip_grads_with_norm_(under, 3.0, norm)
    gct.clip_grads_with_norm_(band, 2.0, norm)  # torch scales by 2 / (2 + 1e-6) here
    gct.clip_grads_with_norm_(nan, 1.0, torch.tensor(math.nan, dtype=norm_dtype))
    gct.clip_grads_with_norm_(inf, 1.0, torch.tensor(math.inf, dtype=norm_dtype))
    for params in (under, band, nan, inf):
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


def test_clip_grads_with_norm_one_element_total_norm_and_python_number():
    grads = _grads([torch.float64], seed=7)
    shaped, number, ref = _params(grads), _params(grads), _params(grads)
    tnu.clip_grads_with_norm_(ref, 1.0, torch.tensor(9.0, dtype=torch.float64))
    gct.clip_grads_with_norm_(shaped, 1.0, torch.tensor([9.0], dtype=torch.float64))
    gct.clip_grads_with_norm_(number, 1.0, 9.0)  # a number (torch refuses one): fp64 for fp64 gradients
    _same_bits(shaped, ref)
    _same_bits(number, ref)


# -- arguments read as torch's float() reads them ------------------------------------------------


def _call(fn, module, params, value):
    """Call ``fn`` of ``module`` (gct or torch.nn.utils) with ``value`` in the argument under test."""
    if fn == "clip_grad_norm_max_norm":
        return module.clip_grad_norm_(params, value)
    if fn == "clip_grad_norm_norm_type":
        return module.clip_grad_norm_(params, 1.0, value)
    if fn == "clip_grad_value_":
        return module.clip_grad_value_(params, value)
    if fn == "get_total_norm":
        return module.get_total_norm([p.grad for p in params], value)
    if fn == "clip_grads_with_norm_":
        return module.clip_grads_with_norm_(params, value, torch.tensor(20.0))
    raise AssertionError(fn)


FUNCTIONS = ["clip_grad_norm_max_norm", "clip_grad_norm_norm_type", "clip_grad_value_", "get_total_norm",
             "clip_grads_with_norm_"]
WHERE = {"clip_grad_norm_max_norm": ("clip_grad_norm_", "max_norm"),
         "clip_grad_norm_norm_type": ("clip_grad_norm_", "norm_type"),
         "clip_grad_value_": ("clip_grad_value_", "clip_value"),
         "get_total_norm": ("get_total_norm", "norm_type"),
         "clip_grads_with_norm_": ("clip_grads_with_norm_", "max_norm")}
VALID = {"max_norm": "[0, inf]", "clip_value": "[0, inf]", "norm_type": "(0, inf]"}

ACCEPTED = [
    "2", "1.0", " 0.5 ", "3e0", "inf", "Infinity", decimal.Decimal("0.5"), fractions.Fraction(3, 2),
    np.float32(0.5), np.float64(2.0), np.int64(1), np.array(0.5), torch.tensor(0.5),
    torch.tensor([2.0]), torch.tensor(1.5, dtype=torch.float64), torch.tensor(2),
]


@pytest.mark.parametrize("value", ACCEPTED, ids=repr)
@pytest.mark.parametrize("fn", FUNCTIONS)
def test_arguments_torch_converts_with_float_are_accepted_with_torchs_result(fn, value):
    grads = [torch.tensor([3.0, -4.0, 0.25]), torch.tensor([[12.0, -0.1]])]
    ours, ref = _params(grads), _params(grads)
    expected = _call(fn, tnu, ref, value)
    got = _call(fn, gct, ours, value)
    if isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert got is None and expected is None
    _same_bits(ours, ref)


def _bad_values(argument):
    common = ["abc", "", None, [1.0], {"max_norm": 1.0}, torch.tensor([1.0, 2.0]), np.array([2.0]), 1 + 0j, True]
    if argument == "norm_type":
        return [*common, "0", "-2", "nan", "-inf", torch.tensor(0.0)]
    return [*common, "-1", "-1e-9", "nan", "-inf", torch.tensor(-1.0), decimal.Decimal("-0.5"), lambda step: 1.0]


@pytest.mark.parametrize(
    "fn,value",
    [(fn, v) for fn in FUNCTIONS for v in _bad_values(WHERE[fn][1])],
    ids=[f"{fn}-{v!r}" for fn in FUNCTIONS for v in _bad_values(WHERE[fn][1])],
)
def test_bad_arguments_keep_clear_errors_and_leave_gradients_untouched(fn, value):
    where, argument = WHERE[fn]
    grads = [torch.tensor([3.0, -4.0, 0.25]), torch.tensor([[12.0, -0.1]])]
    params = _params(grads)
    with pytest.raises(gradclip.InvalidArgumentError) as caught:
        _call(fn, gct, params, value)
    message = str(caught.value)
    assert message.startswith(f"{where}: {argument} "), message
    assert repr(value) in message, message
    if isinstance(value, str) and value not in ("abc", ""):
        assert VALID[argument] in message, message  # a number, out of range: the range is named
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


def test_a_numeric_string_out_of_range_names_what_was_passed():
    p = _params([torch.tensor([3.0, 4.0])])
    with pytest.raises(gradclip.InvalidArgumentError, match=r"^clip_grad_norm_: max_norm must be in \[0, inf\], got "
                       r"-1\.0 \(given as '-1'\)$"):
        gct.clip_grad_norm_(p, "-1")
    with pytest.raises(gradclip.InvalidArgumentError, match=r"^get_total_norm: norm_type must be in \(0, inf\], got "
                       r"0\.0 \(given as '0'\)$"):
        gct.get_total_norm([p[0].grad], "0")


# -- complex gradients ----------------------------------------------------------------------------


class _Complex(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.real = torch.nn.Parameter(torch.zeros(2))
        self.spectrum = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_"])
def test_complex_gradients_are_refused_by_name_and_left_untouched(fn):
    model = _Complex()
    model.real.grad = torch.tensor([30.0, 40.0])
    model.spectrum.grad = torch.tensor([3 + 4j, 1j], dtype=torch.complex64)
    before = [p.grad.clone() for p in model.parameters()]
    calls = {
        "clip_grad_norm_": lambda: gct.clip_grad_norm_(model, 1.0),
        "clip_grad_value_": lambda: gct.clip_grad_value_(model, 1.0),
        "get_total_norm": lambda: gct.get_total_norm([p.grad for p in model.parameters()]),
        "clip_grads_with_norm_": lambda: gct.clip_grads_with_norm_(model, 1.0, torch.tensor(50.0)),
    }
    with pytest.raises(gradclip.BackendError) as caught:
        calls[fn]()
    message = str(caught.value)
    name = "#1" if fn == "get_total_norm" else "spectrum"
    assert message.startswith(f"{fn}: "), message
    assert f" {name} has the complex dtype torch.complex64" in message, message
    assert "do not support complex" in message and "cast integer" not in message, message
    assert "Nothing was changed" in message
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.grad, b)


def test_complex_refusal_is_documented_as_a_deviation():
    for fn in (gct.clip_grad_norm_, gct.get_total_norm, gct.clip_grads_with_norm_):
        assert "omplex" in fn.__doc__, fn.__name__


# -- a parameter listed twice ------------------------------------------------------------------


def test_a_parameter_listed_twice_is_counted_and_scaled_once():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    once = _params(grads)
    twice = _params(grads)
    ref = _params(grads)
    norm_once = gct.clip_grad_norm_(once, 1.0)
    norm_twice = gct.clip_grad_norm_([twice[0], twice[1], twice[0]], 1.0)
    assert torch.equal(norm_once, norm_twice)
    _same_bits(twice, once)
    # torch counts the repeat in the norm and scales that gradient twice.
    norm_torch = tnu.clip_grad_norm_([ref[0], ref[1], ref[0]], 1.0)
    assert norm_torch > norm_twice
    assert not torch.equal(ref[0].grad, twice[0].grad)

    scaled, ref = _params(grads), _params(grads)
    gct.clip_grads_with_norm_([scaled[0], scaled[0], scaled[1]], 1.0, torch.tensor(13.0))
    tnu.clip_grads_with_norm_([ref[0], ref[1]], 1.0, torch.tensor(13.0))
    _same_bits(scaled, ref)  # scaled once, as if listed once
    for fn in (gct.clip_grad_norm_, gct.clip_grads_with_norm_, gct.get_total_norm):
        assert "listed twice" in " ".join(fn.__doc__.split()), fn.__name__
