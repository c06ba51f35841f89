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

**The cut.** Retaining the whole graph through the first pass still holds, while the lower
layers' backward runs, the later layers' activations that plain training has freed by then (on
the small CNN of ``benchmarks/per_sample.py``, 5 MiB during torch's 12 MiB input-gradient kernel
of its second convolution: 1.23x plain training's peak). So the first pass may stop retaining
the graph above the input ``h`` of one call (:func:`find_cut`, :func:`auto_cut`):

* above ``h``, one backward that frees what it runs, as plain training's does, returning the
  gradient ``∂(Σ_i ℓ_i)/∂h``; the upper layers' pieces (input and output gradient, or the
  instantiated per-example gradients, whichever is smaller) are kept;
* below ``h``, a backward from ``h`` with that gradient, retained, taking norms as above.

The second pass needs nothing from the freed graph. Each loss depends on its own example's row
of ``h`` only (per-example clipping presumes no mixing between examples, which is why
BatchNorm is refused), so the gradient of ``Σ_i c_i ℓ_i`` at ``h`` is, row by row, ``c_i``
times the first pass's: the lower part's backward starts from ``h`` with those scaled rows,
and the upper layers' clipped sums are one weight-gradient product each on the rescaled output
gradients, as book-keeping does (Bu et al. 2023, "Differentially private optimization on large
model at small cost", ICML). A cut is taken only where every path from the loss into the lower
graph passes through ``h``'s edge (:func:`_above`): a skip connection around it, or another
output of ``h``'s node used above it, and the step runs uncut. Small CNN: 27.0 -> 24.3 MiB of
live tensors (plain training 22.0).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gradclip.torch.per_sample_func import batch_dim_of
from gradclip.torch.per_sample_hooks import as_output, output_grads

__all__ = ["Cut", "auto_cut", "find_cut", "ghost_norms"]


class Cut:
    """Where the first pass stops retaining the graph: the input ``h`` of one recorded call.

    Attributes:
        edge: ``h``'s gradient edge (the node that produced it, and the slot).
        dim: The dimension of ``h`` along which examples are stacked.
        upper: The recorded calls above the cut (their outputs reach the loss without passing
            ``h``'s node); the others are below it.
        direct: ``id`` of the upper calls whose outputs' gradients the pass above the cut asks
            for directly: those it would not run on its way to ``h`` or to a first layer.
        grad: After the first pass, ``∂(Σ_i ℓ_i)/∂h``.
        pieces: After the first pass, the upper calls' contributions, ``{id(param): [piece]}``:
            their clipped sum is taken book-keeping style.
    """

    __slots__ = ("dim", "direct", "edge", "grad", "pieces", "upper")

    def __init__(self, edge: Any, dim: int, upper: list, direct: set):
        self.edge, self.dim, self.upper, self.direct = edge, dim, upper, direct
        self.grad: torch.Tensor | None = None
        self.pieces: dict[int, list[Any]] = {}


def _above(losses: torch.Tensor, edge: Any) -> set | None:
    """The autograd nodes the loss reaches without passing ``edge``'s node, or None where the
    graph above the cut is not separated from the one below it by that one edge.

    Safe only if every path from the loss into the lower graph goes through ``edge``: then a
    non-retaining backward to ``edge`` runs (and frees) upper nodes only, and ``edge``'s
    gradient is everything the lower graph receives. A skip connection around the cut, or
    another output of the cut's node used above, breaks that. Leaves (``AccumulateGrad``: a
    parameter used on both sides) are never run by a backward that asks for an edge, and hold
    nothing to free, so they may be shared.
    """
    upper: set = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node is edge.node or node in upper:
            continue
        upper.add(node)
        for nxt, slot in node.next_functions:
            if nxt is edge.node and slot != edge.output_nr:
                return None
            stack.append(nxt)
    if edge.node in upper:
        return None
    lower: set = set()
    stack = [edge.node]
    while stack:
        node = stack.pop()
        if node is None or node in lower:
            continue
        if node in upper and getattr(node, "variable", None) is None:
            return None
        lower.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return upper


def auto_cut(calls: list, batch: int) -> list[int]:
    """Where to cut, best first: indices of the calls whose input may be the cut, among those
    where the estimate says cutting frees more than it holds.

    Estimate, in elements, with the calls in forward order and those from the cut on taken as
    above it. *Freed*: the graph above the cut holds about every upper call's input (saved by
    that call, or by the operation between it and the previous one), which the first pass no
    longer retains. *Held*, beyond plain training, while the lower part runs: the upper calls'
    pieces kept for the book-keeping sum (each the smaller of input plus output gradient, or
    the instantiated per-example gradients) and the gradient at the cut (the size of the cut
    call's input). The peak of both passes is usually the backward of a large lower layer
    (on a CNN, an early convolution's input-gradient kernel), where the lower graph holds what
    plain training holds there too, so the extra at the peak is about what is held: among the
    cuts that free more than they hold, the one that holds least comes first.
    """
    sizes = []
    for call in calls:
        first = call.args[0] if call.args and isinstance(call.args[0], torch.Tensor) else None
        a = first.numel() if first is not None else 0
        out = sum(math.prod(shape) for shape in call.shapes)
        params = sum(p.numel() for _, p in call.unit.params)
        sizes.append((a, min(a + out, batch * params)))
    ranked = []
    for index, call in enumerate(calls):
        if call.input_edge is None or call.unit.rule is None:
            continue
        freed = sum(a for a, _ in sizes[index:])
        held = sizes[index][0] + sum(kept for _, kept in sizes[index:])
        if freed > held:
            ranked.append((held, index))
    return [index for _, index in sorted(ranked)]


def find_cut(losses: torch.Tensor, calls: list, candidates: list[int]) -> Cut | None:
    """The cut for this step: at the input of the first candidate call where that is safe (see
    :func:`_above`), else None (no cut: today's single retained pass)."""
    for index in candidates:
        call = calls[index]
        edge = call.input_edge
        if edge is None or call.unit.rule is None:
            continue
        upper_nodes = _above(losses, edge)
        if upper_nodes is not None:
            return _cut_at(call, edge, upper_nodes, calls)
    return None


def _cut_at(call: Any, edge: Any, upper_nodes: set, calls: list) -> Cut:
    upper = [c for c in calls if any(e is not None and e.node in upper_nodes for e in c.edges)]
    # The nodes the pass above the cut runs: those on a path from the loss to h or to a call
    # whose gradient it asks for. An upper call elsewhere (fed by a leaf through operations) is
    # asked for directly, since the graph will be gone for a second try.
    parents: dict[Any, list] = {}
    for node in upper_nodes:
        for nxt, _ in node.next_functions:
            if nxt is not None:
                parents.setdefault(nxt, []).append(node)
    stack = [edge.node, *(e.node for c in upper if _is_source(c) for e in c.edges if e is not None)]
    runs: set = set()
    while stack:
        node = stack.pop()
        if node not in runs:
            runs.add(node)
            stack.extend(parents.get(node, ()))
    direct = {id(c) for c in upper if not _is_source(c) and c.edges[0].node not in runs}
    return Cut(edge, batch_dim_of(call.unit.module), upper, direct)


def ghost_norms(
    ps: Any, losses: torch.Tensor, calls: list, batch: int, cut: Cut | None = None
) -> dict[int, torch.Tensor]:
    """``{id(param): (B,) squared per-example norm}`` from one retained backward pass.

    A parameter shared by several calls (tied weights, a module called twice) needs the sum of
    its contributions before the norm: its per-example gradients are accumulated instead.

    With a ``cut``, the pass runs in two parts: the graph above the cut is traversed once, not
    retained (freed as it goes, as in plain training), and the upper calls' contributions are
    kept in ``cut.pieces`` for a book-keeping clipped sum; then the lower graph is traversed,
    retained, from the cut with the gradient found there (``cut.grad``).
    """
    uses: dict[int, int] = {}
    for call in calls:
        for _, p in call.unit.params:
            uses[id(p)] = uses.get(id(p), 0) + 1
    norms: dict[int, torch.Tensor] = {}
    shared: dict[int, torch.Tensor] = {}
    upper = {id(c) for c in cut.upper} if cut is not None else set()

    def take(call: Any, call_grads: list) -> None:
        keep = id(call) in upper
        for piece in ps.call_pieces(call, call_grads, batch):
            key = id(piece.param)
            if uses.get(key, 0) > 1 or key in shared:
                sample = piece.grad_sample()
                shared[key] = sample if key not in shared else shared[key] + sample
            else:
                norms[key] = piece.norm_sq("auto")
            if keep:  # the second pass does not reach it: its clipped sum comes from the piece
                piece.compact()
                cut.pieces.setdefault(key, []).append(piece)
            else:
                piece.release()
        # The second pass reads autograd's saved tensors (below a cut) or the pieces (above it),
        # not these.
        call.release()

    if cut is None:
        _traverse(losses.sum(), None, calls, take, retain=True)
    else:
        # Above the cut: a pass that frees what it runs, as plain training's does, and returns
        # the gradient at h; then the lower graph, retained for the second pass, from h.
        cut.grad = _traverse(losses.sum(), None, cut.upper, take, retain=False, cut=cut)
        lower = [c for c in calls if id(c) not in upper]
        if cut.grad is not None and lower:  # None: the loss does not depend on h
            _traverse(cut.edge, cut.grad, lower, take, retain=True)
    for key, sample in shared.items():
        norms[key] = sample.reshape(sample.shape[0], -1).pow(2).sum(1)
    return norms


def _is_source(call: Any) -> bool:
    """A call whose gradients come back from ``autograd.grad`` rather than through a hook: a
    first layer (inputs without history), or one with several outputs (needed at once)."""
    return not call.input_nodes or len(call.edges) != 1 or call.edges[0] is None


def _traverse(
    root: Any, root_grad: torch.Tensor | None, calls: list, take: Any, retain: bool, cut: Cut | None = None
) -> torch.Tensor | None:
    """One backward pass from ``root`` (the summed loss, or a cut's edge with its gradient) that
    hands every call in ``calls`` its output gradients (``take``) as they arrive.

    With ``cut`` (the pass above it, not retained), the gradient at the cut is asked for too and
    returned, and the calls the pass would not run (``cut.direct``) are asked for directly:
    there is no graph left for a second try.
    """
    grad_outputs = None if root_grad is None else [root_grad]
    direct = cut.direct if cut is not None else set()
    source_calls, handles, arrived = [], [], set()
    for index, call in enumerate(calls):
        edge = call.edges[0]
        if _is_source(call) or id(call) in direct:
            source_calls.append(call)
            continue

        def hook(grad_outputs: tuple, call: Any = call, index: int = index, slot: int = edge.output_nr) -> None:
            arrived.add(index)
            take(call, [as_output(grad_outputs[slot], call.shapes[0])])

        # On the node that produced the output (not on the tensor, which a later in-place
        # operation may have moved to another node): it sees the gradient of the output itself.
        handles.append(edge.node.register_prehook(hook))
    at_cut = None
    try:
        if cut is None:
            grads = output_grads(root, source_calls, retain_graph=retain, grad_outputs=grad_outputs)
        else:
            at_cut, grads = output_grads(root, source_calls, retain_graph=retain, also=cut.edge)
    finally:
        for handle in handles:
            handle.remove()
    for call, call_grads in zip(source_calls, grads):
        take(call, call_grads)
    del grads
    # Calls the pass did not reach (their inputs descend from a leaf that is not a recorded
    # call's output): one more retained pass for them alone (above a cut, none: find_cut made
    # them sources).
    missing = [c for i, c in enumerate(calls) if c not in source_calls and i not in arrived]
    if missing:
        found = output_grads(root, missing, retain_graph=True, grad_outputs=grad_outputs)
        for call, call_grads in zip(missing, found):
            take(call, call_grads)
    return at_cut
