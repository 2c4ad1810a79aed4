"""Training crops: random seeded windows of the training scenes with their labels (io.labels)."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..config import LabelsConfig
from ..errors import InputError
from ..io.labels import IGNORE, LabelSource, LabelSpec, LabelSummary, open_label_source
from ..io.raster import SceneInfo, WindowReader, prepare_scene
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
        full = [p for p in parts if len(p.x)]
        if not full:
            return parts[0]
        parts = full
        return TileSet(*(np.concatenate([getattr(p, f) for p in parts])
                         for f in ("x", "y", "scene", "window", "extent")))


@dataclass
class SceneCrops:
    """What one scene gave to training: counts, the label it came from, and warnings."""

    scene: str
    label: str
    label_kind: str
    requested: int
    taken: int
    building_centred: int
    capacity: int               # crops its valid area holds without overlap
    building_fraction: float    # of the scene's label
    ignore_fraction: float
    warnings: list[str] = field(default_factory=list)


def _empty_tiles(n_bands: int, tile_px: int) -> TileSet:
    return TileSet(np.zeros((0, n_bands, tile_px, tile_px), np.float32),
                   np.zeros((0, tile_px, tile_px), np.uint8), np.zeros(0, int),
                   np.zeros((0, 4), int), np.zeros((0, 4)))


RowBand = Optional[tuple[int, int]]


def _crop_origin(rng: np.random.Generator, info: SceneInfo, tile_px: int,
                 building_cells: Optional[np.ndarray], cell_px: int, grid_cols: int,
                 rows: tuple[int, int]) -> tuple[int, int]:
    """Top-left (col, row) of a crop inside the rows [first, end): uniform, or centred on a
    random pixel of a random coarse cell that holds building (flat indices into a grid of
    ``grid_cols`` columns)."""
    max_c, min_r, max_r = info.width - tile_px, rows[0], rows[1] - tile_px
    if building_cells is None:
        return int(rng.integers(0, max_c + 1)), int(rng.integers(min_r, max_r + 1))
    gr, gc = divmod(int(building_cells[rng.integers(len(building_cells))]), grid_cols)
    cy = min(info.height - 1, gr * cell_px + int(rng.integers(cell_px)))
    cx = min(info.width - 1, gc * cell_px + int(rng.integers(cell_px)))
    return int(np.clip(cx - tile_px // 2, 0, max_c)), int(np.clip(cy - tile_px // 2, min_r, max_r))


def _cells_in_rows(cells: np.ndarray, cell_px: int, grid_cols: int,
                   rows: tuple[int, int]) -> np.ndarray:
    """The building cells that start inside the rows [first, end)."""
    top = (cells // grid_cols) * cell_px
    return cells[(top >= rows[0]) & (top < rows[1])]


def sample_tiles(scenes: Sequence[SceneInfo], labels: Sequence[Optional[LabelSpec]],
                 scene_ids: Sequence[int], tile_px: int, per_scene: int, bands: Sequence[int],
                 norm: Any, labels_cfg: LabelsConfig, seed: int,
                 building_fraction: float = 0.5, min_valid: float = 0.9,
                 row_bands: Optional[Sequence[RowBand]] = None,
                 ) -> tuple[TileSet, list[SceneCrops]]:
    """``per_scene`` random crops per scene (seeded; crops may overlap), with their labels.
    ``row_bands`` (one per entry of ``scene_ids``, which may then repeat a scene): crops lie
    inside the band's rows [first, end), and the band gets its share of ``per_scene``.

    Each label is checked against its scene first (io.labels: InputError naming file and
    values). ``building_fraction`` of the crops are centred on a random building pixel (from
    the label's coarse building map) so rare buildings are not lost; the rest are uniform. A
    crop needs ``min_valid`` of its pixels labelled (not ignore, not image nodata)."""
    xs, ys, sc, wins, exts = [], [], [], [], []
    reports: list[SceneCrops] = []
    for unit, sid in enumerate(scene_ids):
        info, spec = scenes[sid], labels[sid]
        band = row_bands[unit] if row_bands is not None else None
        if spec is None:
            raise InputError(f"{info.path}: training scene has no label; give it one in the "
                             "manifest (label:), or set labels.file or labels.pattern")
        src = open_label_source(spec, info, labels_cfg)
        try:
            summary = src.check()
            tiles, rep = _scene_crops(info, src, summary, sid, tile_px, per_scene, bands, norm,
                                      seed, building_fraction, min_valid, band)
        finally:
            src.close()
        rep.warnings[:0] = summary.warnings
        reports.append(rep)
        for x, y, window, extent in tiles:
            xs.append(x)
            ys.append(y)
            sc.append(sid)
            wins.append(window)
            exts.append(extent)
    if not xs:
        return _empty_tiles(len(bands), tile_px), reports
    return (TileSet(np.stack(xs), np.stack(ys), np.asarray(sc), np.asarray(wins),
                    np.asarray(exts)), reports)


def _scene_crops(info: SceneInfo, src: LabelSource, summary: LabelSummary, sid: int,
                 tile_px: int, per_scene: int, bands: Sequence[int], norm: Any, seed: int,
                 building_fraction: float, min_valid: float, band: RowBand = None,
                 ) -> tuple[list[tuple[np.ndarray, np.ndarray, tuple[int, ...], tuple[float, ...]]],
                            SceneCrops]:
    name = os.path.basename(info.path)
    rows = band if band is not None else (0, info.height)
    if band is not None:
        name += f" rows {rows[0]}-{rows[1]}"
        per_scene = max(1, int(round(per_scene * (rows[1] - rows[0]) / info.height)))
    valid_px = info.width * info.height * (1.0 - summary.ignore_fraction)
    capacity = int(valid_px // (tile_px * tile_px))
    rep = SceneCrops(info.path, src.path, src.kind, per_scene, 0, 0, capacity,
                     summary.building_fraction, summary.ignore_fraction)
    if info.width < tile_px or rows[1] - rows[0] < tile_px:
        rep.warnings.append(f"scene {name} ({info.width}x{rows[1] - rows[0]} px) is smaller than "
                            f"training.tile_px={tile_px}; no crops taken from it")
        return [], rep
    positions = (info.width - tile_px + 1) * (rows[1] - rows[0] - tile_px + 1)
    target = min(per_scene, positions)
    cells = _cells_in_rows(np.flatnonzero(summary.building_cells.ravel()), summary.cell_px,
                           summary.building_cells.shape[1], rows)
    n_build = int(round(target * building_fraction)) if len(cells) else 0
    rng = np.random.default_rng([seed, sid] if band is None else [seed, sid, rows[0]])
    kinds = rng.permutation(np.r_[np.ones(n_build, bool), np.zeros(target - n_build, bool)])
    image = WindowReader(info, bands)
    taken: set[tuple[int, int]] = set()
    out = []
    sparse = repeats = 0
    for centred in kinds:
        for attempt in range(20):  # tries per crop before giving the slot up
            # Few building pixels near an edge give few distinct centred crops: fall back to
            # uniform positions rather than repeating one crop.
            use_cells = cells if centred and attempt < 10 else None
            c, r = _crop_origin(rng, info, tile_px, use_cells, summary.cell_px,
                                summary.building_cells.shape[1], rows)
            if (c, r) in taken:
                repeats += 1
                continue
            y = src.read_window(c, r, tile_px, tile_px)
            raw, valid = image.read_valid(Window(c, r, tile_px, tile_px))
            y[~valid] = IGNORE  # image nodata (raster.valid_pixels, as runs read it)
            if (y != IGNORE).mean() < min_valid:
                sparse += 1
                continue
            w = Window(c, r, tile_px, tile_px)
            out.append((normalize_scene(raw, info, norm), y, tuple(w), info.window_extent(w)))
            taken.add((c, r))
            rep.building_centred += int(use_cells is not None)
            break
    image.close()
    rep.taken = len(out)
    if rep.taken < target:
        rep.warnings.append(f"scene {name}: only {rep.taken} of {target} crops taken ({sparse} "
                            f"random position(s) had under {min_valid:.0%} labelled pixels, "
                            f"{repeats} repeated a crop; label {os.path.basename(src.path)}: "
                            f"{summary.ignore_fraction:.0%} ignore)")
    elif target < per_scene:
        rep.warnings.append(f"scene {name}: {per_scene} crops of {tile_px} px asked, it has only "
                            f"{positions} distinct positions; took {target}")
    return out, rep


def per_scene_reports(reports: Sequence[SceneCrops]) -> list[SceneCrops]:
    """One report per scene: the row bands of a scene (held-out and training parts) summed."""
    merged: dict[str, SceneCrops] = {}
    for r in reports:
        m = merged.get(r.scene)
        if m is None:
            merged[r.scene] = dataclasses.replace(r, warnings=list(r.warnings))
            continue
        m.requested += r.requested
        m.taken += r.taken
        m.building_centred += r.building_centred
        m.warnings += [w for w in r.warnings if w not in m.warnings]
    return list(merged.values())


def crop_warnings(reports: Sequence[SceneCrops], per_scene: int, tile_px: int) -> list[str]:
    """Warning lines for the init log: per-scene problems, and one line when the crop request
    exceeds what the scenes hold without overlap."""
    lines = [w for r in reports for w in r.warnings]
    over = [r for r in reports if r.taken and per_scene > r.capacity]
    if over:
        worst = min(over, key=lambda r: r.capacity)
        lines.append(f"training.tiles_per_scene={per_scene} is more than {len(over)} of "
                     f"{len(reports)} training scene(s) hold without overlap (e.g. "
                     f"{os.path.basename(worst.scene)}: {worst.capacity} crops of {tile_px} px); "
                     f"their crops overlap (random positions, each valid pixel in "
                     f"~{per_scene / max(worst.capacity, 1):.1f} crops there)")
    return lines


def open_scenes(paths: Sequence[str], cfg: Any) -> list[SceneInfo]:
    """Every scene opened with the run config's input semantics (nodata override, blank fill,
    float range, statistics), failing fast with the file named."""
    return [prepare_scene(p, cfg) for p in paths]
