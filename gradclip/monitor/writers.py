"""Writers for :class:`gradclip.Monitor` records: JSON Lines, CSV and TensorBoard event files.

A writer is any object with ``write(records)`` (a list of step records, see
:mod:`gradclip.monitor` for the fields) and ``close()``. Records arrive in batches, once every
``every`` steps; each writer flushes its file after every batch. A writer may also have
``set_layer_names(names)``: the :class:`~gradclip.Monitor` calls it once, before its first
``write``, with every layer it tracks, in the model's order, so that a writer with a fixed layout
(:class:`CsvWriter`) has a place for a layer whose gradient first appears late in the run.

A closed writer refuses further writes (reopening its file would overwrite the log).
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from gradclip._core.errors import InvalidArgumentError

__all__ = ["JsonlWriter", "CsvWriter", "TensorBoardWriter", "read_log", "SCALAR_KEYS", "LAYER_GROUPS"]

#: The per-step scalar fields, in the order CSV columns and TensorBoard tags use.
SCALAR_KEYS = ("norm", "norm_after", "threshold", "coef", "clipped", "finite", "skip", "clip_rate")
# The per-layer count a record has when per-layer norms are recorded; after SCALAR_KEYS in CSV.
_COUNT_KEY = "nonfinite_layers"
#: The per-layer groups a record may hold (record key -> column/tag stem): gradient norms, and with
#: ``Monitor(updates=True)`` parameter norms, update norms and their ratio.
LAYER_GROUPS = (
    ("layer_norms", "layer_norm"),
    ("param_norms", "param_norm"),
    ("update_norms", "update_norm"),
    ("update_ratios", "update_ratio"),
)


def _check_path(where: str, name: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentError(
            f"{where}: {name} must be a path (str or os.PathLike), got {path!r} of type {type(path).__name__}"
        )
    return os.fspath(path)


def _refuse_closed(where: str, path: str) -> NoReturn:
    raise InvalidArgumentError(
        f"{where}: the writer of {path!r} is closed; create a new writer (reopening the file would "
        "overwrite the log)"
    )


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
        self._closed = False

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append ``records`` to the file, one line each.

        Raises:
            InvalidArgumentError: The writer is closed.
        """
        if self._closed:
            _refuse_closed("JsonlWriter.write", self.path)
        if self._file is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115
        for record in records:
            self._file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


