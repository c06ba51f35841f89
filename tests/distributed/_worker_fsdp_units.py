"""Ranks of the FSDP1 unit-wise runs (AGC on ``use_orig_params=True`` views), started by
``conftest.launch`` with ``worker=`` this file (not a test module).

Each check compares against one process holding the same model whole, with the same gradients
(the whole batch): AGC's norms, coefficients and clipped gradients must be the one process's on
every rank, however the flat shards cut the rows.
"""

from __future__ import annotations

import sys
import warnings

import _worker
import torch
import torch.distributed as dist
from _worker import Checks, same_on_every_rank
from _worker_sharding import STEPS, backward, data, orig_views, strategies, wrap
from torch import nn

import gradclip

warnings.filterwarnings("ignore")


def model_of(depth: int = 1, seed: int = 0) -> nn.Module:
    """Rows of 8, 16 and 3 elements, one layer of 1-D biases only between: over 2 and 4 ranks the
    flat shards begin and end inside rows, and some ranks hold only part of a row."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh()]
    for _ in range(depth):
        layers += [nn.Linear(16, 16), nn.Tanh()]
    layers += [nn.Linear(16, 3), nn.Tanh(), nn.Linear(3, 5)]
    return nn.Sequential(*layers)


def whole_step(model: nn.Module, step: int, rank: int, world: int) -> None:
    """The one-process reference's gradients: the whole batch (FSDP averages equal-size batches)."""
    model.zero_grad(set_to_none=True)
    _, _, x, y = data(step, rank, world)
    torch.nn.functional.mse_loss(model(x), y).backward()


def fsdp_step(model: nn.Module, step: int, rank: int, world: int) -> None:
    backward(model, step, rank, world)


class _AllReduces:
    """Counts ``dist.all_reduce`` calls (the collectives of a clipping call)."""

    def __enter__(self):
        self.count, self._real = 0, dist.all_reduce

        def counted(*args, **kwargs):
            self.count += 1
            return self._real(*args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._real


def agc_equals_one_process(checks: Checks, rank: int, world: int, strategy: str, mesh) -> None:
    tag = f"units/{strategy}"
    for label, factory in (
        ("agc", lambda: gradclip.get("agc", clip_factor=0.02)),
        ("agc.exclude", lambda: gradclip.get("agc", clip_factor=0.02, exclude=("*4.weight",))),
        ("agc.skip", lambda: gradclip.get("agc", clip_factor=0.05, eps=1e-2, nonfinite="skip")),
    ):
        ours, whole = wrap(model_of(), True, strategy, mesh), model_of()
        clipper, reference = factory(), factory()
        for step in range(STEPS):
            fsdp_step(ours, step, rank, world)
            whole_step(whole, step, rank, world)
            info = clipper.clip_(ours)
            want = reference.clip_(whole)
            checks.close(f"{tag}.{label}.norm_equals_one_process", info.norm, want.norm, rtol=1e-5)
            checks.close(f"{tag}.{label}.coef_equals_one_process", info.coef, want.coef, rtol=1e-5)
            checks.ok(f"{tag}.{label}.clipped_equals_one_process", bool(info.clipped) == bool(want.clipped), f"{info.clipped} vs {want.clipped}")
            grads = [p.grad for p in whole.parameters()]
            views = orig_views(ours)
            checks.ok(f"{tag}.{label}.rank_holds_views", len(views) > 0, "no view on this rank")
            for view, k, part in views:
                checks.close(f"{tag}.{label}.view_equals_one_process", view.flatten(), grads[k].flatten()[part], rtol=1e-5, atol=1e-7)
            same_on_every_rank(checks, f"{tag}.{label}.same_on_every_rank", float(info.norm))
        # The reference clipped something: the comparison above covers the per-unit rule.
        checks.ok(f"{tag}.{label}.some_unit_clipped", bool(want.clipped), "nothing clipped in the last step")


def collectives_independent_of_depth(checks: Checks, rank: int, world: int) -> None:
    """One all-reduce per shard group and statistic, not one per tensor: a model with 5 times
    more parameter tensors costs the same collectives."""
    counts = {}
    for depth in (1, 5):
        model = wrap(model_of(depth), True, "FULL_SHARD")
        fsdp_step(model, 0, rank, world)
        clipper = gradclip.get("agc", clip_factor=0.02)
        with _AllReduces() as counter:
            clipper.clip_(model)
        counts[depth] = counter.count
    checks.ok("units/collectives_independent_of_depth", counts[1] == counts[5] <= 6, f"{counts}")


def refused(checks: Checks, rank: int, world: int) -> None:
    """A unit axis other than rows on views, and AGC on flat parameters: a clear error naming
    what cannot be done (the flat parameter and its group), nothing clipped."""
    for label, orig, clipper, expect in (
        ("axis_on_views", True, gradclip.get("agc", axis=1), ("axis=(1,)", "0.weight (shape (16, 8))", "use_orig_params=True", "Nothing was clipped")),
        ("agc_on_flat", False, gradclip.get("agc"), ("FlatParameter(", "group of ranks", "per unit (rows)", "Nothing was clipped")),
        ("chain_agc_on_flat", False, gradclip.Chain(gradclip.get("agc"), gradclip.GlobalNorm(1.0)), ("FlatParameter(", "group of ranks", "Nothing was clipped")),
    ):
        model = wrap(model_of(), orig, "FULL_SHARD")
        fsdp_step(model, 1, rank, world)
        before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        try:
            clipper.clip_(model)
            checks.ok(f"units/refused.{label}", False, "no error raised")
        except gradclip.InvalidArgumentError as error:
            text = str(error)
            checks.ok(f"units/refused.{label}", all(part in text for part in expect), text)
        after = [p.grad for p in model.parameters() if p.grad is not None]
        checks.ok(f"units/refused.{label}.nothing_clipped", len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))
    # Inside summon_full_params every rank holds whole parameters and gradients, not its pieces:
    # the layout's rows would count them once per rank. Refused on every rank, nothing clipped.
    model = wrap(model_of(), True, "FULL_SHARD")
    fsdp_step(model, 1, rank, world)
    with type(model).summon_full_params(model, with_grads=True):
        before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        try:
            gradclip.get("agc", clip_factor=0.02).clip_(model)
            checks.ok("units/refused.unsharded", False, "no error raised")
        except gradclip.GradClipError as error:
            text = str(error)
            checks.ok("units/refused.unsharded", "unsharded at this point" in text and "0.weight, 0.bias" in text, text)
        after = [p.grad for p in model.parameters() if p.grad is not None]
        checks.ok("units/refused.unsharded.nothing_clipped", len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))


def scenario_units(checks: Checks, rank: int, world: int) -> None:
    # NO_SHARD: whole tensors in their shapes on every rank (no rows to form from pieces).
    for strategy, mesh in strategies(world):
        agc_equals_one_process(checks, rank, world, strategy, mesh)
    collectives_independent_of_depth(checks, rank, world)
    refused(checks, rank, world)


_worker.SCENARIOS["fsdp1_units"] = scenario_units

if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    _worker.main()
