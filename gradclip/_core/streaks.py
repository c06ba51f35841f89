"""Streaks of skipped optimizer steps: count them, and stop a run that only skips.

A clipper that skips steps (``SkipOnSpike``, ``SkipAbove``, ``nonfinite="skip"``) protects a run
from one bad batch; a run whose every step is skipped has diverged, and skipping forever hides
it. OLMo-core's ``SkipStepOptimizer`` and Megatron's ``grad_norm_skip_threshold`` leave the
streak unbounded; optax's ``apply_if_finite(max_consecutive_errors=...)`` bounds it for
non-finite steps only. :class:`SkipStreak` bounds it for any reason to skip.

The count is an array on the gradients' device (``where(skip, count + 1, 0)``), so counting
costs no host-device synchronisation. Checking the bound does: one host read per optimizer step,
and only when a bound is set and the clipper can skip at all (``clipper.may_skip``).

The wrappers that own the optimizer step (``ClippedOptimizer``, the trainer callbacks, Keras'
``ClippingOptimizer``) hold one :class:`SkipStreak` each; a bare ``clip_`` cannot know whether
its caller skipped, so its :class:`~gradclip.ClipInfo` has ``consecutive_skips=None``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from gradclip._core.errors import DivergenceError, StateError
from gradclip._core.types import ClipInfo
from gradclip._core.validation import check_int

__all__ = ["SkipStreak", "divergence_error"]


class SkipStreak:
    """Counts the optimizer steps skipped in a row; raises past a bound.

    Args:
        max_consecutive_skips: Raise :class:`~gradclip.DivergenceError` when this many steps in a
            row were skipped (an int ``>= 1``), or None to count only.
        where: The owner, for messages (``"ClippedOptimizer"``).

    Raises:
        InvalidArgumentError: ``max_consecutive_skips`` is not None or an int ``>= 1``.
    """

    def __init__(self, max_consecutive_skips: int | None, where: str):
        self.max_consecutive_skips = check_int(where, "max_consecutive_skips", max_consecutive_skips, low=1, allow_none=True)
        self.where = where
        self._count: Any = None
        self._host_count = 0  # the count as last read on the host (checkpoints, messages)
        # With a bound: the norms and losses of the last max_consecutive_skips steps, oldest
        # first, as fixed-shape 1-D arrays on the device, with a 0/1 array saying which steps
        # gave a loss (a NaN loss is a value to report, not a missing one). Fixed shapes, not a
        # growing list, so a compiled step sees the same types every step and never recompiles.
        self._norms: Any = None
        self._losses: Any = None
        self._given: Any = None

    def warn_if_never_skips(self, clipper: Any) -> None:
        """Warn when a bound is set but ``clipper`` can never skip a step: the bound would never
        fire, silently. (A GradScaler's overflow skips are not counted: they are how the scaler
        finds its scale, often several in a row at the start, not the clipper's judgement.)"""
        if self.max_consecutive_skips is None or getattr(clipper, "may_skip", True):
            return
        warnings.warn(
            f"{self.where}: max_consecutive_skips={self.max_consecutive_skips} has no effect: "
            f"{type(clipper).__name__} never skips a step, so no streak can form. Give a clipper "
            "that can skip (nonfinite='skip', SkipAbove, SkipOnSpike, ...), or leave the bound out. "
            "A GradScaler's overflow skips are not counted.",
            UserWarning,
            stacklevel=3,
        )

    @property
    def count(self) -> Any:
        """The current streak: an int64 0-d array, or the Python int 0 before the first step."""
        return self._host_count if self._count is None else self._count

    def observe(self, ops: Any, info: ClipInfo, loss: Any = None, may_skip: bool = True) -> ClipInfo:
        """Count one optimizer step and return ``info`` with ``consecutive_skips`` set.

        Args:
            ops: The gradients' backend (``gradclip._core.ops.Ops``).
            info: The step's ClipInfo; ``info.skip`` says whether the step was skipped.
            loss: The step's loss (kept for the error message, with a bound only), or None.
            may_skip: False when the clipper can never skip: the count stays 0 and the bound
                is not checked (no host read).

        Returns:
            ``info`` with ``consecutive_skips`` the streak including this step.

        Raises:
            DivergenceError: The streak reached ``max_consecutive_skips``. The count is kept
                (a caught error followed by another skipped step raises again).
        """
        zero = ops.scalar(0, "int64")
        if not may_skip or info.skip is None:
            count = zero  # one operation per step for the clippers that never skip
        else:
            previous = self._count if self._count is not None else ops.scalar(self._host_count, "int64")
            count = ops.where(ops.cast(info.skip, "bool"), previous + 1, zero)
        self._count = count
        info = info._replace(consecutive_skips=count)
        if not may_skip or self.max_consecutive_skips is None:
            return info
        self._remember(ops, info.norm, loss)
        streak = int(ops.to_host(count))
        self._host_count = streak
        if streak >= self.max_consecutive_skips:
            raise self._error(ops, streak)
        return info

    def _remember(self, ops: Any, norm: Any, loss: Any) -> None:
        """Shift this step's norm and loss into the fixed-length history (no host read)."""
        if self._norms is None:
            empty = [math.nan] * self.max_consecutive_skips
            self._norms, self._losses = ops.array(empty, "float32"), ops.array(empty, "float32")
            self._given = ops.array([0.0] * self.max_consecutive_skips, "float32")
        given = ops.scalar(0.0 if loss is None else 1.0)
        if loss is None:
            loss = ops.scalar(math.nan)
        elif isinstance(loss, (int, float)):
            loss = ops.scalar(float(loss))
        else:
            # A loss with autograd history would keep the step's whole graph alive: keep the value.
            loss = ops.cast(loss.detach() if hasattr(loss, "detach") else loss, "float32")
        self._norms = ops.flat_concat([self._norms[1:], ops.cast(norm, "float32")])
        self._losses = ops.flat_concat([self._losses[1:], loss])
        self._given = ops.flat_concat([self._given[1:], given])

    def _error(self, ops: Any, streak: int) -> DivergenceError:
        given = ops.to_list(self._given)
        losses = [v if g else None for v, g in zip(ops.to_list(self._losses), given)]
        return divergence_error(self.where, self.max_consecutive_skips, streak, ops.to_list(self._norms), losses)

    def reset(self) -> None:
        """Forget the streak (after a restart from a checkpoint the user chose to roll back to)."""
        self._count, self._host_count = None, 0
        self._norms = self._losses = self._given = None

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> int:
        """The streak as a Python int (one host read)."""
        if self._count is not None:
            self._host_count = int(self._count.item() if hasattr(self._count, "item") else self._count)
        return self._host_count

    def load_state_dict(self, value: Any) -> None:
        """Restore :meth:`state_dict`'s int.

        Raises:
            StateError: ``value`` is not an int ``>= 0``; nothing changes then.
        """
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise StateError(f"{self.where}: the checkpoint's consecutive_skips must be an int >= 0, got {value!r}")
        self._count, self._host_count = None, value
        self._norms = self._losses = self._given = None


def divergence_error(
    where: str, limit: int, streak: int, norms: Sequence[float], losses: Sequence[float | None]
) -> DivergenceError:
    """The :class:`~gradclip.DivergenceError` for ``streak`` skipped steps in a row.

    Shared by :class:`SkipStreak` and Keras' ``ClippingOptimizer``, which keeps its streak in
    variables of its own.

    Args:
        where: The owner, for the message.
        limit: ``max_consecutive_skips``.
        streak: The steps skipped in a row.
        norms: The gradient norms of the last ``limit`` steps, oldest first (host values).
        losses: Their losses, None where no loss was given.

    Returns:
        The error, naming the streak and the norms and losses of its last ``min(streak, limit)``
        steps (also its ``streak``, ``norms`` and ``losses`` attributes).
    """
    shown = max(0, min(streak, limit))
    norms = [float(v) for v in list(norms)[len(norms) - shown:]]
    losses = [None if v is None else float(v) for v in list(losses)[len(losses) - shown:]]
    return DivergenceError(
        f"{where}: {streak} optimizer steps in a row were skipped (max_consecutive_skips={limit}); "
        f"training is not progressing. Last gradient norms: [{', '.join(f'{v:.6g}' for v in norms)}]; "
        f"last losses: [{', '.join('-' if v is None else f'{v:.6g}' for v in losses)}]. "
        "Lower the learning rate, check the data of these steps, or resume from an earlier checkpoint.",
        streak,
        norms,
        losses,
    )
