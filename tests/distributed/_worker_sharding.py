"""Ranks of the sharding runs (FSDP1, per-parameter reduction groups, CPU offload, scale), started
by ``conftest.launch`` with ``worker=`` this file (not a test module).

The scenarios register into ``_worker.SCENARIOS`` and run through ``_worker.main`` (gloo over a
FileStore, checks written as JSON, a failing rank exits at once). Every check compares against a
reference computed in the same process: FSDP1's own ``clip_grad_norm_`` on an identical model,
or a one-process model holding every parameter whole.
"""

from __future__ import annotations

import math
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

import _worker
import gradclip
from _worker import Checks, same_on_every_rank

warnings.filterwarnings("ignore")
STEPS = 3
SCALE_COUNTS = (2_000, 20_000)


def fsdp_model(seed: int = 0) -> nn.Module:
    """Uneven layers (3 and 1 rows): flat slices cut parameters at arbitrary offsets."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 5))


def data(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(4 * world, 8, generator=g)
    y = torch.randn(4 * world, 5, generator=g) * (30.0 if step == 1 else 1.0)
    return x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4], x, y


def wrap(module, use_orig_params, strategy, mesh=None):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, ShardingStrategy

    kwargs = {"device_mesh": mesh} if mesh is not None else {}
    return FSDP(
        module, use_orig_params=use_orig_params, sharding_strategy=getattr(ShardingStrategy, strategy),
        device_id=torch.device("cpu"), **kwargs,
    )


def backward(model, step, rank, world):
    x, y, _, _ = data(step, rank, world)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x), y).backward()


def reference_grads(step, world):
    """One process, the whole batch: FSDP averages the ranks' gradients of equal-size batches."""
    model = fsdp_model()
    _, _, x, y = data(step, 0, world)
    torch.nn.functional.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def orig_views(model):
    """(gradient view, index of the parameter in the reference, slice of its flattened whole)
    for every original parameter with a gradient on this rank (use_orig_params=True)."""
    out = []
    for handle in [m._handle for m in type(model).fsdp_modules(model) if m._handle is not None]:
        flat = handle.flat_param
        for k, (param, info) in enumerate(zip(flat._params, flat._shard_param_infos)):
            if param.grad is None or not info.in_shard:
                continue
            out.append((param.grad, k, slice(info.intra_param_start_idx, info.intra_param_end_idx + 1)))
    return out


def strategies(world: int):
    """(FSDP1 sharding strategy, device mesh or None) pairs run on ``world`` processes: HSDP on a
    2 x 2 mesh (replicate, shard) with 4."""
    for strategy in ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"] + (["HYBRID_SHARD"] if world == 4 else []):
        mesh = None
        if strategy == "HYBRID_SHARD":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        yield strategy, mesh


def scenario_fsdp1(checks: Checks, rank: int, world: int) -> None:
    for strategy, mesh in strategies(world):
        for orig in (False, True):
            tag = f"fsdp1/{strategy}.orig{int(orig)}"
            ours, theirs = wrap(fsdp_model(), orig, strategy, mesh), wrap(fsdp_model(), orig, strategy, mesh)
            for p_norm, label in ((2.0, "p2"), (1.0, "p1"), (math.inf, "pinf")):
                clipper = gradclip.GlobalNorm(0.5, norm_type=p_norm)
                for step in range(STEPS):
                    backward(ours, step, rank, world)
                    backward(theirs, step, rank, world)
                    info = clipper.clip_(ours)
                    want = theirs.clip_grad_norm_(0.5, norm_type=p_norm)
                    checks.close(f"{tag}.{label}.norm_equals_fsdp_clip_grad_norm", info.norm, want, rtol=1e-5)
                    for a, b in zip(ours.parameters(), theirs.parameters()):
                        if b.grad is not None:
                            checks.close(f"{tag}.{label}.clipped_grads_equal", a.grad, b.grad, rtol=1e-5)
                    ref = reference_grads(step, world)
                    whole = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, p_norm) for g in ref]), p_norm)
                    checks.close(f"{tag}.{label}.norm_equals_one_process", info.norm, whole, rtol=1e-5)
                    same_on_every_rank(checks, f"{tag}.{label}.same_on_every_rank", float(info.norm))
            if orig:
                per_tensor(checks, tag, rank, world, orig, strategy, mesh)
            else:
                refused(checks, tag, rank, world, strategy, mesh)


