"""One rank of a distributed test run, started by ``conftest.launch`` (not a test module).

``python _worker.py RANK WORLD STORE_FILE SCENARIO OUT_JSON``: joins a gloo process group through
a FileStore, runs the scenario, and writes ``{"checks": [[name, ok, detail], ...], "error": ...}``.
Every check compares against a one-process reference computed on the full model in this same
process. On an exception the rank writes what it has and exits at once with status 1, so the
launcher kills the other ranks instead of letting them wait in a collective.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import gradclip
import gradclip.torch as gct
from gradclip.torch.distributed import is_dtensor, local_tensor

STEPS = 6
SPIKE = 3  # the targets are scaled up: a gradient spike
NAN = 5  # one gradient element is NaN (on the rank holding it only, for sharded layouts)
PER_RANK = 4  # samples per rank and step


# -- the model and the data --------------------------------------------------------------------
class MLP(nn.Module):
    """fc1-fc3 split evenly over 2 and 4 ranks; the side branch does not: ``odd`` has 3 rows and
    ``gate`` 1, so FSDP2 and hand-made ``Shard`` placements leave ranks with uneven shards and
    with empty ones (torch.chunk semantics: 3 rows over 4 ranks are 1, 1, 1, 0)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 12)
        self.fc3 = nn.Linear(12, 4)
        self.odd = nn.Linear(8, 3)
        self.gate = nn.Linear(3, 1)

    def forward(self, x):
        main = self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))
        return main + self.gate(torch.tanh(self.odd(x)))  # (n, 1) broadcast over the 4 outputs


class TiedLM(nn.Module):
    """Embedding and output head share one weight (the same Parameter twice)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def make_mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


def batch(step: int, n: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 8, generator=g)
    y = torch.randn(n, 4, generator=g)
    if step == SPIKE:
        y = y * 40.0
    return x, y


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


# -- checks ------------------------------------------------------------------------------------------
class Checks:
    def __init__(self):
        self.items: list[list] = []

    def ok(self, name: str, cond: bool, detail: str = ""):
        self.items.append([name, bool(cond), "" if cond else detail])

    def close_part(self, name, got, want, **tolerances):
        """``close`` for a DTensor (or plain tensor) ``got`` against the whole tensor ``want``."""
        self.close(name, *this_ranks_part(got, want), **tolerances)

    def close(self, name, got, want, rtol=2e-5, atol=1e-6):
        got = torch.as_tensor(got).detach().to(torch.float64)
        want = torch.as_tensor(want).detach().to(torch.float64)
        if got.shape != want.shape:
            return self.ok(name, False, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
        good = torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        detail = ""
        if not good:
            diff = (got - want).abs()
            diff = torch.where(torch.isnan(diff), torch.zeros_like(diff), diff)
            detail = f"max abs diff {diff.max().item():.3g}; got {got.flatten()[:4].tolist()} want {want.flatten()[:4].tolist()}"
        self.ok(name, good, detail)


def this_ranks_part(got, want):
    """``(got, want)`` as tensors to compare on this rank, ``want`` being the whole tensor.

    A DTensor ``got`` gives its local shard and ``want`` the same part of the whole tensor, cut
    without communication (``distribute_tensor`` with ``src_data_rank=None`` slices locally):
    every rank checks its own part and together they cover the tensor, with no all-gather per
    comparison. A Partial DTensor has no such part and is gathered (a collective: its placements
    are the same on every rank, so every rank gathers it at the same point).
    """
    if not is_dtensor(got):
        return got, want
    if any(p.is_partial() for p in got.placements):
        return got.full_tensor(), want
    from torch.distributed.tensor import distribute_tensor

    part = distribute_tensor(want.detach(), got.device_mesh, list(got.placements), src_data_rank=None)
    return local_tensor(got), local_tensor(part)


def info_tuple(info):
    return [float(info.norm), float(info.threshold), float(info.coef), bool(info.clipped), bool(info.finite), bool(info.skip)]


def compare_info(checks, name, got, want, *, fields=("norm", "threshold", "coef", "clipped", "finite", "skip")):
    labels = ("norm", "threshold", "coef", "clipped", "finite", "skip")
    for label, g, w in zip(labels, got, want):
        if label not in fields:
            continue
        if isinstance(w, bool):
            checks.ok(f"{name}.{label}", g == w, f"{g} != {w}")
        else:
            checks.close(f"{name}.{label}", g, w, rtol=5e-5, atol=1e-6)


def same_on_every_rank(checks, name, value):
    """``value`` (plain data) must be identical on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    checks.ok(name, all(_same(v, gathered[0]) for v in gathered), f"differs across ranks: {gathered}")


def uneven_and_empty_shards(checks, name, grads):
    """The DTensors among ``grads`` include uneven local shards and empty ones (on some rank)."""
    sizes = [local_tensor(g).numel() for g in grads if is_dtensor(g)]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sizes)
    per_tensor = list(zip(*gathered))
    uneven = any(len(set(s)) > 1 for s in per_tensor)
    empty = any(min(s) == 0 < max(s) for s in per_tensor)
    checks.ok(name, uneven and empty, f"local shard sizes per tensor: {per_tensor}")


def _same(a, b):
    # NaN == NaN for this purpose.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# -- clippers under test -------------------------------------------------------------------------
