"""One ground resolution for the networks (scenes.gsd_m): the resampled grid keeps each scene's
extent, window reads average the file's pixels (nodata skipped), pixel sizes are ground metres in
any CRS, raster labels follow their scene, the gallery contract inherits or refuses another GSD,
and `resflow run` maps on the resampled grid but writes the mask on the scene file's own grid."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import ConfigError, InputError
from resflow_mpi.galleries import resolve_run_config
from resflow_mpi.io import geotiff
from resflow_mpi.io.area import GroundArea
from resflow_mpi.io.labels import LabelSpec, open_label_source
from resflow_mpi.io.raster import (SceneInfo, WindowReader, at_gsd, gsd_mismatch, gsd_note,
                                   gsd_summary, open_scene)
from resflow_mpi.tiling import PixelGrid, Window, resampled_grid
from tests.conftest import resflow, store_scenes, write_config

gdal.UseExceptions()
UTM = 32633
GT_025 = (500000.0, 0.25, 0.0, 4000000.0, 0.0, -0.25)


def _wkt(epsg: int) -> str:
    s = osr.SpatialReference()
    s.ImportFromEPSG(epsg)
    return s.ExportToWkt()


def _blocks(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(3, h, w) uint8 whose 2x2 blocks average to a whole number (pairs of v-1 and v+1)."""
    rng = np.random.default_rng(seed)
    v = rng.integers(2, 250, (3, height // 2, width // 2)).astype(np.int16)
    out = np.repeat(np.repeat(v, 2, 1), 2, 2)
    out[:, 0::2, 0::2] -= 1
    out[:, 1::2, 1::2] += 1
    return out.astype(np.uint8)


def test_resampled_grid_keeps_the_extent_and_skips_scenes_already_there() -> None:
    g = PixelGrid(1001, 799, GT_025)
    half = resampled_grid(g, (0.25, 0.25), 0.5)
    assert half is not None and (half.width, half.height) == (500, 400)  # round(500.5) == 500
    assert half.geotransform[0] == g.geotransform[0] and half.geotransform[3] == g.geotransform[3]
    assert math.isclose(half.width * half.geotransform[1], g.width * g.geotransform[1])
    assert math.isclose(half.height * half.geotransform[5], g.height * g.geotransform[5])
    assert resampled_grid(g, (0.25, 0.25), 0.2501) is None  # within 1 %: read as it is
    rotated = PixelGrid(100, 100, (0.0, 0.2, 0.1, 0.0, 0.1, -0.2))
    r = resampled_grid(rotated, (0.2236, 0.2236), 0.4472)
    assert r is not None and r.geotransform == pytest.approx((0.0, 0.4, 0.2, 0.0, 0.2, -0.4))


def test_pixel_sides_are_ground_metres_in_any_crs() -> None:
    utm = GroundArea(_wkt(32617)).pixel_sides_m((500000, 0.5, 0, 4000000, 0, -0.5), 10, 10)
    assert utm == pytest.approx((0.5 / 0.9996, 0.5 / 0.9996), rel=1e-4)  # UTM's scale factor
    sx, sy = GroundArea(_wkt(4326)).pixel_sides_m((10.0, 1e-5, 0, 60.0, 0, -1e-5), 0, 0)
    assert sx == pytest.approx(0.558, rel=5e-3) and sy == pytest.approx(1.114, rel=5e-3)


def test_a_geographic_scene_is_resampled_to_square_ground_pixels(tmp_path: Path) -> None:
    gt = (10.0, 1e-5, 0.0, 60.0, 0.0, -1e-5)  # ~0.56 m x 1.11 m at 60 N
    path = geotiff.write_array(tmp_path / "geo.tif", _blocks(200, 100), 4326, gt, None)
    info = at_gsd(open_scene(path), 1.0)
    assert info.native_grid is not None and info.native_grid.width == 200
    sx, sy = GroundArea(info.crs_wkt).pixel_sides_m(info.geotransform, info.width / 2,
                                                     info.height / 2)
    assert sx == pytest.approx(1.0, rel=0.02) and sy == pytest.approx(1.0, rel=0.02)
    assert info.area_km2 == pytest.approx(open_scene(path).area_km2, rel=1e-6)


def test_window_reads_average_the_file_and_skip_nodata(tmp_path: Path) -> None:
    pixels = _blocks(64, 48)
    pixels[:, :2, :2] = 0          # one whole nodata block
    pixels[:, 2:4, 2] = 0          # half a block nodata: the resampled pixel is nodata too
    path = geotiff.write_array(tmp_path / "s.tif", pixels, UTM, GT_025, 0)
    info = at_gsd(open_scene(path), 0.5)
    assert (info.width, info.height, info.resampling) == (32, 24, "average")
    assert info.file_grid == PixelGrid(64, 48, GT_025)
    reader = WindowReader(info, [1, 2, 3])
    arr, valid = reader.read_valid(Window(0, 0, 32, 24))
    expected = pixels.reshape(3, 24, 2, 32, 2).astype(float)
    expected = np.where(expected == 0, np.nan, expected)
    with warnings.catch_warnings():  # the all-nodata block has no mean
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(expected, axis=(2, 4))
    assert not valid[0, 0] and not valid[1, 1] and valid.sum() == 32 * 24 - 2
    assert np.abs(arr[:, valid].astype(float) - mean[:, valid]).max() <= 1.0
    reader.close()
    up = at_gsd(open_scene(path), 0.125)
    assert (up.width, up.height, up.resampling) == (128, 96, "bilinear")


def test_a_label_raster_follows_its_resampled_scene(tmp_path: Path) -> None:
    path = geotiff.write_array(tmp_path / "s.tif", _blocks(64, 48), UTM, GT_025, None)
    label = np.zeros((48, 64), np.uint8)
    label[8:24, 16:40] = 1
    lpath = geotiff.write_array(tmp_path / "s_mask.tif", label, UTM, GT_025, 255)
    info = at_gsd(open_scene(path), 0.5)
    cfg = config_from_dict({}).labels
    src = open_label_source(LabelSpec(str(lpath)), info, cfg)
    got = src.read_window(0, 0, info.width, info.height)
    assert got.shape == (24, 32) and (got == label[::2, ::2]).all()
    src.close()


def _manifest(gsd: object) -> dict:
    return {"bands": [1, 2, 3], "gsd_m": gsd, "_root": "/g"}


def test_the_gallery_contract_inherits_or_refuses_another_gsd() -> None:
    unset = config_from_dict({"scenes": {"inputs": ["x.tif"]}})
    assert resolve_run_config(_manifest(0.5), unset).scenes.gsd_m == 0.5
    other = config_from_dict({"scenes": {"inputs": ["x.tif"], "gsd_m": 0.3}})
    with pytest.raises(ConfigError, match=r"scenes.gsd_m is 0.3 but the gallery /g was trained "
                                          r"with 0.5"):
        resolve_run_config(_manifest(0.5), other)
    with pytest.raises(ConfigError, match=r"trained with null \(each scene at its own pixel size"):
        resolve_run_config(_manifest(None), other)
    assert resolve_run_config({"bands": [1, 2, 3]}, other).scenes.gsd_m == 0.3  # older gallery


def _info(tmp_path: Path, name: str, pixel_m: float) -> SceneInfo:
    gt = (500000.0, pixel_m, 0.0, 4000000.0, 0.0, -pixel_m)
    return open_scene(geotiff.write_array(tmp_path / name, _blocks(16, 16), UTM, gt, None))


def test_init_and_run_say_when_pixel_sizes_differ(tmp_path: Path) -> None:
    scenes = [_info(tmp_path, "a.tif", 0.25), _info(tmp_path, "b.tif", 1.0)]
    summary = gsd_summary(scenes)
    assert summary["min"] == pytest.approx(0.25, rel=1e-3)
    assert summary["max"] == pytest.approx(1.0, rel=1e-3)
    text, warn = gsd_note(summary, None)
    assert warn and "set scenes.gsd_m" in text
    text, warn = gsd_note(summary, 0.5)
    assert not warn and "resampled to 0.5 m" in text
    trained = gsd_summary(scenes[:1])
    assert "b.tif" in (gsd_mismatch(trained, scenes, None) or "")
    assert gsd_mismatch(trained, scenes, 0.5) is None
    assert gsd_mismatch(trained, scenes[:1], None) is None


def test_per_band_nodata_overrides_are_refused_with_resampling(tmp_path: Path) -> None:
    path = geotiff.write_array(tmp_path / "s.tif", _blocks(32, 32), UTM, GT_025, None)
    from resflow_mpi.io.raster import PixelRules
    info = at_gsd(open_scene(path, rules=PixelRules(nodata=(0.0, 1.0, 2.0))), 0.5)
    with pytest.raises(InputError, match="one nodata value for all bands"):
        WindowReader(info, [1, 2, 3])


def test_run_maps_resampled_and_exports_on_the_scene_grid(tmp_path: Path,
                                                          unit_gallery: Path) -> None:
    pixels = _blocks(192, 160, seed=3)
    pixels[:, :15, :15] = 0   # off the 2 x 2 grid: resampled pixels half over nodata
    pixels[:, 101:102, 57:60] = 0
    (tmp_path / "in").mkdir()
    scene = geotiff.write_array(tmp_path / "in" / "s.tif", pixels, UTM, GT_025, 0)
    cfg = write_config(tmp_path / "run.yaml",
                       scenes={"inputs": [str(scene)], "split": "all", "gsd_m": 0.5},
                       models={"gallery": str(unit_gallery)},
                       output={"dir": str(tmp_path / "out"), "probability": True})
    resflow(["run", str(cfg), "--quiet"])
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["ground_resolution"] == {"gsd_m": 0.5, "resampled_scenes": 1}
    store = store_scenes(report["h5_path"])[0]
    net = store["mask"]
    assert net.shape == (80, 96)
    assert tuple(store["attrs"]["native_geotransform"]) == GT_025
    out = gdal.Open(report["scenes"][0]["outputs"][0])
    assert (out.RasterXSize, out.RasterYSize) == (192, 160)
    assert out.GetGeoTransform() == pytest.approx(GT_025)
    mask = out.ReadAsArray()
    assert (mask == np.repeat(np.repeat(net, 2, 0), 2, 1)).all()  # nearest, back on the grid
    assert (mask[:16, :16] == 255).all() and set(np.unique(mask)) <= {0, 1, 255}
    nodata = (pixels == 0).all(0)
    assert (mask[nodata] == 255).all()  # a nodata pixel of the file is never mapped as data
    assert (mask == 255).sum() <= nodata.sum() + 2 * (15 + 15 + 3 + 1) + 4  # at most its border
    assert out.GetMetadataItem("RESFLOW_STORE_ID")
    prob = gdal.Open(str(tmp_path / "out" / "s.resflow-probability.tif"))
    assert (prob.RasterXSize, prob.RasterYSize) == (192, 160)
    assert prob.GetGeoTransform() == pytest.approx(GT_025)
    assert ((prob.ReadAsArray() == 255) == (mask == 255)).all()


def test_windows_move_between_grids_covering_what_they_covered() -> None:
    from resflow_mpi.tiling import window_on_grid
    assert window_on_grid(Window(32, 16, 64, 64), (96, 80), (192, 160)) == Window(64, 32, 128, 128)
    assert window_on_grid(Window(0, 0, 192, 160), (192, 160), (96, 80)) == Window(0, 0, 96, 80)
    # a window off the coarse grid's pixels is covered outward, never cut
    assert window_on_grid(Window(3, 5, 10, 10), (100, 100), (50, 50)) == Window(1, 2, 6, 6)
    assert window_on_grid(Window(95, 95, 5, 5), (100, 100), (33, 33)) == Window(31, 31, 2, 2)