def per_tensor(checks, tag, rank, world, orig, strategy, mesh):
    """Norm, AdaGC, BlockRMS on the original parameters' 1-D views = one process's results."""
    for name, factory in (
        ("norm", lambda: gradclip.Norm(0.2)),
        ("norm.pinf", lambda: gradclip.Norm(0.05, norm_type=math.inf)),
        ("block_rms", lambda: gradclip.get("block_rms", threshold=0.02)),
        ("adagc", lambda: gradclip.get("adagc", start_clip_steps=1, warmup_max_norm=0.5)),
    ):
        ours, clipper, reference = wrap(fsdp_model(), orig, strategy, mesh), factory(), factory()
        whole = fsdp_model()
        for step in range(STEPS):
            backward(ours, step, rank, world)
            info = clipper.clip_(ours)
            whole.zero_grad(set_to_none=True)
            _, _, x, y = data(step, rank, world)
            torch.nn.functional.mse_loss(whole(x), y).backward()
            want = reference.clip_(whole)
            checks.close(f"{tag}.{name}.info_norm", info.norm, want.norm, rtol=1e-5)
            grads = [p.grad for p in whole.parameters()]
            for view, k, part in orig_views(ours):
                checks.close(f"{tag}.{name}.view_equals_one_process", view.flatten(), grads[k].flatten()[part], rtol=1e-5, atol=1e-7)
    # Original parameters given without their module: their shard group is unknown; refused.
    model = wrap(fsdp_model(), orig, strategy, mesh)
    backward(model, 0, rank, world)
    before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    try:
        gradclip.GlobalNorm(0.01).clip_(list(model.named_parameters()))
        checks.ok(f"{tag}.orig_list_without_module_refused", False, "no error raised")
    except gradclip.GradClipError as error:
        checks.ok(f"{tag}.orig_list_without_module_refused", "use_orig_params=True parameter" in str(error), str(error))
    after = [p.grad for p in model.parameters() if p.grad is not None]
    checks.ok(f"{tag}.orig_list_without_module_refused.nothing_clipped", all(torch.equal(a, b) for a, b in zip(before, after)))
    # ... and accepted with the layout set on the clipper.
    clipper = gradclip.GlobalNorm(math.inf)
    clipper.process_group = __import__("gradclip.torch.fsdp", fromlist=["reduction"]).reduction(model)
    checks.close(f"{tag}.orig_list_with_reduction", clipper.clip_(list(model.parameters())).norm, model.clip_grad_norm_(math.inf), rtol=1e-5)
    # AGC on these views (rows cut anywhere) is _worker_fsdp_units.py's topic.


def refused(checks, tag, rank, world, strategy, mesh):
    """use_orig_params=False: per-tensor clippers refuse flat slices; flat parameters passed
    without their module refuse; nothing is clipped."""
    model = wrap(fsdp_model(), False, strategy, mesh)
    backward(model, 0, rank, world)
    before = [p.grad.clone() for p in model.parameters()]
    for label, clipper, target in (
        ("norm", gradclip.Norm(0.01), model),
        ("chain_with_adagc", gradclip.Chain(gradclip.get("adagc"), gradclip.GlobalNorm(1.0)), model),
        ("flat_list_without_module", gradclip.GlobalNorm(0.01), list(model.parameters())),
    ):
        try:
            clipper.clip_(target)
            checks.ok(f"{tag}.refused.{label}", False, "no error raised")
        except gradclip.GradClipError as error:
            text = str(error)
            expected = "FlatParameter" in text and "Nothing was clipped" in text
            if label != "flat_list_without_module":
                expected = expected and ("group of ranks" in text or strategy == "NO_SHARD")
            checks.ok(f"{tag}.refused.{label}", expected, text)
        checks.ok(
            f"{tag}.refused.{label}.nothing_clipped",
            all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters())),
        )


# -- per-parameter reduction groups: TP=2 (x PP=2 with tied embeddings on 4 processes) ------------
#: The whole model: name -> (shape, how it lies, TP split dim). "tp": split over TP (dim),
#: "rep": replicated over TP. Stage s holds layers.s.*; the embedding is tied with the last
#: stage's output layer (same whole tensor, vocabulary rows split over TP).
WHOLE = {
    "embedding.weight": ((10, 8), "tp", 0),
    **{f"layers.{s}.{n}": spec for s in range(2) for n, spec in {
        "ln.weight": ((8,), "rep", None),
        "fc1.weight": ((16, 8), "tp", 0),
        "fc1.bias": ((16,), "tp", 0),
        "fc2.weight": ((8, 16), "tp", 1),
        "fc2.bias": ((8,), "rep", None),
    }.items()},
    **{f"experts.{e}.weight": ((6, 8), "expert", None) for e in range(2)},
}


def whole_grads(step: int) -> dict:
    g = torch.Generator().manual_seed(500 + step)
    scale = 50.0 if step == 1 else 1.0
    return {n: torch.randn(shape, generator=g) * scale for n, (shape, _, _) in WHOLE.items()}


