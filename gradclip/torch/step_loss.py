"""The loss of an optimizer step, for the trainer integrations that clip between ``backward()``
and ``optimizer.step()``.

Lightning and the transformers Trainer clip in a hook fired after the step's last backward, but
neither hands that hook the loss: the integrations catch each micro-batch's loss as it is
computed (Lightning's ``on_before_backward``, the Trainer's ``training_step``) and
:class:`StepLoss` turns them into the loss of the optimizer step, the signal
``SkipOnSpike(signal="loss")`` judges (``clipper.clip_(..., loss=...)``).

Under gradient accumulation the gradient the clipper sees is that of every micro-batch since the
last optimizer step, so the loss is theirs too: the sum of the losses as given when the trainer
has divided each by the number of micro-batches already (Lightning's automatic optimization),
their mean otherwise. Values stay on the device: a loss detached from its graph costs one small
addition per micro-batch and no host read.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StepLoss"]


class StepLoss:
    """The losses of the micro-batches since the last optimizer step (detached, on the device)."""

    def __init__(self) -> None:
        self._total: Any = None
        self._count = 0

    def add(self, loss: Any, scale: Any = None) -> None:
        """Record one micro-batch's loss.

        Args:
            loss: A torch tensor (its graph is not kept) or None (ignored: a step that computed
                no loss, e.g. a skipped batch).
            scale: A loss scale the loss was multiplied by (an AMP ``GradScaler``'s scale, a
                tensor or number), divided out here.
        """
        if loss is None:
            return
        value = loss.detach().float()
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
            A 0-d float32 tensor, or None when no loss was recorded since the last call.
        """
        total, count = self._total, self._count
        self._total, self._count = None, 0
        if total is None:
            return None
        return total / count if mean and count > 1 else total

    def clear(self) -> None:
        """Forget the recorded losses."""
        self._total, self._count = None, 0
