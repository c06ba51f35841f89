"""DPOptimizer over a gloo process group: clipping local, one noise draw, the same model on every rank."""

from __future__ import annotations

import os
import socket
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
import torch.distributed as dist
import torch.multiprocessing as mp


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    for noise in (0.0, 2.0):  # one spawn for every case: starting processes dominates the time
        _case(rank, noise, f"{out}.{noise}")
    for noise in (0.0, 1.0):
        torch.save(_quantile_bounds(noise, rank, 2), f"{out}.quantile.{noise}.{rank}")
    dist.destroy_process_group()


def _quantile_bounds(noise: float, rank: int | None, world: int) -> list[float]:
    """QuantileNorm's C after each of 4 steps: on ``rank`` of ``world`` processes (its share of
    each step's batch), or (``rank`` None) in one process with the whole batch."""
    import gradclip
    import gradclip.torch as gct

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    ps = gct.PerSample(model, gradclip.QuantileNorm(learning_rate=0.5))
    group = None if rank is None else dist.group.WORLD
    per_rank = 4
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), ps, noise, per_rank * (1 if group else world),
                          sample_rate=0.1, process_group=group,
                          generator=torch.Generator().manual_seed(7 + (rank or 0)))  # rank 0's: the one used
    data = torch.Generator().manual_seed(3)
    bounds = []
    for _ in range(4):
        # The ranks' examples differ in scale: each rank's own count would move C its own way.
        x = torch.randn(world, per_rank, 4, generator=data) * torch.tensor([1.0, 6.0])[:world, None, None]
        y = torch.randint(0, 2, (world, per_rank), generator=data)
        x, y = (x.flatten(0, 1), y.flatten()) if rank is None else (x[rank], y[rank])
        opt.zero_grad()
        opt.backward(torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
        opt.step()
        bounds.append(float(ps.state.norm))
    return bounds


def _case(rank: int, noise: float, out: str) -> None:
    import gradclip
    import gradclip.torch as gct

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32) if noise else torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ps = gct.PerSample(model, gradclip.GlobalNorm(0.5))
    gen = torch.Generator().manual_seed(100 + rank)  # different streams: only rank 0's is used
    opt = gct.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ps, noise, 4, generator=gen,
                          process_group=dist.group.WORLD)
    if noise:
        x = torch.zeros(4, 64)
        opt.backward(model(x).sum(1) * 0)
    else:
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(7))[4 * rank : 4 * rank + 4]
        opt.backward(model(x).pow(2).sum(1))
    opt.step()
    torch.save([p.grad for p in model.parameters()], f"{out}.{rank}")


@pytest.fixture(scope="module")
def grads(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dp") / "grads")
    mp.spawn(_worker, args=(2, _port(), out), nprocs=2, join=True)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("noise", [0.0, 2.0])
def test_two_ranks(grads, noise):
    out = f"{grads}.{noise}"
    a, b = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # one noised total on every rank
    if noise:
        flat = torch.cat([g.flatten() for g in a])
        # One draw of N(0, (σC)²) over the global expected batch 2·4, not one per rank (√2 more).
        assert flat.std().item() == pytest.approx(2.0 * 0.5 / 8, rel=0.05)
        return
    import gradclip
    import gradclip.torch as gct

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ps = gct.PerSample(model, gradclip.GlobalNorm(0.5))
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(7))
    ps.backward(model(x).pow(2).sum(1))
    for g, p in zip(a, model.parameters()):
        torch.testing.assert_close(g, p.grad / 8)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_quantile_bound_is_one_over_the_group(grads, noise):
    # Before: each rank moved C from its own count, noised by its own draw (C drifted apart and
    # the count's noise was released once per rank); now the count is summed over the group with
    # its noise added once, on rank 0, over the group's expected batch.
    a, b = (torch.load(f"{grads}.quantile.{noise}.{r}") for r in range(2))
    assert a == b
    assert a == _quantile_bounds(noise, None, 2)  # one process, the whole batch, rank 0's noise
    assert len(set(a)) > 1  # C moves