def build_groups(world: int):
    """TP groups, embedding groups (first & last stage, same TP rank); every rank creates every
    group in the same order, as torch requires."""
    pp = world // 2
    tp = [dist.new_group([2 * s, 2 * s + 1]) for s in range(pp)]
    emb = [dist.new_group([t, t + 2]) for t in range(2)] if pp == 2 else None
    return pp, tp, emb


def local_layout(rank: int, world: int, pp: int):
    """(local name, whole name, slice index or None, attributes) for this rank's parameters."""
    stage, t = divmod(rank, 2)
    out = []
    for name, (shape, how, dim) in WHOLE.items():
        if name.startswith("layers.") and int(name.split(".")[1]) % pp != stage:
            continue
        if pp == 1 and name.startswith("layers.1."):
            continue
        if name.startswith("experts."):
            if int(name.split(".")[1]) == t:  # expert parallel over the TP ranks
                out.append((name, name, None, {"allreduce": False}))
            continue
        if name == "embedding.weight":
            piece = (dim, t)
            if stage == 0:
                out.append((name, name, piece, {"tensor_model_parallel": True, "partition_dim": dim}))
            if stage == pp - 1:
                out.append(("output_layer.weight" if pp == 2 else "output_layer.weight", name, piece,
                            {"tensor_model_parallel": True, "partition_dim": dim, "shared": True}))
            continue
        if how == "tp":
            out.append((name, name, (dim, t), {"tensor_model_parallel": True, "partition_dim": dim, "allreduce": True}))
        else:
            out.append((name, name, None, {"allreduce": True} if name.endswith("bias") else {}))
    return out


def piece_of(tensor, piece):
    if piece is None:
        return tensor
    dim, t = piece
    return tensor.chunk(2, dim=dim)[t]


class Local(nn.Module):
    def __init__(self, layout):
        super().__init__()
        for local, whole, piece, attrs in layout:
            shape = piece_of(torch.zeros(WHOLE[whole][0]), piece).shape
            param = nn.Parameter(torch.zeros(shape))
            for k, v in attrs.items():
                setattr(param, k, v)
            self.register_parameter(local.replace(".", "__"), param)

    def named(self):
        return [(n.replace("__", "."), p) for n, p in self.named_parameters()]


def set_grads(model, layout, grads):
    for (local, whole, piece, _), (_, param) in zip(layout, model.named()):
        param.grad = piece_of(grads[whole], piece).clone()


def scenario_groups(checks: Checks, rank: int, world: int) -> None:
    from gradclip.megatron import reduction_spec
    from gradclip.torch.reduction import ReductionSpec, expert, replicated, sharded, tied

    pp, tps, embs = build_groups(world)
    stage, t = divmod(rank, 2)
    tp = tps[stage]
    mp = dist.group.WORLD
    layout = local_layout(rank, world, pp)
    model = Local(layout)
    tie = embs[t] if embs else None
    rules = {
        "*.ln.weight": replicated(tp), "*.fc2.bias": replicated(tp),
        "*.fc1.*": sharded(tp), "*.fc2.weight": sharded(tp),
        "experts.*": expert(tp),
        "embedding.weight": tied(tie, sharded=tp) if tie is not None else sharded(tp),
        "output_layer.weight": tied(tie, sharded=tp) if tie is not None else sharded(tp),
    }
    if pp == 1:  # both copies on one rank: the output layer's is the duplicate
        from gradclip.torch.reduction import duplicate

        rules["output_layer.weight"] = duplicate(sharded=tp)
    specs = {
        "spec": lambda: ReductionSpec(model.named(), rules, group=mp),
        "megatron": lambda: reduction_spec(model.named(), tp_group=tp, model_parallel_group=mp, expert_group=tp),
    }
    for label, make in specs.items():
        spec = make()
        for name, factory, whole_tensors in (
            ("global_norm.p2", lambda: gradclip.GlobalNorm(1.0), False),
            ("global_norm.p1", lambda: gradclip.GlobalNorm(1.0, norm_type=1.0), False),
            ("global_norm.pinf", lambda: gradclip.GlobalNorm(0.5, norm_type=math.inf), False),
            ("norm", lambda: gradclip.Norm(0.5), True),
            ("adagc", lambda: gradclip.get("adagc", start_clip_steps=1, warmup_max_norm=1.0), True),
            ("zclip", lambda: gradclip.get("zclip", warmup_steps=1), False),
        ):
            ours, reference = factory(), factory()
            ours.process_group = spec
            for step in range(STEPS):
                grads = whole_grads(step)
                set_grads(model, layout, grads)
                info = ours.clip_(model.named())
                # The one-process model: every parameter some rank holds, once.
                ref_params = {n: nn.Parameter(torch.zeros(WHOLE[n][0])) for n in WHOLE if pp == 2 or not n.startswith("layers.1.")}
                for n, p in ref_params.items():
                    p.grad = grads[n].clone()
                want = reference.clip_(list(ref_params.items()))
                tag = f"groups/{label}.{name}"
                checks.close(f"{tag}.norm_equals_one_process", info.norm, want.norm, rtol=1e-5)
                for (local, whole, piece, _), (_, param) in zip(layout, model.named()):
                    checks.close(f"{tag}.grads_equal_one_process", param.grad, piece_of(ref_params[whole].grad, piece), rtol=1e-5, atol=1e-7)
                same_on_every_rank(checks, f"{tag}.same_on_every_rank", float(info.norm))
    # Megatron-core's own rule on CPU: the filtered sum of squares over the model-parallel group.
    for step in range(STEPS):
        grads = whole_grads(step)
        set_grads(model, layout, grads)
        dense = torch.zeros((), dtype=torch.float64)
        experts = torch.zeros((), dtype=torch.float64)
        for name, p in model.named():
            not_tp_duplicate = getattr(p, "tensor_model_parallel", False) or dist.get_rank(tp) == 0
            if getattr(p, "allreduce", True) is False:
                experts += p.grad.double().pow(2).sum()
            elif not_tp_duplicate and not getattr(p, "shared", False):
                dense += p.grad.double().pow(2).sum()
        dist.all_reduce(dense, group=mp)
        dist.all_reduce(experts, group=tp)
        megatron = (dense + experts).sqrt()
        info = gradclip.GlobalNorm(1e9, process_group=reduction_spec(model.named(), tp_group=tp, model_parallel_group=mp, expert_group=tp)).clip_(model.named())
        checks.close("groups/megatron_filtered_sum_of_squares", info.norm, megatron, rtol=1e-6)
        naive = gradclip.GlobalNorm(1e9, process_group=mp).clip_(model.named())
        checks.ok("groups/plain_process_group_overcounts", float(naive.norm) > float(megatron) * 1.01, f"{float(naive.norm)} vs {float(megatron)}")
    bad_input_groups(checks, rank, world, model, layout, rules, tp, tps, mp)


