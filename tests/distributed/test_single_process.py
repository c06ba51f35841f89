"""Distributed plumbing that one process can check: arguments, errors, tied tensors, fast path."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

import gradclip

torch = pytest.importorskip("torch")
dist = torch.distributed

import gradclip.torch as gct  # noqa: E402
from gradclip.backends.torch import TorchOps  # noqa: E402


def _param(values):
    p = torch.nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values, dtype=torch.float32)
    return p


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo group, destroyed afterwards."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# -- tied / repeated tensors ---------------------------------------------------------------------
def test_same_gradient_twice_counts_once_functional():
    g = torch.tensor([3.0, 4.0])
    clipped, info = gradclip.GlobalNorm(1.0).clip([g, g])
    assert info.norm.item() == pytest.approx(5.0)
    assert torch.equal(clipped[0], clipped[1])
    assert clipped[0].norm().item() == pytest.approx(1.0, rel=1e-5)
    assert gradclip.global_norm([g, g]).item() == pytest.approx(5.0)
    assert gct.get_total_norm([g, g]).item() == pytest.approx(5.0)
    _, norm = gradclip.clip_by_global_norm({"a": g, "b": g}, 1.0)
    assert norm.item() == pytest.approx(5.0)


def test_same_array_twice_counts_once_numpy():
    g = np.array([3.0, 4.0], dtype=np.float32)
    clipped, info = gradclip.GlobalNorm(1.0).clip([g, g])
    assert float(info.norm) == pytest.approx(5.0)
    np.testing.assert_array_equal(clipped[0], clipped[1])


def test_same_parameter_twice_is_clipped_once():
    p = _param([3.0, 4.0])
    info = gradclip.GlobalNorm(1.0).clip_([p, p])
    assert info.norm.item() == pytest.approx(5.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)  # scaled once, not twice


def test_tied_module_weights_counted_once():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head)
    model(torch.tensor([1, 2])).sum().backward()
    expected = emb.weight.grad.norm().item()
    assert gradclip.GlobalNorm(math.inf).clip_(model).norm.item() == pytest.approx(expected, rel=1e-6)


# -- the fast path stays plain ---------------------------------------------------------------------
def test_plain_tensors_get_the_plain_backend():
    ops = TorchOps([torch.ones(2)])
    assert type(ops) is TorchOps
    assert not getattr(ops, "distributed", False)


# -- arguments and errors ---------------------------------------------------------------------------
def test_process_group_without_init_process_group_raises():
    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    clipper = gradclip.GlobalNorm(1.0, process_group=object())
    with pytest.raises(gradclip.InvalidArgumentError, match="process_group.*not initialised"):
        clipper.clip_([_param([1.0])])


def test_process_group_with_numpy_raises():
    clipper = gradclip.GlobalNorm(1.0, process_group=object())
    with pytest.raises(gradclip.BackendError, match="process_group= is supported for torch tensors only"):
        clipper.clip([np.ones(3)])


def test_bad_process_group_type_raises(world_of_one):
    clipper = gradclip.GlobalNorm(1.0, process_group="world")
    with pytest.raises(gradclip.InvalidArgumentError, match="ProcessGroup or a DeviceMesh, got str"):
        clipper.clip_([_param([1.0])])


def test_process_group_is_not_config_and_survives_copies(world_of_one):
    clipper = gradclip.get("zclip", process_group=world_of_one)
    assert clipper.process_group is world_of_one
    assert "process_group" not in clipper.config()
    assert copy.deepcopy(clipper).process_group is world_of_one
    state = clipper.state_dict()
    fresh = gradclip.get("zclip")
    fresh.load_state_dict(state)  # the group is not part of the checkpoint
    # ClippedOptimizer probes the clipper on a deep copy.
    p = _param([1.0, 2.0])
    opt = gct.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), gradclip.GlobalNorm(1.0, process_group=world_of_one))
    opt.step()


def test_one_rank_group_equals_no_group(world_of_one):
    for name in gradclip.available():
        if name == "subset":
            kwargs = {"seed": 3}
        else:
            kwargs = {}
        a = [_param([3.0, -4.0]), _param([0.5, 2.0, -1.0])]
        b = copy.deepcopy(a)
        for x, y in zip(a, b):
            y.grad = x.grad.clone()
        info_a = gradclip.get(name, **kwargs).clip_(a)
        info_b = gradclip.get(name, process_group=world_of_one, **kwargs).clip_(b)
        for field in ("norm", "threshold", "coef", "clipped", "finite", "skip"):
            assert torch.allclose(
                getattr(info_a, field).double(), getattr(info_b, field).double(), equal_nan=True
            ), (name, field)
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, msg=name)


def test_rank_without_gradients_joins_silently(world_of_one, recwarn):
    info = gradclip.GlobalNorm(1.0, process_group=world_of_one).clip_([])
    assert info.norm.item() == 0.0
    assert not [w for w in recwarn if "found no gradients" in str(w.message)]
    assert gct.clip_grad_norm_([], 1.0, process_group=world_of_one).item() == 0.0


def test_chain_links_with_different_groups_raise(world_of_one):
    other = dist.new_group([0])
    chained = gradclip.chain(
        gradclip.GlobalNorm(1.0, process_group=world_of_one), gradclip.GlobalNorm(2.0, process_group=other)
    )
    with pytest.raises(gradclip.InvalidArgumentError, match="different process groups"):
        chained.clip_([_param([1.0])])
    same = gradclip.chain(gradclip.NonFinite("zero"), gradclip.GlobalNorm(1.0, process_group=world_of_one))
    assert same.distributed_group() is world_of_one
