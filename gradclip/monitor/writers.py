"""Writers for :class:`gradclip.Monitor` records: JSON Lines, CSV and TensorBoard event files.

A writer is any object with ``write(records)`` (a list of step records, see
:mod:`gradclip.monitor` for the fields) and ``close()``. Records arrive in batches, once every
``every`` steps; each writer flushes its file after every batch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from gradclip._core.errors import InvalidArgumentError

__all__ = ["JsonlWriter", "CsvWriter", "TensorBoardWriter", "read_log", "SCALAR_KEYS"]

#: The per-step scalar fields, in the order CSV columns and TensorBoard tags use.
SCALAR_KEYS = ("norm", "norm_after", "threshold", "coef", "clipped", "finite", "skip", "clip_rate")


def _check_path(where: str, name: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(f"{where}: {name} must be a path (str or os.PathLike), got {type(path).__name__}")
    return os.fspath(path)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by None.

    Strict JSON has no NaN or Infinity (``json.dumps`` writes them as bare tokens that ``jq``,
    JavaScript and most parsers reject), so gradclip's logs write ``null`` there.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class JsonlWriter:
    """One JSON object per step, one per line (the format ``gradclip suggest/report`` read).

    Args:
        path: The file to write; parent folders are created.
        append: Append to an existing file instead of replacing it.
    """

    def __init__(self, path: str | os.PathLike, append: bool = False):
        self.path = _check_path("JsonlWriter", "path", path)
        self.append = bool(append)
        self._file = None

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if self._file is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115
        for record in records:
            self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class CsvWriter:
    """One row per step: the scalar fields, then one ``layer_norm/<name>`` column per layer.

    The columns are fixed by the first batch written. Non-finite values are written as ``nan`` /
    ``inf``; a layer without a gradient that step leaves its cell empty.

    Args:
        path: The file to write; parent folders are created.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check_path("CsvWriter", "path", path)
        self._file = None
        self._writer: Any = None
        self._layers: list[str] = []

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        if self._file is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._writer = csv.writer(self._file)
            layers: dict[str, None] = {}
            for record in records:
                layers.update(dict.fromkeys(record.get("layer_norms", {}) or {}))
            self._layers = list(layers)
            self._writer.writerow(["step", *SCALAR_KEYS, *(f"layer_norm/{n}" for n in self._layers)])
        for record in records:
            layer_norms = record.get("layer_norms") or {}
            row = [record.get("step")]
            for key in SCALAR_KEYS:
                value = record.get(key)
                row.append(int(value) if isinstance(value, bool) else value)
            row.extend(layer_norms.get(name, "") for name in self._layers)
            self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter:
    """TensorBoard event files, written with TensorBoard's own event writer.

    Scalars ``<prefix>norm``, ``<prefix>norm_after``, ``<prefix>threshold``, ``<prefix>coef``,
    ``<prefix>clipped``, ``<prefix>finite``, ``<prefix>skip``, ``<prefix>clip_rate`` and, per layer,
    ``<prefix>layer_norm/<name>``. Needs the ``tensorboard`` package (not TensorFlow, not torch).

    Args:
        logdir: The run folder (created if needed): ``tensorboard --logdir`` on it or a parent.
        prefix: Prefix of every tag.
    """

    _counter = 0

    def __init__(self, logdir: str | os.PathLike, prefix: str = "gradclip/"):
        self.logdir = _check_path("TensorBoardWriter", "logdir", logdir)
        if not isinstance(prefix, str):
            raise InvalidArgumentError(f"TensorBoardWriter: prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "TensorBoardWriter needs the tensorboard package: pip install tensorboard"
            ) from error
        self._event_pb2 = event_pb2
        self._summary_pb2 = summary_pb2
        os.makedirs(self.logdir, exist_ok=True)
        # TensorBoard's file naming and record framing, written synchronously with a plain file
        # (EventFileWriter would import TensorFlow when it is installed, and add a thread).
        TensorBoardWriter._counter += 1
        self.path = os.path.join(
            self.logdir,
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{TensorBoardWriter._counter}",
        )
        self._writer: Any = RecordWriter(open(self.path, "wb"))  # noqa: SIM115
        self._writer.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        self._writer.flush()

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        if self._writer is None:
            raise InvalidArgumentError("TensorBoardWriter.write: the writer is closed")
        summary_pb2 = self._summary_pb2
        for record in records:
            values = []
            for key in SCALAR_KEYS:
                value = record.get(key)
                if value is not None:
                    values.append(summary_pb2.Summary.Value(tag=self.prefix + key, simple_value=float(value)))
            for name, value in (record.get("layer_norms") or {}).items():
                if value is not None:
                    values.append(
                        summary_pb2.Summary.Value(tag=f"{self.prefix}layer_norm/{name}", simple_value=float(value))
                    )
            event = self._event_pb2.Event(
                wall_time=time.time(), step=int(record["step"]), summary=summary_pb2.Summary(value=values)
            )
            self._writer.write(event.SerializeToString())
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON Lines log written by :class:`JsonlWriter`: one dict per step, in order.

    Blank lines are ignored.

    Raises:
        InvalidArgumentError: A line is not a JSON object (the message gives the line number).
    """
    path = _check_path("read_log", "path", path)
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InvalidArgumentError(f"read_log: {path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise InvalidArgumentError(f"read_log: {path}:{number} is not a JSON object")
            records.append(record)
    return records
