"""Tiling maths: every pixel owned exactly once, halo clipped at borders, small scenes."""
from __future__ import annotations

import numpy as np
import pytest

from resflow_mpi.tiling import grid_shape, make_tile, split_block, split_cyclic, tile_grid


@pytest.mark.parametrize("w, h, tile, halo", [(256, 256, 64, 8), (300, 170, 64, 16),
                                              (50, 30, 64, 8), (1, 1, 16, 4), (129, 65, 64, 0)])
def test_every_pixel_owned_once(w: int, h: int, tile: int, halo: int) -> None:
    owner = np.zeros((h, w), np.int32)
    tiles = list(tile_grid(0, w, h, tile, halo))
    assert len(tiles) == np.prod(grid_shape(w, h, tile))
    for t in tiles:
        o = t.owned
        owner[o.row:o.row + o.height, o.col:o.col + o.width] += 1
        # The read window contains the owned window and stays inside the scene.
        r = t.read
        assert 0 <= r.col <= o.col and 0 <= r.row <= o.row
        assert r.col + r.width <= w and r.row + r.height <= h
        assert o.col + o.width <= r.col + r.width and o.row + o.height <= r.row + r.height
        # Padding brings every network input to the same size.
        top, bottom, left, right = t.pad
        assert r.height + top + bottom == tile + 2 * halo
        assert r.width + left + right == tile + 2 * halo
        # The crop points at the owned pixels inside the padded input.
        assert t.crop.col + (r.col - left) == o.col and t.crop.row + (r.row - top) == o.row
    assert (owner == 1).all()


def test_halo_clipped_at_scene_border() -> None:
    t = make_tile(0, 0, 0, 200, 200, 64, 16)
    assert t.read.col == 0 and t.read.row == 0 and t.pad[0] == 16 and t.pad[2] == 16
    inner = make_tile(0, 1, 1, 200, 200, 64, 16)
    assert inner.read == (48, 48, 96, 96) and inner.pad == (0, 0, 0, 0)
    last = make_tile(0, 3, 3, 200, 200, 64, 16)  # owned 192..200: 8 px
    assert last.owned.width == 8 and last.read.col + last.read.width == 200


def test_scene_smaller_than_tile_is_one_padded_tile() -> None:
    tiles = list(tile_grid(0, 40, 20, 64, 8))
    assert len(tiles) == 1
    t = tiles[0]
    assert t.owned == (0, 0, 40, 20) and t.read == (0, 0, 40, 20)
    assert t.pad == (8, 64 + 16 - 8 - 20, 8, 64 + 16 - 8 - 40)


@pytest.mark.parametrize("n, size", [(10, 3), (7, 2), (2, 3), (0, 2), (100, 7)])
def test_splits_partition_the_work(n: int, size: int) -> None:
    for split in (split_block, split_cyclic):
        got = sorted(i for r in range(size) for i in split(n, r, size))
        assert got == list(range(n))
    sizes = [len(split_block(n, r, size)) for r in range(size)]
    assert max(sizes) - min(sizes) <= 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        grid_shape(10, 10, 0)
    with pytest.raises(ValueError):
        list(tile_grid(0, 10, 10, 8, -1))
    with pytest.raises(IndexError):
        make_tile(0, 5, 0, 10, 10, 8, 0)
