"""What the trainer integrations give the clip besides the gradients: the step's loss, and the
count of steps skipped in a row.

Lightning and the transformers Trainer clip in a hook fired after the step's last backward, but
neither hands that hook the loss: the integrations catch each micro-batch's loss as it is
computed (Lightning's ``on_before_backward``, the Trainer's ``training_step``) and
:class:`StepLoss` turns them into the loss of the optimizer step, the signal
``SkipOnSpike(signal="loss")`` judges (``clipper.clip_(..., loss=...)``).

Under gradient accumulation the gradient the clipper sees is that of every micro-batch since the
last optimizer step, so the loss is theirs too: the sum of the losses as given when the trainer
has divided each by the number of micro-batches already (Lightning's automatic optimization, the
transformers Trainer), their mean otherwise. Values stay on the device: a loss detached from its
graph costs one small addition per micro-batch and no host read.

:func:`count_skips` advances a :class:`~gradclip._core.streaks.SkipStreak` and, when the streak
reaches its bound, stops the trainer and leaves the step's gradients cleared before the
:class:`~gradclip.DivergenceError` propagates.

Under data parallelism (``torch.distributed`` initialized, more than one process) each rank
computes the loss of its own shard of the batch, while the gradients DDP/FSDP hand the clipper
are the mean over the ranks. A clipper that reads the loss must decide from the same value on
every rank, or the replicas diverge (one rank skips a step another takes):
:func:`loss_across_ranks` averages the step's loss over the data-parallel group, on the device
(one ``all_reduce`` of one scalar per optimizer step, no host read), for
:class:`~gradclip.torch.ClippedOptimizer` and both trainer callbacks alike. The group is the
clipper's ``process_group`` when it carries one, else the default group (every process); a
clipper that ignores the loss costs no collective.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from gradclip._core.errors import DivergenceError
from gradclip._core.ops import get_ops
from gradclip._core.streaks import SkipStreak
from gradclip._core.types import ClipInfo

__all__ = ["StepLoss", "count_skips", "loss_across_ranks", "monitor_hook", "watches_loss"]


class StepLoss:
    """The losses of the micro-batches since the last optimizer step (detached, on the device).

    Also :class:`~gradclip.torch.ClippedOptimizer`'s record of the losses given to the calls of
    an accumulated step (``step(loss=...)``).
    """

    def __init__(self) -> None:
        self._total: Any = None
        self._count = 0

    def add(self, loss: Any, scale: Any = None) -> None:
        """Record one micro-batch's loss.

        Args:
            loss: A torch tensor (its graph is not kept), or None (ignored: a step that computed
                no loss, e.g. a skipped batch).
            scale: A loss scale the loss was multiplied by (an AMP ``GradScaler``'s scale, a
                tensor or number), divided out here.
        """
        if loss is None:
            return
        # Anything else than a tensor (a number, another framework's array from an overridden
        # training step) is kept as given: the clipper's signal check accepts or names it.
        value = loss
        if isinstance(loss, torch.Tensor):
            # fp16/bf16 losses are summed in fp32 (fp64 ones in fp64); a one-element tensor
            # becomes 0-d (any other shape is left for the clipper's signal check to name).
            value = loss.detach().to(torch.promote_types(loss.dtype, torch.float32))
            if value.numel() == 1:
                value = value.reshape(())
        if scale is not None:
            value = value / scale
        self._total = value if self._total is None else self._total + value
        self._count += 1

    def take(self, mean: bool = True) -> Any:
        """The step's loss, forgetting the micro-batches (the next step starts afresh).

        Args:
            mean: Average the micro-batch losses (True), or sum them (False: each was divided
                by the number of micro-batches already).

        Returns:
            A 0-d tensor (fp32, or fp64 for fp64 losses), or None when no loss was recorded since
            the last call.
        """
        total, count = self._total, self._count
        self._total, self._count = None, 0
        if total is None:
            return None
        return total / count if mean and count > 1 else total

    def mean_with(self, loss: Any) -> Any:
        """The mean of the recorded losses and ``loss``, without recording ``loss``."""
        saved = self.snapshot()
        self.add(loss)
        mean = self.take()
        self.restore(saved)
        return mean

    def snapshot(self) -> tuple[Any, int]:
        """What is recorded, for :meth:`restore` (a call that fails puts it back)."""
        return self._total, self._count

    def restore(self, snapshot: tuple[Any, int]) -> None:
        """Go back to a :meth:`snapshot`."""
        self._total, self._count = snapshot

    def clear(self) -> None:
        """Forget the recorded losses."""
        self._total, self._count = None, 0


def monitor_hook(monitor: Any, name: str) -> Any:
    """Call ``monitor``'s ``before_step`` or ``after_step`` (a Monitor's do nothing unless
    ``updates=True``) and return what it returns; None for no monitor, or a duck-typed one with
    only ``observe``."""
    method = getattr(monitor, name, None)
    return method() if callable(method) else None


def watches_loss(clipper: Any) -> bool:
    """Whether ``clipper`` (or a clipper it wraps) reads the loss signal (``watches_loss``); a
    mapping of clippers (ClippedOptimizer's per-group ones) when any of them does."""
    if clipper is None:
        return False
    if isinstance(clipper, Mapping):
        return any(watches_loss(c) for c in clipper.values())
    children = getattr(clipper, "children", None)
    return bool(getattr(clipper, "watches_loss", False)) or (callable(children) and any(watches_loss(c) for c in children()))


def loss_across_ranks(loss: Any, clipper: Any, device: Any = None) -> Any:
    """The step's loss averaged over the data-parallel ranks, for a clipper that reads it.

    Returns ``loss`` unchanged when ``torch.distributed`` is not initialized, the group has one
    process, ``loss`` is None, or ``clipper`` does not read the loss (no collective then).
    Otherwise every rank of the group must call it once per optimizer step (the clipper is
    called on every rank anyway) and gets the same fp32 (fp64 for an fp64 loss) 0-d tensor: the
    sum of the ranks' losses over ``all_reduce`` divided by the group's size, on the device.

    The group is every process (the default group), not the clipper's ``process_group``: that
    one is where the gradients are sharded (an HSDP shard group, a pipeline stage), which can
    leave out data-parallel replicas, and replicas judging different losses diverge. Ranks that
    share a batch (tensor parallelism) hold the same loss, so the mean over every process is the
    mean over the replicas. Every process must therefore pass the loss: with pipeline
    parallelism, where only the last stage has one, no stage can use a loss-reading clipper.

    Args:
        loss: The step's loss (a 0-d or one-element tensor, or a number), or None.
        clipper: The clipper that will judge it.
        device: Where a loss given as a number is placed (NCCL needs a CUDA tensor); default the
            current CUDA device when the backend is NCCL, else the CPU.
    """
    if loss is None or not watches_loss(clipper):
        return loss
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    group = None  # every process: see above
    size = dist.get_world_size(group)
    if size <= 1:
        return loss
    if isinstance(loss, torch.Tensor):
        value = loss.detach().reshape(()).to(torch.promote_types(loss.dtype, torch.float32), copy=True)
    else:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        value = torch.tensor(float(loss), dtype=torch.float32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)  # SUM: gloo has no AVG
    return value / size


def count_skips(
    streak: SkipStreak,
    info: ClipInfo,
    loss: Any,
    may_skip: bool,
    named: list[Any],
    stop: Callable[[], None],
    keep: Callable[[ClipInfo], None] | None = None,
) -> ClipInfo:
    """Count the step in ``streak``; at its bound stop the trainer and skip the step.

    Args:
        streak: The integration's streak of skipped steps.
        info: The step's ClipInfo (torch tensors).
        loss: The step's loss (for the error message), or None.
        may_skip: Whether the clipper can skip at all (no count, no host read otherwise).
        named: The ``(name, parameter)`` pairs clipped: their gradients are cleared on divergence
            (the step the streak ends on is skipped too).
        stop: Sets the trainer's stop flag (``trainer.should_stop``, ``control.should_training_stop``).
        keep: Given ``info`` with ``consecutive_skips`` before the error propagates (the
            integration's ``last_info`` then counts the step that ended the run, as documented).

    Returns:
        ``info`` with ``consecutive_skips``.

    Raises:
        DivergenceError: The streak reached ``streak.max_consecutive_skips``, after ``stop()``.
    """
    try:
        return streak.observe(get_ops([info.norm], where=streak.where), info, loss, may_skip)
    except DivergenceError:
        if keep is not None:
            keep(info._replace(consecutive_skips=streak.count))
        stop()
        for _, param in named:
            param.grad = None
        raise
