"""How a clip meets a torch optimizer step: AMP ``GradScaler`` stages and the fused step's
``grad_scale``/``found_inf`` inputs, through which a clip coefficient is folded into the step.

A fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` built with ``fused=True``) divides
every gradient by a ``grad_scale`` tensor and skips its update where a ``found_inf`` tensor is
non-zero: that is how ``GradScaler`` unscales for it without a pass of its own. The hook is
public: ``GradScaler.step`` multiplies a ``grad_scale`` already set on the optimizer into its own,
and fused optimizers read both in ``step()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["fold_unsupported_reason", "scaler_enabled", "scaler_stage", "step_flags"]


def fold_unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Say why a clip coefficient cannot be folded into ``optimizer``'s step (None: it can).

    An optimizer can take the coefficient when it reads ``grad_scale``/``found_inf`` in its step
    (``_step_supports_amp_scaling``, set by torch's fused Adam, AdamW, SGD and Adagrad).
    """
    name = type(optimizer).__name__
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return (
            f"{name} does not read a gradient scale in its step; construct it with fused=True "
            "(torch.optim.Adam, AdamW, SGD and Adagrad support it)"
        )
    try:
        parameters = inspect.signature(optimizer.step).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "grad_scaler" in parameters:
        return f"{name}.step takes the older grad_scaler= argument instead of reading grad_scale"
    if any(group.get("fused", True) is False for group in optimizer.param_groups):
        return f"a parameter group of {name} has fused=False"
    return None


def scaler_enabled(scaler: Any) -> bool:
    """Whether ``scaler`` is a GradScaler that scales (None and disabled scalers do not)."""
    if scaler is None:
        return False
    is_enabled = getattr(scaler, "is_enabled", None)
    return bool(is_enabled()) if callable(is_enabled) else True


def scaler_stage(scaler: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """``"ready"``, ``"unscaled"`` or ``"stepped"`` for this optimizer; None if unknowable."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return None
    state = states.get(id(optimizer))  # .get: a defaultdict must not grow an entry here
    if state is None:
        return "ready"
    stage = getattr(state.get("stage"), "name", None)
    return {"READY": "ready", "UNSCALED": "unscaled", "STEPPED": "stepped"}.get(stage or "", None)




@contextmanager
def step_flags(
    optimizer: torch.optim.Optimizer, divisor: torch.Tensor | None, skip: torch.Tensor | None
) -> Iterator[None]:
    """Have ``optimizer``'s next step divide gradients by ``divisor`` and skip where ``skip``.

    A step pre-hook combines them with whatever ``GradScaler.step`` set on the optimizer just
    before calling its step (``grad_scale = S``, ``found_inf``); without a scaler the
    attributes it creates are removed after the step, as ``GradScaler`` does.
    """
    if divisor is None and skip is None:
        yield
        return
    created: list[str] = []

    def hook(stepped, args, kwargs):
        if divisor is not None:
            current = getattr(stepped, "grad_scale", None)
            if current is None:
                stepped.grad_scale = divisor
                created.append("grad_scale")
            else:
                stepped.grad_scale = current * divisor.to(current.device, current.dtype)
        if skip is not None:
            flag = skip.to(torch.float32)
            current = getattr(stepped, "found_inf", None)
            if current is None:
                stepped.found_inf = flag
                created.append("found_inf")
            else:
                # A logical or: fused kernels skip only where found_inf == 1 exactly.
                stepped.found_inf = torch.maximum(current, flag.to(current.device, current.dtype))
        return None

    handle = optimizer.register_step_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for name in created:
            if name in optimizer.__dict__:
                delattr(optimizer, name)