def clipper_specs():
    """(label, factory, kind) for every registered clipper (and chains); kind says what may
    legitimately differ from one process: "elementwise" methods rewrite elements."""
    specs = [
        ("global_norm.p2", lambda: gradclip.get("global_norm", max_norm=0.5), "norm"),
        ("global_norm.p1", lambda: gradclip.get("global_norm", max_norm=0.5, norm_type=1.0), "norm"),
        ("global_norm.p3", lambda: gradclip.get("global_norm", max_norm=0.5, norm_type=3.0), "norm"),
        ("global_norm.pinf", lambda: gradclip.get("global_norm", max_norm=0.2, norm_type=math.inf), "norm"),
        ("global_norm.skip", lambda: gradclip.get("global_norm", max_norm=0.5, nonfinite="skip"), "norm"),
        ("norm.p2", lambda: gradclip.get("norm", max_norm=0.2), "per_tensor"),
        ("norm.p1", lambda: gradclip.get("norm", max_norm=0.3, norm_type=1.0), "per_tensor"),
        ("norm.p3", lambda: gradclip.get("norm", max_norm=0.3, norm_type=3.0), "per_tensor"),
        ("norm.pinf", lambda: gradclip.get("norm", max_norm=0.1, norm_type=math.inf), "per_tensor"),
        ("average_norm", lambda: gradclip.get("average_norm", max_norm=0.01), "per_tensor"),
        ("block_rms", lambda: gradclip.get("block_rms", threshold=0.05), "per_tensor"),
        ("norm_sign", lambda: gradclip.get("norm_sign", threshold=0.5), "elementwise"),
        ("value", lambda: gradclip.get("value", clip_value=0.05), "elementwise"),
        ("zero_outliers", lambda: gradclip.get("zero_outliers", threshold=0.1), "elementwise"),
        ("agc", lambda: gradclip.get("agc", clip_factor=0.05), "per_tensor"),
        ("autoclip.sketch", lambda: gradclip.get("autoclip", percentile=50.0), "norm"),
        ("autoclip.window", lambda: gradclip.get("autoclip", percentile=50.0, history=4), "norm"),
        ("zclip", lambda: gradclip.get("zclip", warmup_steps=2), "norm"),
        ("quantile_norm", lambda: gradclip.get("quantile_norm", initial_norm=0.5), "norm"),
        ("skip_on_spike", lambda: gradclip.get("skip_on_spike", window=8, min_history=2, sigma=2.0), "norm"),
        ("adagc", lambda: gradclip.get("adagc", start_clip_steps=2, warmup_max_norm=0.5), "per_tensor"),
        ("skip_above", lambda: gradclip.get("skip_above", max_norm=0.5), "norm"),
        ("none", lambda: gradclip.get("none"), "norm"),
        ("ada_clip", lambda: gradclip.get("ada_clip", theta=0.5), "elementwise"),
        ("ada_gn", lambda: gradclip.get("ada_gn"), "per_tensor"),
        # Without optimizer_state SpikeAware passes through (its rule is tested in test_spam.py).
        ("spike_aware", lambda: gradclip.get("spike_aware", warmup_steps=0), "elementwise"),
        ("non_finite.skip", lambda: gradclip.get("non_finite", policy="skip"), "norm"),
        ("non_finite.zero", lambda: gradclip.get("non_finite", policy="zero"), "elementwise"),
        (
            "subset.element",
            lambda: gradclip.get("subset", clipper="value", fraction=0.5, seed=7),
            "random",
        ),
        (
            "subset.tensor",
            lambda: gradclip.get(
                "subset", clipper={"clipper": "global_norm", "config": {"max_norm": 0.5}}, fraction=0.5, by="tensor", seed=7
            ),
            "random",
        ),
        (
            "chain",
            lambda: gradclip.chain(gradclip.get("non_finite", policy="zero"), gradclip.get("zclip", warmup_steps=2)),
            "elementwise",
        ),
    ]
    return specs


def registered_names_covered(checks):
    covered = {label.split(".")[0] for label, _, _ in clipper_specs()}
    missing = sorted(set(gradclip.available()) - covered)
    checks.ok("registry.every_clipper_covered", not missing, f"no distributed test for {missing}")


# -- reference: one process, the full model ------------------------------------------------------
def reference_grads(world: int, model_factory=make_mlp, data=None):
    """Per step, the full-batch gradients of the full model (names -> tensors)."""
    model = model_factory()
    out = []
    for step in range(STEPS):
        x, y = batch(step, PER_RANK * world) if data is None else data(step)
        model.zero_grad()
        loss_of(model, x, y).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        if step == NAN:
            grads["fc1.weight"][0, 0] = math.nan
        out.append(grads)
    return model, out


def run_reference(spec_factory, model, steps_grads, names=None):
    """Clip the reference gradients step by step; return per step (info tuple, clipped grads)."""
    clipper = spec_factory()
    params = dict(model.named_parameters())
    names = names or list(params)
    results = []
    for grads in steps_grads:
        for n in names:
            params[n].grad = grads[n].clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = clipper.clip_([(n, params[n]) for n in names])
        results.append((info_tuple(info), {n: params[n].grad.clone() for n in names}))
    return results


