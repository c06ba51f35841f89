"""Ghost mode's first backward pass: per-example norms with nothing per layer kept.

Ghost clipping (Li et al. 2022, "Large language models can be strong differentially private
learners"; Bu et al. 2023) takes two backward passes: the first only measures each example's
norm, the second is an ordinary backward of ``Σ_i c_i ℓ_i``. To keep the first pass lean, each
recorded call's output gradient is turned into that layer's per-example squared norms inside a
tensor hook, as soon as autograd produces it, and dropped: at most one layer's output gradient
(plus what autograd itself holds) is alive at a time, instead of every layer's. The pass is
asked for the gradients of the *first* calls' outputs only (those whose inputs carry no
history), which makes autograd traverse every later call without computing any weight gradient.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ghost_norms"]


def ghost_norms(ps: Any, losses: torch.Tensor, calls: list, batch: int) -> dict[int, torch.Tensor]:
    """``{id(param): (B,) squared per-example norm}`` from one retained backward pass.

    A parameter shared by several calls (tied weights, a module called twice) needs the sum of
    its contributions before the norm: its per-example gradients are accumulated instead.
    """
    uses: dict[int, int] = {}
    for call in calls:
        for _, p in call.unit.params:
            uses[id(p)] = uses.get(id(p), 0) + 1
    norms: dict[int, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}

    def take(call: Any, call_grads: list) -> None:
        for piece in ps.call_pieces(call, call_grads, batch):
            key = id(piece.param)
            if uses.get(key, 0) > 1 or key in shared:
                sample = piece.grad_sample()
                shared[key] = sample if key not in shared else shared[key] + sample
            else:
                norms[key] = piece.norm_sq("auto")
            piece.release()

    sources, source_calls, handles, arrived = [], [], [], set()
    for index, call in enumerate(calls):
        if not call.input_nodes or len(call.outputs) != 1:
            # A first layer (its gradient is what the pass returns), or a call with several
            # outputs (all needed at once): their gradients come back from autograd.grad.
            sources.extend(call.outputs)
            source_calls.append(call)
            continue

        def hook(grad: torch.Tensor, call: Any = call, index: int = index) -> None:
            arrived.add(index)
            take(call, [grad])

        handles.append(call.outputs[0].register_hook(hook))
    try:
        grads = torch.autograd.grad(losses.sum(), sources, retain_graph=True, allow_unused=True) if sources else ()
    finally:
        for handle in handles:
            handle.remove()
    at = 0
    for call in source_calls:
        count = len(call.outputs)
        take(call, list(grads[at : at + count]))
        at += count
    del grads
    # Calls the pass did not reach (their inputs descend from a leaf that is not a recorded
    # call's output): one more retained pass for them alone.
    missing = [c for i, c in enumerate(calls) if c not in source_calls and i not in arrived]
    if missing:
        outs = [c.outputs[0] for c in missing]
        for call, grad in zip(missing, torch.autograd.grad(losses.sum(), outs, retain_graph=True, allow_unused=True)):
            take(call, [grad])
    for key, sample in shared.items():
        norms[key] = sample.reshape(sample.shape[0], -1).pow(2).sum(1)
    return norms
