"""One run over scenes in three CRSs (two UTM zones and EPSG:4326) on 2 ranks: every output keeps
its input's grid, masks equal each scene mapped alone, areas add up, and a merged EPSG:4326
polygon layer lies inside the scenes' footprints."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from osgeo import gdal, ogr

from resflow_mpi.synth import write_raster_from_array
from tests.conftest import resflow, write_config

pytestmark = pytest.mark.mpi
GRIDS = {  # name: (EPSG, geotransform) -- the same pixels placed in three coordinate systems
    "utm37": (32637, (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)),
    "utm33": (32633, (400000.0, 0.5, 0.0, 5000000.0, 0.0, -0.5)),
    "wgs84": (4326, (36.0, 4.5e-6, 0.0, 9.0, 0.0, -4.5e-6)),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, tiny_archive: Path,
          tiny_gallery: Path) -> dict:
    work = tmp_path_factory.mktemp("mixed")
    entries = json.loads(tiny_archive.read_text())
    src = gdal.Open(str(tiny_archive.parent / next(e for e in entries
                                                   if e["split"] == "test")["image"]))
    pixels = src.ReadAsArray()
    nodata = src.GetRasterBand(1).GetNoDataValue()
    scenes = [write_raster_from_array(work / f"{name}.tif", pixels, epsg, gt, nodata)
              for name, (epsg, gt) in GRIDS.items()]
    cfg = write_config(work / "all.yaml", scenes={"inputs": [str(s) for s in scenes],
                                                  "split": "all"},
                       models={"gallery": str(tiny_gallery)}, output={"dir": str(work / "all")})
    resflow(["run", str(cfg), "--quiet"], ranks=2)
    alone = []
    for s in scenes:
        out = work / f"alone-{s.stem}"
        resflow(["run", str(cfg), "--quiet", "--engine", "local", "--set",
                 f"scenes.inputs=['{s}']", "--set", f"output.dir={out}"])
        alone.append(out)
    return {"work": work, "scenes": scenes, "all": work / "all", "alone": alone}


def test_each_output_keeps_its_scene_grid(mixed: dict) -> None:
    report = json.loads((mixed["all"] / "run_report.json").read_text())
    assert [Path(s["path"]).name for s in report["scenes"]] == [p.name for p in mixed["scenes"]]
    for s in report["scenes"]:
        src = gdal.Open(s["path"])
        rasters = [p for p in s["outputs"] if "bucket" not in Path(p).name]
        assert rasters
        for p in rasters:
            ds = gdal.Open(p)
            assert (ds.RasterXSize, ds.RasterYSize) == (src.RasterXSize, src.RasterYSize)
            assert ds.GetGeoTransform() == src.GetGeoTransform()
            assert ds.GetSpatialRef().IsSame(src.GetSpatialRef())


def test_masks_equal_each_scene_mapped_alone(mixed: dict) -> None:
    with h5py.File(mixed["all"] / "masks.h5", "r") as f:
        together = [f[f"scenes/{i}/mask"][...] for i in range(len(mixed["scenes"]))]
    assert (together[0] == 1).any() and (together[0] == 0).any()
    for i, out in enumerate(mixed["alone"]):
        with h5py.File(out / "masks.h5", "r") as f:
            assert np.array_equal(f["scenes/0/mask"][...], together[i]), f"scene {i} differs"


def test_report_area_is_the_sum_of_scene_areas(mixed: dict) -> None:
    report = json.loads((mixed["all"] / "run_report.json").read_text())
    per_scene = [s["area_km2"] for s in report["scenes"]]
    assert all(a > 0 for a in per_scene)
    assert report["area_km2"] == pytest.approx(sum(per_scene), rel=1e-9)
    # The EPSG:4326 scene covers about the same ground as its UTM twins (0.5 m pixels).
    assert per_scene[2] == pytest.approx(per_scene[0], rel=0.02)


def test_merged_polygons_in_wgs84_lie_inside_the_scenes(mixed: dict) -> None:
    merged = mixed["work"] / "merged.gpkg"
    p = resflow(["vectorize", str(mixed["all"]), "--out", str(mixed["work"] / "vec"),
                 "--merged", str(merged)])
    assert "merged" in p.stdout
    ds = ogr.Open(str(merged))
    layer = ds.GetLayer(0)
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "4326"
    assert layer.GetFeatureCount() > 0
    footprints = ogr.Geometry(ogr.wkbMultiPolygon)
    for scene in mixed["scenes"]:
        info = gdal.Info(str(scene), format="json")
        footprints.AddGeometry(ogr.CreateGeometryFromJson(json.dumps(info["wgs84Extent"])))
    area = footprints.UnionCascaded().Buffer(1e-7)
    scenes_seen = set()
    for f in layer:
        assert area.Contains(f.GetGeometryRef()), f.GetField("scene")
        scenes_seen.add(f.GetField("scene"))
    assert len(scenes_seen) == 3


def test_image_gallery_keeps_extents_in_wgs84(tiny_gallery: Path) -> None:
    """Every tile's footprint is stored in EPSG:4326 as well as its scene's CRS, so searches and
    maps compare tiles across UTM zones."""
    from osgeo import osr

    from resflow_mpi.galleries import ImageGallery
    g = ImageGallery(tiny_gallery / "images.h5")
    assert g.extent_wgs84 is not None and g.extent_wgs84.shape == g.extent.shape
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    wgs84.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    for i in range(0, len(g.extent), max(1, len(g.extent) // 7)):
        src = osr.SpatialReference()
        src.ImportFromEPSG(int(g.scenes[int(g.scene[i])]["epsg"]))
        src.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        xmin, ymin, xmax, ymax = g.extent[i]
        lon, lat, _ = osr.CoordinateTransformation(src, wgs84).TransformPoint(
            (xmin + xmax) / 2, (ymin + ymax) / 2)
        lo_lon, lo_lat, hi_lon, hi_lat = g.extent_wgs84[i]
        assert -180 <= lo_lon < hi_lon <= 180 and -90 <= lo_lat < hi_lat <= 90
        assert lo_lon < lon < hi_lon and lo_lat < lat < hi_lat
    hit = g.search(g.codes[0], k=1)[0]
    assert hit["extent_wgs84"] == [float(v) for v in g.extent_wgs84[hit["tile"]]]