def clip_and_compare(checks, layout, model_d, set_grads, steps_grads_d, reference, *, name_map=None, skip_specs=(), info_fields=None):
    """Run every clipper on the distributed model and compare with the reference run.

    ``set_grads(step)`` puts the step's distributed gradients on ``model_d``; ``name_map`` maps
    the distributed parameter names to the reference ones.
    """
    for label, factory, kind in clipper_specs():
        if label in skip_specs:
            continue
        clipper = factory()
        want = reference[label]
        infos = []
        for step in range(STEPS):
            set_grads(step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = clipper.clip_(model_d)
            got = info_tuple(info)
            infos.append(got)
            fields = info_fields(kind) if info_fields else ("norm", "threshold", "coef", "clipped", "finite", "skip")
            compare_info(checks, f"{layout}/{label}/step{step}", got, want[step][0], fields=fields)
            checks.ok(f"{layout}/{label}/step{step}.norm_is_plain_tensor", not is_dtensor(info.norm), "info.norm is a DTensor")
            for n, p in model_d.named_parameters():
                ref_name = name_map(n) if name_map else n
                checks.close_part(f"{layout}/{label}/step{step}/{ref_name}", p.grad, want[step][1][ref_name])
        same_on_every_rank(checks, f"{layout}/{label}/info_identical_on_ranks", infos)
        same_on_every_rank(checks, f"{layout}/{label}/state_identical_on_ranks", clipper.state_dict())


def reference_runs(model, steps_grads):
    return {label: run_reference(factory, model, steps_grads) for label, factory, _ in clipper_specs()}


def drop_in_functions(checks, layout, model_d, set_grads, model_ref, steps_grads, name_map=None):
    """``clip_grad_norm_`` and ``get_total_norm`` for p in {1, 2, 3, inf}."""
    for p in (1.0, 2.0, 3.0, math.inf):
        for step in (0, SPIKE):
            for n, param in model_ref.named_parameters():
                param.grad = steps_grads[step][n].clone()
            want_total = gct.get_total_norm([q.grad for q in model_ref.parameters()], p)
            want = gct.clip_grad_norm_(model_ref.parameters(), 0.3, p)
            set_grads(step)
            got_total = gct.get_total_norm([q.grad for q in model_d.parameters()], p)
            got = gct.clip_grad_norm_(model_d.parameters(), 0.3, p)
            checks.close(f"{layout}/get_total_norm.p{p}/step{step}", got_total, want_total)
            checks.close(f"{layout}/clip_grad_norm_.p{p}/step{step}", got, want)
            checks.ok(f"{layout}/clip_grad_norm_.p{p}/step{step}.plain", not is_dtensor(got), "returned a DTensor")
            for n, param in model_d.named_parameters():
                ref_name = name_map(n) if name_map else n
                checks.close_part(
                    f"{layout}/clip_grad_norm_.p{p}/step{step}/{ref_name}",
                    param.grad,
                    dict(model_ref.named_parameters())[ref_name].grad,
                )
            same_on_every_rank(checks, f"{layout}/clip_grad_norm_.p{p}/step{step}/identical", float(got))


# -- layouts ------------------------------------------------------------------------------------------
def saved_grads_after_backward(model_d, local_batch, *, nan_owner=None):
    """Run forward/backward per step; keep a copy of the gradients of every step."""
    saved = []
    for step in range(STEPS):
        x, y = local_batch(step)
        model_d.zero_grad(set_to_none=True)
        loss_of(model_d, x, y).backward()
        grads = [p.grad.detach().clone() for p in model_d.parameters()]
        if step == NAN:
            nan_owner(model_d, grads)
        saved.append(grads)

    def set_grads(step):
        for p, g in zip(model_d.parameters(), saved[step]):
            p.grad = g.clone()

    return set_grads


def _first_param_nan(model_d, grads):
    """NaN into fc1.weight[0, 0]: on every rank for replicated tensors, on its owner for shards."""
    g = grads[0]
    if is_dtensor(g):
        from torch.distributed.tensor import Replicate

        # Rows of fc1.weight are sharded (Shard(0)) or columns (Shard(1)): global (0, 0) is on the
        # first shard of every sharded mesh dimension.
        coordinate = g.device_mesh.get_coordinate()
        owner = all(
            c == 0 or isinstance(p, Replicate) or p.is_partial() for c, p in zip(coordinate, g.placements)
        )
        if owner:
            local_tensor(g)[0, 0] = math.nan
    else:
        g[0, 0] = math.nan


def layout_ddp(checks, rank, world, model_ref, steps_grads, reference):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(make_mlp())

    def local_batch(step):
        x, y = batch(step, PER_RANK * world)
        return x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]

    set_grads = saved_grads_after_backward(ddp, local_batch, nan_owner=_first_param_nan)
    strip = lambda n: n.removeprefix("module.")  # noqa: E731

    # DDP has already averaged the gradients: gradclip must not communicate at all.
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        set_grads(0)
        gradclip.GlobalNorm(0.5).clip_(ddp)
        gradclip.get("zclip").clip_(ddp)
        gct.clip_grad_norm_(ddp.parameters(), 0.5)
    finally:
        dist.all_reduce = original
    checks.ok("ddp/no_extra_reduction", not calls, f"{len(calls)} all_reduce call(s) under DDP")

    clip_and_compare(checks, "ddp", ddp, set_grads, None, reference, name_map=strip)
    drop_in_functions(checks, "ddp", ddp, set_grads, model_ref, steps_grads, name_map=strip)
    optimizer_and_monitor(checks, "ddp", rank, world, lambda m: DDP(m), local_batch, strip)


def layout_fsdp(checks, rank, world, model_ref, steps_grads, reference, mesh_shape=None, label="fsdp2"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    shape = mesh_shape or (world,)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)

    def wrap(model):
        for layer in (model.fc1, model.fc2, model.fc3):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    model_d = wrap(make_mlp())

    def local_batch(step):
        x, y = batch(step, PER_RANK * world)
        return x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK]

    set_grads = saved_grads_after_backward(model_d, local_batch, nan_owner=_first_param_nan)
    set_grads(0)
    checks.ok(f"{label}/grads_are_dtensors", all(is_dtensor(p.grad) for p in model_d.parameters()), "not DTensors")
    uneven_and_empty_shards(checks, f"{label}/uneven_and_empty_shards", [p.grad for p in model_d.parameters()])
    clip_and_compare(checks, label, model_d, set_grads, None, reference)
    drop_in_functions(checks, label, model_d, set_grads, model_ref, steps_grads)
    optimizer_and_monitor(checks, label, rank, world, wrap, local_batch, None)


