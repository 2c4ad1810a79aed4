"""The area of interest's geometry (io/aoi.py) on real OGR files: reprojection from lon/lat onto
a UTM scene grid (axis order), each tile's share inside, the per-window rasterisation, and the
one-line errors for a missing, unreadable, polygon-less or CRS-less file."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from osgeo import ogr, osr

from resflow_mpi.errors import InputError
from resflow_mpi.io.aoi import inside_mask, load_aoi, scene_aoi
from resflow_mpi.tiling import Window

EPSG = 32637
GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)
TILE_PX = 64


def lonlat_polygon(cols: tuple[float, float], rows: tuple[float, float], epsg: int = EPSG,
                   gt: tuple[float, ...] = GT) -> list[list[float]]:
    """A pixel rectangle of the scene grid as a lon/lat ring (GeoJSON order: lon, lat)."""
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(epsg)
    wgs84 = osr.SpatialReference()
    wgs84.ImportFromEPSG(4326)
    for srs in (utm, wgs84):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    ct = osr.CoordinateTransformation(utm, wgs84)
    ring = []
    for c, r in ((cols[0], rows[0]), (cols[1], rows[0]), (cols[1], rows[1]), (cols[0], rows[1]),
                 (cols[0], rows[0])):
        x, y = gt[0] + c * gt[1], gt[3] + r * gt[5]
        ring.append(list(ct.TransformPoint(x, y)[:2]))
    return ring


def write_geojson(path: Path, rings: list[list[list[float]]]) -> Path:
    """A GeoJSON (lon/lat, RFC 7946) FeatureCollection of polygons."""
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": {"type": "Polygon", "coordinates": [ring]}} for ring in rings]}))
    return path


def test_lonlat_aoi_on_a_utm_grid(tmp_path: Path) -> None:
    aoi = load_aoi(str(write_geojson(tmp_path / "aoi.geojson",
                                     [lonlat_polygon((0, 100), (0, 70))])))
    on = scene_aoi(aoi, _wkt(EPSG), GT, 192, 192, TILE_PX)
    assert on is not None
    assert on.inside.shape == (3, 3)
    # tiles (row, col) 0,0 whole; 0,1 / 1,0 / 1,1 partly; the rest outside
    assert on.inside[0, 0] == 1.0
    assert on.inside[0, 1] == pytest.approx(36 / 64, abs=1e-3)
    assert on.inside[1, 0] == pytest.approx(6 / 64, abs=1e-3)
    assert on.inside[1, 1] == pytest.approx(36 * 6 / 64 ** 2, abs=1e-3)
    assert (on.inside[2, :] == 0).all() and (on.inside[:, 2] == 0).all()
    assert on.tiles_intersecting == 4 and set(on.edges) == {1, 3, 4}
    assert on.area_km2 == pytest.approx(100 * 70 * 0.25 / 1e6, rel=1e-3)
    # the per-window rasterisation agrees with the share (pixel centres)
    w = Window(64, 0, 64, 64)
    mask = inside_mask(on.edges[1], _wkt(EPSG), GT, w)
    assert mask.shape == (64, 64)
    assert mask[:, :36].all() and not mask[:, 36:].any()
    assert mask.mean() == pytest.approx(on.inside[0, 1], abs=1e-3)


def test_aoi_missing_the_scene(tmp_path: Path) -> None:
    aoi = load_aoi(str(write_geojson(tmp_path / "far.geojson",
                                     [lonlat_polygon((1000, 1100), (0, 70))])))
    assert scene_aoi(aoi, _wkt(EPSG), GT, 192, 192, TILE_PX) is None


def _wkt(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def _gpkg(path: Path, geometry_wkt: str, srs: osr.SpatialReference | None) -> Path:
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = ds.CreateLayer("aoi", srs=srs, geom_type=ogr.wkbUnknown)
    f = ogr.Feature(layer.GetLayerDefn())
    f.SetGeometry(ogr.CreateGeometryFromWkt(geometry_wkt))
    layer.CreateFeature(f)
    ds = None
    return path


@pytest.mark.parametrize("case,fragment", [
    ("missing", "area of interest not found (scenes.aoi)"),
    ("unreadable", "not a readable vector file"),
    ("points", "has no polygons"),
    ("no_crs", "has no CRS (scenes.aoi)"),
    ("undefined_crs", "has no CRS (scenes.aoi)"),
])
def test_aoi_errors_are_one_line(tmp_path: Path, case: str, fragment: str) -> None:
    utm = osr.SpatialReference()
    utm.ImportFromEPSG(EPSG)
    path = {"missing": lambda: tmp_path / "absent.gpkg",
            "unreadable": lambda: _write(tmp_path / "junk.geojson", "not json at all"),
            "points": lambda: _gpkg(tmp_path / "p.gpkg", "POINT (500010 999990)", utm),
            "no_crs": lambda: _shapefile(tmp_path / "n.shp", "POLYGON ((0 0,1 0,1 1,0 1,0 0))"),
            "undefined_crs": lambda: _gpkg(tmp_path / "u.gpkg",
                                           "POLYGON ((0 0,1 0,1 1,0 1,0 0))", None)}[case]()
    with pytest.raises(InputError) as err:
        load_aoi(str(path))
    line = str(err.value)
    assert "\n" not in line and str(path) in line and fragment in line, line


def _shapefile(path: Path, geometry_wkt: str) -> Path:
    """A Shapefile without a .prj (no CRS)."""
    ds = ogr.GetDriverByName("ESRI Shapefile").CreateDataSource(str(path))
    layer = ds.CreateLayer(path.stem, geom_type=ogr.wkbPolygon)
    f = ogr.Feature(layer.GetLayerDefn())
    f.SetGeometry(ogr.CreateGeometryFromWkt(geometry_wkt))
    layer.CreateFeature(f)
    ds = None
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_fraction_matches_rasterised_pixels_on_a_rotated_aoi(tmp_path: Path) -> None:
    """A diamond over the grid: each tile's share equals its rasterised pixel share (1 px of
    boundary per 64 px edge at most)."""
    utm_ring = [(96, 4), (188, 96), (96, 188), (4, 96), (96, 4)]
    ring = [lonlat_polygon((c, c), (r, r))[0] for c, r in utm_ring]
    aoi = load_aoi(str(write_geojson(tmp_path / "diamond.geojson", [ring])))
    on = scene_aoi(aoi, _wkt(EPSG), GT, 192, 192, TILE_PX)
    assert on is not None and on.tiles_intersecting == 9
    for index, wkb in on.edges.items():
        r, c = divmod(index, 3)
        share = inside_mask(wkb, _wkt(EPSG), GT, Window(c * 64, r * 64, 64, 64)).mean()
        assert share == pytest.approx(on.inside[r, c], abs=2 / 64)
    assert np.isclose(on.inside.sum() * 64 * 64, 0.5 * 184 * 184, rtol=1e-3)


def test_report_names_the_aoi() -> None:
    from resflow_mpi.report import _aoi_section
    html = _aoi_section({"aoi": {"path": "/data/aoi.gpkg", "tiles_intersecting": 1234,
                                 "tiles_total": 5000, "area_km2": 12.5,
                                 "scenes_outside": ["/data/far.tif"]}})
    assert "Area of interest" in html and "/data/aoi.gpkg" in html
    assert "1234 of 5000" in html and "12.500 km2" in html and "/data/far.tif" in html
    assert _aoi_section({}) == ""
