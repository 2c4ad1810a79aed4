"""One area model, proven by a differential test: the same window's ground area through every
route (the area module, the scene's report area, the sum of its tiles, the progress line's
per-tile area, the vectorized polygon of a full-window mask) against an independent ellipsoidal
reference, in EPSG:4326, EPSG:3857 and UTM (also at a zone edge) at 0, 45 and 60 degrees.

The reference is computed here in numpy: the window's boundary, densified, in longitude and
latitude (EPSG:4326 and 3857 by their formulas; UTM through PROJ's inverse projection only),
mapped to the ellipsoid's cylindrical equal-area coordinates (longitude, authalic q(latitude)),
where the planar shoelace area is the ellipsoidal area."""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from osgeo import gdal, osr

from resflow_mpi.io.area import GroundArea
from resflow_mpi.io.raster import open_scene
from resflow_mpi.io.vectorize import vectorize_mask
from resflow_mpi.pipeline import km2_per_tile
from resflow_mpi.tiling import Window, tile_grid

gdal.UseExceptions()

WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
WGS84_E2 = WGS84_F * (2 - WGS84_F)
WGS84_B2 = WGS84_A ** 2 * (1 - WGS84_E2)
WIDTH, HEIGHT = 96, 80     # pixels of every case's window
TILE_PX = 32
# The issue asks every route to agree with the reference within 0.5 %; they agree within 1e-5.
REL_TOL = 1e-5


class Case(NamedTuple):
    name: str
    epsg: int
    lon: float       # window centre, degrees
    lat: float
    pixel: float     # pixel size in the CRS's units


CASES = [Case(f"{crs}-lat{lat}", epsg, lon, lat, pixel)
         for crs, epsg, lon, pixel in (("4326", 4326, 10.0, 5e-4), ("3857", 3857, 10.0, 50.0),
                                       ("utm33-centre", 32633, 15.0, 50.0),
                                       ("utm33-edge", 32633, 18.0, 50.0))
         for lat in (0, 45, 60)]
# Scene-scale windows several degrees wide, where a per-scene mean pixel area would be far off.
CASES += [Case("3857-wide-lat60", 3857, 10.0, 60.0, 4000.0),
          Case("4326-wide-lat60", 4326, 10.0, 60.0, 0.1)]


def srs_of(epsg: int) -> osr.SpatialReference:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def geotransform(case: Case) -> tuple[float, ...]:
    """A north-up geotransform whose window of WIDTH x HEIGHT pixels is centred on the case."""
    if case.epsg == 4326:
        x, y = case.lon, case.lat
    elif case.epsg == 3857:
        x = WGS84_A * math.radians(case.lon)
        y = WGS84_A * math.log(math.tan(math.pi / 4 + math.radians(case.lat) / 2))
    else:
        ct = osr.CoordinateTransformation(srs_of(4326), srs_of(case.epsg))
        x, y = ct.TransformPoint(case.lon, case.lat)[:2]
    return (x - WIDTH / 2 * case.pixel, case.pixel, 0.0, y + HEIGHT / 2 * case.pixel, 0.0,
            -case.pixel)


def authalic_q(lat_deg: np.ndarray) -> np.ndarray:
    """q(phi) of the WGS 84 ellipsoid: (lon, b^2/2 q) is an equal-area map of it."""
    s = np.sin(np.radians(lat_deg))
    e = math.sqrt(WGS84_E2)
    return s / (1 - WGS84_E2 * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)