def layout_tp(checks, rank, world, model_ref, steps_grads, reference, *, with_fsdp=False):
    """Tensor parallel (ColwiseParallel fc1, RowwiseParallel fc2, fc3 left a plain replicated
    module: a mixed DTensor / plain list); with_fsdp: 2-D dp x tp, FSDP2 over dp."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if with_fsdp:
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
        dp_rank, dp_size = dp_mesh.get_local_rank(), 2
        label = "fsdp2_tp"
    else:
        tp_mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        dp_rank, dp_size = 0, 1
        label = "tp"

    def wrap(model):
        parallelize_module(model, tp_mesh, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        if with_fsdp:
            fully_shard(model.fc1, mesh=dp_mesh)
            fully_shard(model.fc2, mesh=dp_mesh)
            fully_shard(model, mesh=dp_mesh)
        return model

    model_d = wrap(make_mlp())
    # Reference batch: PER_RANK * world samples; tp ranks of one dp group see the same slice.
    per_dp = PER_RANK * world // dp_size

    def local_batch(step):
        x, y = batch(step, PER_RANK * world)
        return x[dp_rank * per_dp : (dp_rank + 1) * per_dp], y[dp_rank * per_dp : (dp_rank + 1) * per_dp]

    set_grads = saved_grads_after_backward(model_d, local_batch, nan_owner=_first_param_nan)
    set_grads(0)
    kinds = sorted({"plain" if not is_dtensor(p.grad) else str(tuple(p.grad.placements)) for p in model_d.parameters()})
    checks.ok(f"{label}/mixed_layout", len(kinds) >= 3, f"layouts seen: {kinds}")
    clip_and_compare(checks, label, model_d, set_grads, None, reference)
    drop_in_functions(checks, label, model_d, set_grads, model_ref, steps_grads)
    # torch's fused AdamW itself refuses a list mixing DTensor and plain parameters (fc3 and the
    # side branch are left plain under tp alone): "got mixed torch.Tensor and DTensor". Under
    # fsdp2_tp every parameter is a DTensor, on one of two meshes.
    optimizer_and_monitor(checks, label, rank, world, wrap, local_batch, None, fused=with_fsdp)


def distribute_as(t, mesh, placements, *, no_partial=False):
    """``t`` as a DTensor with ``placements`` on ``mesh`` (a plain copy when ``mesh`` is None);
    ``no_partial`` turns Partial into Replicate (for methods that refuse Partial)."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    if mesh is None:
        return t.clone()
    if no_partial:
        placements = [Replicate() if p.is_partial() else p for p in placements]
    if any(p.is_partial() for p in placements):
        # Every Partial mesh dim splits the value into equal parts that add up exactly.
        parts = math.prod(mesh.size(d) for d, p in enumerate(placements) if p.is_partial())
        shard_placements = [Replicate() if p.is_partial() else p for p in placements]
        local = distribute_tensor(t / parts, mesh, shard_placements, src_data_rank=None).to_local()
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=t.shape, stride=t.stride())
    return distribute_tensor(t.clone(), mesh, placements, src_data_rank=None)


