"""Ghost mode's first backward pass: per-example norms with nothing per layer kept.

Ghost clipping (Li et al. 2022, "Large language models can be strong differentially private
learners"; Bu et al. 2023) takes two backward passes: the first only measures each example's
norm, the second is an ordinary backward of ``Σ_i c_i ℓ_i``. To keep the first pass lean, each
recorded call's output gradient is turned into that layer's per-example squared norms inside a
hook on the autograd node that produced the output, as soon as autograd produces it, and
dropped: at most one layer's output gradient (plus what autograd itself holds) is alive at a
time, instead of every layer's. The pass is asked for the gradients of the *first* calls'
outputs only (those whose inputs carry no history), which makes autograd traverse every later
call without computing any weight gradient.

Each call's recorded inputs are dropped as soon as its norm is taken. They are detached views
of the layers' inputs, sharing storage; kept, they would hold every activation through the
second pass, which then could not free each saved tensor as it passes the layer (as plain
training does): on a small CNN that was 5 MiB over plain training's peak in the second pass.
"""

from __future__ import annotations

from typing import Any

import torch

from gradclip.torch.per_sample_hooks import as_output, output_grads

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
        call.release()  # the second pass reads autograd's saved tensors, not these

    source_calls, handles, arrived = [], [], set()
    for index, call in enumerate(calls):
        edge = call.edges[0]
        if not call.input_nodes or len(call.edges) != 1 or edge is None:
            # A first layer (its gradient is what the pass returns), or a call with several
            # outputs (all needed at once): their gradients come back from autograd.grad.
            source_calls.append(call)
            continue

        def hook(grad_outputs: tuple, call: Any = call, index: int = index, slot: int = edge.output_nr) -> None:
            arrived.add(index)
            take(call, [as_output(grad_outputs[slot], call.shapes[0])])

        # On the node that produced the output (not on the tensor, which a later in-place
        # operation may have moved to another node): it sees the gradient of the output itself.
        handles.append(edge.node.register_prehook(hook))
    try:
        grads = output_grads(losses.sum(), source_calls, retain_graph=True)
    finally:
        for handle in handles:
            handle.remove()
    for call, call_grads in zip(source_calls, grads):
        take(call, call_grads)
    del grads
    # Calls the pass did not reach (their inputs descend from a leaf that is not a recorded
    # call's output): one more retained pass for them alone.
    missing = [c for i, c in enumerate(calls) if c not in source_calls and i not in arrived]
    for call, call_grads in zip(missing, output_grads(losses.sum(), missing, retain_graph=True)):
        take(call, call_grads)
    for key, sample in shared.items():
        norms[key] = sample.reshape(sample.shape[0], -1).pow(2).sum(1)
    return norms
