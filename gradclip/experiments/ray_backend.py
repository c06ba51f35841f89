"""``--backend ray``: the same runs as Ray tasks, on an existing cluster or a local one.

A comparison on a real model outgrows two cores fast. With ``backend="ray"`` every run becomes
one Ray task (``ray.remote``), scheduled by the resources it asks for (``--resources
cpu=4,gpu=1``), on the cluster named by ``--ray-address`` (``ray.init(address=...)``; without it,
the Ray instance this process is connected to, or a new local one). Records come back as runs
end and go into the same report as local runs. A run that raises is reported ``"failed"``; a run
whose worker or node dies (out of memory, preempted, killed) is reported ``"killed"`` with Ray's
reason; neither is retried (a retry would hide the failure) nor dropped.

Workers need gradclip and the task's own imports installed. A task file
(``--task my_task.py:make``) travels with each run as source text, so it needs no shared
file system; a task module (``--task my_pkg.tasks:make``) must be importable on the workers
(installed, or shipped with Ray's ``runtime_env``). Each run gets the pinned environment
(:mod:`~gradclip.experiments.environment`) through ``runtime_env``'s ``env_vars``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from gradclip._core.errors import InvalidArgumentError
from gradclip.experiments.environment import pinned_environment
from gradclip.experiments.tasks.base import TaskError

__all__ = ["run_ray", "parse_resources", "MissingRayError"]

_NAMED = {"cpu": "num_cpus", "gpu": "num_gpus", "memory": "memory"}


class MissingRayError(InvalidArgumentError):
    """``backend="ray"`` without Ray installed."""


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise MissingRayError(
            "--backend ray needs Ray, which is not installed: pip install 'gradclip[ray]'"
        ) from error
    return ray


def parse_resources(text: str | dict[str, Any] | None) -> dict[str, float]:
    """What each run asks Ray for: ``"cpu=1,gpu=0.5,memory=2e9,my_resource=1"`` or a dict.

    ``cpu``, ``gpu`` and ``memory`` (bytes) are Ray's ``num_cpus``, ``num_gpus`` and
    ``memory``; any other name is a custom resource of the cluster. Default: ``cpu=1``.

    Returns:
        A dict of non-negative numbers.

    Raises:
        InvalidArgumentError: Malformed text, or a value that is not a number >= 0.
    """
    if text is None:
        return {"cpu": 1.0}
    if isinstance(text, str):
        items = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, equals, value = part.partition("=")
            if not equals or not key.strip():
                raise InvalidArgumentError(f"--resources {text!r}: expected name=amount, got {part!r}")
            items[key.strip()] = value.strip()
    elif isinstance(text, dict):
        items = dict(text)
    else:
        raise InvalidArgumentError(f"resources must be a dict or 'name=amount,...', got {type(text).__name__}")
    resources = {}
    for key, value in items.items():
        try:
            amount = float(value)
        except (TypeError, ValueError):
            amount = math.nan
        if isinstance(value, bool) or not math.isfinite(amount) or amount < 0:
            raise InvalidArgumentError(f"resources: {key} must be a number >= 0, got {value!r}")
        resources[key] = amount
    resources.setdefault("cpu", 1.0)
    return resources


def _options(resources: dict[str, float]) -> dict[str, Any]:
    options: dict[str, Any] = {"max_retries": 0, "runtime_env": {"env_vars": pinned_environment()}}
    custom = {}
    for key, amount in resources.items():
        if key in _NAMED:
            options[_NAMED[key]] = int(amount) if key == "memory" else amount
        else:
            custom[key] = amount
    if custom:
        options["resources"] = custom
    return options


def _execute(config):
    from gradclip.experiments.runner import run_one

    return run_one(config)


def run_ray(
    configs: Sequence[Any],
    *,
    address: str | None = None,
    resources: dict[str, float] | str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``configs`` as Ray tasks and return the records in config order.

    Args:
        configs: :class:`~gradclip.experiments.runner.RunConfig` objects.
        address: ``ray.init(address=...)``: ``"auto"``, ``"ray://head:10001"``... None: the
            instance this process is already connected to, else a new local one.
        resources: What each run asks for (:func:`parse_resources`).
        on_progress: ``(index, steps)``, called when a run ends (Ray reports no finer
            progress).
        on_done: ``(index, record)`` as each run ends.
        init_kwargs: More keyword arguments for ``ray.init`` (``runtime_env``, ``num_cpus``
            of a local instance...).

    Returns:
        The records; failed and killed runs have records with that ``status``.

    Raises:
        MissingRayError: Ray is not installed.
        TaskError: A run found the task breaking the contract; the other runs were cancelled.
    """
    from gradclip.experiments.runner import failed_record

    ray = _import_ray()
    options = _options(parse_resources(resources))
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **(init_kwargs or {}))
        started_here = True
    try:
        remote = ray.remote(_execute).options(**options)
        refs = {remote.remote(config): index for index, config in enumerate(configs)}
        results: list[dict[str, Any] | None] = [None] * len(configs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            for ref in done:
                index = refs[ref]
                config = configs[index]
                try:
                    record = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    cause = getattr(error, "cause", None)
                    if isinstance(cause, TaskError):
                        for other in pending:
                            ray.cancel(other, force=True)
                        raise TaskError(str(cause)) from None
                    detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(error).splitlines()[0]
                    record = failed_record(config, "failed", detail, str(error))
                except ray.exceptions.RayError as error:
                    # WorkerCrashedError, NodeDiedError, OutOfMemoryError, TaskCancelledError...
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    record = failed_record(config, "killed", f"Ray {type(error).__name__}: {first}"[:500])
                results[index] = record
                if on_progress:
                    on_progress(index, config.steps)
                if on_done:
                    on_done(index, record)
        return results  # type: ignore[return-value]
    finally:
        if started_here:
            ray.shutdown()
