"""The :class:`Monitor`: per-step clipping statistics, kept on the device, fetched in batches."""

from __future__ import annotations

import math
import numbers
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gradclip._core.errors import InvalidArgumentError
from gradclip.monitor.suggest import ThresholdSuggestion, suggest_threshold

__all__ = ["Monitor", "ClipRateWarning"]

# Order of the scalar fields in a device row.
_ROW = ("norm", "norm_after", "threshold", "coef", "clipped", "finite", "skip")
_NO_GRAD = -1.0  # a layer without a gradient this step (norms are >= 0 or NaN)


class ClipRateWarning(UserWarning):
    """More than half of the recent steps were clipped: clipping now limits every step's size."""


def _is_torch(value: Any) -> bool:
    return type(value).__module__.split(".", 1)[0] == "torch"


def _check_int(where: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{where}: {name} must be an integer >= {low}, got {value!r}")
    return value


def _check_layer_norms(where: str, layer_norms: Any) -> None:
    """``layer_norms`` must be ``(names, tensor)``: str names, a 1-D tensor with one norm per name."""
    is_pair = isinstance(layer_norms, (list, tuple)) and len(layer_norms) == 2
    names, tensor = layer_norms if is_pair else (None, None)
    ok = (
        isinstance(names, (list, tuple))
        and all(isinstance(n, str) for n in names)
        and getattr(tensor, "ndim", None) == 1
        and int(tensor.shape[0]) == len(names)
    )
    if not ok:
        raise InvalidArgumentError(
            f"{where}: layer_norms must be (names, 1-D tensor) with one norm per name, got "
            f"{type(layer_norms).__name__} {layer_norms!r:.200}"
        )


def _percentiles(values: Iterable[float]) -> dict[str, float] | None:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return None
    return {
        "p10": float(np.quantile(array, 0.10)),
        "p50": float(np.quantile(array, 0.50)),
        "p90": float(np.quantile(array, 0.90)),
        "p99": float(np.quantile(array, 0.99)),
        "max": float(array.max()),
    }


class Monitor:
    """Record what clipping measured and did, step by step, without a sync every step.

    Call :meth:`observe` with the :class:`~gradclip.ClipInfo` of each clipping step (a
    ``gradclip.torch.ClippedOptimizer(..., monitor=m)`` and the Lightning/transformers callbacks
    do it for you). Values stay on the device; every ``every`` steps they are fetched in one
    batch, turned into records (see :mod:`gradclip.monitor` for the fields) and handed to the
    writers. :meth:`close` (or leaving a ``with`` block) flushes the rest.

    Args:
        model: The ``torch.nn.Module`` whose parameters are clipped; needed for per-layer norms.
            None for other frameworks (only the global statistics are recorded then).
        every: Fetch and write every this many steps, ``>= 1``. Each fetch is one host-device
            synchronisation; a larger ``every`` costs one sync per ``every`` steps.
        per_layer: Record the L2 norm of each named parameter's gradient, as the optimizer uses it
            (after clipping). Costs one extra read of the gradients per step.
        writers: Objects with ``write(records)`` and ``close()``: :class:`JsonlWriter`,
            :class:`CsvWriter`, :class:`TensorBoardWriter`. A writer that also has
            ``set_layer_names(names)`` is given :attr:`layer_names` once, before its first write.
        history: How many recent steps the in-memory statistics (percentiles, :meth:`suggest`)
            keep, ``>= 1``.
        window: The number of recent steps the clip rate and its warning look at, ``>= 1``.
        warn: Emit :class:`ClipRateWarning` when more than half of the last ``window`` steps were
            clipped (once, and again only after the rate has fallen back to half or less).
        updates: Also record, per layer, the parameter norm ``‖W‖``, the norm of the optimizer's
            update ``‖ΔW‖`` and their ratio ``‖ΔW‖ / ‖W‖`` (the learning-rate health signal:
            ~1e-3 is typical, a jump flags a bad step). Needs :meth:`before_step` before and
            :meth:`after_step` after each optimizer step (``ClippedOptimizer`` and the Lightning and
            transformers callbacks call them); costs one copy of the parameters per step and two
            reads. torch models only.

    Raises:
        InvalidArgumentError: A bad argument.
    """

    def __init__(
        self,
        model: Any = None,
        every: int = 1,
        per_layer: bool = True,
        writers: Sequence[Any] = (),
        *,
        history: int = 10_000,
        window: int = 100,
        warn: bool = True,
        updates: bool = False,
    ):
        where = "Monitor"
        if model is not None and not callable(getattr(model, "named_parameters", None)):
            raise InvalidArgumentError(
                f"{where}: model must be a torch.nn.Module (with named_parameters) or None, "
                f"got {type(model).__qualname__}"
            )
        self.model = model
        self.every = _check_int(where, "every", every, 1)
        self.per_layer = bool(per_layer)
        if writers is None:
            writers = ()
        if not isinstance(writers, (list, tuple)):
            raise InvalidArgumentError(f"{where}: writers must be a list of writers, got {type(writers).__name__}")
        for position, writer in enumerate(writers):
            if not callable(getattr(writer, "write", None)) or not callable(getattr(writer, "close", None)):
                raise InvalidArgumentError(
                    f"{where}: writers[{position}] must have write(records) and close() methods, "
                    f"got {type(writer).__qualname__}"
                )
        self.writers = list(writers)
        self.history = _check_int(where, "history", history, 1)
        self.window = _check_int(where, "window", window, 1)
        self.warn = bool(warn)
        if not isinstance(updates, bool):
            raise InvalidArgumentError(f"{where}: updates must be True or False, got {updates!r}")
        if updates and model is None:
            raise InvalidArgumentError(f"{where}: updates=True needs the model (its parameters are measured)")
        self.updates = updates
        self._snapshot: list[Any] | None = None
        self._awaiting_update = False
        # (step, row, sections): the device row and which per-layer sections follow its scalars.
        self._pending: list[tuple[int, Any, tuple[str, ...]]] = []
        self._next_step = 0
        self._layer_names: list[str] | None = None
        self._layer_params: list[Any] = []
        self._norms: deque[float] = deque(maxlen=self.history)
        self._recent_clipped: deque[bool] = deque(maxlen=self.window)
        self._layer_history: dict[str, deque[float]] = {}
        self._totals = {"steps": 0, "clipped": 0, "nonfinite": 0, "skipped": 0}
        self._last_threshold: float | None = None
        self._warned_rate = False
        self._announced_layers = False
        self._closed = False

    # -- recording ---------------------------------------------------------------------------------
    @property
    def layer_names(self) -> list[str]:
        """The names of the layers (parameters) tracked per layer."""
        self._resolve_layers()
        return list(self._layer_names or [])

    def _resolve_layers(self) -> None:
        if self._layer_names is not None:
            return
        if self.model is None or not self.per_layer:
            self._layer_names, self._layer_params = [], []
            return
        pairs = [(n, p) for n, p in self.model.named_parameters() if getattr(p, "requires_grad", True)]
        self._layer_names = [n for n, _ in pairs]
        self._layer_params = [p for _, p in pairs]

    def observe(self, info: Any, *, step: int | None = None, layer_norms: Any = None) -> None:
        """Record one clipping step.

        Args:
            info: The :class:`~gradclip.ClipInfo` returned by the clipper.
            step: The step number to record (e.g. the trainer's global step), an integer; by
                default the count of observed steps, from 0.
            layer_norms: Precomputed per-layer norms as ``(names, 1-D tensor)``, one norm per
                name; by default they are measured from the model's gradients now.

        Raises:
            InvalidArgumentError: ``info`` is not a ClipInfo, ``step`` not an integer, a bad
                ``layer_norms``, or the monitor is closed. Nothing is recorded then.
        """
        where = "Monitor.observe"
        if self._closed:
            raise InvalidArgumentError(f"{where}: the monitor is closed")
        fields = getattr(info, "_fields", None)
        if fields is None or not all(name in fields for name in ("norm", "threshold", "coef", "clipped", "finite", "skip")):
            raise InvalidArgumentError(f"{where}: info must be a gradclip.ClipInfo, got {type(info).__qualname__}")
        if step is None:
            step = self._next_step
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise InvalidArgumentError(
                f"{where}: step must be an integer (the step number) or None, got {step!r} of type "
                f"{type(step).__name__}"
            )
        step = int(step)
        if layer_norms is not None:
            _check_layer_norms(where, layer_norms)
        self._resolve_layers()
        sections: tuple[str, ...] = ()
        if _is_torch(info.norm):
            row = self._torch_row(info, layer_norms)
            if self._layer_names and row.numel() > len(_ROW):
                sections = ("layers",)
        else:
            row = ("host", tuple(info), None)
        # Only now, with the row built, does anything change.
        self._next_step = step + 1
        self._pending.append((step, row, sections))
        # With updates, the step's row waits for after_step() to add the update norms.
        self._awaiting_update = self.updates and not isinstance(row, tuple)
        if len(self._pending) >= self.every and not self._awaiting_update:
            self.flush()

    # -- parameter updates ---------------------------------------------------------------------------
    def before_step(self) -> None:
        """Remember the parameters before the optimizer step (with ``updates=True``; else nothing).

        Call it after :meth:`observe` and before ``optimizer.step()``.
        """
        if not self.updates or self._closed:
            return
        self._resolve_layers()
        self._snapshot = [p.detach().clone() for p in self._layer_params]

    def after_step(self) -> Any:
        """Measure the update the optimizer step made (with ``updates=True``; else None).

        Adds each layer's ``‖W‖``, ``‖ΔW‖`` and ``‖ΔW‖ / ‖W‖`` to the step last observed (device
        values, fetched with it), then writes when ``every`` steps are pending.

        Returns:
            ``(names, param_norms, update_norms, ratios)`` with 1-D fp32 device tensors, one entry
            per layer (for loggers: no synchronisation), or None when nothing was measured
            (``updates=False``, or :meth:`before_step` was not called).
        """
        if not self.updates or self._snapshot is None or self._closed:
            return None
        import torch

        snapshot, self._snapshot = self._snapshot, None
        params = [p.detach() for p in self._layer_params]
        from gradclip._core.ops import get_ops

        ops = get_ops(params, framework="torch", where="Monitor.after_step")
        deltas = torch._foreach_sub(params, snapshot)
        param_norms = ops.norms(params, 2.0).to(torch.float32)
        update_norms = ops.norms(deltas, 2.0).to(torch.float32)
        # ‖ΔW‖ / ‖W‖; a zero parameter norm gives 0 for no update and inf for any update.
        positive = param_norms > 0
        ratios = torch.where(positive, update_norms / torch.where(positive, param_norms, 1.0), update_norms * math.inf)
        ratios = torch.where(update_norms == 0, torch.zeros_like(ratios), ratios)
        if self._pending and self._awaiting_update:
            step, row, sections = self._pending[-1]
            extra = torch.cat([param_norms, update_norms, ratios]).to(row.device)
            self._pending[-1] = (step, torch.cat([row, extra]), (*sections, "updates"))
        self._awaiting_update = False
        if len(self._pending) >= self.every:
            self.flush()
        return list(self._layer_names or []), param_norms, update_norms, ratios

    def _torch_row(self, info: Any, layer_norms: Any):
        import torch

        device = info.norm.device
        norm = info.norm.detach().to(torch.float32)
        coef = info.coef.detach().to(device, torch.float32)
        values = [
            norm,
            norm * coef,
            info.threshold.detach().to(device, torch.float32),
            coef,
            info.clipped.detach().to(device, torch.float32),
            info.finite.detach().to(device, torch.float32),
            info.skip.detach().to(device, torch.float32),
        ]
        row = torch.stack(values)
        if self._layer_names:
            layers = self._layer_row(device, layer_norms)
            if layers is not None:
                row = torch.cat([row, layers])
        return row

    def _layer_row(self, device: Any, layer_norms: Any):
        import torch

        names = self._layer_names or []
        missing = torch.full((), _NO_GRAD, dtype=torch.float32, device=device)
        if layer_norms is not None:
            given_names, tensor = layer_norms
            parts = tensor.detach().to(device, torch.float32).unbind()
            position = {name: i for i, name in enumerate(given_names)}
            entries = [parts[position[n]] if n in position else missing for n in names]
            return torch.stack(entries)
        present = [(i, p.grad) for i, p in enumerate(self._layer_params) if getattr(p, "grad", None) is not None]
        if not present:
            warnings.warn(
                "Monitor.observe: none of the model's parameters has a gradient; was it called before "
                "backward() (or after zero_grad())? Layer norms are recorded as missing.",
                RuntimeWarning,
                stacklevel=4,
            )
            return torch.stack([missing] * len(names))
        from gradclip._core.ops import get_ops

        grads = [g.detach() for _, g in present]
        ops = get_ops(grads, framework="torch", where="Monitor.observe")
        norms = ops.norms(grads, 2.0).to(device, torch.float32).unbind()
        entries = [missing] * len(names)
        for (index, _), value in zip(present, norms):
            entries[index] = value
        return torch.stack(entries)

    # -- fetching ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Fetch the pending steps from the device (one synchronisation) and write them."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        torch_rows = [row for _, row, _ in pending if not isinstance(row, tuple)]
        if torch_rows:
            import torch

            device = torch_rows[0].device
            width = max(r.numel() for r in torch_rows)
            if all(r.numel() == width for r in torch_rows):
                fetched = torch.stack([r.to(device, non_blocking=True) for r in torch_rows]).cpu().tolist()
            else:  # pragma: no cover - the layer set changed mid-batch; fetch one by one
                fetched = [r.cpu().tolist() for r in torch_rows]
            fetched_iter = iter(fetched)
        records = []
        for step, row, sections in pending:
            if isinstance(row, tuple):
                norm, threshold, coef, clipped, finite, skip = (np.asarray(v).item() for v in row[1][:6])
                values = [float(norm), float(norm) * float(coef), float(threshold), float(coef),
                          float(bool(clipped)), float(bool(finite)), float(bool(skip))]
            else:
                values = next(fetched_iter)
            records.append(self._record(step, values, sections))
        if not self._announced_layers:
            # Before the first write: a CSV lays out a column for every layer, including those
            # whose gradient first appears late in the run.
            self._announced_layers = True
            for writer in self.writers:
                announce = getattr(writer, "set_layer_names", None)
                if callable(announce):
                    announce(self.layer_names)
        for writer in self.writers:
            writer.write(records)
        self._check_rate()

    def _record(self, step: int, values: list[float], sections: tuple[str, ...] = ()) -> dict[str, Any]:
        record: dict[str, Any] = {"step": step}
        for key, value in zip(_ROW, values[: len(_ROW)]):
            record[key] = bool(value) if key in ("clipped", "finite", "skip") else float(value)
        self._totals["steps"] += 1
        self._totals["clipped"] += int(record["clipped"])
        self._totals["nonfinite"] += int(not record["finite"])
        self._totals["skipped"] += int(record["skip"])
        self._recent_clipped.append(record["clipped"])
        self._norms.append(record["norm"])
        if math.isfinite(record["threshold"]):
            self._last_threshold = record["threshold"]
        record["clip_rate"] = sum(self._recent_clipped) / len(self._recent_clipped)
        count = len(self._layer_names or [])
        rest = values[len(_ROW):]
        layer_values = rest[:count] if "layers" in sections else []
        if "updates" in sections:
            updates = rest[count if "layers" in sections else 0 :]
            names = self._layer_names or []
            for offset, key in enumerate(("param_norms", "update_norms", "update_ratios")):
                record[key] = dict(zip(names, updates[offset * count : (offset + 1) * count]))
        if self._layer_names and layer_values:
            layers = {}
            nonfinite = 0
            for name, value in zip(self._layer_names, layer_values):
                if value == _NO_GRAD:
                    continue
                layers[name] = value
                nonfinite += int(not math.isfinite(value))
                self._layer_history.setdefault(name, deque(maxlen=self.history)).append(value)
            record["layer_norms"] = layers
            record["nonfinite_layers"] = nonfinite
        return record

    def _check_rate(self) -> None:
        recent = self._recent_clipped
        if not recent:
            return
        rate = sum(recent) / len(recent)
        enough = len(recent) >= min(self.window, 10)
        if rate > 0.5 and enough and not self._warned_rate:
            self._warned_rate = True
            if self.warn:
                hint = ""
                finite = [n for n in self._norms if math.isfinite(n)]
                if finite:
                    hint = f" (median pre-clip norm {float(np.median(finite)):.4g}"
                    if self._last_threshold is not None:
                        hint += f", threshold {self._last_threshold:.4g}"
                    hint += ")"
                warnings.warn(
                    f"gradclip.Monitor: {rate:.0%} of the last {len(recent)} steps were clipped{hint}: "
                    "clipping has become a step-size limit rather than a guard against spikes. Raise "
                    "the threshold (see monitor.suggest()) or lower the learning rate.",
                    ClipRateWarning,
                    stacklevel=4,
                )
        elif rate <= 0.5:
            self._warned_rate = False

    # -- results -------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Steps fetched so far (pending steps are not counted until :meth:`flush`)."""
        return self._totals["steps"]

    def norms(self) -> list[float]:
        """The recent pre-clip global norms (up to ``history``), after a flush."""
        self.flush()
        return list(self._norms)

    def summary(self) -> dict[str, Any]:
        """Statistics of the run so far (flushes first).

        Returns:
            ``steps``, ``clipped_steps``, ``clip_rate`` (all steps), ``recent_clip_rate`` (last
            ``window``), ``nonfinite_steps``, ``skipped_steps``, ``threshold`` (last finite),
            ``norm_percentiles`` (``p10 p50 p90 p99 max`` of the recent finite pre-clip norms, or
            None) and ``layers``: per layer name, the same percentiles of its recent norms.
        """
        self.flush()
        steps = self._totals["steps"]
        recent = self._recent_clipped
        return {
            "steps": steps,
            "clipped_steps": self._totals["clipped"],
            "clip_rate": self._totals["clipped"] / steps if steps else 0.0,
            "recent_clip_rate": sum(recent) / len(recent) if recent else 0.0,
            "nonfinite_steps": self._totals["nonfinite"],
            "skipped_steps": self._totals["skipped"],
            "threshold": self._last_threshold,
            "norm_percentiles": _percentiles(self._norms),
            "layers": {name: _percentiles(values) for name, values in self._layer_history.items()},
        }

    def suggest(self, quantile: float = 0.9) -> ThresholdSuggestion:
        """Recommend a ``max_norm`` from the norms observed so far (see :func:`suggest_threshold`).

        The reasoning also reports how often the threshold in use clipped.
        """
        self.flush()
        return suggest_threshold(list(self._norms), quantile, current_threshold=self._last_threshold)

    def close(self) -> None:
        """Flush pending steps and close every writer; further :meth:`observe` calls raise."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for writer in self.writers:
                writer.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Monitor(every={self.every}, per_layer={self.per_layer}, updates={self.updates}, "
            f"writers={len(self.writers)}, steps={self.steps})"
        )
