"""FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``): clipping its sharded gradients.

Nothing to pass in the common case: ``clipper.clip_(fsdp_model)`` (and ``fold_``) find the
FSDP1 units inside the module and reduce each flat parameter's gradient slice over its shard
group (HSDP: the shard group only; replicas hold identical slices and count once), exactly as
FSDP1's own ``clip_grad_norm_`` does, with the fp32 norms and non-finite policies of gradclip and
every clipper, adaptive ones included. See :mod:`gradclip.backends.torch_fsdp` for the layout.

Given parameters instead of the module (an optimizer's param groups, a trainer callback), the
shard groups cannot be found from them; set the layout on the clipper once::

    clipper.process_group = gradclip.torch.fsdp.reduction(fsdp_model)

With ``use_orig_params=True`` the original parameters' gradients are 1-D views of their piece
of the shard: per-tensor methods (``Norm``, ``AverageNorm``, ``BlockRMS``, ``AdaGC``) see each
whole tensor's norm, and unit-wise ``AGC`` each row's norm, though a piece may begin or end
inside a row (per-row partial sums are all-reduced over the shard group once per call; a view's
unit vector holds its row's norm per element, so AGC's decision costs a few fp32 vectors as long
as this rank's shard). AGC forms rows only (its default ``axis``): another axis is refused.
With ``use_orig_params=False`` per-tensor and unit-wise methods raise, naming the flat parameter
and its group, before anything is clipped (FSDP2's ``fully_shard`` keeps shapes and supports
them all).
"""

from __future__ import annotations

from typing import Any

from gradclip._core.errors import InvalidArgumentError
from gradclip.backends.torch_fsdp import FSDPLayout, fsdp_layout

__all__ = ["FSDPLayout", "find", "reduction"]


def find(module: Any) -> FSDPLayout | None:
    """The reduction layout of the FSDP1 units inside ``module`` (cached), or None if it holds none.

    Args:
        module: Any ``torch.nn.Module`` (the FSDP1 root, or a module whose children are wrapped).

    Returns:
        An :class:`~gradclip.backends.torch_fsdp.FSDPLayout`, or None.
    """
    return fsdp_layout(module)


def reduction(module: Any) -> FSDPLayout:
    """The reduction layout of the FSDP1 units inside ``module``, to set as a clipper's
    ``process_group`` when it is called with parameters rather than the module.

    Args:
        module: A module holding ``FullyShardedDataParallel`` units.

    Returns:
        An :class:`~gradclip.backends.torch_fsdp.FSDPLayout`.

    Raises:
        InvalidArgumentError: ``module`` holds no FSDP1 unit with parameters.
    """
    layout = fsdp_layout(module)
    if layout is None:
        raise InvalidArgumentError(
            f"gradclip.torch.fsdp.reduction: {type(module).__qualname__} holds no FullyShardedDataParallel "
            "unit with parameters (FSDP2's fully_shard needs nothing: its gradients are DTensors)"
        )
    return layout
