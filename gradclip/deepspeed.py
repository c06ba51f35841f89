"""DeepSpeed ZeRO stages 1, 2 and 3: any gradclip clipper at the point the engine clips.

Under ZeRO the gradients live in the engine's partitions (``p.grad`` is None between
``engine.backward`` and ``engine.step``), so clipping the module clips nothing. The engine calls
``engine.optimizer.step()`` after the gradients are reduced and before it computes its own norm,
clips and updates; :func:`attach` wraps that call and, there, clips the partitions this rank
holds (``engine.optimizer.averaged_gradients``) in place, reducing every statistic over the
engine's data-parallel group::

    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    zero = gradclip.deepspeed.attach(engine, gradclip.get("zclip"))
    for batch in loader:
        engine.backward(engine(batch).loss)
        engine.step()                 # gradclip clips inside, then the engine updates
        zero.last_info                # the ClipInfo of the last step (norm before clipping)

* ZeRO-1/2 hold one flat slice of each parameter group per rank: the global norm and
  element-wise methods work; per-tensor and unit-wise methods are refused (a slice mixes
  parameters). ZeRO-3 holds one shard of every parameter: per-tensor methods (``Norm``,
  ``AdaGC``, ``BlockRMS``) see each whole parameter's norm (shards summed over the group).
* The engine's own clipping is turned off (``engine.optimizer.clip_grad = 0``) while attached, so
  gradients are clipped once; with nothing else differing, ``info.norm`` equals the engine's
  ``get_global_grad_norm()`` of the same step (the engine measures after gradclip clipped).
* A skipped step (``SkipOnSpike``, ``nonfinite="skip"``) goes through the engine's own overflow
  path: the partitions are made non-finite, the engine discards the step and clears the
  gradients (its ``get_global_grad_norm()`` reports inf; a dynamic fp16 loss scale is lowered, as
  for any overflow).
* fp16/bf16 loss scaling: the partitions are divided by the loss scale for clipping and
  multiplied back (powers of two: exact), so thresholds are in unscaled units.

Unsupported, and refused with a clear error instead of clipping nothing: ZeRO stage 0 (use
``clip_(model)``), optimizer/parameter offload (the gradients go straight to CPU buffers the
engine owns), and engines with model parallelism (``mpu``).
"""

from __future__ import annotations

import types
from typing import Any

import torch

from gradclip._core.clipper import Clipper
from gradclip._core.errors import InvalidArgumentError
from gradclip.backends.torch_groups import Assign, Assigner
from gradclip.backends.torch_fsdp import needs_whole_tensors

__all__ = ["ZeroClip", "attach", "zero_optimizer_of"]

_WHERE = "gradclip.deepspeed.attach"


class _ZeroLayout(Assigner):
    """The partitions of one step: ZeRO-1/2 flat slices, ZeRO-3 shards with one slot per
    parameter (the same order on every rank of the data-parallel group)."""

    def __init__(self, group: Any, assigns: list[Assign]):
        self.total_groups = [group]
        self.has_flat = any(a.flat for a in assigns)
        self.shard_groups = [group] if any(a.shard is not None for a in assigns) else []
        self.slots = {group: len(assigns)} if self.shard_groups else {}
        self._assigns = assigns
        self._ids: dict[int, Assign] = {}

    def bind(self, tensors: list[torch.Tensor]) -> None:
        self._ids = {id(t): a for t, a in zip(tensors, self._assigns)}

    def assign(self, grads, where):
        return [self._ids[id(g)] for g in grads]


