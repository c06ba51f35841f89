"""How many ATen operations one clipping step dispatches (issue 14, item 5; the OPS row of
``benchmarks/``).

On a GPU every ATen operation is a kernel launch issued by the host, and an adaptive clipper's
step is mostly scalar state math between the norm and the scale: there its cost is the number of
launches, not their work. The counts are exact and machine-independent (a dispatch-mode counter
after one warm-up call), so they are pinned here: a change that adds operations to a step fails
this test and must raise the limit on purpose. The one-kernel forms the torch backend uses for
that math must give the generic forms' results bit for bit; the last tests check it.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import gradclip
from gradclip._core.ops import Ops
from gradclip.backends.torch import TorchOps
from gradclip.bench.workloads import _count_ops, _op_profile

#: The most operations one ``clip_`` of each clipper (registry defaults) may dispatch, counted
#: on CPU with the foreach kernels a GPU takes. torch's ``clip_grad_norm_(foreach=True)`` takes
#: 8; GlobalNorm's 4 more are its exact-1 coefficient at or under the threshold (DESIGN rule 4),
#: the non-finite policy, and the ``finite`` and ``clipped`` flags of its ClipInfo.
LIMITS = {
    "global_norm": 12,
    "non_finite": 8,
    "quantile_norm": 20,
    "skip_on_spike": 35,
    "adagc": 41,
    "autoclip": 65,
    "zclip": 77,
    "value": 20,
    "norm": 23,
    "average_norm": 25,
}

#: The longest chain of dependent operations in one ``clip_`` (the step's latency in launches on
#: a GPU, and the fewest launches any regrouping of its independent operations could reach
#: without fusing). torch's ``clip_grad_norm_`` is one chain of 8; GlobalNorm's 9th is the
#: non-finite policy's select after the exact-1 select. The adaptive clippers' chains are their
#: state math (a percentile of AutoClip's sketch, ZClip's warm-up median and MAD then its EMAs):
#: longer than GlobalNorm's count + 8 for AutoClip and ZClip, which is why only a compiled or
#: captured step can bring them under it (benchmarks/RESULTS.md, rows OPS and C2).
CRITICAL_PATHS = {
    "global_norm": 9,
    "non_finite": 6,
    "quantile_norm": 9,
    "skip_on_spike": 19,
    "adagc": 18,
    "autoclip": 37,
    "zclip": 43,
    "value": 9,
    "norm": 13,
}


def _params(count: int, numel: int = 8192) -> list:
    """``count`` parameters with random gradients: 8,192 elements each, the size at which the CPU
    takes the foreach kernels (as the OPS row does) rather than its stacked small-tensor path."""
    generator = torch.Generator().manual_seed(0)
    params = []
    for _ in range(count):
        param = torch.nn.Parameter(torch.empty(numel))
        param.grad = torch.randn(numel, generator=generator)
        params.append(param)
    return params


def _count(name: str, params: list) -> int:
    clipper = gradclip.get(name)
    return _count_ops(lambda: clipper.clip_(params, allow_repeat=True))


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_a_step_dispatches_at_most_its_limit(name):
    count = _count(name, _params(20))
    assert count <= LIMITS[name], (
        f"{name}: one clip_ dispatches {count} ATen operations, more than its limit {LIMITS[name]} "
        "(each is a kernel launch on a GPU)"
    )


@pytest.mark.parametrize("name", sorted(CRITICAL_PATHS))
def test_a_step_s_chain_of_dependent_operations_is_at_most_its_limit(name):
    clipper = gradclip.get(name)
    params = _params(20)
    count, path = _op_profile(lambda: clipper.clip_(params, allow_repeat=True))
    assert path <= CRITICAL_PATHS[name], (
        f"{name}: one clip_ chains {path} dependent ATen operations, more than its limit "
        f"{CRITICAL_PATHS[name]} (the step's latency in launches on a GPU)"
    )
    assert path <= count


@pytest.mark.parametrize("name", ["global_norm", "adagc", "value"])
def test_the_count_does_not_grow_with_the_number_of_tensors(name):
    # Multi-tensor kernels and vectorised per-tensor state (AdaGC keeps one γ per tensor; Value
    # finds the elements out of range by one max-abs kernel, not a reduction per tensor): the
    # launches of a step are the same for 20 tensors as for 60.
    assert _count(name, _params(20)) == _count(name, _params(60))


# -- the one-kernel forms of the torch backend give the generic forms' bits ---------------------
def _ops() -> TorchOps:
    return TorchOps([torch.zeros(3)])


def _same(a, b) -> None:
    # Exactly equal, dtype included (NaN where NaN; a zero's sign is not compared).
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_count_up_adds_the_flag_as_the_cast_would():
    ops = _ops()
    counter = torch.tensor([0, 5, 2**40], dtype=torch.int64)
    flag = torch.tensor([True, False, True])
    _same(ops.count_up(counter, flag), Ops.count_up(ops, counter, flag))
    _same(ops.count_up(counter[1], flag[0]), Ops.count_up(ops, counter[1], flag[0]))


def test_clamp_values_is_minimum_of_maximum():
    ops = _ops()
    x = torch.tensor([-math.inf, -1.0, 0.0, 0.5, 3.0, math.inf, math.nan])
    for low, high in ((0.0, 1.0), (2.0, 1.0), (-math.inf, math.inf)):
        low_t, high_t = torch.tensor(low), torch.tensor(high)
        _same(ops.clamp_values(x, low_t, high_t), Ops.clamp_values(ops, x, low_t, high_t))


def test_count_at_most_is_compare_and_count():
    ops = _ops()
    ascending = torch.cumsum(torch.tensor([0, 3, 0, 0, 2, 5, 0, 1]), 0)
    values = torch.tensor([-1, 0, 2, 3, 5, 10, 11, 99])
    for pair in values.unfold(0, 2, 1):
        _same(ops.count_at_most(ascending, pair), Ops.count_at_most(ops, ascending, pair))


def test_ratio_or_one_divides_only_where_asked():
    ops = _ops()
    num = torch.tensor([1.0, 0.0, math.inf, 2.0, 3.0], dtype=torch.float64)
    den = torch.tensor([3.0, 0.0, math.inf, 0.0, 7.0], dtype=torch.float64)
    cond = torch.tensor([True, False, False, False, True])
    got = ops.ratio_or_one(cond, num, den)
    _same(got, Ops.ratio_or_one(ops, cond, num, den))
    assert got.tolist() == [1.0 / 3.0, 1.0, 1.0, 1.0, 3.0 / 7.0]


def test_abs_agrees_with_the_generic_form():
    ops = _ops()
    x = torch.tensor([-2.5, -0.0, 0.0, 1e-30, math.inf, -math.inf])
    _same(ops.abs(x), Ops.abs(ops, x))
    assert torch.equal(ops.abs(x), torch.tensor([2.5, 0.0, 0.0, 1e-30, math.inf, math.inf]))
