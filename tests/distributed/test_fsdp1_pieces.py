"""The row arithmetic of FSDP1 views (``gradclip/backends/torch_fsdp_units.py``), in one process.

A parameter flattened row-major is cut into consecutive pieces, as FSDP1's flat shards cut it
over the ranks (anywhere, empty pieces included). Every way of cutting small tensors into two
and three pieces must give, once the pieces' per-row partial sums are added (what the
all-reduce does): each row's sum of squares; each element of a piece its row's norm; and each
row counted exactly once by ``owned_sums``. The distributed runs are ``test_fsdp1_units.py``.
"""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from gradclip.backends.torch_fsdp_units import (
    owned_sums,
    per_element,
    piece_of,
    unit_sums,
    units_of,
)

SHAPES = [(4, 5), (3, 2, 2), (6,), (1, 5), (5, 1), ()]


def _cuts(numel: int, parts: int):
    """Every way of cutting ``range(numel)`` into ``parts`` consecutive (start, length) pieces."""
    for bounds in itertools.combinations_with_replacement(range(numel + 1), parts - 1):
        edges = (0, *bounds, numel)
        yield [(a, b - a) for a, b in itertools.pairwise(edges)]


def _whole_rows(tensor: torch.Tensor) -> torch.Tensor:
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    return (rows.double() ** 2).sum(1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("parts", [2, 3])
def test_pieces_rebuild_every_row(shape, parts):
    g = torch.Generator().manual_seed(len(shape) * 10 + parts)
    tensor = torch.randn(shape, generator=g, dtype=torch.float64)  # fp64: sums exact to rounding
    flat = tensor.reshape(-1)
    want = _whole_rows(tensor)
    first_unit = 3  # the parameter's place in its group's unit vector
    assert units_of(shape) == want.numel()
    for cut in _cuts(flat.numel(), parts):
        pieces = [piece_of("group", first_unit, shape, start, length, "p") for start, length in cut]
        vector = torch.zeros(first_unit + units_of(shape), dtype=torch.float64)
        for (start, length), piece in zip(cut, pieces):
            index, sums = unit_sums(flat[start : start + length], piece)
            vector[index : index + sums.numel()] += sums
        torch.testing.assert_close(vector[first_unit:], want, rtol=1e-12, atol=1e-12)
        norms = vector.sqrt()
        counted = 0.0
        for (start, length), piece in zip(cut, pieces):
            index, sums = unit_sums(flat[start : start + length], piece)
            each = per_element(norms[index : index + sums.numel()], piece)
            assert each.shape == (length,)
            rows = [(start + j) // (flat.numel() // want.numel()) for j in range(length)]
            torch.testing.assert_close(each, want.sqrt()[rows] if rows else each, rtol=1e-12, atol=0.0)
            counted += float(owned_sums(each * each, piece))
        assert math.isclose(counted, float(want.sum()), rel_tol=1e-12), (cut, counted, float(want.sum()))


def test_a_piece_inside_one_row():
    """A piece strictly inside a row touches that one unit, and does not own it."""
    piece = piece_of("group", 0, (4, 10), 23, 5, "w")
    index, sums = unit_sums(torch.ones(5), piece)
    assert index == 2 and sums.tolist() == pytest.approx([5.0], rel=1e-6)  # fp32 row norm, squared
    assert per_element(torch.tensor([2.0]), piece).tolist() == [2.0] * 5
    assert float(owned_sums(torch.ones(5), piece)) == 0.0


def test_an_empty_piece_touches_nothing():
    piece = piece_of("group", 4, (4, 10), None, None, "w")
    _, sums = unit_sums(torch.ones(0), piece)
    assert sums.numel() == 0
    assert per_element(torch.ones(0, dtype=torch.float64), piece).numel() == 0
    assert float(owned_sums(torch.ones(0), piece)) == 0.0