def bad_input_groups(checks, rank, world, model, layout, rules, tp, tps, mp):
    from gradclip.torch.reduction import ReductionSpec, replicated

    set_grads(model, layout, whole_grads(0))
    before = [p.grad.clone() for _, p in model.named()]
    other = dist.new_group([r for r in range(world) if r != rank]) if world > 2 else None
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    outsider = groups[(rank + 1) % world]
    cases = {
        "named_by_two_groups": (lambda: ReductionSpec(model.named(), {**rules, "*.fc1.weight": replicated(tp)}, group=mp), "fc1.weight"),
        "group_without_this_rank": (lambda: ReductionSpec(model.named(), {**rules, "*.ln.weight": replicated(outsider)}, group=mp), "not in"),
        "sharded_parameter_unassigned": (lambda: ReductionSpec(model.named(), {k: v for k, v in rules.items() if k != "*.fc2.weight"}, group=mp, default="partitioned"), "fc2.weight"),
        "parameter_unassigned": (lambda: ReductionSpec(model.named(), {k: v for k, v in rules.items() if k != "*.fc2.bias"}, group=mp), "fc2.bias"),
        "shard_group_outside_spec_group": (lambda: ReductionSpec(model.named(), {**rules, "*.ln.weight": replicated(tp)}, group=groups[rank]), "not inside"),
        "gradient_not_in_spec": (lambda: gradclip.GlobalNorm(0.01, process_group=ReductionSpec(model.named(), rules, group=mp)).clip_(model.named() + [("stray", _stray())]), "belongs to no parameter"),
    }
    del other
    for label, (make, needle) in cases.items():
        try:
            make()
            checks.ok(f"groups/bad_input.{label}", False, "no error raised")
        except gradclip.GradClipError as error:
            checks.ok(f"groups/bad_input.{label}", needle in str(error), str(error))
        checks.ok(f"groups/bad_input.{label}.nothing_clipped", all(torch.equal(a, p.grad) for a, (_, p) in zip(before, model.named())))


def _stray():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    return p


