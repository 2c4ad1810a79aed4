"""Pixel validity through every route that asks for it: training crops (init.data.sample_tiles),
runs and evaluation (WindowReader.read_tile over the tile grid), the nodata prescan
(tile_coverage) and scene statistics must mark the same pixels valid, for scenes with a mask band,
an alpha band, NaN nodata, per-band nodata, a scenes.nodata override and blank-fill collars.
Every scene is a real GeoTIFF made here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.config import config_from_dict
from resflow_mpi.init.data import sample_tiles
from resflow_mpi.io.labels import IGNORE, LabelSpec
from resflow_mpi.io.raster import prepare_scene, scene_statistics, tile_coverage
from tests.unit.test_scene_semantics import (BANDS, GT, _wkt, expected_coverage, make_scene,
                                             pixels, tiled_validity)

H, W, CROP_PX = 70, 100, 32


def _label(path: Path) -> LabelSpec:
    """A 0/1 raster label on the scene grid with no ignore pixel."""
    ds = gdal.GetDriverByName("GTiff").Create(str(path), W, H, 1, gdal.GDT_Byte)
    ds.SetProjection(_wkt(32637))
    ds.SetGeoTransform(GT)
    ds.GetRasterBand(1).WriteArray((np.indices((H, W)).sum(0) % 7 == 0).astype(np.uint8))
    ds = None
    return LabelSpec(str(path))


def mask_band(tmp: Path) -> tuple[Path, dict[str, Any]]:
    keep = np.ones((H, W), bool)
    keep[:, :30] = False
    keep[40:50, 60:90] = False
    return make_scene(tmp / "s.tif", pixels(), mask=keep), {}


def alpha_band(tmp: Path) -> tuple[Path, dict[str, Any]]:
    alpha = np.full((H, W), 255, np.uint8)
    alpha[:25] = 0
    alpha[np.arange(H), np.arange(H)] = 0
    return make_scene(tmp / "s.tif", pixels(), alpha=alpha), {}


def nan_nodata(tmp: Path) -> tuple[Path, dict[str, Any]]:
    arr = pixels().astype(np.float32)
    arr[:, 40:, :50] = np.nan
    arr[1, 5:9, 70:95] = np.nan  # one band only: NaN is never a value
    return make_scene(tmp / "s.tif", arr, nodata=float("nan")), {
        "normalization": {"value_max": 255.0}}


def per_band_nodata(tmp: Path) -> tuple[Path, dict[str, Any]]:
    arr = pixels()
    arr[0, :, :40] = 0     # band 1's nodata alone: data (a dark pixel)
    arr[1, 30:, :40] = 7   # and band 2's nodata too: nodata (band 3 declares none)
    vrt = tmp / "s.vrt"  # a GeoTIFF holds one nodata value; a VRT holds one per band
    ds = gdal.BuildVRT(str(vrt), [str(make_scene(tmp / "s.tif", arr))])
    ds.GetRasterBand(1).SetNoDataValue(0)
    ds.GetRasterBand(2).SetNoDataValue(7)
    ds = None
    return vrt, {}


def nodata_override(tmp: Path) -> tuple[Path, dict[str, Any]]:
    arr = pixels()
    arr[:, 10:30, 20:80] = 5
    arr[0, 50:60, :] = 5  # one band only: data
    return make_scene(tmp / "s.tif", arr, nodata=0), {"scenes": {"nodata": 5}}


def blank_fill_collars(tmp: Path) -> tuple[Path, dict[str, Any]]:
    arr = pixels()
    arr[:, :, :20] = 255          # a white collar, crossing crop edges
    arr[:, 60:, :] = 252          # a bottom collar in the JPEG fringe
    arr[:, 30:33, 50:58] = 255    # a short bright roof: data
    return make_scene(tmp / "s.tif", arr), {
        "scenes": {"blank_fill": True, "blank_fill_min_run_px": 16,
                   "blank_fill_values": [[250, 255]]}}


SCENES: dict[str, Callable[[Path], tuple[Path, dict[str, Any]]]] = {
    "mask band": mask_band, "alpha band": alpha_band, "NaN nodata": nan_nodata,
    "per-band nodata": per_band_nodata, "scenes.nodata override": nodata_override,
    "blank-fill collars": blank_fill_collars}


@pytest.mark.parametrize("make", SCENES.values(), ids=SCENES.keys())
def test_training_crops_and_runs_mark_the_same_pixels_valid(tmp_path: Path, make: Callable) -> None:
    path, sections = make(tmp_path)
    cfg = config_from_dict({"scenes": {"bands": list(BANDS), **sections.pop("scenes", {})},
                            **sections})
    info = prepare_scene(path, cfg)
    run_valid = tiled_validity(info, tile_px=32, halo_px=4)  # the run's (and evaluate's) reads
    assert 0 < run_valid.sum() < run_valid.size

    tiles, reports = sample_tiles([info], [_label(tmp_path / "label.tif")], [0], CROP_PX, 24,
                                  BANDS, cfg.normalization, cfg.labels, seed=3,
                                  building_fraction=0.0, min_valid=0.0)
    assert len(tiles.x) == 24 and np.isfinite(tiles.x).all()  # NaN never reaches the networks
    mixed = 0
    for y, (c, r, w, h) in zip(tiles.y, tiles.window):
        want = run_valid[r:r + h, c:c + w]
        assert np.array_equal(y != IGNORE, want), f"crop at col {c}, row {r}"
        mixed += bool(want.any() and not want.all())
    assert mixed >= 3  # the crops cross validity edges, not only whole valid/invalid areas

    # the nodata prescan and the statistics (undecimated) count the same pixels
    assert np.allclose(tile_coverage(info, 32, BANDS), expected_coverage(run_valid, 32))
    mean, _ = scene_statistics(info, BANDS, sample_px=max(H, W))
    raw = gdal.Open(str(path)).ReadAsArray()[:len(BANDS)].astype(np.float64)
    assert np.allclose(mean, raw[:, run_valid].mean(axis=1))
