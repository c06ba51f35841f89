"""Forward hooks that record each module call, and the check that every gradient went through one.

Per-example clipping needs, for every call of a module that owns trainable parameters, what the
module saw (its inputs) and its outputs (to take their gradients). A forward hook on the user's
own module records them: no wrapper, the ``state_dict`` keeps its keys, and removing the hooks
leaves the model as it was.

A parameter that reaches the loss *outside* any recorded call (``x @ model.fc.weight.T`` in a
parent's forward, a positional-embedding ``nn.Parameter`` added by the parent) would get a
gradient no rule accounts for: Opacus silently drops it, which breaks the privacy guarantee's
premise. :func:`check_graph` walks the autograd graph from the loss, stepping over each recorded
call (from its outputs straight to its inputs), and names any such parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from gradclip._core.errors import InvalidArgumentError
from gradclip.torch.per_sample_func import floating_outputs
from gradclip.torch.per_sample_rules import rule_for

__all__ = ["Call", "Recorder", "as_output", "check_graph", "output_grads"]


class Call:
    """One recorded call of a hooked module.

    Its outputs are kept as gradient edges (the autograd node that produced each and the slot),
    not as tensors: the gradient that reaches an edge is the gradient with respect to the output
    *as the module returned it*, even when a later in-place operation (``ReLU(inplace=True)``)
    rewrites the tensor and its ``grad_fn``; and an output that autograd does not save is freed
    as in plain training instead of living until the backward pass.
    """

    __slots__ = ("args", "edges", "input_edge", "input_leaves", "input_nodes", "kwargs", "shapes", "unit")

    def __init__(self, unit: Any, args: tuple, kwargs: dict, outputs: list[torch.Tensor]):
        self.unit = unit
        # Detached: the rules only read values; the graph is reached through ``edges``.
        self.args = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
        self.kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        #: One per floating output: its gradient edge, or None for an output without gradient.
        known = rule_for(unit.module) is not None  # a layer whose forward is known (in any mode)
        self.edges = [_edge(o, known) for o in outputs]
        self.shapes = [o.shape for o in outputs]
        tensors = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor) and x.requires_grad]
        self.input_nodes = [x.grad_fn for x in tensors if x.grad_fn is not None]
        self.input_leaves = [x for x in tensors if x.grad_fn is None]
        #: The gradient edge of the call's only differentiable input, when it has exactly one and
        #: that one carries history: where ghost mode may cut its first pass (per_sample_ghost).
        self.input_edge = get_gradient_edge(tensors[0]) if len(tensors) == 1 and tensors[0].grad_fn is not None else None

    def release(self) -> None:
        """Drop the recorded inputs once the call's contributions are computed (ghost mode's
        first pass): they share storage with the activations, which autograd can then free
        during the second pass as it does in plain training."""
        self.args, self.kwargs = (), {}


def _edge(out: torch.Tensor, own_base: bool) -> Any:
    """The gradient edge whose gradient is that of ``out`` as returned (reshaped to its shape).

    An output that is a reshaped view of a tensor the module made (``nn.Linear`` on a 3-D input
    returns a view of its 2-D matmul) loses its own node if a later operation modifies it in
    place (autograd rebases the view's history onto its base); the base's edge receives the
    same gradient either way. Only for the layers with a rule, whose forward makes the base and
    uses it for nothing else."""
    if not out.requires_grad:
        return None
    base = out._base
    if (
        own_base
        and base is not None
        and base.grad_fn is not None
        and base.numel() == out.numel()
        and base.is_contiguous()
        and out.is_contiguous()
    ):
        return get_gradient_edge(base)
    return get_gradient_edge(out)


class Recorder:
    """Forward hooks on the modules of the units; records calls while gradients are enabled.

    Args:
        units: ``{module: unit}`` for every module to hook.
    """

    def __init__(self, units: dict[nn.Module, Any]):
        self.calls: list[Call] = []
        self.enabled = True
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in units]
        self._units = units

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Off while a rule re-runs a module under torch.func, and under no_grad/inference
        # (evaluation): nothing will be differentiated, so nothing is kept alive.
        if not self.enabled or not torch.is_grad_enabled():
            return
        outputs = floating_outputs(output)
        if not any(o.requires_grad for o in outputs):
            return
        self.calls.append(Call(self._units[module], args, kwargs, outputs))

    def take(self) -> list[Call]:
        """The calls recorded since the last take (and forget them)."""
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.calls = []


def check_graph(losses: torch.Tensor, calls: list[Call], tracked: dict[int, str]) -> list[Call]:
    """Refuse a loss whose graph reaches a tracked parameter outside every recorded call.

    Args:
        losses: The per-example losses.
        calls: The recorded calls (of this forward, and possibly of others: an evaluation pass
            run with gradients enabled).
        tracked: ``{id(parameter): name}`` of the parameters being clipped.

    Returns:
        The calls the losses' graph reaches, in order (the others belong to another forward).

    Raises:
        InvalidArgumentError: Naming the parameter(s) that would receive an unclipped gradient.
    """
    jumps: dict[Any, list[Any]] = {}
    offenders: list[str] = []
    # A parent module's own parameters may appear anywhere in its body (the torch.func rule
    # differentiates the whole forward); its body is walked, not stepped over.
    allowed = {id(p) for call in calls if not call.unit.opaque for _, p in call.unit.params}
    for call in calls:
        if not call.unit.opaque:
            continue
        for edge in call.edges:
            if edge is not None:
                jumps.setdefault(edge.node, []).extend(call.input_nodes)
    stack = [losses.grad_fn]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        jump = jumps.get(node)
        if jump is not None:
            stack.extend(jump)  # over the recorded call, to its inputs
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and id(variable) in tracked and id(variable) not in allowed:
            offenders.append(tracked[id(variable)])
            continue
        stack.extend(n for n, _ in node.next_functions)
    reached = [c for c in calls if any(e is not None and e.node in seen for e in c.edges)]
    for call in reached:
        for leaf in call.input_leaves:  # a parameter fed to a module as its input
            if id(leaf) in tracked:
                offenders.append(tracked[id(leaf)])
    if offenders:
        names = ", ".join(sorted(set(offenders)))
        raise InvalidArgumentError(
            f"PerSample.backward: parameter(s) {names} receive gradients outside the calls of the modules that "
            "own them (used directly in another module's forward), so their per-example gradients cannot be "
            "clipped; wrap that use in a module (for example an nn.Linear or a small nn.Module holding the "
            "parameter, which mode='auto' handles) or freeze the parameter. Gradients are unchanged."
        )
    return reached


def output_grads(
    loss: Any, calls: list[Call], retain_graph: bool = False, grad_outputs: Any = None, also: Any = None
) -> Any:
    """The gradient of ``loss`` with respect to every recorded output, per call (None where the
    loss does not depend on it), in one backward pass that computes no parameter gradient.
    ``loss`` may be a gradient edge, with its gradient in ``grad_outputs``. With ``also`` (one
    more gradient edge), ``(its gradient, per call)``."""
    edges = [e for call in calls for e in call.edges if e is not None]
    wanted = edges if also is None else [also, *edges]
    found = torch.autograd.grad(loss, wanted, grad_outputs, retain_graph=retain_graph, allow_unused=True) if wanted else ()
    grads = iter(found if also is None else found[1:])
    per_call = [[None if e is None else as_output(next(grads), shape) for e, shape in zip(call.edges, call.shapes)]
                for call in calls]
    return per_call if also is None else (found[0], per_call)


def as_output(grad: torch.Tensor | None, shape: torch.Size) -> torch.Tensor | None:
    """An edge's gradient in the shape of the output it stands for (see :func:`_edge`)."""
    return grad if grad is None or grad.shape == shape else grad.reshape(shape)
