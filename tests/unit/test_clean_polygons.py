"""Clean polygons: right-angle regularisation (pure, and through `resflow vectorize` on real GDAL
masks in a projected and a geographic CRS), and each polygon's confidence from the probability
COG beside the mask."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import shapely
from scipy import ndimage
from osgeo import gdal, ogr, osr
from shapely import affinity
from shapely.geometry import Polygon

from resflow_mpi.cli import cmd_vectorize
from resflow_mpi.io import geotiff
from resflow_mpi.io.export import PROBABILITY_NODATA, quantize_probability
from resflow_mpi.io.footprints import corner_angles_deg, dominant_angle_deg, regularize
from resflow_mpi.io.naming import MASK, PROBABILITY, output_file_name
from resflow_mpi.io.vectorize import vectorize_mask
from resflow_mpi.runtime.device import LAUNCHER_SIZE_VARS

gdal.UseExceptions()
ogr.UseExceptions()

PIXEL_M = 0.5
# An L of 40 x 40 px with a 20 x 20 px notch: area 1200 px.
L_SHAPE = Polygon([(0, 0), (40, 0), (40, 20), (20, 20), (20, 40), (0, 40)])
L_AREA_PX = 1200.0
ROTATION_DEG = 25.0


def jagged_labels(shape: Polygon, size: int, seed: int = 0) -> np.ndarray:
    """Pixels whose centres lie in ``shape`` (pixel coordinates: x = column, y = row), with a
    third of the boundary pixels flipped: a jagged, noisy outline as a segmentation gives."""
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    inside = shapely.contains_xy(shape, cols, rows)
    edge = inside ^ np.roll(inside, 1, 0) | inside ^ np.roll(inside, 1, 1)
    inside ^= edge & (np.random.default_rng(seed).random(inside.shape) < 0.3)
    return inside.astype(np.uint8)


def rotated_l(offset: float = 20.0) -> Polygon:
    return affinity.translate(affinity.rotate(L_SHAPE, ROTATION_DEG, origin=(20, 20)),
                              offset, offset)


def right_angled(ring: list, tol_deg: float = 0.5) -> bool:
    return all(abs(a - 90.0) <= tol_deg for a in corner_angles_deg(ring))


def read_features(path: Path) -> list[dict]:
    ds = ogr.Open(str(path))
    layer = ds.GetLayerByName("buildings")
    return [dict(f.items(), geom=f.GetGeometryRef().Clone()) for f in layer]


def test_pure_regularize_of_a_jagged_l_has_six_right_angles() -> None:
    rows, cols = np.nonzero(jagged_labels(rotated_l(), 80))
    pixels = shapely.union_all([shapely.box(c, r, c + 1, r + 1) for r, c in zip(rows, cols)])
    pixels = max(getattr(pixels, "geoms", [pixels]), key=lambda g: g.area)
    assert len(pixels.exterior.coords) > 60           # a staircase
    result = regularize(pixels, 1.5)
    ring = list(result.polygon.exterior.coords)
    assert result.method == "orthogonal" and len(ring) == 7 and right_angled(ring)
    assert result.polygon.area == pytest.approx(L_AREA_PX, rel=0.08)
    assert dominant_angle_deg(result.polygon) % 90 == pytest.approx(ROTATION_DEG, abs=2.0)


def test_a_near_rectangle_becomes_its_minimum_rotated_rectangle() -> None:
    rect = affinity.rotate(shapely.box(10, 10, 40, 25), 10, origin="centroid")
    bumpy = rect.union(shapely.box(24, 24, 25, 26.5))
    result = regularize(bumpy, 1.0)
    assert result.method == "rectangle" and len(result.polygon.exterior.coords) == 5
    assert right_angled(list(result.polygon.exterior.coords))


def write_raster(path: Path, data: np.ndarray, crs: int, gt: tuple, nodata: int | None) -> Path:
    return geotiff.write_array(path, data, crs, gt, nodata)


def test_vectorize_regularizes_in_metres_and_reads_confidence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A jagged rotated L and a speck in a UTM mask, with a probability COG beside it: one
    polygon with six right angles, the speck dropped by --min-area, confidence the L's mean."""
    for var in LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    labels = jagged_labels(rotated_l(), 100)
    labels[90, 90] = 1                                  # a speck of 0.25 m2
    gt = (500_000.0, PIXEL_M, 0.0, 1_000_000.0, 0.0, -PIXEL_M)
    mask = write_raster(tmp_path / output_file_name("s", MASK), labels, 32637, gt, 255)
    prob = np.where(labels == 1, 0.8, 0.1).astype(np.float32)
    nodata = np.zeros(labels.shape, bool)
    nodata[:, :45] = labels[:, :45] == 1                # part of the L has no probability
    prob[labels == 1] += np.where(np.arange(100) % 2 == 0, 0.1, -0.1)[None, :].repeat(100, 0)[
        labels == 1]                                    # 0.9 / 0.7 in alternate columns
    q = quantize_probability(prob, nodata)
    source = write_raster(tmp_path / "p.tif", q, 32637, gt, PROBABILITY_NODATA)
    geotiff.translate_cog(source, tmp_path / output_file_name("s", PROBABILITY))
    components, _ = ndimage.label(labels == 1)   # 4-connected, as GDAL polygonizes
    biggest = np.bincount(components.ravel())[1:].argmax() + 1
    expected = float(q[(components == biggest) & ~nodata].mean()) / 254

    args = argparse.Namespace(masks=[str(mask)], out=str(tmp_path / "v"), min_area_m2=1.0,
                              simplify_m=0.0, geojson=False, regularize=True)
    assert cmd_vectorize(args) == 0
    line = capsys.readouterr().out
    assert "confidence from s.resflow-probability.tif" in line and "right angles: 1 orthogonal" in line
    feats = read_features(tmp_path / "v" / "s.resflow-buildings.gpkg")
    assert len(feats) == 1
    ring = [tuple(p) for p in feats[0]["geom"].GetGeometryRef(0).GetPoints()]
    assert len(ring) == 7 and right_angled(ring)
    assert feats[0]["area_m2"] == pytest.approx(L_AREA_PX * PIXEL_M ** 2 / 0.9996 ** 2, rel=0.08)
    assert feats[0]["confidence"] == pytest.approx(expected, abs=1e-9)
    assert 0.75 < expected < 0.85

    (tmp_path / output_file_name("s", PROBABILITY)).unlink()
    result = vectorize_mask(mask, tmp_path / "plain.gpkg", min_area_m2=1.0)
    assert result["confidence"] is None
    feats = read_features(tmp_path / "plain.gpkg")
    assert feats[0]["confidence"] is None and len(feats[0]["geom"].GetGeometryRef(0).GetPoints()) > 20
    args.out = str(tmp_path / "w")
    assert cmd_vectorize(args) == 0
    assert "confidence empty: no probability COG" in capsys.readouterr().out


