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
from typing import Any

import torch

__all__ = [
    "StepFlags",
    "clear_step_flags",
    "fold_unsupported_reason",
    "scaler_enabled",
    "scaler_stage",
    "scaler_step_outside_trace",
    "set_step_flags",
    "share_wrapper_stage",
]


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


@torch.compiler.disable  # a write into the scaler's own bookkeeping, like _set_step_flags
def share_wrapper_stage(scaler: Any, wrapper: Any, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s GradScaler record the one kept for ``wrapper`` once the scaler has
    unscaled the gradients through the wrapper.

    GradScaler keeps each optimizer's stage and inf checks by ``id(optimizer)``. A wrapper that
    steps ``optimizer`` through the scaler has the same ``param_groups``, so torch's AMP recipe
    ``scaler.unscale_(wrapper)`` (to inspect the gradients before ``step()``), or code kept from
    before the wrapper, ``scaler.step(wrapper)``, unscales the gradients under the wrapper's id,
    and the scaler, asked about ``optimizer``, would unscale them a second time. Sharing the
    record (the same dict under both ids) makes both ids see one unscale and one inf check;
    ``update()`` reads the same inf flags twice, which changes nothing. Nothing happens unless the
    wrapper's gradients were unscaled and ``optimizer``'s were not.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return
    if scaler_stage(scaler, wrapper) == "unscaled" and scaler_stage(scaler, optimizer) == "ready":
        states[id(optimizer)] = states[id(wrapper)]


@torch.compiler.disable
def scaler_step_outside_trace(scaler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """``scaler.step(optimizer)`` for an optimizer that reads ``grad_scale``/``found_inf``,
    always run eagerly.

    ``GradScaler.step`` hands a fused optimizer its scale and inf flags by writing them as
    attributes on the optimizer just before its step (and the pre-hook of :func:`set_step_flags`
    combines the clip's into them at that moment). Inside a ``torch.compile`` trace dynamo drops
    such writes on an optimizer silently, so a compiled ``opt.step`` applied neither the clip
    coefficient nor the skip. A fused step is one kernel per parameter group: tracing it gains
    nothing, and run eagerly every write is real.
    """
    return scaler.step(optimizer)




class StepFlags:
    """What :func:`set_step_flags` changed on an optimizer, for :func:`clear_step_flags`."""

    __slots__ = ("created", "handle", "previous")

    def __init__(self, previous: dict[str, Any] | None, handle: Any, created: list[str]):
        self.previous = previous
        self.handle = handle
        self.created = created


def set_step_flags(
    optimizer: torch.optim.Optimizer,
    divisor: torch.Tensor | None,
    skip: torch.Tensor | None,
    through_scaler: bool = False,
) -> StepFlags | None:
    """Have ``optimizer``'s next step divide gradients by ``divisor`` and skip where ``skip``;
    undo with :func:`clear_step_flags` after the step (in a ``finally``).

    Without a GradScaler the attributes are set on the optimizer now (combined with any already
    there): plain attribute writes, made outside any ``torch.compile`` trace (see
    ``_set_step_flags``; no context manager around the step either: torch's optimizers break the
    graph inside their step, which dynamo cannot do inside a generator context manager).
    ``GradScaler.step`` sets its own ``grad_scale``/``found_inf`` just before it calls the step, so with ``through_scaler`` a step
    pre-hook combines them with these at that moment; the attributes it creates are removed
    after the step, as ``GradScaler`` does.

    Returns:
        None when there is nothing to set, else the record :func:`clear_step_flags` takes.
    """
    if divisor is None and skip is None:
        return None  # nothing to write: no graph break either
    return _set_step_flags(optimizer, divisor, skip, through_scaler)


# The writes run outside any torch.compile trace (a graph break each): dynamo models torch
# optimizers specially and silently drops attribute writes made on them inside a traced frame, so
# a traced ``optimizer.grad_scale = ...`` never reached the fused kernel: a compiled, folded step
# applied no clip coefficient and a skipped one stepped anyway. Run eagerly, the writes are real
# and the compiled optimizer step reads them (and guards on them) like any attribute.
@torch.compiler.disable
def _set_step_flags(optimizer: Any, divisor: Any, skip: Any, through_scaler: bool) -> StepFlags:
    if not through_scaler:
        previous = {name: optimizer.__dict__.get(name) for name in ("grad_scale", "found_inf")}
        _combine(optimizer, divisor, skip)
        return StepFlags(previous, None, [])
    created: list[str] = []

    def hook(stepped, args, kwargs):
        created.extend(_combine(stepped, divisor, skip))

    return StepFlags(None, optimizer.register_step_pre_hook(hook), created)


def clear_step_flags(optimizer: torch.optim.Optimizer, flags: StepFlags | None) -> None:
    """Put the optimizer's ``grad_scale``/``found_inf`` back as they were before
    :func:`set_step_flags`."""
    if flags is not None:
        _clear_step_flags(optimizer, flags)


@torch.compiler.disable  # see _set_step_flags
def _clear_step_flags(optimizer: Any, flags: StepFlags) -> None:
    if flags.handle is not None:
        flags.handle.remove()
        for name in flags.created:
            optimizer.__dict__.pop(name, None)
        return
    for name, value in flags.previous.items():
        if value is None:
            optimizer.__dict__.pop(name, None)
        else:
            setattr(optimizer, name, value)


def _combine(optimizer: Any, divisor: torch.Tensor | None, skip: torch.Tensor | None) -> list[str]:
    """Multiply ``divisor`` into the optimizer's ``grad_scale`` and or ``skip`` into its
    ``found_inf`` (creating them where absent); returns the names created."""
    created = []
    if divisor is not None:
        current = optimizer.__dict__.get("grad_scale")
        if current is None:
            optimizer.grad_scale = divisor
            created.append("grad_scale")
        else:
            optimizer.grad_scale = current * divisor.to(current.device, current.dtype)
    if skip is not None:
        flag = skip.to(torch.float32)
        current = optimizer.__dict__.get("found_inf")
        if current is None:
            optimizer.found_inf = flag
            created.append("found_inf")
        else:
            # A logical or: fused kernels skip only where found_inf == 1 exactly.
            optimizer.found_inf = torch.maximum(current, flag.to(current.device, current.dtype))
    return created