def layout_manual(checks, rank, world, model_ref, steps_grads, reference_functional):
    """DTensors built by hand, functional API (clip/update return DTensors): Shard on either dim,
    Replicate, Partial, 1-D or 2-D meshes, several meshes in one list."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh1 = init_device_mesh("cpu", (world,))
    # odd.* (3 rows) and gate.* (1 row) give uneven and empty local shards.
    if world == 4:
        mesh2 = init_device_mesh("cpu", (2, 2))
        layouts = {
            "fc1.weight": (mesh2, [Shard(0), Shard(1)]),
            "fc1.bias": (mesh1, [Shard(0)]),
            "fc2.weight": (mesh2, [Partial(), Shard(1)]),
            "fc2.bias": (mesh2, [Replicate(), Shard(0)]),
            "fc3.weight": (mesh2, [Shard(1), Replicate()]),
            "fc3.bias": (None, None),  # plain, replicated
            "odd.weight": (mesh2, [Shard(0), Shard(1)]),  # rows 2, 1
            "odd.bias": (mesh1, [Shard(0)]),  # 1, 1, 1, 0
            "gate.weight": (mesh1, [Shard(1)]),  # columns 1, 1, 1, 0
            "gate.bias": (mesh2, [Shard(0), Partial()]),  # 1, 0, and partial sums
        }
    else:
        layouts = {
            "fc1.weight": (mesh1, [Shard(0)]),
            "fc1.bias": (mesh1, [Replicate()]),
            "fc2.weight": (mesh1, [Shard(1)]),
            "fc2.bias": (mesh1, [Partial()]),
            "fc3.weight": (mesh1, [Partial()]),
            "fc3.bias": (None, None),
            "odd.weight": (mesh1, [Shard(0)]),  # rows 2, 1
            "odd.bias": (mesh1, [Partial()]),
            "gate.weight": (mesh1, [Shard(0)]),  # the 1-row tensor: rows 1, 0
            "gate.bias": (mesh1, [Shard(0)]),  # 1, 0
        }
    names = list(layouts)
    missing = sorted(set(dict(model_ref.named_parameters())) - set(names))
    checks.ok("manual/every_parameter_laid_out", not missing, f"no layout for {missing}")

    def distribute(t, name, no_partial=False):
        return distribute_as(t, *layouts[name], no_partial=no_partial)

    params_full = {n: p.detach() for n, p in model_ref.named_parameters()}
    uneven_and_empty_shards(checks, "manual/uneven_and_empty_shards", [distribute(steps_grads[0][n], n) for n in names])
    for label, factory, kind in clipper_specs():
        no_partial = kind in ("elementwise", "random")
        clipper = factory()
        infos = []
        for step in range(STEPS):
            grads = {n: distribute(steps_grads[step][n], n, no_partial) for n in names}
            params = {n: distribute(params_full[n], n, no_partial) for n in names}
            out, info = clipper.clip(grads, params=params)
            want_out, want_info = reference_functional[label][step]
            got = info_tuple(info)
            infos.append(got)
            compare_info(checks, f"manual/{label}/step{step}", got, want_info)
            for n in names:
                checks.ok(f"manual/{label}/step{step}/{n}.type", is_dtensor(out[n]) == is_dtensor(grads[n]), "type changed")
                checks.close_part(f"manual/{label}/step{step}/{n}", out[n], want_out[n])
        same_on_every_rank(checks, f"manual/{label}/info_identical_on_ranks", infos)

    # Element-wise rewriting of a Partial DTensor is refused, on every rank alike.
    for name_ in ("value", "zero_outliers", "norm_sign"):
        partial = DTensor.from_local(torch.ones(3) / world, mesh1, [Partial()], run_check=False)
        try:
            gradclip.get(name_).clip([partial])
        except gradclip.BackendError as error:
            checks.ok(f"manual/partial_refused/{name_}", "Partial" in str(error), str(error))
        else:
            checks.ok(f"manual/partial_refused/{name_}", False, "no error")


def reference_functional_runs(model_ref, steps_grads):
    params = {n: p.detach() for n, p in model_ref.named_parameters()}
    out = {}
    for label, factory, _ in clipper_specs():
        clipper = factory()
        runs = []
        for step in range(STEPS):
            grads = {n: g.clone() for n, g in steps_grads[step].items()}
            clipped, info = clipper.clip(grads, params=params)
            runs.append((clipped, info_tuple(info)))
        out[label] = runs
    return out


def layout_partition(checks, rank, world, model_ref, steps_grads, reference):
    """Plain tensors sharded by the user (ZeRO-style partition of whole tensors) with an
    explicit process_group; the last rank holds no gradient at all."""
    names = [n for n, _ in model_ref.named_parameters()]
    holders = world - 1
    mine = [n for i, n in enumerate(names) if rank < holders and i % holders == rank]
    params = {n: nn.Parameter(p.detach().clone()) for n, p in model_ref.named_parameters() if n in mine}
    group = dist.group.WORLD

    def set_grads(step):
        for n, p in params.items():
            p.grad = steps_grads[step][n].clone()

    for label, factory, kind in clipper_specs():
        if kind == "random":
            continue  # random draws depend on a tensor's position in each rank's own list
        clipper = factory()
        clipper.process_group = group
        infos = []
        for step in range(STEPS):
            set_grads(step)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no "found no gradients" noise
                info = clipper.clip_(list(params.items()))
            got = info_tuple(info)
            infos.append(got)
            fields = ("norm", "threshold", "clipped", "finite", "skip") if kind == "elementwise" else None
            compare_info(checks, f"partition/{label}/step{step}", got, reference[label][step][0], **({"fields": fields} if fields else {}))
            for n, p in params.items():
                checks.close(f"partition/{label}/step{step}/{n}", p.grad, reference[label][step][1][n])
        if kind != "elementwise":
            same_on_every_rank(checks, f"partition/{label}/info_identical_on_ranks", infos)
        else:
            same_on_every_rank(checks, f"partition/{label}/flags_identical_on_ranks", [i[:2] + i[3:] for i in infos])

    # The drop-ins with a process group, including the rank without gradients.
    for p in (1.0, 2.0, 3.0, math.inf):
        set_grads(SPIKE)
        for n, q in model_ref.named_parameters():
            q.grad = steps_grads[SPIKE][n].clone()
        total = gct.get_total_norm([q.grad for q in params.values()], p, process_group=group)
        want = gct.clip_grad_norm_(model_ref.parameters(), 0.3, p)
        checks.close(f"partition/get_total_norm.p{p}", total, want)
        got = gct.clip_grad_norm_(list(params.values()), 0.3, p, process_group=group)
        checks.close(f"partition/clip_grad_norm_.p{p}", got, want)
        for n, q in params.items():
            checks.close(f"partition/clip_grad_norm_.p{p}/{n}", q.grad, dict(model_ref.named_parameters())[n].grad)
    checks.ok("partition/rank_without_grads", (rank == world - 1) == (not params), f"rank {rank} holds {mine}")

    # ClippedOptimizer with a fused AdamW (the coefficient folded into its step) and a Monitor
    # on the ranks holding parameters; the rank without any calls clip_([]) to take part in the
    # reduction, and its monitor observes that info.
    for clip_name, make_clipper in (
        ("global_norm", lambda: gradclip.GlobalNorm(0.5)),
        ("zclip", lambda: gradclip.get("zclip", warmup_steps=2)),
    ):
        ref = make_mlp()
        ref_monitor = gradclip.Monitor(ref, every=2)
        ref_opt = gct.ClippedOptimizer(
            torch.optim.AdamW(ref.parameters(), lr=0.01, fused=True), make_clipper(), monitor=ref_monitor
        )
        model = make_mlp()
        for n, q in model.named_parameters():
            q.requires_grad_(n in mine)  # this rank's partition: the monitor tracks only these
        own = {n: q for n, q in model.named_parameters() if n in mine}
        clipper = make_clipper()
        clipper.process_group = group
        monitor = gradclip.Monitor(model, every=2)
        opt = (
            gct.ClippedOptimizer(torch.optim.AdamW(list(own.values()), lr=0.01, fused=True), clipper, monitor=monitor)
            if own
            else None
        )
        for step in range(5):
            x, y = batch(step, PER_RANK * world)
            ref_opt.zero_grad()
            loss_of(ref, x, y).backward()
            for n, q in own.items():
                q.grad = dict(ref.named_parameters())[n].grad.clone()
            ref_opt.step()
            if opt is not None:
                opt.step()
                compare_info(checks, f"partition/optimizer/{clip_name}/step{step}", info_tuple(opt.last_info), info_tuple(ref_opt.last_info))
            else:
                monitor.observe(clipper.clip_([]))
        if opt is not None:
            checks.ok(f"partition/optimizer/{clip_name}/folded", opt.folded and ref_opt.folded, f"{opt.folded}, {ref_opt.folded}")
        for n, q in own.items():
            checks.close(f"partition/optimizer/{clip_name}/{n}", q.detach(), dict(ref.named_parameters())[n].detach(), rtol=1e-4, atol=1e-5)
        compare_monitors(checks, f"partition/monitor/{clip_name}", monitor, ref_monitor, mine)
        overall = {k: v for k, v in monitor.summary().items() if k != "layers"}  # layers differ by rank
        same_on_every_rank(checks, f"partition/monitor/{clip_name}/identical_on_ranks", overall)
        monitor.close()
        ref_monitor.close()

    # Subset (seed given) with a process group, rank 0 holding every gradient and the others
    # none: the same as one process on the full list, on every rank.
    everything = {n: nn.Parameter(p.detach().clone()) for n, p in model_ref.named_parameters()} if rank == 0 else {}
    for label, factory, kind in clipper_specs():
        if kind != "random":
            continue
        clipper = factory()
        clipper.process_group = group
        infos = []
        for step in range(STEPS):
            for n, q in everything.items():
                q.grad = steps_grads[step][n].clone()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = clipper.clip_(list(everything.items()))
            infos.append(info_tuple(info))
            compare_info(checks, f"partition/without_grads/{label}/step{step}", infos[-1], reference[label][step][0])
            for n, q in everything.items():
                checks.close(f"partition/without_grads/{label}/step{step}/{n}", q.grad, reference[label][step][1][n])
        same_on_every_rank(checks, f"partition/without_grads/{label}/info_identical_on_ranks", infos)

    # A sub-group: ranks 0 and 1 share the gradient, the others clip on their own.
    pair = dist.new_group([0, 1])
    if rank in (0, 1):
        g = torch.full((3,), float(rank + 1))
        norm = gct.clip_grad_norm_([_with_grad(g)], 1.0, process_group=pair)
        checks.close("partition/subgroup_norm", norm, math.sqrt(3 * 1 + 3 * 4))


def layout_mixed_partition(checks, rank, world, model_ref, steps_grads, reference_functional):
    """DTensors and plain tensors in one list under ``process_group=``: the plain tensors are
    partitioned over the ranks (whole tensors, ZeRO-style) and the last rank holds none of them,
    only its DTensor shards (one of them empty). DTensor norms are reduced on their mesh, the
    plain part over the group, and the global norm adds the two. Functional API, with params."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    placements = {
        "fc1.bias": [Replicate()],
        "fc2.weight": [Shard(1)],
        "fc3.bias": [Partial()],
        "odd.weight": [Shard(0)],  # rows 2, 1 or 1, 1, 1, 0
        "gate.weight": [Shard(0)],  # one row: empty shards
    }
    names = [n for n, _ in model_ref.named_parameters()]
    plain = [n for n in names if n not in placements]  # fc1.weight, with the NaN, on rank 0
    holders = world - 1
    mine_plain = [n for i, n in enumerate(plain) if rank < holders and i % holders == rank]
    mine = [n for n in names if n in placements or n in mine_plain]  # DTensors and plain interleaved
    checks.ok("mixed/rank_without_plain_grads", (rank == world - 1) == (not mine_plain), f"rank {rank} holds {mine_plain}")
    params_full = {n: p.detach() for n, p in model_ref.named_parameters()}
    group = dist.group.WORLD

    def lay_out(tensors, no_partial):
        return {
            n: distribute_as(tensors[n], mesh if n in placements else None, placements.get(n), no_partial=no_partial)
            for n in mine
        }

    uneven_and_empty_shards(checks, "mixed/uneven_and_empty_shards", list(lay_out(steps_grads[0], False).values()))
    for label, factory, kind in clipper_specs():
        if kind == "random":
            continue  # random draws depend on a tensor's position in each rank's own list
        no_partial = kind == "elementwise"
        clipper = factory()
        clipper.process_group = group
        infos = []
        for step in range(STEPS):
            grads = lay_out(steps_grads[step], no_partial)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # no "found no gradients" noise
                out, info = clipper.clip(grads, params=lay_out(params_full, no_partial))
            want_out, want_info = reference_functional[label][step]
            got = info_tuple(info)
            infos.append(got)
            fields = ("norm", "threshold", "clipped", "finite", "skip") if kind == "elementwise" else None
            compare_info(checks, f"mixed/{label}/step{step}", got, want_info, **({"fields": fields} if fields else {}))
            checks.ok(f"mixed/{label}/step{step}.norm_is_plain_tensor", not is_dtensor(info.norm), "info.norm is a DTensor")
            for n in mine:
                checks.ok(f"mixed/{label}/step{step}/{n}.type", is_dtensor(out[n]) == is_dtensor(grads[n]), "type changed")
                checks.close_part(f"mixed/{label}/step{step}/{n}", out[n], want_out[n])
        if kind == "norm":  # global statistics (per-tensor state follows each rank's own tensors)
            same_on_every_rank(checks, f"mixed/{label}/state_identical_on_ranks", clipper.state_dict())
        if kind != "elementwise":
            same_on_every_rank(checks, f"mixed/{label}/info_identical_on_ranks", infos)
        else:
            same_on_every_rank(checks, f"mixed/{label}/flags_identical_on_ranks", [i[:2] + i[3:] for i in infos])


