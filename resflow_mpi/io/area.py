"""Ground area on a CRS's own ellipsoid, for pixel windows and polygons in any CRS.

The one area model of resflow: scene and tile areas (run report, progress line, report.html) and
polygon areas (vectorize) all come from here. A shape's boundary, densified in its own CRS, is
projected into a Lambert azimuthal equal-area projection on the same datum, centred near the
shape. That projection preserves area exactly, so the planar area there is the ground area on the
ellipsoid: the geodesic area for a geographic CRS, and for a projected CRS the planar area with
the projection's scale factors taken out (Web Mercator at 60 deg N: a quarter of the map area).
GDAL 3.6 has no geodesic area of its own (``OGRGeometry::GetGeodesicArea`` came in 3.9).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from osgeo import ogr, osr

from ..errors import InputError
from ..tiling import Window
from .gdalenv import ensure_configured

# Longest boundary segment before projecting: a straight edge of the source CRS becomes a curve in
# the equal-area projection; segments this short keep the error near 1e-9, so the areas of a
# window's tiles add up to the window's area.
SEGMENT_DEG = 0.005
SEGMENT_M = 500
# A window wider or taller than this is measured in pieces, each near its own projection centre
# (a Lambert azimuthal projection is singular at the antipode of its centre).
MAX_SPAN_DEG = 20.0
# Projection centres are snapped to this grid so the tiles of a scene share one transformation.
CENTRE_GRID_DEG = 1.0
# Polygons within a cell of this many segment lengths (0.25 deg, 25 km) share one projection.
CELL_SEGMENTS = 50


class GroundArea:
    """Ground areas in m2 of windows and geometries given in one CRS (``crs_wkt``).

    ``where`` names the data in error messages (a scene or mask path)."""

    def __init__(self, crs_wkt: str, where: str = "raster"):
        ensure_configured()
        if not crs_wkt:
            raise InputError(f"{where}: has no CRS, so its ground area is unknown; assign one "
                             "with gdal_edit.py -a_srs")
        self.where = where
        try:
            self.srs = _traditional(osr.SpatialReference(wkt=crs_wkt))
        except RuntimeError:
            raise InputError(f"{where}: its CRS cannot be read, so its ground area is unknown; "
                             "assign one with gdal_edit.py -a_srs") from None
        geographic = bool(self.srs.IsGeographic())
        self._to_equal_area: dict[tuple[float, float], osr.CoordinateTransformation] = {}
        self._by_cell: dict[tuple[int, int], osr.CoordinateTransformation] = {}
        # A local (engineering) CRS has no ellipsoid: its plane is the ground, in its own unit.
        self._local_m_per_unit: Optional[float] = None
        geog = self.srs.CloneGeogCS() if geographic or self.srs.IsProjected() else None
        if geog is None:
            if not (self.srs.IsLocal() and self.srs.GetLinearUnits() > 0):
                raise InputError(f"{where}: its CRS ({self.srs.GetName()}) has no ellipsoid and no "
                                 "linear unit, so its ground area is unknown; assign a "
                                 "geographic or projected CRS with gdal_edit.py -a_srs")
            self._local_m_per_unit = float(self.srs.GetLinearUnits())
            self.segment = math.inf
            return
        self._geog = _traditional(geog)
        self._degrees_per_geog_unit = self._geog.GetAngularUnits() * 180.0 / math.pi
        try:
            self._to_geog = osr.CoordinateTransformation(self.srs, self._geog)
        except RuntimeError:
            raise InputError(f"{where}: its CRS ({self.srs.GetName()}) cannot be converted to "
                             "longitude/latitude, so its ground area is unknown; check the "
                             "CRS") from None
        if geographic:
            self.segment = SEGMENT_DEG / (self.srs.GetAngularUnits() * 180.0 / math.pi)
        else:
            self.segment = SEGMENT_M / (self.srs.GetLinearUnits() or 1.0)

    # -- projections -------------------------------------------------------------------------
    def _outside(self, x: float, y: float) -> InputError:
        return InputError(f"{self.where}: point ({x:.6g}, {y:.6g}) lies outside the domain of its "
                          f"CRS ({self.srs.GetName()}), so its ground area is undefined; check "
                          "the geotransform and CRS")

    def _lonlat_deg(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Longitudes and latitudes in degrees of points in the CRS (InputError off its domain)."""
        try:
            pts = np.asarray(self._to_geog.TransformPoints(np.column_stack([x, y]).tolist()))
        except RuntimeError:
            pts = np.array([self._to_geog_or_nan(px, py) for px, py in zip(x, y)])
        lon, lat = pts[:, 0] * self._degrees_per_geog_unit, pts[:, 1] * self._degrees_per_geog_unit
        bad = ~(np.isfinite(lon) & np.isfinite(lat) & (np.abs(lat) <= 90.0 + 1e-9))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise self._outside(float(x[i]), float(y[i]))
        return lon, lat

    def _to_geog_or_nan(self, x: float, y: float) -> tuple[float, float]:
        try:
            lon, lat = self._to_geog.TransformPoint(float(x), float(y))[:2]
        except RuntimeError:
            return (math.nan, math.nan)
        return (float(lon), float(lat))

    def _equal_area(self, lon_deg: float, lat_deg: float) -> osr.CoordinateTransformation:
        """The CRS -> Lambert azimuthal equal-area transformation centred near (lon, lat)."""
        g = CENTRE_GRID_DEG
        lon0 = (round(lon_deg / g) * g + 180.0) % 360.0 - 180.0
        lat0 = max(-90.0, min(90.0, round(lat_deg / g) * g))
        key = (lon0, lat0)
        ct = self._to_equal_area.get(key)
        if ct is None:
            laea = self.srs.CloneGeogCS()  # same datum and ellipsoid: no datum shift on the way
            laea.SetLAEA(lat0, lon0, 0.0, 0.0)
            ct = self._to_equal_area[key] = osr.CoordinateTransformation(self.srs,
                                                                         _traditional(laea))
        return ct

    # -- areas -------------------------------------------------------------------------------
    def geometry_m2(self, geom: ogr.Geometry) -> float:
        """Ground area in m2 of a polygon (or multipolygon) in this CRS."""
        if geom is None or geom.IsEmpty():
            return 0.0
        if self._local_m_per_unit is not None:
            return float(geom.GetArea()) * self._local_m_per_unit ** 2
        x0, x1, y0, y1 = geom.GetEnvelope()
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        # Polygons of one neighbourhood share a transformation (no point lookup per polygon).
        cell = (math.floor(cx / (self.segment * CELL_SEGMENTS)),
                math.floor(cy / (self.segment * CELL_SEGMENTS)))
        ct = self._by_cell.get(cell)
        if ct is None:
            lon, lat = self._lonlat_deg(np.array([cx]), np.array([cy]))
            ct = self._by_cell[cell] = self._equal_area(float(lon[0]), float(lat[0]))
        g = geom.Clone()
        g.Segmentize(self.segment)
        try:
            g.Transform(ct)
        except RuntimeError:
            raise InputError(f"{self.where}: a polygon near ({(x0 + x1) / 2:.6g}, "
                             f"{(y0 + y1) / 2:.6g}) cannot be projected to an equal-area CRS; "
                             "check the CRS") from None
        return float(g.GetArea())

    def window_m2(self, geotransform: Sequence[float], window: Window) -> float:
        """Ground area in m2 of a pixel window of a raster with this CRS and ``geotransform``."""
        if window.width <= 0 or window.height <= 0:
            return 0.0
        if self._local_m_per_unit is not None:
            gt = geotransform
            return (abs(gt[1] * gt[5] - gt[2] * gt[4]) * window.width * window.height
                    * self._local_m_per_unit ** 2)
        c0, r0 = float(window.col), float(window.row)
        c1, r1 = c0 + window.width, r0 + window.height
        cols, rows = _ring(c0, r0, c1, r1, 8)
        lon, lat = self._lonlat_deg(*_apply(geotransform, cols, rows))
        lon_span = float(np.ptp(np.degrees(np.unwrap(np.radians(lon)))))
        nx = min(36, max(1, math.ceil(lon_span / MAX_SPAN_DEG)))
        ny = min(18, max(1, math.ceil(float(np.ptp(lat)) / MAX_SPAN_DEG)))
        total = 0.0
        for i in range(nx):
            for j in range(ny):
                total += self._piece_m2(geotransform,
                                        c0 + (c1 - c0) * i / nx, r0 + (r1 - r0) * j / ny,
                                        c0 + (c1 - c0) * (i + 1) / nx, r0 + (r1 - r0) * (j + 1) / ny)
        return total

    def _piece_m2(self, gt: Sequence[float], c0: float, r0: float, c1: float, r1: float) -> float:
        corners_x, corners_y = _apply(gt, np.array([c0, c1, c1, c0]), np.array([r0, r0, r1, r1]))
        edge = max(math.hypot(corners_x[k] - corners_x[k - 1], corners_y[k] - corners_y[k - 1])
                   for k in range(4))
        cols, rows = _ring(c0, r0, c1, r1, max(1, math.ceil(edge / self.segment)))
        x, y = _apply(gt, cols, rows)
        cx, cy = _apply(gt, np.array([(c0 + c1) / 2]), np.array([(r0 + r1) / 2]))
        lon, lat = self._lonlat_deg(cx, cy)
        ct = self._equal_area(float(lon[0]), float(lat[0]))
        try:
            pts = np.asarray(ct.TransformPoints(np.column_stack([x, y]).tolist()))
        except RuntimeError:
            pts = np.full((len(x), 2), math.nan)
        if not np.isfinite(pts[:, :2]).all():
            self._lonlat_deg(x, y)  # names the point outside the CRS's domain
            raise InputError(f"{self.where}: window ({c0:g}, {r0:g})-({c1:g}, {r1:g}) px cannot be "
                             "projected to an equal-area CRS; check the geotransform and CRS")
        px, py = pts[:, 0] - pts[:, 0].mean(), pts[:, 1] - pts[:, 1].mean()
        return float(abs(np.dot(px, np.roll(py, -1)) - np.dot(py, np.roll(px, -1))) / 2.0)

    def pixel_sides_m(self, geotransform: Sequence[float], col: float, row: float
                      ) -> tuple[float, float]:
        """Ground lengths in metres of one pixel step along a row and along a column at pixel
        (col, row): measured in an azimuthal equal-area plane centred there, so degrees of
        longitude shrink with latitude and a projection's scale factor is taken into account."""
        gt = geotransform
        if self._local_m_per_unit is not None:
            m = self._local_m_per_unit
            return math.hypot(gt[1], gt[4]) * m, math.hypot(gt[2], gt[5]) * m
        x, y = _apply(gt, np.array([col, col + 1.0, col]), np.array([row, row, row + 1.0]))
        lon, lat = self._lonlat_deg(x[:1], y[:1])
        laea = self.srs.CloneGeogCS()
        laea.SetLAEA(float(lat[0]), float(lon[0]), 0.0, 0.0)
        try:
            ct = osr.CoordinateTransformation(self.srs, _traditional(laea))
            pts = np.asarray(ct.TransformPoints(np.column_stack([x, y]).tolist()))[:, :2]
        except RuntimeError:
            pts = np.full((3, 2), math.nan)
        if not np.isfinite(pts).all():
            raise self._outside(float(x[0]), float(y[0]))
        return (float(np.hypot(*(pts[1] - pts[0]))), float(np.hypot(*(pts[2] - pts[0]))))

    def metres_per_unit(self, x: float, y: float) -> float:
        """Ground length in metres of one CRS unit near (x, y): the square root of the local
        area scale (exact for conformal projections such as UTM and Web Mercator)."""
        if self._local_m_per_unit is not None:
            return self._local_m_per_unit
        d = self.segment / 20.0
        ring = ogr.Geometry(ogr.wkbLinearRing)
        for px, py in ((x, y), (x + d, y), (x + d, y + d), (x, y + d), (x, y)):
            ring.AddPoint_2D(px, py)
        square = ogr.Geometry(ogr.wkbPolygon)
        square.AddGeometry(ring)
        return math.sqrt(self.geometry_m2(square)) / d


def _traditional(srs: osr.SpatialReference) -> osr.SpatialReference:
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def _apply(gt: Sequence[float], cols: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CRS coordinates of pixel positions through a GDAL geotransform."""
    return gt[0] + cols * gt[1] + rows * gt[2], gt[3] + cols * gt[4] + rows * gt[5]


def _ring(c0: float, r0: float, c1: float, r1: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A rectangle's boundary with ``n`` points per edge (not closed), in pixel coordinates."""
    t = np.arange(n) / n
    cols = np.concatenate([c0 + (c1 - c0) * t, np.full(n, c1), c1 - (c1 - c0) * t, np.full(n, c0)])
    rows = np.concatenate([np.full(n, r0), r0 + (r1 - r0) * t, np.full(n, r1), r1 - (r1 - r0) * t])
    return cols, rows

