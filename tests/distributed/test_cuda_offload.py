"""FSDP2 with CPUOffloadPolicy under NCCL (needs CUDA; skipped without it).

The gradients live on CPU while NCCL reduces only GPU tensors ("No backend type associated with
device type cpu"): gradclip moves the partial sums to the group's GPU for the all-reduce and back
(``gradclip.backends.torch_dtensor._on_group_device``). One process, one GPU, an NCCL group of
one: the collective path is the same as with more ranks.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()), reason="needs CUDA and NCCL"
)


def test_fsdp2_cpu_offload_norm_under_nccl(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    import gradclip

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.cuda.set_device(0)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).cuda()
        reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
        fully_shard(model, offload_policy=CPUOffloadPolicy())
        x, y = torch.randn(4, 8), torch.randn(4, 4) * 10
        torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
        assert all(p.grad.device.type == "cpu" for p in model.parameters())
        info = gradclip.GlobalNorm(0.5).clip_(model)
        torch.nn.functional.mse_loss(reference(x), y).backward()
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        torch.testing.assert_close(info.norm.cpu(), want, rtol=1e-5, atol=1e-6)
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours.grad.full_tensor().cpu(), theirs.grad, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()