class ZeroClip:
    """A clipper attached to a ZeRO engine (see the module docstring; build with :func:`attach`).

    Attributes:
        clipper: The clipper applied at every optimizer step.
        last_info: The :class:`~gradclip.ClipInfo` of the last step (None before the first).
        stage: The engine's ZeRO stage.
    """

    def __init__(self, engine: Any, clipper: Clipper):
        if not isinstance(clipper, Clipper):
            raise InvalidArgumentError(f"{_WHERE}: clipper must be a gradclip clipper, got {type(clipper).__qualname__}")
        # An engine, or its ZeRO optimizer itself (what a trainer's callback is handed).
        optimizer = engine if hasattr(engine, "averaged_gradients") else getattr(engine, "optimizer", None)
        stage = _stage_of(engine, optimizer)
        kind = type(optimizer).__name__
        if stage not in (1, 2, 3) or not hasattr(optimizer, "averaged_gradients"):
            raise InvalidArgumentError(
                f"{_WHERE}: the engine runs ZeRO stage {stage} with {kind}; gradclip attaches to ZeRO "
                "stages 1, 2 and 3 (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3). Without "
                "ZeRO the gradients are in p.grad: call clipper.clip_(engine.module) before engine.step()"
            )
        if getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False) or getattr(
            optimizer, "offload_param", False
        ):
            raise InvalidArgumentError(
                f"{_WHERE}: ZeRO stage {stage} with optimizer/parameter offload is not supported: the "
                "engine writes the gradients straight into its CPU buffers, with no point where they can "
                "be clipped before its own update. Use gradient_clipping in the DeepSpeed config there"
            )
        if getattr(engine, "mpu", None) is not None or getattr(optimizer, "mpu", None) is not None:
            raise InvalidArgumentError(
                f"{_WHERE}: the engine has model parallelism (mpu); gradclip's ZeRO adapter reduces over "
                "the data-parallel group only. Clip with a gradclip.torch.reduction.ReductionSpec instead"
            )
        if clipper.distributed_group() is not None:
            raise InvalidArgumentError(
                f"{_WHERE}: {clipper!r} already carries a process_group; the adapter reduces over the "
                "engine's data-parallel group itself. Leave process_group unset"
            )
        if stage < 3:
            needs = needs_whole_tensors(clipper)
            if needs is not None:
                raise InvalidArgumentError(
                    f"{_WHERE}: {needs!r} works per tensor, but ZeRO stage {stage} holds one flat slice of "
                    "each parameter group per rank (pieces of many parameters); use ZeRO-3 (one shard per "
                    "parameter) or a global-norm clipper"
                )
        self.engine, self.optimizer, self.clipper, self.stage = engine, optimizer, clipper, stage
        self.group = optimizer.dp_process_group
        self.last_info = None
        self._engine_clip = optimizer.clip_grad
        optimizer.clip_grad = 0.0  # gradclip clips; the engine must not clip again
        self._step = optimizer.step
        optimizer.step = self._clip_then_step

    def detach(self) -> None:
        """Restore the engine's own step and clip value."""
        self.optimizer.step = self._step
        self.optimizer.clip_grad = self._engine_clip

    def _partitions(self) -> tuple[list[torch.Tensor], list[Assign]]:
        groups = self.optimizer.averaged_gradients
        tensors: list[torch.Tensor] = []
        assigns: list[Assign] = []
        for i in sorted(groups):
            part = groups[i]
            if part is None:
                continue
            if self.stage == 3:
                params = self.optimizer.fp16_groups[i]
                for k, (tensor, param) in enumerate(zip(part, params)):
                    slot = len(assigns)
                    name = getattr(param, "ds_name", None) or f"group{i}.param{k}"
                    assigns.append(Assign(self.group, 1, self.group, slot, False, name, int(param.ds_numel)))
                    tensors.append(tensor)
            else:
                for k, tensor in enumerate(part):
                    assigns.append(Assign(self.group, 1, None, -1, True, f"ZeRO-{self.stage} partition {i}.{k}"))
                    tensors.append(tensor)
        return tensors, assigns

    def _clip_then_step(self, *args: Any, **kwargs: Any) -> Any:
        tensors, assigns = self._partitions()
        layout = _ZeroLayout(self.group, assigns)
        layout.bind(tensors)
        scale = float(getattr(self.optimizer, "loss_scale", 1.0) or 1.0)
        holders = [(a.name, types.SimpleNamespace(grad=t)) for a, t in zip(assigns, tensors)]
        if scale != 1.0:
            torch._foreach_mul_(tensors, 1.0 / scale)
        self.clipper.process_group = layout
        try:
            info = self.clipper.clip_(holders)
        finally:
            self.clipper.process_group = None
            if scale != 1.0:
                torch._foreach_mul_(tensors, scale)
        self.last_info = info
        if self.clipper.may_skip and bool(info.skip):
            # The engine's own overflow path discards the step and clears the gradients.
            for t in tensors:
                t.fill_(float("nan"))
        return self._step(*args, **kwargs)


def _stage_of(engine: Any, optimizer: Any) -> int:
    """The ZeRO stage, from the engine, else from the optimizer's type (0: no ZeRO optimizer)."""
    if hasattr(engine, "zero_optimization_stage"):
        return int(engine.zero_optimization_stage())
    name = type(optimizer).__name__
    if name == "DeepSpeedZeroOptimizer_Stage3":
        return 3
    if name == "DeepSpeedZeroOptimizer":
        return 2 if getattr(optimizer, "partition_gradients", False) else 1
    return 0


def zero_optimizer_of(optimizer: Any) -> Any:
    """The DeepSpeed ZeRO optimizer behind a trainer's optimizer (accelerate wraps it), or None."""
    for candidate in (optimizer, getattr(optimizer, "optimizer", None)):
        if candidate is not None and hasattr(candidate, "averaged_gradients") and _stage_of(None, candidate):
            return candidate
    return None


def attach(engine: Any, clipper: Clipper) -> ZeroClip:
    """Clip a DeepSpeed ZeRO engine's gradients with ``clipper`` at every ``engine.step()``.

    Args:
        engine: The ``DeepSpeedEngine`` from ``deepspeed.initialize`` (ZeRO stage 1, 2 or 3),
            or its ZeRO optimizer (``engine.optimizer``).
        clipper: Any gradclip clipper; per-tensor ones need ZeRO-3. Its state advances once per
            optimizer step and is identical on every rank.

    Returns:
        A :class:`ZeroClip` (``last_info``, ``detach()``).

    Raises:
        InvalidArgumentError: ZeRO stage 0, offload, model parallelism, a clipper with its own
            process group, or a per-tensor clipper under ZeRO-1/2.
    """
    return ZeroClip(engine, clipper)