def scenario_lightning(checks: Checks, rank: int, world: int) -> None:
    """Lightning's FSDP1 strategy with the model wrapped in configure_model (on CPU Lightning's
    own wrapping passes device_id=None, which FSDP1 refuses; on GPUs strategy="fsdp" runs the
    same callback code): the
    callback's norm equals FSDP1's clip_grad_norm_ of the same gradients on every rank."""
    import os

    try:
        import lightning.pytorch as pl
        from lightning.pytorch.strategies import FSDPStrategy
    except ImportError:
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from gradclip.lightning import GradClipCallback

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning refuses FSDPStrategy itself without a GPU accelerator (a type check that a
        subclass passes); everything else is Lightning's FSDP1 strategy unchanged."""

    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29999")
    for orig in (False, True):
        seen: list = []

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = fsdp_model()

            def configure_model(self):
                self.net = FSDP(self.net, device_id=torch.device("cpu"), use_orig_params=orig)

            def training_step(self, batch, index):
                x, y = batch
                return torch.nn.functional.mse_loss(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05)

        class Reference(pl.Callback):
            def on_before_optimizer_step(self, trainer, module, optimizer):
                # max_norm=inf: FSDP1's total norm, gradients multiplied by exactly 1.
                seen.append(float(module.net.clip_grad_norm_(math.inf)))

        class After(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, index):
                seen.append(float(clip.last_info.norm))

        clip = GradClipCallback(gradclip.GlobalNorm(0.5), log=False)
        g = torch.Generator().manual_seed(3)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(48, 8, generator=g), torch.randn(48, 5, generator=g) * 10), batch_size=4
        )
        trainer = pl.Trainer(
            accelerator="cpu", devices=world, strategy=CPUFSDPStrategy(process_group_backend="gloo"), max_steps=3,
            callbacks=[Reference(), clip, After()], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(Module(), loader)
        pairs = list(zip(seen[0::2], seen[1::2]))
        checks.ok(f"lightning/fsdp1.orig{int(orig)}.ran_three_steps", len(pairs) == 3, f"{seen}")
        for want, got in pairs:
            checks.close(f"lightning/fsdp1.orig{int(orig)}.norm_equals_fsdp_clip_grad_norm", got, want, rtol=1e-5)
        checks.ok(
            f"lightning/fsdp1.orig{int(orig)}.callback_uses_the_fsdp_layout",
            type(clip.clipper.process_group).__name__ == "FSDPLayout", repr(clip.clipper.process_group),
        )


def scenario_deepspeed(checks: Checks, rank: int, world: int) -> None:
    """DeepSpeed ZeRO 1/2/3 on CPU (DS_ACCELERATOR=cpu, gloo), a client AdamW: gradclip attached
    at the engine's clip point equals one process training the whole model with the same
    clipper (norms over 4 steps, one a spike), and the engine's own get_global_grad_norm()."""
    import os

    try:
        import deepspeed
    except ImportError:
        return
    import gradclip.deepspeed as gds

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")

    def engine_for(stage):
        model = fsdp_model()
        config = {
            "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05), config=config)
        return engine

    cases = [
        # Each engine costs seconds on CPU: every stage once unclipped, clipping on 1 and 3,
        # an adaptive clipper on 2 (the stages differ in their partitions, not in the clippers).
        ("global_norm.noclip", lambda: gradclip.GlobalNorm(1e9), (1, 2, 3)),
        ("global_norm", lambda: gradclip.GlobalNorm(0.5), (1, 3)),
        ("zclip", lambda: gradclip.get("zclip", warmup_steps=2), (2,)),
        ("norm", lambda: gradclip.Norm(0.3), (3,)),
        ("adagc", lambda: gradclip.get("adagc", start_clip_steps=1, warmup_max_norm=0.5), (3,)),
    ]
    for name, factory, stages in cases:
        for stage in stages:
            tag = f"deepspeed/zero{stage}.{name}"
            engine = engine_for(stage)
            zero = gds.attach(engine, factory())
            reference, ref_clipper = fsdp_model(), factory()
            ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.05)
            for step in range(4):
                x, y, xs, ys = data(step, rank, world)
                engine.backward(torch.nn.functional.mse_loss(engine(x), y))
                engine.step()
                info = zero.last_info
                ref_opt.zero_grad()
                torch.nn.functional.mse_loss(reference(xs), ys).backward()
                want = ref_clipper.clip_(reference)
                ref_opt.step()
                checks.close(f"{tag}.norm_equals_one_process", info.norm, want.norm, rtol=1e-4, atol=1e-6)
                checks.close(f"{tag}.coef_equals_one_process", info.coef, want.coef, rtol=1e-4, atol=1e-6)
                engine_norm = float(engine.get_global_grad_norm())
                if name.startswith("global_norm") or name == "zclip":
                    # The engine measures after gradclip clipped: the clipped norm.
                    checks.close(f"{tag}.engine_norm_is_clipped_norm", engine_norm, float(info.norm * info.coef), rtol=1e-4)
                same_on_every_rank(checks, f"{tag}.same_on_every_rank", [float(info.norm), float(info.coef)])
            checks.ok(f"{tag}.engine_clip_off_while_attached", engine.optimizer.clip_grad == 0.0)
            zero.detach()
            engine.destroy()
    # Refusals: per-tensor methods on ZeRO-1/2 flat slices; an engine without ZeRO.
    for stage, label, factory in ((1, "zero1_per_tensor", lambda: gradclip.Norm(0.3)), (2, "zero2_agc", lambda: gradclip.get("agc")), (0, "zero0", lambda: gradclip.GlobalNorm(1.0))):
        engine = engine_for(stage)
        try:
            gds.attach(engine, factory())
            checks.ok(f"deepspeed/refused.{label}", False, "no error raised")
        except gradclip.GradClipError as error:
            checks.ok(f"deepspeed/refused.{label}", f"stage {stage}" in str(error), str(error))
        checks.ok(f"deepspeed/refused.{label}.engine_untouched", "_clip_then_step" not in repr(engine.optimizer.step))
        engine.destroy()


def scenario_hf_deepspeed(checks: Checks, rank: int, world: int) -> None:
    """transformers' Trainer with DeepSpeed ZeRO-2 on CPU: the callback attaches itself at the
    engine's clip point; its norms equal one process training the whole model."""
    import os
    import tempfile

    try:
        import deepspeed  # noqa: F401
        from transformers import Trainer, TrainingArguments
    except ImportError:
        return
    from gradclip.transformers import GradClipCallback

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = fsdp_model()

        def forward(self, x, labels=None):
            out = self.net(x)
            return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 4 * world * 3

        def __getitem__(self, i):
            step, within = divmod(i, 4 * world)
            _, _, xs, ys = data(step, 0, world)
            return {"x": xs[within], "labels": ys[within]}

    callback = GradClipCallback(gradclip.GlobalNorm(0.5))
    config = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0, "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}}}
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out, per_device_train_batch_size=4, max_steps=3, deepspeed=config, use_cpu=True,
            report_to=[], max_grad_norm=0.0, save_strategy="no", logging_steps=1, dataloader_drop_last=True,
            remove_unused_columns=False, learning_rate=0.05,
        )
        trainer = Trainer(model=Net(), args=arguments, train_dataset=Data(), callbacks=[callback])
        trainer.train()
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    checks.ok("hf_deepspeed/attached", getattr(callback, "_zero", None) is not None, "the callback did not attach")
    checks.ok("hf_deepspeed/three_steps_logged", len(norms) == 3, f"{trainer.state.log_history}")
    same_on_every_rank(checks, "hf_deepspeed/same_on_every_rank", norms)
    checks.ok("hf_deepspeed/clipped", any(n > 0.5 for n in norms) and callback.last_info is not None, f"{norms}")
    # The engine measured after gradclip clipped: its norm is the clipped one.
    engine_norm = float(trainer.model_wrapped.get_global_grad_norm())
    info = callback.last_info
    checks.close("hf_deepspeed/engine_norm_is_clipped_norm", engine_norm, float(info.norm * info.coef), rtol=1e-4)
    trainer.model_wrapped.destroy()


