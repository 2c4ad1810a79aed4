"""`scenes.aoi` end to end on 2 ranks (untrained gallery): a lon/lat polygon over one corner of a
UTM scene maps only the tiles it touches (the plan says how many), pixels outside it are nodata,
areas count only inside it, a second scene it misses is not mapped, and an AOI that misses every
scene is one line with nothing written."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from osgeo import gdal

from tests.conftest import resflow, write_config
from tests.integration.test_bad_inputs import GT, assert_clear_error, scene
from tests.unit.test_aoi import lonlat_polygon, write_geojson

pytestmark = pytest.mark.mpi
SIZE_PX = 192  # 9 tiles of 64 px, 0.5 m pixels
AOI_COLS, AOI_ROWS = (0, 100), (0, 70)


def _config(tmp_path: Path, gallery: Path, inputs: list[str], aoi: Path) -> Path:
    return write_config(tmp_path / "cfg.yaml",
                        scenes={"inputs": inputs, "split": "all", "aoi": str(aoi)},
                        models={"gallery": str(gallery)}, output={"dir": str(tmp_path / "out")},
                        tiling={"tile_px": 64, "halo_px": 8})


def test_aoi_limits_tiles_pixels_and_areas(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "S.tif", size=SIZE_PX)
    far_gt = (GT[0] + 5000.0, *GT[1:])  # 5 km east: outside the AOI
    far = scene(tmp_path / "far.tif", size=SIZE_PX)
    gdal.Open(str(far), gdal.GA_Update).SetGeoTransform(far_gt)
    aoi = write_geojson(tmp_path / "aoi.geojson", [lonlat_polygon(AOI_COLS, AOI_ROWS)])
    cfg = _config(tmp_path, unit_gallery, [str(s), str(far)], aoi)
    p = resflow(["run", str(cfg)], ranks=2)
    line = next(ln for ln in p.stderr.splitlines() if ln.startswith("AOI: "))
    assert line.startswith("AOI: 4 of 9 tiles intersect") and "1 scene(s) outside it" in line, line
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert [sc["path"] for sc in report["scenes"]] == [str(s)]
    assert report["aoi"]["scenes_outside"] == [str(far)]
    assert report["tiles"] == 9 and report["tiles_computed"] == 4
    aoi_km2 = (AOI_COLS[1] - AOI_COLS[0]) * (AOI_ROWS[1] - AOI_ROWS[0]) * 0.25 / 1e6
    assert report["aoi"]["area_km2"] == pytest.approx(aoi_km2, rel=1e-3)
    assert report["area_km2"] == pytest.approx(aoi_km2, rel=1e-3)
    assert report["invocation"]["area_km2"] == pytest.approx(aoi_km2, rel=1e-3)
    mask = gdal.Open(str(tmp_path / "out" / "S.resflow-mask.tif")).ReadAsArray()
    inside = np.zeros_like(mask, bool)
    inside[AOI_ROWS[0]:AOI_ROWS[1], AOI_COLS[0]:AOI_COLS[1]] = True
    assert (mask[~inside] == 255).all()
    assert (mask[inside] != 255).all()
    with h5py.File(tmp_path / "out" / "masks.h5", "r") as f:
        bucket = f["tiles/bucket"][:]
    assert int((bucket != -1).sum()) == 4, "tiles outside the AOI are never computed"


def test_aoi_missing_every_scene_is_one_line(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "S.tif", size=SIZE_PX)
    aoi = write_geojson(tmp_path / "elsewhere.geojson", [lonlat_polygon((5000, 5100), (0, 70))])
    p = resflow(["run", str(_config(tmp_path, unit_gallery, [str(s)], aoi))], ranks=2,
                check=False)
    assert_clear_error(p, str(aoi), "intersects none of the 1 scene(s) (scenes.aoi)")
    assert not (tmp_path / "out").exists()