class CsvWriter:
    """A wide table, one row per step, under one fixed header: ``pandas.read_csv(path)`` reads it as is.

    Columns: ``step``, the scalar fields (:data:`SCALAR_KEYS`), ``nonfinite_layers``, then one
    ``layer_norm/<name>`` column per layer (and, once a record brings them, one
    ``param_norm/<name>``, ``update_norm/<name>`` and ``update_ratio/<name>`` column per layer). With a :class:`~gradclip.Monitor` the layer columns
    are every layer the monitor tracks, in the model's order, known before the first row (the
    monitor calls :meth:`set_layer_names`): a layer whose gradient first appears late in the run
    has its column from the start, empty until then. Used on its own, a record that brings a layer
    the header lacks makes the writer rewrite the file once with that column appended (earlier
    rows get an empty cell): no value is dropped and every row has as many cells as the header.

    Cells: bools as ``0``/``1``; non-finite values as ``nan``/``inf`` (pandas reads both as
    floats); empty where a layer had no gradient that step or the field was not recorded (pandas:
    NaN), e.g. ``nonfinite_layers`` without per-layer norms.

    Args:
        path: The file to write (replaced); parent folders are created.

    Raises:
        InvalidArgumentError: ``path`` is not a path.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = _check_path("CsvWriter", "path", path)
        self._file: Any = None
        self._writer: Any = None
        self._layers: list[str] = []
        # The per-layer groups with columns: gradient norms always, update groups once seen.
        self._groups: list[tuple[str, str]] = [LAYER_GROUPS[0]]
        self._closed = False

    def set_layer_names(self, names: Sequence[str]) -> None:
        """Lay out a column for each of ``names`` (appended to the layers already known).

        Raises:
            InvalidArgumentError: ``names`` is not a list of str, or the writer is closed.
        """
        where = "CsvWriter.set_layer_names"
        if self._closed:
            _refuse_closed(where, self.path)
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise InvalidArgumentError(f"{where}: names must be a list of str (layer names), got {names!r}")
        self._add_layers(names)

    def _header(self) -> list[str]:
        return ["step", *SCALAR_KEYS, _COUNT_KEY, *(f"{stem}/{n}" for _, stem in self._groups for n in self._layers)]

    def _add_layers(self, names: Any) -> None:
        known = set(self._layers)
        new = [n for n in dict.fromkeys(names) if n not in known]
        if not new:
            return
        self._layers.extend(new)
        if self._file is not None:
            self._rewrite_with_header()

    def _rewrite_with_header(self) -> None:
        """Rewrite the file under the current header; earlier rows get empty cells in new columns.

        A CSV header cannot grow in place; the rewrite goes through a temporary file and
        ``os.replace``, so a crash in the middle leaves the old file whole.
        """
        self._file.close()
        with open(self.path, encoding="utf-8", newline="") as old:
            rows = list(csv.reader(old))
        old_header, rows = rows[0], rows[1:]
        header = self._header()
        # Cells move by column name: new columns may sit between old ones (one block per group).
        where = {name: index for index, name in enumerate(old_header)}
        temporary = self.path + ".tmp"
        with open(temporary, "w", encoding="utf-8", newline="") as new:
            writer = csv.writer(new)
            writer.writerow(header)
            for row in rows:
                writer.writerow([row[where[name]] if name in where and where[name] < len(row) else "" for name in header])
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer = csv.writer(self._file)

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        """Append one row per record (the first call creates the file and writes the header).

        Raises:
            InvalidArgumentError: The writer is closed.
        """
        if self._closed:
            _refuse_closed("CsvWriter.write", self.path)
        if not records:
            return
        brought: dict[str, None] = {}
        groups = list(self._groups)
        for record in records:
            for group in LAYER_GROUPS:
                values = record.get(group[0])
                if values:
                    brought.update(dict.fromkeys(values))
                    if group not in groups:
                        groups.append(group)
        grew = len(groups) != len(self._groups)
        self._groups = [group for group in LAYER_GROUPS if group in groups]
        if grew and self._file is not None and not set(brought) - set(self._layers):
            self._rewrite_with_header()
        self._add_layers(brought)  # before any row: at most one rewrite per batch
        if self._file is None:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8", newline="")  # noqa: SIM115
            self._writer = csv.writer(self._file)
            self._writer.writerow(self._header())
        for record in records:
            row = [record.get("step")]
            for key in (*SCALAR_KEYS, _COUNT_KEY):
                value = record.get(key)
                row.append(int(value) if isinstance(value, bool) else value)
            for key, _ in self._groups:
                values = record.get(key) or {}
                row.extend(values.get(name, "") for name in self._layers)
            self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardWriter:
    """TensorBoard event files, written with TensorBoard's own event writer.

    Scalars ``<prefix>norm``, ``<prefix>norm_after``, ``<prefix>threshold``, ``<prefix>coef``,
    ``<prefix>clipped``, ``<prefix>finite``, ``<prefix>skip``, ``<prefix>clip_rate`` and, with
    per-layer norms, ``<prefix>nonfinite_layers`` and ``<prefix>layer_norm/<name>`` (a layer
    without a gradient that step has no point there); with ``Monitor(updates=True)`` also
    ``<prefix>param_norm/<name>``, ``<prefix>update_norm/<name>`` and ``<prefix>update_ratio/<name>``. Needs the ``tensorboard`` package (not
    TensorFlow, not torch).

    Args:
        logdir: The run folder (created if needed): ``tensorboard --logdir`` on it or a parent.
        prefix: Prefix of every tag.

    Raises:
        InvalidArgumentError: ``logdir`` is not a path or ``prefix`` is not a str.
    """

    _counter = 0

    def __init__(self, logdir: str | os.PathLike, prefix: str = "gradclip/"):
        self.logdir = _check_path("TensorBoardWriter", "logdir", logdir)
        if not isinstance(prefix, str):
            raise InvalidArgumentError(
                f"TensorBoardWriter: prefix must be a str (e.g. 'gradclip/'), got {prefix!r} of type "
                f"{type(prefix).__name__}"
            )
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
        """Append one event per record.

        Raises:
            InvalidArgumentError: The writer is closed.
        """
        if self._writer is None:
            _refuse_closed("TensorBoardWriter.write", self.path)
        summary_pb2 = self._summary_pb2
        for record in records:
            values = []
            for key in (*SCALAR_KEYS, _COUNT_KEY):
                value = record.get(key)
                if value is not None:
                    values.append(summary_pb2.Summary.Value(tag=self.prefix + key, simple_value=float(value)))
            for key, stem in LAYER_GROUPS:
                for name, value in (record.get(key) or {}).items():
                    if value is not None:
                        values.append(
                            summary_pb2.Summary.Value(tag=f"{self.prefix}{stem}/{name}", simple_value=float(value))
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