def _import_megatron():
    """megatron.core, with a stand-in for triton when it is absent: one MoE module imports it for
    GPU kernels that CPU runs never call (requirements/megatron.txt)."""
    import importlib.util
    import types

    if importlib.util.find_spec("megatron") is None:
        return None
    if importlib.util.find_spec("triton") is None:
        # Stand in for the one module that imports triton (GPU paging kernels for MoE), not for
        # triton itself: torch probes for a real triton package.
        ops = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
        ops.GLOBAL_BLOCK_SIZE = 1

        def _gpu_only(*args, **kwargs):
            raise RuntimeError("paged stash kernels need triton and a GPU")

        ops.paged_stash_copy_kernel = ops.paged_stash_pop_kernel = _gpu_only
        sys.modules[ops.__name__] = ops
    import megatron.core  # noqa: F401

    return megatron.core


def scenario_megatron(checks: Checks, rank: int, world: int) -> None:
    """Real Megatron-core TP=2 on CPU (gloo): ColumnParallelLinear -> RowParallelLinear (bias
    replicated) -> LayerNorm (replicated). The adapter's norm equals Megatron's filtered sum of
    squares (its own param_is_not_tensor_parallel_duplicate / param_is_not_shared) all-reduced over
    the model-parallel group, and the norm of the whole tensors (shards gathered, replicas once)."""
    if world != 2 or _import_megatron() is None:
        return
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.module import param_is_not_shared

    from gradclip.megatron import reduction_spec

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    del model_parallel_cuda_manual_seed
    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True, gradient_accumulation_fusion=False)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            init = torch.nn.init.normal_
            self.fc1 = ColumnParallelLinear(8, 16, config=config, init_method=init, bias=True, gather_output=False)
            self.fc2 = RowParallelLinear(16, 8, config=config, init_method=init, bias=True, input_is_parallel=True, skip_bias_add=False)
            self.ln = nn.LayerNorm(8)

        def forward(self, x):
            h, _ = self.fc1(x)
            out, _ = self.fc2(torch.tanh(h))
            return self.ln(out)

    block = Block()
    tp = parallel_state.get_tensor_model_parallel_group()
    mp = parallel_state.get_model_parallel_group()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(700 + step)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g) * (20.0 if step == 1 else 1.0)
        block.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(block(x), y).backward()
        named = [(n, p) for n, p in block.named_parameters() if p.grad is not None]
        squares = torch.zeros((), dtype=torch.float64)
        for _, p in named:
            if param_is_not_tensor_parallel_duplicate(p) and param_is_not_shared(p):
                squares += p.grad.double().pow(2).sum()
        dist.all_reduce(squares, group=mp)
        whole = torch.zeros((), dtype=torch.float64)
        for _, p in named:
            if getattr(p, "tensor_model_parallel", False):
                pieces = [torch.empty_like(p.grad) for _ in range(2)]
                dist.all_gather(pieces, p.grad.contiguous(), group=tp)
                whole += torch.cat(pieces, dim=p.partition_dim).double().pow(2).sum()
            else:
                whole += p.grad.double().pow(2).sum()
        spec = reduction_spec(block)  # groups from Megatron's parallel_state
        info = gradclip.GlobalNorm(1e9, process_group=spec).clip_(named)
        checks.close("megatron_core/norm_equals_filtered_sum_of_squares", info.norm, squares.sqrt(), rtol=1e-6)
        checks.close("megatron_core/norm_equals_whole_tensors", info.norm, whole.sqrt(), rtol=1e-6)
        naive = gradclip.GlobalNorm(1e9, process_group=mp).clip_(named)
        checks.ok("megatron_core/plain_process_group_overcounts", float(naive.norm) > float(info.norm) * 1.001, f"{float(naive.norm)} vs {float(info.norm)}")
    attrs = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "allreduce", None)) for n, p in block.named_parameters()}
    checks.ok("megatron_core/attributes_as_documented", attrs["fc1.weight"][0] and attrs["fc2.weight"][0] and not attrs["fc2.bias"][0], f"{attrs}")
    parallel_state.destroy_model_parallel()


