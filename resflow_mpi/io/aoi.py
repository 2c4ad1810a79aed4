"""The area of interest (``scenes.aoi``): which tiles of a scene are mapped, and which of their
pixels count. The one place that holds its geometry.

An AOI is any OGR source of polygons in any CRS (the union of every polygon of every layer). Per
scene it is reprojected to the scene's CRS (traditional GIS axis order on both sides), clipped to
the scene's extent and compared with each tile's owned window: a tile outside it is neither read
nor computed (all nodata); a tile on its edge is computed and its pixels outside are nodata
(pixel centres, rasterised per owned window, so memory stays one tile); a tile inside is mapped
whole. Windows are georeferenced polygons of the scene's geotransform, so any geotransform works.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from osgeo import gdal, ogr, osr

from ..errors import InputError
from ..tiling import Window, grid_shape
from .area import GroundArea, _traditional
from .gdalenv import ensure_configured
from .vsi import is_virtual
from .vsi import stat as vsi_stat

# Edges are densified to this share of the AOI's larger extent before reprojection, so a straight
# edge of the AOI's CRS follows its true curve in the scene's CRS.
DENSIFY_SHARE = 1 / 256
# A tile that the AOI covers but for this many pixels (reprojection round-off along an edge shared
# with the scene) is whole; one it covers by less is outside.
SNAP_PX = 0.01


@dataclass(frozen=True)
class AreaOfInterest:
    """The AOI as loaded: the union of its polygons (WKB) in its own CRS."""

    path: str
    wkb: bytes
    crs_wkt: str

    def geometry(self) -> ogr.Geometry:
        """A new OGR geometry of the AOI (its own CRS)."""
        return ogr.CreateGeometryFromWkb(self.wkb)


@dataclass(frozen=True)
class SceneAOI:
    """The AOI in one scene: its part inside the scene (WKB, scene CRS), each tile's share of
    owned pixels inside it (``inside``, (rows, cols) in [0, 1]) and, for tiles on its edge, the
    AOI clipped to the owned window (``edges``: tile index -> WKB)."""

    wkb: bytes
    inside: np.ndarray
    edges: dict[int, bytes] = field(default_factory=dict)
    area_km2: float = 0.0

    def tile_inside(self, index: int) -> float:
        """Share of tile ``index``'s owned pixels inside the AOI (0: outside, 1: inside)."""
        return float(self.inside.ravel()[index])

    @property
    def tiles_intersecting(self) -> int:
        """Tiles of the scene that the AOI touches (mapped)."""
        return int((self.inside > 0).sum())


def load_aoi(path: str) -> AreaOfInterest:
    """Read every polygon of an OGR source into one geometry; InputError (one line naming the
    file and ``scenes.aoi``) when it is missing, unreadable, has no polygons or no CRS, or its
    layers disagree on the CRS. Read once per process while the file is unchanged."""
    found = vsi_stat(path)
    if found is None and not is_virtual(path):
        raise InputError(f"{path}: area of interest not found (scenes.aoi)")
    return _load_aoi(path, found)


@functools.lru_cache(maxsize=4)
def _load_aoi(path: str, stamp: Optional[tuple[int, int]]) -> AreaOfInterest:
    ensure_configured()
    try:
        ds = gdal.OpenEx(path, gdal.OF_VECTOR | gdal.OF_READONLY)
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable vector file (scenes.aoi: "
                         f"{str(exc).strip().splitlines()[0]})") from None
    if ds is None or ds.GetLayerCount() == 0:
        raise InputError(f"{path}: not a readable vector file with a layer (scenes.aoi)")
    union = ogr.Geometry(ogr.wkbMultiPolygon)
    crs: Optional[osr.SpatialReference] = None
    for i in range(ds.GetLayerCount()):
        layer = ds.GetLayerByIndex(i)
        for feature in layer:
            g = feature.GetGeometryRef()
            if g is None or ogr.GT_Flatten(g.GetGeometryType()) not in (
                    ogr.wkbPolygon, ogr.wkbMultiPolygon):
                continue
            srs = g.GetSpatialReference() or layer.GetSpatialRef()
            if srs is None or (srs.GetName() or "").startswith("Undefined"):  # GPKG srs_id 0/-1
                raise InputError(f"{path}: layer {layer.GetName()!r} has no CRS (scenes.aoi); "
                                 "assign one, e.g. ogr2ogr -a_srs EPSG:4326 fixed.gpkg "
                                 f"{os.path.basename(path)}")
            if crs is None:
                crs = srs.Clone()
            elif not crs.IsSame(srs):
                raise InputError(f"{path}: its polygons are in more than one CRS (scenes.aoi); "
                                 "reproject them to one CRS")
            g = g.Clone()
            g.FlattenTo2D()
            for part in (g if ogr.GT_Flatten(g.GetGeometryType()) == ogr.wkbMultiPolygon
                         else [g]):
                union.AddGeometry(part)
    if crs is None or union.IsEmpty():
        raise InputError(f"{path}: has no polygons (scenes.aoi needs polygon features: the "
                         "area to map)")
    merged = union.UnionCascaded() if union.GetGeometryCount() > 1 else union.MakeValid()
    return AreaOfInterest(path, bytes(merged.ExportToWkb()), crs.ExportToWkt())


