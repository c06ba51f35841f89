"""CUDA: every clipper on the GPU equals the CPU, and nothing synchronises host and device.

These tests need a CUDA device, which CI does not have: they skip there (with that reason) and
run on a GPU machine with ``pytest tests/test_cuda.py``. The CPU suite proves the same algorithms;
what only a GPU can show is the device path — foreach kernels per (device, dtype) group, fp32
accumulation of half-precision norms on the device, the absence of hidden ``cudaMemcpy``
round trips, which CUDA's sync debug mode turns into errors, and CUDA graphs: the default path
captured by ``torch.cuda.graph`` and replayed, and ``torch.compile(mode="reduce-overhead")``.
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch", reason="CUDA tests need torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (these run on a GPU machine)", allow_module_level=True)

import gradclip  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from gradclip.monitor import Monitor  # noqa: E402

ALL = gradclip.available()
SHAPES = [(64, 32), (32,), (16, 8, 3), (), (0, 4), (1000,)]


def _grads(device, dtype, scale=3.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=generator) * scale).to(device=device, dtype=dtype) for s in SHAPES]


def _params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.ones_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


@contextlib.contextmanager
def sync_errors():
    """Make every implicit host-device synchronisation raise (CUDA's sync debug mode)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ALL)
def test_every_clipper_on_cuda_equals_cpu(name, dtype):
    cpu = gradclip.get(name, **({"seed": 0} if name == "subset" else {}))
    gpu = gradclip.get(name, **({"seed": 0} if name == "subset" else {}))
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for step in range(6):  # enough steps for stateful clippers to leave their warm-up paths
        scale = 3.0 * (50.0 if step == 4 else 1.0)  # one spike
        cpu_params = _params(_grads("cpu", dtype, scale, seed=step))
        gpu_params = _params(_grads("cuda", dtype, scale, seed=step))
        cpu_info = cpu.clip_(cpu_params).to_dict()
        gpu_info = gpu.clip_(gpu_params).to_dict()
        for a, b in zip(cpu_params, gpu_params):
            assert b.grad.dtype == dtype and b.grad.is_cuda
            torch.testing.assert_close(b.grad.cpu().float(), a.grad.float(), rtol=tolerance, atol=tolerance)
        for key in ("norm", "threshold", "coef"):
            if cpu_info[key] is not None and gpu_info[key] is not None:
                assert gpu_info[key] == pytest.approx(cpu_info[key], rel=tolerance, abs=tolerance), key
        assert gpu_info["skip"] == cpu_info["skip"]


@pytest.mark.parametrize("name", ALL)
def test_every_clipper_clips_without_a_host_sync(name):
    clipper = gradclip.get(name, **({"seed": 0} if name == "subset" else {}))
    params = _params(_grads("cuda", torch.float32))
    clipper.clip_(params)  # first call: state is created (allocation may copy constants once)
    for step in range(3):
        for p, g in zip(params, _grads("cuda", torch.float32, seed=step + 1)):
            p.grad.copy_(g)
        with sync_errors():
            info = clipper.clip_(params)
    assert info.norm is None or info.norm.is_cuda


def test_half_precision_norm_does_not_overflow_on_cuda():
    grads = [torch.full((4096,), 60000.0, device="cuda", dtype=torch.float16)]
    params = _params(grads)
    info = gradclip.GlobalNorm(1.0).clip_(params)
    expected = 60000.0 * 4096**0.5
    assert info.norm.item() == pytest.approx(expected, rel=1e-3)
    assert torch.isfinite(params[0].grad).all()
    assert torch.linalg.vector_norm(params[0].grad.float()).item() == pytest.approx(1.0, rel=1e-2)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, float("inf")])