def _with_grad(g):
    p = nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    return p


def tied_embeddings(checks, rank, world):
    """The same Parameter twice (tied input/output embeddings) is counted once."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(1)
    ref = TiedLM()
    idx = torch.randint(0, 10, (PER_RANK * world, 3), generator=torch.Generator().manual_seed(5))
    target = torch.randn(PER_RANK * world, 3, 10, generator=torch.Generator().manual_seed(6))

    def loss(model, i, t):
        return torch.nn.functional.mse_loss(model(i), t)

    loss(ref, idx, target).backward()
    unique = list({id(p): p for p in ref.parameters()}.values())
    by_hand = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in unique))
    listed_twice = [ref.emb.weight, ref.head.weight, ref.mid.weight, ref.mid.bias]
    checks.ok("tied/same_parameter", ref.emb.weight is ref.head.weight, "not tied")
    checks.close("tied/get_total_norm_twice", gct.get_total_norm([p.grad for p in listed_twice]), by_hand)
    _, info = gradclip.GlobalNorm(math.inf).clip([p.grad for p in listed_twice])
    checks.close("tied/functional_twice", info.norm, by_hand)
    clipped, _ = gradclip.GlobalNorm(0.1).clip([p.grad for p in listed_twice])
    checks.ok("tied/functional_same_result", torch.equal(clipped[0], clipped[1]), "two results for one tensor")
    ref_norm = gradclip.GlobalNorm(0.1).clip_(_clone_with_grads(ref)).norm
    checks.close("tied/module", ref_norm, by_hand)
    twice = _clone_with_grads(ref)
    norm_list = gradclip.GlobalNorm(0.1).clip_([twice.emb.weight, twice.head.weight, twice.mid.weight, twice.mid.bias]).norm
    checks.close("tied/parameter_list_twice", norm_list, by_hand)
    checks.close("tied/parameter_list_clipped_once", twice.emb.weight.grad, ref.emb.weight.grad * (0.1 / (by_hand + 1e-6)))

    sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    torch.manual_seed(1)
    ddp = DDP(TiedLM())
    loss(ddp, idx[sl], target[sl]).backward()
    checks.close("tied/ddp", gradclip.GlobalNorm(0.1).clip_(ddp).norm, by_hand)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(1)
    model = TiedLM()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    loss(model, idx[sl], target[sl]).backward()
    info = gradclip.GlobalNorm(0.1).clip_(model)
    checks.close("tied/fsdp2", info.norm, by_hand)
    checks.close_part("tied/fsdp2_weight", model.emb.weight.grad, ref.emb.weight.grad * (0.1 / (by_hand + 1e-6)))


def _clone_with_grads(model):
    clone = copy.deepcopy(model)  # keeps the tie: deepcopy's memo maps the one Parameter once
    for new, old in zip(clone.parameters(), model.parameters()):
        new.grad = old.grad.clone()
    return clone


def optimizer_and_monitor(checks, layout, rank, world, wrap, local_batch, name_map, *, fused=True):
    """ClippedOptimizer (plain and, with ``fused``, fused/folded; and a skipping clipper) and
    Monitor per-layer norms on the distributed model, against the same on one process."""

    def train(model, batches, make_opt, clipper, monitor=None):
        opt = gct.ClippedOptimizer(make_opt(model.parameters()), clipper, monitor=monitor)
        infos = []
        for x, y in batches:
            opt.zero_grad()
            loss_of(model, x, y).backward()
            opt.step()
            infos.append(info_tuple(opt.last_info))
        return opt, infos

    optimizers = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
    }
    clippers = {
        "global_norm": lambda: gradclip.GlobalNorm(0.5),
        "skip_on_spike": lambda: gradclip.get("skip_on_spike", window=8, min_history=2, sigma=2.0),
        "zclip": lambda: gradclip.get("zclip", warmup_steps=2),
    }
    full_batches = [batch(step, PER_RANK * world) for step in range(5)]
    local_batches = [local_batch(step) for step in range(5)]
    if not fused:
        del optimizers["adamw_fused"]
    for opt_name, make_opt in optimizers.items():
        for clip_name, make_clipper in clippers.items():
            tag = f"{layout}/optimizer/{opt_name}/{clip_name}"
            ref = make_mlp()
            ref_opt, ref_infos = train(ref, full_batches, make_opt, make_clipper())
            model = wrap(make_mlp())
            try:
                opt, infos = train(model, local_batches, make_opt, make_clipper())
            except Exception as error:  # noqa: BLE001 - reported as a failed check
                checks.ok(tag, False, f"{type(error).__name__}: {error}")
                continue
            checks.ok(f"{tag}/folded_as_reference", opt.folded == ref_opt.folded, f"{opt.folded} vs {ref_opt.folded}")
            for step, (g, w) in enumerate(zip(infos, ref_infos)):
                compare_info(checks, f"{tag}/step{step}", g, w)
            params_ref = dict(ref.named_parameters())
            for n, p in model.named_parameters():
                ref_name = name_map(n) if name_map else n
                checks.close_part(f"{tag}/{ref_name}", p.detach(), params_ref[ref_name].detach(), rtol=1e-4, atol=1e-5)
            same_on_every_rank(checks, f"{tag}/identical_on_ranks", infos)

    # Monitor: per-layer norms of the (DTensor) gradients equal one process's.
    ref = make_mlp()
    ref_monitor = gradclip.Monitor(ref, every=2)
    train(ref, full_batches, optimizers["sgd"], gradclip.GlobalNorm(0.5), ref_monitor)
    model = wrap(make_mlp())
    monitor = gradclip.Monitor(model, every=2)
    train(model, local_batches, optimizers["sgd"], gradclip.GlobalNorm(0.5), monitor)
    compare_monitors(checks, f"{layout}/monitor", monitor, ref_monitor, list(ref_monitor.summary()["layers"]), name_map)
    same_on_every_rank(checks, f"{layout}/monitor/identical_on_ranks", monitor.summary())
    monitor.close()
    ref_monitor.close()


def compare_monitors(checks, tag, monitor, ref_monitor, layer_names, name_map=None, steps=5):
    """The monitor's step counts and norms equal the one-process monitor's, and it tracks exactly
    ``layer_names`` (reference names; ``name_map`` gives the reference name of a distributed one)
    with the reference's per-layer statistics."""
    want, got = ref_monitor.summary(), monitor.summary()
    checks.ok(f"{tag}/steps", got["steps"] == want["steps"] == steps, f"{got['steps']} vs {want['steps']}")
    checks.ok(f"{tag}/clipped_steps", got["clipped_steps"] == want["clipped_steps"], f"{got} vs {want}")
    checks.close(f"{tag}/norms", torch.tensor(monitor.norms()), torch.tensor(ref_monitor.norms()))
    tracked = sorted(name_map(n) if name_map else n for n in got["layers"])
    checks.ok(f"{tag}/layer_names", tracked == sorted(layer_names), f"{tracked} vs {sorted(layer_names)}")
    by_reference_name = {(name_map(n) if name_map else n): stats for n, stats in got["layers"].items()}
    for name in layer_names:
        mine = by_reference_name.get(name)
        if mine is not None:
            stats = want["layers"][name]
            checks.close(f"{tag}/layer/{name}", torch.tensor(list(mine.values())), torch.tensor(list(stats.values())), rtol=1e-4)