def window_polygon(geotransform: Sequence[float], w: Window) -> ogr.Geometry:
    """A pixel window as a georeferenced polygon (its four corners, any geotransform)."""
    gt = geotransform
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for c, r in ((w.col, w.row), (w.col + w.width, w.row), (w.col + w.width, w.row + w.height),
                 (w.col, w.row + w.height), (w.col, w.row)):
        ring.AddPoint_2D(gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5])
    poly = ogr.Geometry(ogr.wkbPolygon)
    poly.AddGeometry(ring)
    return poly


def in_crs(aoi: AreaOfInterest, crs_wkt: str) -> ogr.Geometry:
    """The AOI reprojected to ``crs_wkt`` (edges densified first)."""
    g = aoi.geometry()
    src = _traditional(osr.SpatialReference(wkt=aoi.crs_wkt))
    dst = _traditional(osr.SpatialReference(wkt=crs_wkt))
    if src.IsSame(dst):
        return g
    xmin, xmax, ymin, ymax = g.GetEnvelope()
    step = max(xmax - xmin, ymax - ymin) * DENSIFY_SHARE
    if step > 0:
        g.Segmentize(step)
    try:
        g.Transform(osr.CoordinateTransformation(src, dst))
    except RuntimeError as exc:
        raise InputError(f"{aoi.path}: cannot reproject the area of interest to a scene's CRS "
                         f"({str(exc).strip().splitlines()[0]})") from None
    return g


def scene_aoi(aoi: AreaOfInterest, crs_wkt: str, geotransform: Sequence[float], width: int,
              height: int, tile_px: int) -> Optional[SceneAOI]:
    """The AOI on one scene's tile grid (None: the AOI misses the scene)."""
    ensure_configured()
    whole = window_polygon(geotransform, Window(0, 0, width, height))
    part = in_crs(aoi, crs_wkt).Intersection(whole)
    if part is None or part.IsEmpty() or part.GetArea() <= 0:
        return None
    rows, cols = grid_shape(width, height, tile_px)
    inside = np.zeros((rows, cols), np.float32)
    edges: dict[int, bytes] = {}
    for r in range(rows):
        h = min(tile_px, height - r * tile_px)
        # Clipped to the tile row first, so each tile meets only the AOI's vertices near it.
        strip = part.Intersection(window_polygon(geotransform, Window(0, r * tile_px, width, h)))
        if strip is None or strip.IsEmpty() or strip.GetArea() <= 0:
            continue
        x0, x1, y0, y1 = strip.GetEnvelope()
        for c in range(cols):
            w = Window(c * tile_px, r * tile_px, min(tile_px, width - c * tile_px), h)
            box = window_polygon(geotransform, w)
            bx0, bx1, by0, by1 = box.GetEnvelope()
            if bx0 > x1 or bx1 < x0 or by0 > y1 or by1 < y0 or not box.Intersects(strip):
                continue
            if box.Within(strip):
                inside[r, c] = 1.0
                continue
            clipped = box.Intersection(strip)
            share = clipped.GetArea() / box.GetArea() if clipped is not None else 0.0
            snap = SNAP_PX / (w.width * w.height)
            if share >= 1.0 - snap:
                inside[r, c] = 1.0
            elif share > snap:
                inside[r, c] = share
                edges[r * cols + c] = bytes(clipped.ExportToWkb())
    area_km2 = GroundArea(crs_wkt, aoi.path).geometry_m2(part) / 1e6
    return SceneAOI(bytes(part.ExportToWkb()), inside, edges, area_km2)


def _rasterize(geom: ogr.Geometry, crs_wkt: str, geotransform: Sequence[float], width: int,
               height: int, all_touched: bool = False) -> np.ndarray:
    """(height, width) bool: the pixels of a grid that ``geom`` (in ``crs_wkt``) burns."""
    ensure_configured()
    ds = gdal.GetDriverByName("MEM").Create("", width, height, 1, gdal.GDT_Byte)
    ds.SetGeoTransform(tuple(geotransform))
    ds.SetProjection(crs_wkt)
    mem = ogr.GetDriverByName("Memory").CreateDataSource("")
    layer = mem.CreateLayer("aoi", srs=osr.SpatialReference(wkt=crs_wkt),
                            geom_type=geom.GetGeometryType())
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(geom)
    layer.CreateFeature(feature)
    gdal.RasterizeLayer(ds, [1], layer, burn_values=[1],
                        options=["ALL_TOUCHED=TRUE"] if all_touched else [])
    return ds.GetRasterBand(1).ReadAsArray() > 0


def outline_pixels(aoi: AreaOfInterest, crs_wkt: str, geotransform: Sequence[float],
                   width: int, height: int) -> np.ndarray:
    """(height, width) bool: the AOI's boundary drawn on a raster grid (e.g. a scene's
    quicklook), every pixel the boundary touches."""
    return _rasterize(in_crs(aoi, crs_wkt).Boundary(), crs_wkt, geotransform, width, height,
                      all_touched=True)


def inside_mask(wkb: bytes, crs_wkt: str, geotransform: Sequence[float], w: Window
                ) -> np.ndarray:
    """(h, w) bool: True where a pixel centre of window ``w`` lies inside the geometry ``wkb``
    (in the scene's CRS ``crs_wkt``); one window is rasterised, never the scene."""
    gt = geotransform
    window_gt = (gt[0] + w.col * gt[1] + w.row * gt[2], gt[1], gt[2],
                 gt[3] + w.col * gt[4] + w.row * gt[5], gt[4], gt[5])
    return _rasterize(ogr.CreateGeometryFromWkb(wkb), crs_wkt, window_gt, w.width, w.height)
