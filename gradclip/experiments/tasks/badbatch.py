"""The ``badbatch`` task: ``digits`` where a few batches come from a broken shard, the loss spikes
that loss-aware skipping is built for.

Large runs meet batches that are wrong rather than merely noisy: a shard whose preprocessing was
skipped, text in the wrong encoding, labels misaligned with their inputs. Such a batch raises the
loss far above its recent level and its gradient points somewhere the model should not go; PaLM
(Chowdhery et al. 2022) restarted around such batches and skipped them, and OLMo-core's
``SkipStepOptimizer`` skips any step whose loss or gradient norm leaves mean + k·std of its recent
window (``gradclip.SkipOnSpike(signal="loss" | "grad_norm" | "both")``). Unlike ``spikes``, where
the gradient is scaled after ``backward()`` and the loss never shows it, here the fault is in the
data: the loss sees it, and so does the gradient.

A bad batch is an ordinary batch of the step (the same examples ``digits`` would draw, so the
data stream is otherwise unchanged) with every label wrong — shifted by the same random amount in
1..9 modulo 10 — and its inputs left unnormalised, multiplied by ``input_scale`` (16: the raw 0-16
pixel intensities of scikit-learn's digits instead of 0-1). Which steps are bad, and their shifts,
come from a generator seeded apart from the data's
(:func:`~gradclip.experiments.tasks.digits.fault_schedule`): every clipper of a seed meets the same
bad batches at the same steps, and none in the first 20 steps; a run too short to meet one by
chance (``--quick``: 30 steps) meets one.
"""

from __future__ import annotations

import math
from typing import Any

from gradclip._core.errors import InvalidArgumentError
from gradclip.experiments.tasks.digits import DigitsTask, ensure_fault, fault_schedule

__all__ = ["BadBatchTask"]

#: Seeds the bad-batch schedule apart from ``spikes``' (salt 20 000), so the two fall independently.
_SALT = 30_000
_CLASSES = 10


class BadBatchTask(DigitsTask):
    """``digits`` with bad batches: at a fraction of the steps every label of the batch is wrong
    and its inputs are at the wrong scale.

    Args:
        seed: The run's seed.
        bad_fraction: The probability that a step's batch is bad, in [0, 1] (0: plain ``digits``).
        input_scale: What a bad batch's inputs are multiplied by, a finite number > 0 (16: the
            raw pixel intensities; 1: labels wrong, inputs as usual).

    Raises:
        InvalidArgumentError: ``bad_fraction`` outside [0, 1] or ``input_scale`` not a finite
            number > 0 (the message names the argument and the value).

    Divergence is judged as for ``digits`` (a loss above 1000 x ln 10, or non-finite).
    """

    name = "badbatch"
    description = "digits where a few batches have wrong labels and unnormalised inputs (loss spikes)"

    def __init__(self, seed: int, bad_fraction: float = 0.03, input_scale: float = 16.0):
        self.check_option_values({"bad_fraction": bad_fraction, "input_scale": input_scale})
        super().__init__(seed)
        self.bad_fraction = float(bad_fraction)
        self.input_scale = float(input_scale)
        self._bad_draws, uniform = fault_schedule(seed, salt=_SALT)
        # A shift in 1..9: every label of a bad batch names another class.
        self._shifts = 1 + (uniform * (_CLASSES - 1)).long()

    @classmethod
    def check_option_values(cls, options: dict[str, Any]) -> None:
        """Validate ``bad_fraction`` and ``input_scale`` where given (``gradclip compare`` calls
        this before any run starts, through
        :func:`~gradclip.experiments.tasks.check_task_options`).

        Raises:
            InvalidArgumentError: A value out of range; the message names the option.
        """
        fraction = options.get("bad_fraction", 0.0)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise InvalidArgumentError(
                f"task {cls.name!r}: bad_fraction must be a number in [0, 1] (the probability that a step's "
                f"batch is bad), got {fraction!r}"
            )
        scale = options.get("input_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
            raise InvalidArgumentError(
                f"task {cls.name!r}: input_scale must be a finite number > 0 (what a bad batch's inputs are "
                f"multiplied by), got {scale!r}"
            )

    def begin_run(self, steps: int) -> None:
        """A run too short to meet a bad batch by chance (``--quick``) still meets one
        (:func:`~gradclip.experiments.tasks.digits.ensure_fault`)."""
        self._bad_draws = ensure_fault(self._bad_draws, self.bad_fraction, steps)

    def is_bad(self, step: int) -> bool:
        """Whether the batch of ``step`` is a bad one (the same for every clipper of this seed)."""
        return step < len(self._bad_draws) and bool(self._bad_draws[step] < self.bad_fraction)

    def batch(self, step):
        x, y = super().batch(step)
        if not self.is_bad(step):
            return x, y
        return x * self.input_scale, (y + self._shifts[step]) % _CLASSES
