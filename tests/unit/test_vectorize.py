"""Mask -> building polygons: counts, ground areas, CRS, filters, GeoJSON in WGS84, CLI expansion."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr

from resflow_mpi.errors import InputError
from resflow_mpi.cli import cmd_vectorize as vectorize_command
from resflow_mpi.io.vectorize import (expand_mask_inputs, merge_layers, output_paths,
                                      vectorize_mask)
from resflow_mpi.runtime.device import LAUNCHER_SIZE_VARS

gdal.UseExceptions()
ogr.UseExceptions()

PIXEL_M = 0.5
EPSG = 32637
ORIGIN = (500_000.0, 1_000_000.0)  # UTM 37N easting/northing of the upper-left corner
# (row0, row1, col0, col1) of the building rectangles, in pixels.
RECTANGLES = [(10, 20, 10, 30), (40, 60, 50, 55), (70, 90, 80, 110)]
SPECK = (30, 100)
PIXEL_AREA_M2 = PIXEL_M * PIXEL_M   # on the map (UTM metres)
RECT_AREAS_M2 = sorted((r1 - r0) * (c1 - c0) * PIXEL_AREA_M2 for r0, r1, c0, c1 in RECTANGLES)
# UTM's scale factor on its central meridian (easting 500 km): ground area = map area / k0^2.
UTM_K0 = 0.9996


def ground(map_areas_m2: list[float]) -> list[float]:
    """Ground areas (m2) of map areas on the central meridian, for comparison to 1e-6."""
    return pytest.approx([a / UTM_K0 ** 2 for a in map_areas_m2], rel=1e-6)


def write_mask(path: Path, labels: np.ndarray, bands: int = 1) -> Path:
    """A GeoTIFF mask on a 0.5 m UTM grid, nodata 255, like `resflow run` exports."""
    h, w = labels.shape
    ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, bands, gdal.GDT_Byte)
    ds.SetGeoTransform((ORIGIN[0], PIXEL_M, 0.0, ORIGIN[1], 0.0, -PIXEL_M))
    ds.SetProjection(f"EPSG:{EPSG}")
    for b in range(1, bands + 1):
        ds.GetRasterBand(b).SetNoDataValue(255)
        ds.GetRasterBand(b).WriteArray(labels)
    ds = None
    return path


def known_labels() -> np.ndarray:
    """Three rectangles, a one-pixel speck and a nodata border on background."""
    labels = np.zeros((100, 120), np.uint8)
    labels[:5, :] = 255
    labels[:, -4:] = 255
    for r0, r1, c0, c1 in RECTANGLES:
        labels[r0:r1, c0:c1] = 1
    labels[SPECK] = 1
    return labels


@pytest.fixture()
def mask_tif(tmp_path: Path) -> Path:
    return write_mask(tmp_path / "0000_scene_mask.tif", known_labels())


def read_layer(path: Path, layer_name: str | None = None) -> tuple[list[dict], str | None, int]:
    """Features (as attribute dicts with 'geom'), the layer's EPSG code and feature count."""
    ds = ogr.Open(str(path))
    layer = ds.GetLayerByName(layer_name) if layer_name else ds.GetLayer(0)
    feats = [dict(f.items(), geom=f.GetGeometryRef().Clone()) for f in layer]
    return feats, layer.GetSpatialRef().GetAuthorityCode(None), layer.GetFeatureCount()