def raise_names(checks, name, grads, offenders):
    """``GlobalNorm(nonfinite="raise").clip(grads)`` raises NonFiniteError naming ``offenders``."""
    try:
        gradclip.GlobalNorm(1.0, nonfinite="raise").clip(grads)
    except gradclip.NonFiniteError as error:
        checks.ok(name, error.offenders == offenders, f"{error.offenders}: {error}")
    else:
        checks.ok(name, False, "no error")


def misc_checks(checks, rank, world):
    """Things that need more than one process but no model."""
    # Subset(seed=None) would draw a different random key on every rank.
    p = _with_grad(torch.ones(4))
    try:
        gradclip.get("subset").clip_([p])
    except gradclip.InvalidArgumentError as error:
        checks.ok("misc/subset_needs_seed", "seed=" in str(error), str(error))
    else:
        checks.ok("misc/subset_needs_seed", False, "no error")
    # A DeviceMesh as process_group: every dimension of it.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2)) if world % 2 == 0 else init_device_mesh("cpu", (world,))
    g = torch.full((5,), float(rank + 1))
    norm = gct.clip_grad_norm_([_with_grad(g)], 1.0, process_group=mesh)
    checks.close("misc/mesh_as_process_group", norm, math.sqrt(sum(5 * (r + 1) ** 2 for r in range(world))))
    # NaN on one rank only is seen by all ranks, for p = inf too (MAX reductions keep NaN).
    for p_ in (2.0, math.inf):
        g = torch.ones(3)
        if rank == world - 1:
            g[1] = math.nan
        info = gradclip.GlobalNorm(1.0, norm_type=p_, nonfinite="skip", process_group=dist.group.WORLD).clip_([_with_grad(g)])
        checks.ok(f"misc/nan_on_one_rank.p{p_}", (not bool(info.finite)) and bool(info.skip), str(info_tuple(info)))


    # nonfinite="raise" names the DTensor whose NaN sits on another rank's shard, on every rank.
    from torch.distributed.tensor import Shard, distribute_tensor

    one_d = init_device_mesh("cpu", (world,))
    full_grad = torch.ones(2 * world, 3)
    full_grad[0, 1] = math.nan  # on rank 0's shard only
    sharded = distribute_tensor(full_grad, one_d, [Shard(0)], src_data_rank=None)
    raise_names(checks, "misc/raise_names_sharded_tensor", {"w": sharded, "b": torch.ones(2)}, ["w"])

    # Partial parts that are finite but add up beyond fp32: the reduced tensor holds inf, and the
    # "raise" message names it (as the norm, read after the reduction, sees it).
    from torch.distributed.tensor import DTensor, Partial

    overflowing = DTensor.from_local(torch.full((3,), 2e38), one_d, [Partial()], run_check=False)
    raise_names(checks, "misc/raise_names_partial_overflow", {"w": overflowing, "b": torch.ones(2)}, ["w"])

    # nonfinite="raise" under process_group= with the NaN on the last rank only: every rank
    # raises (none waits in a collective); the holder names its tensor, the others say the
    # values are on another rank instead of blaming an overflow of their own finite elements.
    world_group = dist.group.WORLD
    for label, call in (
        ("global_norm", lambda named: gradclip.GlobalNorm(1.0, nonfinite="raise", process_group=world_group).clip_(named)),
        (
            "clip_grad_norm_",
            lambda named: gct.clip_grad_norm_([q for _, q in named], 1.0, error_if_nonfinite=True, process_group=world_group),
        ),
    ):
        g = torch.ones(3)
        if rank == world - 1:
            g[1] = math.nan
        try:
            call([("w", _with_grad(g))])
        except gradclip.NonFiniteError as error:
            text = str(error)
            if rank == world - 1:
                good = len(error.offenders) == 1
            else:
                good = not error.offenders and "another rank" in text and "beyond ~1e19" not in text
            checks.ok(f"misc/raise_nan_on_another_rank/{label}", good, f"{error.offenders}: {text}")
        else:
            checks.ok(f"misc/raise_nan_on_another_rank/{label}", False, "no error")


