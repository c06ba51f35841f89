"""Unit-wise statistics (AGC's rows) of FSDP1 ``use_orig_params=True`` views.

Under FSDP1 each rank holds, for each original parameter, a 1-D view of a contiguous piece of
the parameter flattened row-major: elements ``start .. start + length - 1``. A unit of a weight
with ``ndim >= 2`` is a row (``Ops.unit_axis`` 0: ``row_length = numel / shape[0]`` elements);
a vector or scalar is one unit. A piece may begin and end inside a row, and a row may lie on
two ranks (or more, for short pieces).

So a unit's norm is formed in two steps: every rank sums ``|g|²`` per unit over the rows its
pieces touch (the rows cut at both ends included) into a vector holding *every* unit of its
shard group's parameters, zeros elsewhere; one all-reduce of that vector per shard group gives
each unit's whole sum on every rank (ranks without a piece join with zeros, so none waits).
Each element then carries its row's norm: a view's unit vector is as long as the view, so AGC's
per-unit rule and ``scale_units`` apply per element without any other layout. When the unit
vectors are summed (:func:`owned_sums`), each row counts once over the group: on the rank
holding its first element, at that element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Piece", "owned_sums", "per_element", "piece_of", "unit_sums", "units_of"]


class Piece(NamedTuple):
    """This rank's piece of one original parameter (see the module docstring)."""

    #: The shard group its units are summed over.
    group: Any
    #: Index of the parameter's first unit in its group's unit vector.
    first_unit: int
    #: Elements per unit (a row; the whole tensor for vectors and scalars).
    row_length: int
    #: Offset of the piece in the parameter flattened row-major, and its length.
    start: int
    length: int
    name: str


def piece_of(group: Any, first_unit: int, shape: Sequence[int], start: int | None, length: int | None, name: str) -> Piece:
    """The :class:`Piece` of a parameter of original ``shape`` (FSDP1's ``_shapes``) of which
    this rank holds ``length`` elements from ``start`` (``_shard_param_infos``; None: none)."""
    numel = math.prod(shape)
    row = numel // shape[0] if len(shape) >= 2 and shape[0] > 0 else numel
    return Piece(group, first_unit, row, start or 0, length or 0, name)


def units_of(shape: Sequence[int]) -> int:
    """How many units a parameter of original ``shape`` has: its rows, or one."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _rows(piece: Piece) -> tuple[int, int, int, int]:
    """``(first row, head, full rows, tail)``: the row the piece begins in, how many elements
    of it the piece holds when it begins inside it (else 0), then whole rows and the elements
    of a last, cut row."""
    start, length, row = piece.start, piece.length, piece.row_length
    if length == 0:
        return 0, 0, 0, 0
    first = start // row
    head = min(length, row - start % row) if start % row else 0
    full, tail = divmod(length - head, row)
    return first, head, full, tail


def _counts(piece: Piece) -> list[int]:
    """Elements of the piece in each unit it touches, in order."""
    _, head, full, tail = _rows(piece)
    return ([head] if head else []) + [piece.row_length] * full + ([tail] if tail else [])


def unit_sums(tensor: torch.Tensor, piece: Piece) -> tuple[int, torch.Tensor]:
    """This piece's ``Σ|g|²`` per unit it touches (fp64), and the index in its group's unit
    vector of the first of them: a cut head row, the whole rows as one reduction, a cut tail."""
    first, head, full, tail = _rows(piece)
    acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    flat = tensor.detach().reshape(-1)
    parts = []
    if head:
        parts.append(torch.linalg.vector_norm(flat[:head], 2, dtype=acc).reshape(1))
    if full:
        rows = flat[head : head + full * piece.row_length].view(full, piece.row_length)
        parts.append(torch.linalg.vector_norm(rows, 2, dim=1, dtype=acc))
    if tail:
        parts.append(torch.linalg.vector_norm(flat[piece.length - tail :], 2, dtype=acc).reshape(1))
    if not parts:
        return piece.first_unit, torch.zeros((0,), dtype=torch.float64, device=tensor.device)
    norms = torch.cat(parts).to(torch.float64) if len(parts) > 1 else parts[0].to(torch.float64)
    return piece.first_unit + first, norms * norms


def per_element(unit_norms: torch.Tensor, piece: Piece) -> torch.Tensor:
    """Each element of the piece with its unit's norm (``unit_norms``: the units it touches)."""
    counts = _counts(piece)
    if not counts:
        return unit_norms.new_zeros((0,))
    if len(counts) == 1:
        return unit_norms.expand(counts[0]).contiguous()
    repeats = torch.as_tensor(counts, device=unit_norms.device)
    return torch.repeat_interleave(unit_norms, repeats, output_size=piece.length)


def owned_sums(vector: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The sum of a per-element unit vector over the units this rank owns: those whose first
    element the piece holds, taken at that element (each unit counts once over the group)."""
    if piece.length == 0:
        return vector.new_zeros(())
    first = -piece.start % piece.row_length
    return vector[first :: piece.row_length].sum()
