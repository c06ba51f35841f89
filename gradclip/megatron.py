"""Megatron-core: a :class:`~gradclip.torch.reduction.ReductionSpec` from its parameter attributes.

Megatron-core marks how each parameter lies: tensor-parallel weights carry
``tensor_model_parallel=True`` (with ``partition_dim``), weights that are identical on every
tensor-parallel rank carry nothing (LayerNorm) or ``allreduce=True`` only (row-parallel biases),
expert weights ``allreduce=False`` when expert-parallel, and the copy of a tied embedding on the
last pipeline stage ``shared=True``. Its own ``get_grad_norm_fp32`` counts a gradient when
``param_is_not_tensor_parallel_duplicate`` and ``param_is_not_shared`` hold and all-reduces the
sum over the model-parallel group (expert parameters over the expert group). The spec built
here gives the same global norm, and whole-tensor per-tensor norms besides::

    from gradclip.megatron import reduction_spec
    clipper = gradclip.GlobalNorm(1.0, process_group=reduction_spec(model))

megatron-core itself is needed only for the default groups (``parallel_state``); pass the groups
to use the adapter with any model that sets these attributes.
"""

from __future__ import annotations

from typing import Any

from gradclip._core.errors import InvalidArgumentError
from gradclip.torch.reduction import ReductionSpec, duplicate, expert, replicated, sharded

__all__ = ["reduction_spec"]


def _default_groups() -> dict[str, Any]:
    try:
        from megatron.core import parallel_state as ps
    except ImportError as error:
        raise InvalidArgumentError(
            "gradclip.megatron.reduction_spec: megatron-core is not installed (or does not import: "
            f"{error}); pass tp_group= and model_parallel_group= (and expert groups) explicitly"
        ) from error
    groups = {
        "tp_group": ps.get_tensor_model_parallel_group(),
        "model_parallel_group": ps.get_model_parallel_group(),
    }
    for name, getter in (("expert_group", "get_expert_tensor_model_pipeline_parallel_group"), ("expert_tp_group", "get_expert_tensor_parallel_group")):
        try:
            groups[name] = getattr(ps, getter)()
        except Exception:  # noqa: BLE001 - not initialised without expert parallelism
            groups[name] = None
    return groups


def reduction_spec(
    model: Any,
    *,
    tp_group: Any = None,
    model_parallel_group: Any = None,
    expert_group: Any = None,
    expert_tp_group: Any = None,
) -> ReductionSpec:
    """The reduction of a Megatron-core model's gradients, read from its parameters' attributes.

    Args:
        model: The model (or chunks' parameters as ``(name, parameter)`` pairs).
        tp_group: The tensor-parallel group; default Megatron's ``parallel_state`` one (all
            four group arguments default together when ``tp_group`` is None).
        model_parallel_group: The tensor x pipeline parallel group (dense parameters' totals).
        expert_group: The group expert parameters (``allreduce=False``) are summed over.
        expert_tp_group: The group expert weights are tensor-parallel over (None: whole).

    Returns:
        A :class:`~gradclip.torch.reduction.ReductionSpec`.

    Raises:
        InvalidArgumentError: No groups given and megatron-core is unavailable; an expert
            parameter without ``expert_group``; any error of ``ReductionSpec``.
    """
    if tp_group is None:
        found = _default_groups()
        tp_group, model_parallel_group = found["tp_group"], found["model_parallel_group"]
        expert_group, expert_tp_group = found["expert_group"], found["expert_tp_group"]
    if model_parallel_group is None:
        raise InvalidArgumentError("gradclip.megatron.reduction_spec: model_parallel_group is required with tp_group")

    def is_expert(name: str, p: Any) -> bool:
        return getattr(p, "allreduce", True) is False

    def is_tp(p: Any) -> bool:
        return bool(getattr(p, "tensor_model_parallel", False))

    def is_shared(name: str, p: Any) -> bool:
        return not is_expert(name, p) and bool(getattr(p, "shared", False))

    # The predicates are exclusive, so no parameter is named by two rules.
    rules: dict[Any, Any] = {
        lambda n, p: not is_expert(n, p) and not is_shared(n, p) and is_tp(p): sharded(tp_group),
        lambda n, p: not is_expert(n, p) and not is_shared(n, p) and not is_tp(p): replicated(tp_group),
        # The copy counted on another stage: nothing to global norms; TP-split ones keep whole
        # per-tensor norms.
        lambda n, p: is_shared(n, p) and is_tp(p): duplicate(sharded=tp_group),
        lambda n, p: is_shared(n, p) and not is_tp(p): duplicate(),
    }
    if expert_group is not None:
        rules[lambda n, p: is_expert(n, p) and is_tp(p) and expert_tp_group is not None] = expert(expert_group, sharded=expert_tp_group)
        rules[lambda n, p: is_expert(n, p) and not (is_tp(p) and expert_tp_group is not None)] = expert(expert_group)
    else:
        for name, p in (model.named_parameters() if hasattr(model, "named_parameters") else model):
            if is_expert(name, p):
                raise InvalidArgumentError(
                    f"gradclip.megatron.reduction_spec: parameter {name!r} is an expert parameter "
                    "(allreduce=False) but no expert_group was given"
                )
    return ReductionSpec(model, rules, group=model_parallel_group)