# -- scenarios ------------------------------------------------------------------------------------------
def scenario_main(checks, rank, world):
    registered_names_covered(checks)
    misc_checks(checks, rank, world)
    model_ref, steps_grads = reference_grads(world)
    reference = reference_runs(model_ref, steps_grads)
    functional = reference_functional_runs(model_ref, steps_grads)
    layout_manual(checks, rank, world, model_ref, steps_grads, functional)
    layout_partition(checks, rank, world, model_ref, steps_grads, reference)
    layout_mixed_partition(checks, rank, world, model_ref, steps_grads, functional)
    layout_ddp(checks, rank, world, model_ref, steps_grads, reference)
    layout_fsdp(checks, rank, world, model_ref, steps_grads, reference)
    layout_tp(checks, rank, world, model_ref, steps_grads, reference)
    tied_embeddings(checks, rank, world)
    if world == 4:  # 2-D meshes
        layout_fsdp(checks, rank, world, model_ref, steps_grads, reference, mesh_shape=(2, 2), label="hsdp")
        layout_tp(checks, rank, world, model_ref, steps_grads, reference, with_fsdp=True)


def scenario_crash(checks, rank, world):
    """For the launcher's own test: rank 1 fails while rank 0 waits in a collective."""
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.barrier()


SCENARIOS = {"main": scenario_main, "crash": scenario_crash}


def main() -> None:
    rank, world, store_path, scenario, out_path = sys.argv[1:6]
    rank, world = int(rank), int(world)
    torch.set_num_threads(1)
    checks = Checks()
    error = None
    try:
        store = dist.FileStore(store_path, world)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
        )
        SCENARIOS[scenario](checks, rank, world)
    except BaseException:  # noqa: BLE001 - reported to the launcher
        error = traceback.format_exc()
    with open(out_path, "w") as handle:
        json.dump({"checks": checks.items, "error": error}, handle)
    if error is not None:
        os._exit(1)  # do not wait in a collective: the launcher stops the other ranks
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