def test_polygons_have_exact_pixel_areas_in_the_scene_crs(mask_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "buildings.gpkg"
    result = vectorize_mask(mask_tif, out)
    feats, epsg, count = read_layer(out, "buildings")
    assert result["polygons"] == count == len(RECTANGLES) + 1
    assert epsg == str(EPSG)
    areas = sorted(f["area_m2"] for f in feats)
    assert areas == ground([PIXEL_AREA_M2] + RECT_AREAS_M2)
    assert sorted(f["geom"].GetArea() for f in feats) == [PIXEL_AREA_M2] + RECT_AREAS_M2
    assert result["area_m2"] == pytest.approx(sum(areas))
    assert sorted(f["id"] for f in feats) == list(range(1, count + 1))
    assert not list(tmp_path.glob("*.partial*"))


def test_nodata_border_is_not_a_building(tmp_path: Path) -> None:
    labels = np.full((40, 40), 255, np.uint8)
    labels[10:20, 10:20] = 0
    out = tmp_path / "b.gpkg"
    result = vectorize_mask(write_mask(tmp_path / "x_mask.tif", labels), out)
    assert result["polygons"] == 0 and result["area_m2"] == 0.0
    assert read_layer(out, "buildings")[2] == 0


def test_min_area_drops_the_speck(mask_tif: Path, tmp_path: Path) -> None:
    out = tmp_path / "buildings.gpkg"
    result = vectorize_mask(mask_tif, out, min_area_m2=1.0)
    feats, _, count = read_layer(out, "buildings")
    assert result["polygons"] == count == len(RECTANGLES)
    assert result["dropped"] == 1
    assert sorted(f["area_m2"] for f in feats) == ground(RECT_AREAS_M2)


def test_simplify_straightens_a_staircase(tmp_path: Path) -> None:
    labels = np.zeros((60, 60), np.uint8)
    for r in range(10, 50):  # a right triangle with a one-pixel staircase hypotenuse
        labels[r, 10:r + 1] = 1
    mask = write_mask(tmp_path / "t_mask.tif", labels)
    raw = read_layer(Path(vectorize_mask(mask, tmp_path / "raw.gpkg")["gpkg"]))[0][0]
    simple = read_layer(Path(vectorize_mask(mask, tmp_path / "s.gpkg", simplify_m=1.0)["gpkg"]))[0][0]
    assert simple["geom"].GetGeometryRef(0).GetPointCount() < raw["geom"].GetGeometryRef(0).GetPointCount()
    assert simple["area_m2"] == pytest.approx(raw["area_m2"], rel=0.05)
    assert simple["geom"].IsValid()


def test_geojson_is_wgs84_with_the_same_features(mask_tif: Path, tmp_path: Path) -> None:
    gj = tmp_path / "buildings.geojson"
    result = vectorize_mask(mask_tif, tmp_path / "buildings.gpkg", geojson_path=gj)
    feats, epsg, count = read_layer(gj)
    assert result["geojson"] == str(gj)
    assert epsg == "4326" and count == result["polygons"]
    gj_ds = ogr.Open(str(gj))  # keep the dataset alive while its layer is used
    xmin, xmax, ymin, ymax = gj_ds.GetLayer(0).GetExtent()
    # Easting 500 km is zone 37's central meridian (39 E); northing 1000 km is about 9 N.
    assert 38.99 < xmin < xmax < 39.01 and 9.0 < ymin < ymax < 9.1
    assert sorted(f["area_m2"] for f in feats) == ground([PIXEL_AREA_M2] + RECT_AREAS_M2)


def test_bad_inputs_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        vectorize_mask(tmp_path / "missing_mask.tif", tmp_path / "o.gpkg")
    rgb = write_mask(tmp_path / "rgb.tif", known_labels(), bands=3)
    with pytest.raises(InputError, match="one-band Byte mask"):
        vectorize_mask(rgb, tmp_path / "o.gpkg")
    assert not (tmp_path / "o.gpkg").exists()


def test_directories_expand_to_masks_but_not_cogs(mask_tif: Path, tmp_path: Path) -> None:
    gdal.Translate(str(tmp_path / "0000_scene_mask_cog.tif"), str(mask_tif), format="COG")
    (tmp_path / "run_report.json").write_text("{}")
    assert expand_mask_inputs([tmp_path]) == [mask_tif.resolve()]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no \\*.resflow-mask.tif"):
        expand_mask_inputs([tmp_path / "empty"])
    assert output_paths(mask_tif, None)[0] == tmp_path / "0000_scene.resflow-buildings.gpkg"


def test_command_writes_beside_or_into_out(mask_tif: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for var in LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "vectors"
    args = argparse.Namespace(masks=[str(tmp_path)], out=str(out), min_area_m2=1.0,
                              simplify_m=0.0, geojson=True)
    assert vectorize_command(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("3 polygon(s)" in ln and "0000_scene_mask.tif" in ln for ln in lines)
    assert read_layer(out / "0000_scene.resflow-buildings.gpkg", "buildings")[2] == 3
    assert read_layer(out / "0000_scene.resflow-buildings.geojson")[2] == 3

    bad = argparse.Namespace(masks=[str(mask_tif), str(write_mask(tmp_path / "z.tif",
                                                                  known_labels(), bands=2))],
                             out=None, min_area_m2=0.0, simplify_m=0.0, geojson=False)
    assert vectorize_command(bad) == 2
    assert (tmp_path / "0000_scene.resflow-buildings.gpkg").is_file()
    assert "1 failed" in capsys.readouterr().out


def test_geographic_masks_get_areas_in_square_metres(tmp_path: Path) -> None:
    labels = np.zeros((50, 50), np.uint8)
    labels[10:30, 10:20] = 1
    deg = 1e-5  # about 1.11 m at the equator
    path = tmp_path / "geo_mask.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(path), 50, 50, 1, gdal.GDT_Byte)
    ds.SetGeoTransform((39.0, deg, 0.0, 0.0005, 0.0, -deg))
    ds.SetProjection("EPSG:4326")
    ds.WriteArray(labels)
    ds = None
    result = vectorize_mask(path, tmp_path / "geo.gpkg")
    metres_per_degree = 111_320.0
    expected_m2 = 200 * (deg * metres_per_degree) ** 2
    assert result["polygons"] == 1
    assert result["area_m2"] == pytest.approx(expected_m2, rel=0.01)
    assert read_layer(tmp_path / "geo.gpkg", "buildings")[1] == "4326"


@pytest.mark.parametrize("name, driver", [("all.shp", "ESRI Shapefile"), ("all.gpkg", "GPKG"),
                                          ("all.geojson", "GeoJSON")])
def test_merged_layer_is_written_in_the_format_its_extension_names(
        mask_tif: Path, tmp_path: Path, name: str, driver: str) -> None:
    result = vectorize_mask(mask_tif, tmp_path / "one.gpkg")
    merged = merge_layers([result["gpkg"]], tmp_path / name)
    ds = ogr.Open(merged["path"])
    assert ds.GetDriver().GetName() == driver
    layer = ds.GetLayer(0)
    assert layer.GetFeatureCount() == result["polygons"] == 4
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "4326"
    assert sorted(f.GetField("area_m2") for f in layer) == ground([PIXEL_AREA_M2] + RECT_AREAS_M2)
    if driver == "ESRI Shapefile":
        assert all((tmp_path / f"all{ext}").is_file() for ext in (".shx", ".dbf", ".prj"))
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_merged_path_problems_are_one_line_before_any_work(mask_tif: Path,
                                                          tmp_path: Path) -> None:
    def args(merged: str) -> argparse.Namespace:
        return argparse.Namespace(masks=[str(mask_tif)], out=str(tmp_path / "vec"),
                                  min_area_m2=0.0, simplify_m=0.0, geojson=False, merged=merged,
                                  merged_crs="EPSG:4326")
    (tmp_path / "adir.gpkg").mkdir()
    cases = [(tmp_path / "all.csv", "unsupported extension '.csv'; use one of .gpkg, .geojson"),
             (tmp_path / "noext", "unsupported extension '(none)'"),
             (tmp_path / "nodir" / "x.gpkg",
              f"folder {tmp_path / 'nodir'} does not exist; create it"),
             (tmp_path / "adir.gpkg", "is a directory")]
    for merged, says in cases:
        with pytest.raises(InputError, match=re.escape(f"--merged {merged}: {says}")):
            vectorize_command(args(str(merged)))
    assert not (tmp_path / "vec" / "0000_scene.resflow-buildings.gpkg").exists()
    bad_crs = args(str(tmp_path / "all.gpkg"))
    bad_crs.merged_crs = "EPSG:99999999"
    with pytest.raises(InputError, match="--merged-crs EPSG:99999999: not a known"):
        vectorize_command(bad_crs)
