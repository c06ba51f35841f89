"""PyTorch's own tests of ``clip_grad_norm_`` / ``clip_grad_value_``, run against gradclip's drop-ins.

Ported from pytorch/pytorch, ``test/test_nn.py`` at commit
74f2fa66feec00335f72813782f4802e80bff4cb (BSD-3-Clause, Copyright (c) Meta Platforms, Inc. and
affiliates): ``TestNNDeviceType.test_clip_grad_value``, ``test_clip_grad_norm`` and
``test_clip_grad_norm_error_if_nonfinite``. The inputs, the loops and the assertions are
upstream's; ``torch.nn.utils`` is replaced by ``gradclip.torch``, ``self.assertEqual`` by
:func:`_assert_equal` (torch's comparison with its default tolerances, as ``TestCase`` uses),
and the device parameter by CPU (plus CUDA when there is one).

Every upstream case passes, except the deliberate difference named below, which is asserted as
gradclip's behaviour instead:

* ``NORM_TYPE_NOT_A_NORM``: a norm order ``p <= 0`` (upstream feeds -3.5, -2, -1, -0.1 and 0) is
  refused with :class:`gradclip.InvalidArgumentError` naming ``norm_type``, before anything is
  changed. torch computes ``(Σ|g|^p)^(1/p)`` for negative p (not a norm: it grows as gradients
  shrink) and counts non-zero elements for p = 0, and expects a ``RuntimeError`` only when that
  value is non-finite and ``error_if_nonfinite=True``.
"""

from __future__ import annotations

import math
import warnings
from itertools import product

import pytest

torch = pytest.importorskip("torch")

import gradclip  # noqa: E402
from gradclip.torch import (  # noqa: E402
    clip_grad_norm_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
)

inf, nan = math.inf, math.nan
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
NORM_TYPE_NOT_A_NORM = "norm_type <= 0 is refused (InvalidArgumentError), not computed"