@pytest.mark.parametrize("foreach", [True, False])
def test_clip_grad_norm_matches_torch_on_cuda(norm_type, foreach):
    # torch refuses the inf norm of an empty tensor ("no identity"), gradclip takes it as 0:
    # compare on the non-empty tensors.
    grads = [g for g in _grads("cuda", torch.float32) if g.numel()]
    ours, theirs = _params(grads), _params(grads)
    norm = gct.clip_grad_norm_(ours, 1.0, norm_type=norm_type, foreach=foreach)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=norm_type, foreach=foreach)
    torch.testing.assert_close(norm, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_mixed_devices_in_one_call():
    grads = _grads("cuda", torch.float32) + _grads("cpu", torch.float32, seed=1)
    params = _params(grads)
    reference = torch.cat([g.detach().cpu().flatten() for g in grads]).norm()
    info = gradclip.GlobalNorm(1.0).clip_(params)
    assert info.norm.item() == pytest.approx(reference.item(), rel=1e-5)
    total = torch.cat([p.grad.cpu().flatten() for p in params]).norm()
    assert total.item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_clipped_optimizer_with_fused_adamw_and_scaler_runs_without_sync(fold):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).cuda()
    reference.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    opt = gct.ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True),
                               gradclip.GlobalNorm(0.5), scaler=scaler, fold=fold)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, fused=True)
    ref_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(5):
        x = torch.randn(128, 32, device="cuda", generator=generator)
        for net, sc in ((model, scaler), (reference, ref_scaler)):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = net(x).float().pow(2).mean() * 100
            sc.scale(loss).backward()
        with sync_errors():
            opt.step()
        assert opt.folded == fold
        scaler.update()
        opt.zero_grad()
        ref_scaler.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_monitor_syncs_only_when_it_flushes():
    model = torch.nn.Linear(16, 4).cuda()
    clipper = gradclip.ZClip(warmup_steps=2)
    monitor = Monitor(model, every=4)
    for step in range(8):
        model(torch.randn(8, 16, device="cuda")).pow(2).sum().backward()
        if step % 4 == 3:  # the flush step fetches everything in one batch
            monitor.observe(clipper.clip_(model))
        else:
            with sync_errors():
                monitor.observe(clipper.clip_(model))
        model.zero_grad()
    monitor.flush()
    assert monitor.steps == 8 and len(monitor.norms()) == 8


def test_drop_ins_run_without_a_host_sync():
    params = _params(_grads("cuda", torch.float32))
    with sync_errors():
        gct.clip_grad_norm_(params, 1.0)
        gct.clip_grad_norm_(params, 1.0, norm_type=float("inf"))
        gct.clip_grad_value_(params, 1.0)


# -- CUDA graphs: the default path captures and replays (issue 14) --------------------------------


def _static_params(seed=0):
    """Parameters whose .grad tensors stay the same objects (a captured graph reads and writes
    their addresses); new gradients are copied into them."""
    params = _params([g for g in _grads("cuda", torch.float32, seed=seed) if g.numel()])
    return params


def _load(params, seed, scale):
    for p, g in zip(params, [g for g in _grads("cuda", torch.float32, scale=scale, seed=seed) if g.numel()]):
        p.grad.copy_(g)


CAPTURED = {
    "GlobalNorm.clip_": lambda params: gradclip.GlobalNorm(1.0).clip_(params).norm,
    "clip_grad_norm_": lambda params: gct.clip_grad_norm_(params, 1.0),
    "clip_grad_value_": lambda params: gct.clip_grad_value_(params, 0.5),
}


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_the_default_path_is_captured_by_a_cuda_graph_and_replays_exactly(name):
    """torch.cuda.graph: warm up on a side stream, capture one call, then each step copy new
    gradients into the same tensors and replay; every replay equals an eager call."""
    call = CAPTURED[name]
    params, reference = _static_params(), _static_params()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):
            _load(params, step, 3.0)
            call(params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    _load(params, 10, 3.0)
    with torch.cuda.graph(graph):
        out = call(params)
    for step in range(6):
        scale = 50.0 if step == 3 else 3.0  # a step that clips hard and one that does not
        _load(params, 20 + step, scale)
        _load(reference, 20 + step, scale)
        graph.replay()
        expected = call(reference)
        torch.cuda.synchronize()
        if out is not None:
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        for a, b in zip(params, reference):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["global_norm", "zclip", "autoclip"])
def test_reduce_overhead_runs_the_compiled_clip_as_a_cuda_graph(name):
    """torch.compile(mode="reduce-overhead"): the clip replays as a CUDA graph (inductor skips
    none) and equals the eager clipper step for step, a stateful one's state included. The
    gradients are marked static (the same tensors every step, as with zero_grad(set_to_none=
    False)): a graph that writes into its inputs replays only on static addresses."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    kwargs = {"zclip": {"warmup_steps": 3}, "autoclip": {"history": 8}}.get(name, {})
    clipper, eager = gradclip.get(name, **kwargs), gradclip.get(name, **kwargs)
    params, reference = _static_params(), _static_params()
    for p in params:
        torch._dynamo.mark_static_address(p.grad)
    step = torch.compile(lambda: clipper.clip_(params), mode="reduce-overhead", fullgraph=True)
    for i in range(10):
        scale = 50.0 if i == 7 else 3.0
        _load(params, 30 + i, scale)
        _load(reference, 30 + i, scale)
        torch.compiler.cudagraph_mark_step_begin()
        info = step()
        norm = info.norm.clone()  # an output of a replay lives until the next replay
        expected = eager.clip_(reference)
        torch.testing.assert_close(norm, expected.norm, rtol=1e-5, atol=1e-6)
        for a, b in zip(params, reference):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    _assert_plain_close(clipper.state_dict()["state"], eager.state_dict()["state"])


def _assert_plain_close(a, b):
    """Plain checkpoint data (dicts, lists, numbers) equal within fp32 rounding."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_plain_close(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_plain_close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    else:
        assert a == b