def reference_m2(case: Case, gt: tuple[float, ...], per_edge: int = 4000) -> float:
    """Ellipsoidal area of the window, independent of resflow's area code (see module doc)."""
    t = np.arange(per_edge) / per_edge
    cols = np.concatenate([WIDTH * t, np.full(per_edge, WIDTH), WIDTH * (1 - t), np.zeros(per_edge)])
    rows = np.concatenate([np.zeros(per_edge), HEIGHT * t, np.full(per_edge, HEIGHT), HEIGHT * (1 - t)])
    x, y = gt[0] + cols * gt[1], gt[3] + rows * gt[5]
    if case.epsg == 4326:
        lon, lat = x, y
    elif case.epsg == 3857:
        lon = np.degrees(x / WGS84_A)
        lat = np.degrees(2 * np.arctan(np.exp(y / WGS84_A)) - math.pi / 2)
    else:
        ct = osr.CoordinateTransformation(srs_of(case.epsg), srs_of(4326))
        pts = np.asarray(ct.TransformPoints(np.column_stack([x, y]).tolist()))
        lon, lat = pts[:, 0], pts[:, 1]
    px, py = np.radians(lon), WGS84_B2 / 2 * authalic_q(lat)
    px, py = px - px.mean(), py - py.mean()   # products of small numbers: no cancellation
    return float(abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))) / 2)


def write_raster(path: Path, case: Case, bands: int, value: int) -> Path:
    """A real GeoTIFF of the case's window made by GDAL: ``bands`` Byte bands of random values
    (``value`` 0) or all ``value``."""
    ds = gdal.GetDriverByName("GTiff").Create(str(path), WIDTH, HEIGHT, bands, gdal.GDT_Byte)
    ds.SetProjection(srs_of(case.epsg).ExportToWkt())
    ds.SetGeoTransform(geotransform(case))
    rng = np.random.default_rng(0)
    for b in range(1, bands + 1):
        ds.GetRasterBand(b).WriteArray(rng.integers(1, 256, (HEIGHT, WIDTH), dtype=np.uint8)
                                       if value == 0 else np.full((HEIGHT, WIDTH), value, np.uint8))
    ds = None
    return path


def route_areas_m2(case: Case, tmp: Path) -> dict[str, float]:
    """The case's window area (m2) through every route that computes it."""
    scene = open_scene(write_raster(tmp / f"{case.name}.tif", case, 3, 0), (1, 2, 3))
    tiles = list(tile_grid(0, WIDTH, HEIGHT, TILE_PX, 4))
    polygons = vectorize_mask(write_raster(tmp / f"{case.name}_mask.tif", case, 1, 1),
                              tmp / f"{case.name}.gpkg")
    assert polygons["polygons"] == 1
    return {"module": GroundArea(scene.crs_wkt).window_m2(scene.geotransform,
                                                          Window(0, 0, WIDTH, HEIGHT)),
            "scene report": scene.area_km2 * 1e6,
            "sum of tiles": sum(scene.window_area_km2(t.owned) for t in tiles) * 1e6,
            "progress line": km2_per_tile([scene], TILE_PX) * len(tiles) * 1e6,
            "vectorized polygon": polygons["area_m2"]}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_route_gives_the_ellipsoidal_area(case: Case, tmp_path: Path) -> None:
    gt = geotransform(case)
    reference = reference_m2(case, gt)
    for route, area in route_areas_m2(case, tmp_path).items():
        assert area == pytest.approx(reference, rel=REL_TOL), route


def test_the_reference_sees_what_planar_areas_miss() -> None:
    """The test can fail: planar map areas are off by more than the tolerance where it matters."""
    planar = {c.name: WIDTH * HEIGHT * c.pixel ** 2 for c in CASES if c.epsg != 4326}
    ratio = {name: planar[name] / reference_m2(c, geotransform(c))
             for c in CASES if (name := c.name) in planar}
    assert ratio["3857-lat60"] == pytest.approx(4.0, rel=0.01)       # Web Mercator: 1/cos^2
    assert ratio["3857-lat45"] == pytest.approx(2.0, rel=0.01)
    assert ratio["utm33-centre-lat0"] == pytest.approx(0.9996 ** 2, rel=1e-6)
    assert ratio["utm33-edge-lat0"] - 1 > 100 * REL_TOL              # 1.0027 at the zone edge