def test_geographic_mask_is_regularized_on_the_ground(tmp_path: Path) -> None:
    """At 60 degrees N a degree of longitude is half a degree of latitude on the ground: pixels
    of 1e-5 deg latitude x 2e-5 deg longitude are square there. The L's right angles must be
    right angles in a local metric projection, not in degrees."""
    lat0, lon0 = 60.0, 10.0
    dlat = 1e-5
    dlon = dlat / np.cos(np.radians(lat0))
    gt = (lon0, dlon, 0.0, lat0 + 0.0005, 0.0, -dlat)
    mask = write_raster(tmp_path / output_file_name("g", MASK), jagged_labels(rotated_l(), 100),
                        4326, gt, 255)
    result = vectorize_mask(mask, tmp_path / "g.gpkg", min_area_m2=5.0,
                            regularize_corners=True)
    assert result["polygons"] == 1 and result["regularized"] == {"orthogonal": 1}
    geom = read_features(tmp_path / "g.gpkg")[0]["geom"]
    wgs = osr.SpatialReference()
    wgs.ImportFromEPSG(4326)
    wgs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(32632)
    utm.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    geom.Transform(osr.CoordinateTransformation(wgs, utm))
    ring = [tuple(p) for p in geom.GetGeometryRef(0).GetPoints()]
    assert len(ring) == 7 and right_angled(ring, tol_deg=0.2)
    in_degrees = read_features(tmp_path / "g.gpkg")[0]["geom"]
    degrees = [tuple(p) for p in in_degrees.GetGeometryRef(0).GetPoints()]
    assert not right_angled(degrees, tol_deg=5.0)   # in degrees the corners are not square
