"""Schedules for threshold arguments: ``gradclip.GlobalNorm(max_norm=CosineDecay(1.0, 10_000, 0.1))``.

The public home of :mod:`gradclip._core.schedules` (see there for the contract: the step is kept in
the clipper's state and each call evaluates the schedule on the device). Any threshold argument of
``GlobalNorm``, ``Norm``, ``AverageNorm``, ``BlockRMS``, ``AGC`` (``clip_factor``), ``ZClip``
(``max_grad_norm``) and ``SkipAbove`` takes a number, one of these objects, its config, or a plain
callable ``f(step)`` (an optax schedule under JAX).
"""

from gradclip._core.schedules import (
    Constant,
    CosineDecay,
    FromCallable,
    Join,
    Linear,
    Piecewise,
    Schedule,
    schedule_from_config,
    warmup_cosine,
)

__all__ = [
    "Constant",
    "CosineDecay",
    "FromCallable",
    "Join",
    "Linear",
    "Piecewise",
    "Schedule",
    "schedule_from_config",
    "warmup_cosine",
]