class _Counter:
    """Counts aten operations (TorchDispatchMode) and collectives (dist.all_reduce calls, and
    functional collectives among the operations) during a call: cost measured without timing."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops += 1
                if "c10d" in str(func):
                    counter.collectives += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.ops = self.collectives = 0

    def __enter__(self):
        self._all_reduce = dist.all_reduce

        def counted(*args, **kwargs):
            self.collectives += 1
            return self._all_reduce(*args, **kwargs)

        dist.all_reduce = counted
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        dist.all_reduce = self._all_reduce


class _PythonCalls:
    """Counts Python function calls (``sys.setprofile`` "call" events) during a call: the
    per-tensor Python work (helpers called per DTensor, per-tensor objects) without timing."""

    def __enter__(self):
        self.count = 0

        def profile(frame, event, arg):
            if event == "call":
                self.count += 1

        sys.setprofile(profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)


#: Python calls per DTensor gradient allowed in one GlobalNorm.clip_ (about 18 today, 56 when each
#: tensor went through DTensor.to_local under no_grad and got a fresh metadata tuple).
PYTHON_CALLS_PER_TENSOR = 24


def scenario_scale(checks: Checks, rank: int, world: int) -> None:
    """20,000 DTensor gradients (Shard(0) on a 1-D mesh), clipped in place: gradclip's aten
    operations grow at most linearly with the count and its collectives not at all (counted, not
    timed). torch's DTensor clip_grad_norm_ runs side by side on 300 (equal norms and clipped
    gradients); its cost grows faster than linearly (benchmarks/bench_many_tensors.py times both),
    so the test does not run it on thousands."""
    if world != 2:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))

    def params_of(n):
        g = torch.Generator().manual_seed(rank)
        out = []
        for t in torch.randn(n, 2, 3, generator=g).unbind(0):
            p = nn.Parameter(DTensor.from_local(torch.zeros(2, 3), mesh, [Shard(0)], run_check=False))
            p.grad = DTensor.from_local(t.clone(), mesh, [Shard(0)], run_check=False)
            out.append(p)
        return out

    counts, calls = {}, {}
    for n in SCALE_COUNTS:
        ours = params_of(n)
        with _Counter() as c:
            info = gradclip.GlobalNorm(1e-3).clip_(ours)
        counts[n] = (c.ops, c.collectives)
        with _PythonCalls() as python:
            gradclip.GlobalNorm(1e-3).clip_(ours)
        calls[n] = python.count
    # torch side by side on 300 tensors (its cost grows faster than linearly: 2,000 take it
    # about 40 s on one CPU core, 20,000 far longer), gradclip on the same 300.
    ours, theirs = params_of(300), params_of(300)
    info = gradclip.GlobalNorm(1e-3).clip_(ours)
    total = torch.nn.utils.clip_grad_norm_(theirs, 1e-3, foreach=True)
    total = total.full_tensor() if isinstance(total, DTensor) else total
    checks.close("scale/dtensor.norm_equals_torch", info.norm, total, rtol=1e-5)
    for a, b in list(zip(ours, theirs))[::3]:
        checks.close("scale/dtensor.grads_equal_torch", a.grad.to_local(), b.grad.to_local(), rtol=1e-5, atol=1e-9)
    (small, small_c), (large, large_c) = counts[SCALE_COUNTS[0]], counts[SCALE_COUNTS[1]]
    ratio = SCALE_COUNTS[1] / SCALE_COUNTS[0]
    detail = f"operations {small} -> {large}, collectives {small_c} -> {large_c} for {SCALE_COUNTS}"
    checks.ok("scale/dtensor.ops_at_most_linear", large <= ratio * small + 50, detail)
    checks.ok("scale/dtensor.collectives_independent_of_count", large_c == small_c <= 2, detail)
    small_calls, large_calls = calls[SCALE_COUNTS[0]], calls[SCALE_COUNTS[1]]
    detail = f"Python calls {small_calls} -> {large_calls} for {SCALE_COUNTS}"
    checks.ok("scale/dtensor.python_calls_at_most_linear", large_calls <= ratio * small_calls + 1000, detail)
    checks.ok("scale/dtensor.python_calls_per_tensor", large_calls <= PYTHON_CALLS_PER_TENSOR * SCALE_COUNTS[1], detail)


def scenario_offload(checks: Checks, rank: int, world: int) -> None:
    """CPU-resident partial sums under gloo: the reduction keeps them on CPU (gloo reduces CPU
    tensors) and hand-made CPU DTensor gradients, as CPU offload leaves them, equal one process.
    FSDP2's CPUOffloadPolicy itself needs an accelerator in this torch; the NCCL case, where the
    sums travel to the GPU and back, is tests/distributed/test_cuda_offload.py."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard

    from gradclip.backends.torch_dtensor import _on_group_device

    moved = _on_group_device(torch.ones(2), dist.group.WORLD)
    checks.ok("offload/gloo_keeps_cpu_sums_on_cpu", moved.device.type == "cpu", str(moved.device))
    mesh = init_device_mesh("cpu", (world,))
    for step in range(STEPS):
        ref = reference_grads(step, world)
        grads = [distribute_tensor(g, mesh, [Shard(0)], src_data_rank=None) for g in ref]
        info = gradclip.GlobalNorm(0.5).clip_([_with_grad(g) for g in grads])
        whole = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref]))
        checks.close("offload/cpu_dtensor_norm_equals_one_process", info.norm, whole, rtol=1e-5)
        checks.ok("offload/norm_stays_on_cpu", info.norm.device.type == "cpu", str(info.norm.device))


