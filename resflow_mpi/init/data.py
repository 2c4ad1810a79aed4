"""Training tiles: windows sampled from training scenes with their ground-truth masks (GDAL reads)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..io.raster import SceneInfo, WindowReader, open_scene, with_statistics
from ..io.truth import TruthReader, mask_path_for
from ..pipeline import normalize_scene
from ..tiling import Window


@dataclass
class TileSet:
    """Training tiles: normalised inputs, masks (0/1, 255 nodata) and where they came from."""

    x: np.ndarray          # (N, C, S, S) float32
    y: np.ndarray          # (N, S, S) uint8
    scene: np.ndarray      # (N,) index into ``scenes``
    window: np.ndarray     # (N, 4) col, row, width, height
    extent: np.ndarray     # (N, 4) xmin, ymin, xmax, ymax in the scene CRS

    def subset(self, idx: np.ndarray) -> "TileSet":
        return TileSet(self.x[idx], self.y[idx], self.scene[idx], self.window[idx], self.extent[idx])

    @staticmethod
    def concat(parts: Sequence["TileSet"]) -> "TileSet":
        parts = [p for p in parts if len(p.x)]
        return TileSet(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("x", "y", "scene", "window", "extent")))


def sample_tiles(scenes: Sequence[SceneInfo], scene_ids: Sequence[int], tile_px: int,
                 per_scene: int, bands: Sequence[int], norm: Any, seed: int,
                 min_valid: float = 0.9) -> TileSet:
    """Up to ``per_scene`` non-overlapping grid windows per scene, mostly valid, reproducibly."""
    xs, ys, sc, wins, exts = [], [], [], [], []
    for sid in scene_ids:
        info = scenes[sid]
        mpath = mask_path_for(info.path)
        if not Path(mpath).is_file():
            raise InputError(f"{mpath}: ground-truth mask for {info.path} not found or unreadable "
                             "(init needs <scene>_mask.tif beside each training scene)")
        truth = TruthReader(info)   # checks the mask's size against its scene
        image = WindowReader(info, bands)
        rows, cols = info.height // tile_px, info.width // tile_px
        rng = np.random.default_rng([seed, sid])
        order = rng.permutation(rows * cols)
        taken = 0
        for cell in order:
            if taken >= per_scene:
                break
            r, c = divmod(int(cell), cols)
            w = Window(c * tile_px, r * tile_px, tile_px, tile_px)
            m = truth.read(w.col, w.row, w.width, w.height)
            if (m != 255).mean() < min_valid:
                continue
            xs.append(normalize_scene(image.read_window(w), info, norm))
            ys.append(m)
            sc.append(sid)
            wins.append(tuple(w))
            exts.append(info.window_extent(w))
            taken += 1
        truth.close()
        image.close()
    if not xs:
        c = len(bands)
        return TileSet(np.zeros((0, c, tile_px, tile_px), np.float32),
                       np.zeros((0, tile_px, tile_px), np.uint8), np.zeros(0, int),
                       np.zeros((0, 4), int), np.zeros((0, 4)))
    return TileSet(np.stack(xs), np.stack(ys), np.asarray(sc), np.asarray(wins), np.asarray(exts))


def open_scenes(paths: Sequence[str], bands: Sequence[int], mode: str = "range") -> list[SceneInfo]:
    """Header checks for every scene (fail fast, naming the file), statistics when needed."""
    return [with_statistics(open_scene(p, bands), bands, mode) for p in paths]
