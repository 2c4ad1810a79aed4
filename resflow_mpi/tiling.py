"""Pure tiling maths: the tile grid over a scene, owned windows, halo reads, work splitting.

A scene of ``width x height`` pixels is covered by a grid of tiles of ``tile_px`` owned pixels
(the last row/column of tiles is smaller). Every output pixel is owned by exactly one tile. The
network sees the owned window grown by ``halo_px`` on each side (context only), clipped to the
scene; the clipped part is padded by the pipeline so every network input has the same shape.
No I/O, no MPI: everything here is a function of integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence


class Window(NamedTuple):
    """A pixel window: column/row offset and size (GDAL's xoff, yoff, xsize, ysize order)."""

    col: int
    row: int
    width: int
    height: int

    def intersects(self, other: "Window") -> bool:
        return not (other.col >= self.col + self.width or other.col + other.width <= self.col
                    or other.row >= self.row + self.height or other.row + other.height <= self.row)


@dataclass(frozen=True)
class Tile:
    """One unit of work: where its owned pixels are and which (larger) window to read.

    ``pad`` = (top, bottom, left, right) pixels the reader must add to ``read`` so the network input
    is ``(tile_px + 2*halo_px)`` square; ``crop`` is the owned window inside that padded input.
    """

    scene: int          # index of the scene in the run's scene list
    index: int          # tile index within the scene, row-major over the grid
    grid_row: int
    grid_col: int
    owned: Window
    read: Window
    pad: tuple[int, int, int, int]
    crop: Window

    @property
    def key(self) -> tuple[int, int]:
        return (self.scene, self.index)


GSD_TOLERANCE = 0.01  # a scene within 1 % of the target ground sample distance is read as it is


@dataclass(frozen=True)
class PixelGrid:
    """A raster's pixel grid: size and GDAL geotransform."""

    width: int
    height: int
    geotransform: tuple[float, ...]


def resampled_grid(grid: PixelGrid, sides_m: tuple[float, float], gsd_m: float
                   ) -> Optional[PixelGrid]:
    """The grid covering the same ground as ``grid`` with pixels of ``gsd_m`` metres, given the
    ground lengths ``sides_m`` of one pixel step along a row and along a column; None when the
    grid is already within ``GSD_TOLERANCE`` of it. The extent is kept exactly (the pixel size
    absorbs the rounding of the size), so masks map back onto the scene's own grid."""
    sx, sy = sides_m[0] / gsd_m, sides_m[1] / gsd_m
    if abs(sx - 1.0) <= GSD_TOLERANCE and abs(sy - 1.0) <= GSD_TOLERANCE:
        return None
    width, height = max(1, round(grid.width * sx)), max(1, round(grid.height * sy))
    return PixelGrid(width, height, scaled_geotransform(grid.geotransform, grid.width / width,
                                                        grid.height / height))


def window_on_grid(w: Window, src: tuple[int, int], dst: tuple[int, int]) -> Window:
    """Window ``w`` of a (width, height) ``src`` grid on a ``dst`` grid of the same extent: the
    smallest whole-pixel window covering it (origin rounded down, far edge up), clipped."""
    fx, fy = dst[0] / src[0], dst[1] / src[1]
    c0, r0 = math.floor(w.col * fx + 1e-9), math.floor(w.row * fy + 1e-9)
    c1 = min(dst[0], math.ceil((w.col + w.width) * fx - 1e-9))
    r1 = min(dst[1], math.ceil((w.row + w.height) * fy - 1e-9))
    return Window(c0, r0, max(1, c1 - c0), max(1, r1 - r0))


def scaled_geotransform(gt: tuple[float, ...], factor_x: float, factor_y: float) -> tuple[float, ...]:
    """The geotransform of a raster whose pixel is ``factor_x`` x ``factor_y`` source pixels, same
    origin: every term that multiplies a column (gt[1], gt[4]) scales with factor_x, every term that
    multiplies a row (gt[2], gt[5]) with factor_y, so rotated grids stay exact."""
    return (gt[0], gt[1] * factor_x, gt[2] * factor_y, gt[3], gt[4] * factor_x, gt[5] * factor_y)


def grid_shape(width: int, height: int, tile_px: int) -> tuple[int, int]:
    """Rows and columns of tiles needed to cover ``width x height`` with ``tile_px`` tiles."""
    if tile_px <= 0:
        raise ValueError(f"tile_px must be positive, got {tile_px}")
    if width <= 0 or height <= 0:
        raise ValueError(f"scene size must be positive, got {width}x{height}")
    return (height + tile_px - 1) // tile_px, (width + tile_px - 1) // tile_px


def make_tile(scene: int, grid_row: int, grid_col: int, width: int, height: int,
              tile_px: int, halo_px: int) -> Tile:
    """The tile at (grid_row, grid_col): owned window, clipped halo read window, padding, crop."""
    rows, cols = grid_shape(width, height, tile_px)
    if not (0 <= grid_row < rows and 0 <= grid_col < cols):
        raise IndexError(f"tile ({grid_row}, {grid_col}) outside grid {rows}x{cols}")
    c0, r0 = grid_col * tile_px, grid_row * tile_px
    ow, oh = min(tile_px, width - c0), min(tile_px, height - r0)
    rc0, rr0 = max(0, c0 - halo_px), max(0, r0 - halo_px)
    rc1, rr1 = min(width, c0 + ow + halo_px), min(height, r0 + oh + halo_px)
    full = tile_px + 2 * halo_px
    left, top = halo_px - (c0 - rc0), halo_px - (r0 - rr0)
    right, bottom = full - left - (rc1 - rc0), full - top - (rr1 - rr0)
    return Tile(scene=scene, index=grid_row * cols + grid_col, grid_row=grid_row, grid_col=grid_col,
                owned=Window(c0, r0, ow, oh), read=Window(rc0, rr0, rc1 - rc0, rr1 - rr0),
                pad=(top, bottom, left, right), crop=Window(halo_px, halo_px, ow, oh))


def tile_grid(scene: int, width: int, height: int, tile_px: int, halo_px: int) -> Iterator[Tile]:
    """All tiles of a scene in row-major order; together their owned windows cover it exactly once."""
    if halo_px < 0:
        raise ValueError(f"halo_px must be >= 0, got {halo_px}")
    rows, cols = grid_shape(width, height, tile_px)
    for r in range(rows):
        for c in range(cols):
            yield make_tile(scene, r, c, width, height, tile_px, halo_px)


def split_block(n: int, rank: int, size: int) -> range:
    """Contiguous share of ``n`` items for ``rank`` of ``size``; sizes differ by at most one."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def split_cyclic(n: int, rank: int, size: int) -> range:
    """Round-robin share of ``n`` items for ``rank`` of ``size``."""
    return range(rank, n, size)


def batches(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most ``batch_size`` items."""
    for i in range(0, len(items), batch_size):
        yield items[i:i + batch_size]