def _with_grad(grad):
    """An object holding ``grad`` as a parameter does (clip_ clips it in place)."""
    return type("Holder", (), {"grad": grad})()


def scenario_sharding(checks: Checks, rank: int, world: int) -> None:
    """Everything this file checks, in one launch per world size."""
    scenario_groups(checks, rank, world)
    scenario_fsdp1(checks, rank, world)
    if world == 2:  # a Trainer per use_orig_params, and DeepSpeed engines: seconds each
        scenario_lightning(checks, rank, world)
        scenario_deepspeed(checks, rank, world)
        scenario_hf_deepspeed(checks, rank, world)
        scenario_megatron(checks, rank, world)
        scenario_scale(checks, rank, world)
    scenario_offload(checks, rank, world)


_worker.SCENARIOS["sharding"] = scenario_sharding
_worker.SCENARIOS["lightning"] = scenario_lightning
_worker.SCENARIOS["deepspeed"] = scenario_deepspeed
_worker.SCENARIOS["hf_deepspeed"] = scenario_hf_deepspeed
_worker.SCENARIOS["megatron"] = scenario_megatron
_worker.SCENARIOS["scale"] = scenario_scale
_worker.SCENARIOS["offload"] = scenario_offload
_worker.SCENARIOS["fsdp1"] = scenario_fsdp1
_worker.SCENARIOS["groups"] = scenario_groups

if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    _worker.main()
