"""The ``torch.func`` rule: per-example gradients of any module, from its call's inputs.

For a module without a dedicated rule (or every module, in ``mode="vmap"``), the per-example
gradient of its own parameters is the vector-Jacobian product of the module's forward for that
one example with that example's output gradient. ``torch.func.vmap`` of ``torch.func.vjp`` over
``functional_call`` computes all of them in one vectorized pass, in chunks of ``chunk_size``
examples to bound memory (the approach of Opacus' ``functorch`` grad sampler and of
``torch.func``'s per-sample-gradient tutorial). Only the module's own parameters are
differentiated: a child module's parameters belong to the child's rule.

The examples are assumed independent through the module (no BatchNorm-like mixing; those are
refused before) and stacked along the batch dimension: dim 0, or dim 1 for
``nn.MultiheadAttention(batch_first=False)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from gradclip._core.errors import InvalidArgumentError
from gradclip.torch.per_sample_rules import Direct

__all__ = ["batch_dim_of", "func_contributions", "owned_parameters"]


def batch_dim_of(module: nn.Module) -> int:
    """The dimension along which a module's inputs and outputs stack the examples."""
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return 1
    return 0


def owned_parameters(module: nn.Module, recurse: bool) -> list[tuple[str, torch.Tensor]]:
    """The trainable parameters a rule for ``module`` differentiates (its own, or every one of
    its subtree for a module handled whole such as ``nn.MultiheadAttention``)."""
    return [(n, p) for n, p in module.named_parameters(recurse=recurse) if p.requires_grad]


def func_contributions(
    name: str,
    module: nn.Module,
    params: list[tuple[str, torch.Tensor]],
    args: tuple,
    kwargs: dict[str, Any],
    output_shapes: list[torch.Size],
    grads: list[torch.Tensor | None],
    batch: int,
    chunk_size: int | None,
) -> list[Direct]:
    """Per-example gradients of ``params`` for one call of ``module`` (one :class:`Direct` each).

    Args:
        name: The module's qualified name, for messages.
        module: The module.
        params: ``(name relative to module, parameter)`` pairs to differentiate.
        args, kwargs: The call's arguments as recorded (tensors detached).
        output_shapes: The shapes of the call's floating-point outputs, in order.
        grads: Their gradients (None for an output the loss did not use).
        batch: The number of examples.
        chunk_size: Examples per vectorized chunk (None: all at once).

    Returns:
        One :class:`Direct` per parameter.

    Raises:
        InvalidArgumentError: An input whose batch dimension does not hold ``batch`` examples.
    """
    dim = batch_dim_of(module)
    frozen = {n: p.detach() for n, p in params}

    def batched(x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() > dim and x.shape[dim] == batch

    arg_dims = tuple(dim if batched(x) else None for x in args)
    if not any(d is not None for d in arg_dims):
        raise InvalidArgumentError(
            f"PerSample: no positional input of {name} ({type(module).__name__}) has {batch} examples along "
            f"dim {dim}, so its per-example gradients cannot be taken; losses must hold one entry per example"
        )
    # A keyword tensor is per example when it stacks the examples along dim 0 (masks such as
    # MultiheadAttention's key_padding_mask); others (attn_mask) are shared by every example.
    kw_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch]
    shared_kw = {k: v for k, v in kwargs.items() if k not in kw_names}
    kw_values = tuple(kwargs[k] for k in kw_names)
    used = [i for i, g in enumerate(grads) if g is not None]
    cotangents = tuple(grads[i] for i in used)

    def one(param_values: dict, example_args: tuple, example_kw: tuple, example_g: tuple) -> dict:
        full_args = tuple(
            x.unsqueeze(dim) if d is not None else x for x, d in zip(example_args, arg_dims)
        )
        call_kw = dict(shared_kw)
        call_kw.update({k: v.unsqueeze(0) for k, v in zip(kw_names, example_kw)})

        def forward(p: dict) -> tuple:
            out = functional_call(module, p, full_args, call_kw)
            flat = _floating_outputs(out)
            return tuple(flat[i] for i in used)

        _, pullback = vjp(forward, param_values)
        return pullback(tuple(g.unsqueeze(odim) for g, odim in zip(example_g, out_dims)))[0]

    # The first output stacks examples as the inputs do; any other (MultiheadAttention's
    # averaged weights) along dim 0.
    out_dims = tuple(dim if i == 0 else 0 for i in used)
    for i, odim in zip(used, out_dims):
        if not (len(output_shapes[i]) > odim and output_shapes[i][odim] == batch):
            raise InvalidArgumentError(
                f"PerSample: an output of {name} ({type(module).__name__}) does not hold {batch} examples along "
                f"dim {odim} (shape {tuple(output_shapes[i])}); its per-example gradients cannot be taken"
            )
    # The math attention kernel has batching rules; the fused CPU/GPU ones would make vmap
    # fall back to a Python loop over examples.
    with sdpa_kernel([SDPBackend.MATH]):
        per_example = vmap(
            one,
            in_dims=(None, arg_dims, tuple(0 for _ in kw_names), out_dims),
            chunk_size=chunk_size,
        )(frozen, args, kw_values, cotangents)
    return [Direct(p, per_example[n]) for n, p in params]


def _floating_outputs(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a module's output (a tensor, or a tuple/list of them; a
    ``None`` such as MultiheadAttention's weights with ``need_weights=False`` is skipped)."""
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [x for x in items if isinstance(x, torch.Tensor) and x.is_floating_point()]


floating_outputs = _floating_outputs