def _assert_equal(actual, expected, msg=None):
    """``TestCase.assertEqual`` for what these tests compare: tensors and Python numbers, with
    torch's default tolerances for the dtype."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=msg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(foreach, device):
    l = torch.nn.Linear(10, 10).to(device)  # noqa: E741 - upstream's name
    clip_value = 2.5

    grad_w, grad_b = torch.arange(-50., 50, device=device).view(10, 10).div_(5), torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(l.parameters(), grad_list):
            p._grad = g.clone().view_as(p.data) if g is not None else g

        clip_grad_value_(l.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, l.parameters()):
            assert p.grad.data.max() <= clip_value
            assert p.grad.data.min() >= -clip_value

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50., 50, device=device).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    clip_grad_value_(p1, clip_value, foreach=foreach)
    clip_grad_value_([p2], clip_value, foreach=foreach)
    _assert_equal(p1.grad, p2.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [0.5, 1.5, 2, 4, "inf"])
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm(norm_type, foreach, device):
    l = torch.nn.Linear(10, 10).to(device)  # noqa: E741
    max_norm = 2

    def compute_norm(norm_type):
        norm_type = float(norm_type)
        if norm_type != inf:
            total_norm = 0
            for p in l.parameters():
                total_norm += p.grad.data.abs().pow(norm_type).sum()
            return pow(total_norm, 1. / norm_type)
        else:
            return max(p.grad.data.abs().max() for p in l.parameters())

    def compare_scaling(grads):
        p_scale = [p.grad.data.div(g).view(-1) for p, g in zip(l.parameters(), grads)]
        scale = torch.cat(p_scale)
        _assert_equal(scale.std(), 0)
        return scale[0]

    grads = torch.arange(1., 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p.data)
    norm_before = compute_norm(norm_type)
    norm = clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    _assert_equal(norm, norm_before)
    _assert_equal(norm_after, max_norm)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # decomposed APIs should behave as expected
    grads = torch.arange(1., 101, device=device).view(10, 10), torch.ones(10, device=device).div(1000)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p)
    norm_before = compute_norm(norm_type)
    grads = [p.grad for p in l.parameters()]
    total_norm = get_total_norm(grads, norm_type=norm_type, foreach=foreach)
    clip_grads_with_norm_(l.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(norm_type)
    _assert_equal(total_norm, norm_before)
    _assert_equal(norm_after, max_norm)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # Small gradients should be left unchanged
    grads = torch.rand(10, 10, device=device).div(10000), torch.ones(10, device=device).div(500)
    for p, g in zip(l.parameters(), grads):
        p.grad.data.copy_(g)
    norm_before = compute_norm(norm_type)
    norm = clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    _assert_equal(norm, norm_before)
    _assert_equal(norm_before, norm_after)
    assert norm_after <= max_norm
    scale = compare_scaling(grads)
    _assert_equal(scale, 1)

    # Should accept a single Tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(1., 101, device=device).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    _assert_equal(p1.grad, p2.grad)

    # Should warning when parameters generator exhausted
    params = l.parameters()
    for p in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
        assert len(w) == 1
        assert str(w[0].message) == "`parameters` is an empty generator, no gradient clipping will occur."


@pytest.mark.parametrize("device", DEVICES)
def test_clip_grad_norm_error_if_nonfinite(device):
    norms_pos = [0.1, 1, 2, 3.5, inf]
    norms_neg = [-0.1, -1, -2, -3.5]
    norms_except_0 = norms_pos + norms_neg
    norms_all = norms_except_0 + [0]

    # Each entry in test_cases has the following values, in this order:
    #
    # grad_only_one_elem    If True, only one element of the parameter's
    #                       gradient is set to the scalar grad, and the
    #                       rest of the elements are 0. If False, all grad
    #                       elements are equal to the scalar.
    #
    # prefix_finite_grad_param  If True, prefix a parameter that has a grad
    #                           of 1.
    #
    # scalars           Scalars to use as the parameter's grad, through
    #                   multiplication
    #
    # norms_nonfinite   Norm types that should produce nonfinite total norm
    #
    # norms_finite      Norm types that should produce finite total norm
    test_cases = [
        # Test errors from an infinite grad
        (False, False, [inf, -inf], norms_except_0, [0]),
        (False, True, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, False, [inf, -inf], norms_pos, norms_neg + [0]),
        (True, True, [inf, -inf], norms_pos, norms_neg + [0]),

        # Test errors from a NaN grad
        (False, False, [nan], norms_except_0, [0]),
        (False, True, [nan], norms_except_0, [0]),
        (True, False, [nan], norms_except_0, [0]),
        (True, True, [nan], norms_except_0, [0]),

        # Test a grad that should never error
        (False, False, [2e22, -2e22], [], norms_all),
        (False, True, [2e22, -2e22], [], norms_all),
        (True, False, [2e22, -2e22], [], norms_all),
        (True, True, [2e22, -2e22], [], norms_all),

        # Test a grad that will overflow to inf for only some norm orders
        (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [inf, 1, 0.1, 0, -1, -0.1]),
        (False, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, False, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
        (True, True, [2e200, -2e200], [3.5, 2], norms_neg + [inf, 1, 0.1, 0]),
    ]

    def gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param):
        param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)

        if grad_only_one_elem:
            param[1].mul(scalar).sum().backward()
        else:
            param.mul(scalar).sum().backward()

        if prefix_finite_grad_param:
            prefix_param = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
            prefix_param.mul(1).sum().backward()
            parameters = [prefix_param, param]
        else:
            parameters = [param]

        return parameters

    deviations = []

    def run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param,
                      is_norm_nonfinite):
        msg = (
            f'norm_type: {norm_type}, '
            f'error_if_nonfinite: {error_if_nonfinite}, '
            f'scalar: {scalar}, '
            f'grad_only_one_elem: {grad_only_one_elem}, '
            f'prefix_finite_grad_param: {prefix_finite_grad_param}, '
            f'is_norm_nonfinite: {is_norm_nonfinite}')

        parameters = gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param)

        if norm_type <= 0:  # NORM_TYPE_NOT_A_NORM: refused before anything changes
            deviations.append(msg)
            grads_before = [p.grad.clone() for p in parameters]
            with pytest.raises(gradclip.InvalidArgumentError, match=r"clip_grad_norm_: norm_type"):
                clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)
            for before, p in zip(grads_before, parameters):
                _assert_equal(p.grad, before, msg=msg)
            return

        # Should only throw an error if the total norm is expected to be
        # nonfinite and `error_if_nonfinite=True`
        if is_norm_nonfinite and error_if_nonfinite:
            error_msg = f'The total norm of order {float(norm_type)} for gradients'

            grads_before = [p.grad.clone() for p in parameters]

            with pytest.raises(RuntimeError, match=error_msg):
                clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=True)

            # Grad should not change if error is thrown
            grads_after = [p.grad for p in parameters]
            for before, after in zip(grads_before, grads_after):
                _assert_equal(after, before, msg=msg)
        else:
            clip_grad_norm_(parameters, 1, norm_type=norm_type, error_if_nonfinite=error_if_nonfinite)

    for grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite in test_cases:
        for error_if_nonfinite in [False, True]:
            for norm_type, scalar in product(norms_nonfinite, scalars):
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, True)

            for norm_type, scalar in product(norms_finite, scalars):
                run_test_case(norm_type, error_if_nonfinite, scalar, grad_only_one_elem, prefix_finite_grad_param, False)

    # The deviation covers exactly upstream's cases of a norm order <= 0, and no others.
    upstream_orders = {nt for _, _, scalars, bad, good in test_cases for nt in bad + good}
    assert {nt for nt in upstream_orders if nt <= 0} == {0, -0.1, -1, -2, -3.5}
    assert deviations and all("norm_type: -" in m or "norm_type: 0," in m for m in deviations)