def test_reference_matches_the_closed_form_quadrangle() -> None:
    """The reference itself: a lon/lat quadrangle's area has a closed form on the ellipsoid."""
    case = Case("q", 4326, 10.0, 60.0, 0.01)
    gt = geotransform(case)
    lat0, lat1 = gt[3] + HEIGHT * gt[5], gt[3]
    closed = (WGS84_B2 / 2 * math.radians(WIDTH * gt[1])
              * float(authalic_q(np.array(lat1)) - authalic_q(np.array(lat0))))
    assert reference_m2(case, gt) == pytest.approx(closed, rel=1e-9)
    # and the sphere of the same area would be off by far more than the tolerance
    sphere = WGS84_A ** 2 * math.radians(WIDTH * gt[1]) * (math.sin(math.radians(lat1))
                                                           - math.sin(math.radians(lat0)))
    assert abs(sphere / closed - 1) > 100 * REL_TOL


def test_other_ellipsoids_and_units_are_honoured(tmp_path: Path) -> None:
    """A CRS on another ellipsoid (NAD27, Clarke 1866) and one in feet: the CRS's own figures."""
    gt = (-100.0, 0.01, 0.0, 45.0, 0.0, -0.01)
    nad27 = GroundArea(srs_of(4267).ExportToWkt()).window_m2(gt, Window(0, 0, 10, 10))
    wgs84 = GroundArea(srs_of(4326).ExportToWkt()).window_m2(gt, Window(0, 0, 10, 10))
    a, rf = 6378206.4, 294.9786982
    e2 = (1 / rf) * (2 - 1 / rf)
    s = np.sin(np.radians([44.9, 45.0]))
    e = math.sqrt(e2)
    q = s / (1 - e2 * s * s) + np.log((1 + e * s) / (1 - e * s)) / (2 * e)
    closed = a * a * (1 - e2) / 2 * math.radians(0.1) * float(q[1] - q[0])
    assert nad27 == pytest.approx(closed, rel=1e-7)
    assert abs(nad27 / wgs84 - 1) > 1e-5   # the ellipsoids differ visibly
    feet = GroundArea(srs_of(2263).ExportToWkt()).window_m2((1e6, 2.0, 0.0, 2e5, 0.0, -2.0),
                                                            Window(0, 0, 100, 70))
    assert feet == pytest.approx(100 * 70 * (2 * 0.3048006096) ** 2, rel=1e-3)


def test_points_outside_the_crs_domain_are_one_line_errors() -> None:
    from resflow_mpi.errors import InputError
    with pytest.raises(InputError, match="no CRS"):
        GroundArea("", "x.tif")
    utm = GroundArea(srs_of(32633).ExportToWkt(), "x.tif")
    with pytest.raises(InputError, match=r"x.tif: point \(1e\+09, 5e\+06\) lies outside the domain"):
        utm.window_m2((1e9, 10.0, 0.0, 5e6, 0.0, -10.0), Window(0, 0, 4, 4))
    lonlat = GroundArea(srs_of(4326).ExportToWkt(), "y.tif")
    with pytest.raises(InputError, match=r"y.tif: point \(0, 200\) lies outside the domain"):
        lonlat.window_m2((0.0, 1.0, 0.0, 200.0, 0.0, -1.0), Window(0, 0, 4, 4))


def test_a_local_crs_is_its_own_plane_in_its_unit() -> None:
    """An engineering (site) grid has no ellipsoid: its plane is the ground, in its linear unit."""
    wkt = ('LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["foot",0.3048],'
           'AXIS["X",EAST],AXIS["Y",NORTH]]')
    site = GroundArea(wkt, "site.tif")
    assert site.window_m2((0.0, 2.0, 0.0, 0.0, 0.0, -2.0), Window(0, 0, 10, 5)) == \
        pytest.approx(50 * (2 * 0.3048) ** 2, rel=1e-12)
    assert site.metres_per_unit(0.0, 0.0) == 0.3048
