"""Annotation chips: one window of a scene as a small GeoTIFF, and a GeoPackage index of them.

A chip keeps its scene's CRS, bands, data type and nodata; its geotransform is the scene's moved
to the window's corner, so it lies exactly on the scene in a GIS. The index holds one polygon per
chip (its footprint) with the bucket, the tile's hash code, the scene and the window, why it was
drawn (stratum) and the mapped tile's confidence where known, and the chip's path relative to the
index, so QGIS opens both side by side for labelling.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from osgeo import gdal, ogr, osr

from ..errors import InputError, OutputError
from . import geotiff
from .gdalenv import ensure_configured

INDEX_LAYER = "chips"
_CHIP_OPTIONS = ("COMPRESS=DEFLATE", "PREDICTOR=2", "TILED=NO")


@dataclass(frozen=True)
class ChipRecord:
    """One written chip: where it comes from and where it went (``chip`` relative to the index)."""

    tile: int
    bucket: int
    code: str
    bucket_code: str
    scene: str
    scene_path: str
    window: tuple[int, int, int, int]   # col, row, width, height in scene pixels
    chip: str
    stratum: str = "bucket"             # why it was drawn: bucket, flagged, low-confidence
    confidence: float = float("nan")    # mean |p - 0.5| * 2 of a mapped tile (NaN: not known)


def window_geotransform(scene_gt: Sequence[float], col: int, row: int) -> tuple[float, ...]:
    """The geotransform of the window whose top-left pixel is (col, row) of a scene."""
    x0, dx, rx, y0, ry, dy = scene_gt
    return (x0 + col * dx + row * rx, dx, rx, y0 + col * ry + row * dy, ry, dy)


def write_chip(scene_path: str, window: tuple[int, int, int, int], out_path: Path) -> Path:
    """Read ``window`` (col, row, width, height) of a scene with GDAL and write it as a GeoTIFF."""
    ensure_configured()
    try:
        src = gdal.Open(scene_path)
    except RuntimeError:
        src = None
    if src is None:
        raise InputError(f"{scene_path}: scene recorded in the image gallery cannot be opened; "
                         "put it back at that path or rebuild the gallery with `resflow init`")
    col, row, width, height = window
    if col < 0 or row < 0 or col + width > src.RasterXSize or row + height > src.RasterYSize:
        raise InputError(f"{scene_path}: window {list(window)} lies outside the "
                         f"{src.RasterXSize}x{src.RasterYSize} scene; the scene changed since "
                         "`resflow init`, rebuild the gallery")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        geotiff.translate(src, out_path, "GTiff", _CHIP_OPTIONS, src_win=window)
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"{out_path}: cannot write the chip ({str(exc).strip()[:200]}); check "
                          "--out is writable and has space") from None
    return out_path


def _footprint(scene_path: str, window: tuple[int, int, int, int]) -> tuple[ogr.Geometry, str]:
    """The window's polygon in the scene CRS, and that CRS as WKT."""
    src = gdal.Open(scene_path)
    gt = window_geotransform(src.GetGeoTransform(), window[0], window[1])
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for px, py in ((0, 0), (window[2], 0), (window[2], window[3]), (0, window[3]), (0, 0)):
        ring.AddPoint_2D(gt[0] + px * gt[1] + py * gt[2], gt[3] + px * gt[4] + py * gt[5])
    polygon = ogr.Geometry(ogr.wkbPolygon)
    polygon.AddGeometry(ring)
    return polygon, src.GetProjection()


def read_chip_paths(path: Path) -> list[str]:
    """The ``chip`` column of a chip index (paths relative to it); [] when it cannot be read."""
    ensure_configured()
    try:
        ds = ogr.Open(str(path))
        layer = ds.GetLayerByName(INDEX_LAYER) if ds is not None else None
        return [str(f.GetField("chip")) for f in layer] if layer is not None else []
    except RuntimeError:
        return []


def write_chip_index(path: Path, records: Sequence[ChipRecord]) -> Path:
    """GeoPackage of chip footprints (layer ``chips``), replacing any earlier index at ``path``.

    Chips of one CRS keep it; chips of several CRSs are indexed in WGS84 (EPSG:4326, lon/lat)."""
    ensure_configured()
    footprints = [_footprint(r.scene_path, r.window) for r in records]
    srs_wkts = {wkt for _, wkt in footprints}
    reproject = len(srs_wkts) > 1
    if not reproject:
        srs = osr.SpatialReference(wkt=srs_wkts.pop() if srs_wkts else "")
    else:
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(4326)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.gpkg")
    if tmp.exists():
        tmp.unlink()
    try:
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp))
        layer = ds.CreateLayer(INDEX_LAYER, srs=srs, geom_type=ogr.wkbPolygon)
        fields = [("tile", ogr.OFTInteger64), ("bucket", ogr.OFTInteger), ("code", ogr.OFTString),
                  ("bucket_code", ogr.OFTString), ("scene", ogr.OFTString),
                  ("window", ogr.OFTString), ("col", ogr.OFTInteger), ("row", ogr.OFTInteger),
                  ("width", ogr.OFTInteger), ("height", ogr.OFTInteger), ("chip", ogr.OFTString),
                  ("stratum", ogr.OFTString), ("confidence", ogr.OFTReal)]
        for name, kind in fields:
            layer.CreateField(ogr.FieldDefn(name, kind))
        defn = layer.GetLayerDefn()
        layer.StartTransaction()
        for record, (polygon, wkt) in zip(records, footprints):
            if reproject:
                source = osr.SpatialReference(wkt=wkt)
                source.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
                polygon = polygon.Clone()
                polygon.Segmentize(max(1.0, polygon.GetEnvelope()[1] - polygon.GetEnvelope()[0]) / 8)
                polygon.Transform(osr.CoordinateTransformation(source, srs))
            feature = ogr.Feature(defn)
            values = {"tile": record.tile, "bucket": record.bucket, "code": record.code,
                      "bucket_code": record.bucket_code, "scene": record.scene,
                      "window": ",".join(str(v) for v in record.window), "col": record.window[0],
                      "row": record.window[1], "width": record.window[2],
                      "height": record.window[3], "chip": record.chip,
                      "stratum": record.stratum}
            for name, value in values.items():
                feature.SetField(name, value)
            if not math.isnan(record.confidence):  # unknown: left null
                feature.SetField("confidence", float(record.confidence))
            feature.SetGeometry(polygon)
            layer.CreateFeature(feature)
        layer.CommitTransaction()
        ds = None
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        raise OutputError(f"{path}: cannot write the chip index ({str(exc).strip()[:200]}); check "
                          "--out is writable and has space") from None
    return path
