"""Turn scenes of the synthetic archive into the files a user brings ("map your own imagery").

Every helper writes real files with GDAL/OGR, shaped like real-world deliveries:

* :func:`jpeg_tiff_4326` - RGB JPEG-in-TIFF (YCbCr), EPSG:4326, georeferenced ONLY by an
  ``.aux.xml`` sidecar (a baseline TIFF with no GeoTIFF tags), no nodata declared; optionally a
  white band (blank fill) across its top rows.
* :func:`vrt_mosaic` - a scene cut into 2x2 chips (GeoTIFFs in the scene's UTM CRS) and mosaicked
  again as one VRT scene.
* :func:`add_building_polygons` - the ground-truth mask vectorised (``gdal.Polygonize``, building
  pixels only) on a given grid, reprojected to EPSG:4326 and appended to a GeoJSON layer.

Used by tests/integration/test_own_imagery.py and by the README recipe check.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from osgeo import gdal, ogr, osr

gdal.UseExceptions()
ogr.UseExceptions()

WGS84 = 4326


def _srs(epsg_or_wkt: int | str) -> osr.SpatialReference:
    srs = osr.SpatialReference()
    if isinstance(epsg_or_wkt, int):
        srs.ImportFromEPSG(epsg_or_wkt)
    else:
        srs.ImportFromWkt(epsg_or_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return srs


def geographic_geotransform(path: str | Path) -> tuple[float, ...]:
    """An EPSG:4326 north-up geotransform covering the same ground as the projected scene at
    ``path`` (its corners' lon/lat bounding box on the same pixel grid size)."""
    ds = gdal.Open(str(path))
    gt, w, h = ds.GetGeoTransform(), ds.RasterXSize, ds.RasterYSize
    to_geo = osr.CoordinateTransformation(_srs(ds.GetProjection()), _srs(WGS84))
    corners = [(gt[0] + c * gt[1], gt[3] + r * gt[5]) for c in (0, w) for r in (0, h)]
    pts = to_geo.TransformPoints(corners)
    lons, lats = [p[0] for p in pts], [p[1] for p in pts]
    return (min(lons), (max(lons) - min(lons)) / w, 0.0, max(lats), 0.0,
            -(max(lats) - min(lats)) / h)


def jpeg_tiff_4326(src: str | Path, dst: str | Path, white_rows: int = 0,
                   quality: int = 90) -> tuple[float, ...]:
    """Write ``dst``: the 3-band scene ``src`` as a JPEG (YCbCr) baseline TIFF in EPSG:4326 whose
    georeferencing lives only in ``dst.aux.xml``; no nodata. Returns the geotransform."""
    s = gdal.Open(str(src))
    pixels = s.ReadAsArray()  # (3, h, w)
    if white_rows:
        pixels = pixels.copy()
        pixels[:, :white_rows, :] = 255
    gt = geographic_geotransform(src)
    mem = gdal.GetDriverByName("MEM").Create("", s.RasterXSize, s.RasterYSize, 3, gdal.GDT_Byte)
    mem.WriteRaster(0, 0, s.RasterXSize, s.RasterYSize, pixels.tobytes())
    for b in range(1, 4):
        mem.GetRasterBand(b).SetColorInterpretation(gdal.GCI_RedBand + b - 1)
    # PROFILE=BASELINE: no GeoTIFF tags in the TIFF; GDAL puts the georeferencing into the PAM
    # sidecar (dst.aux.xml), as many drone and web-map exports do.
    gdal.GetDriverByName("GTiff").CreateCopy(
        str(dst), mem, options=["COMPRESS=JPEG", "PHOTOMETRIC=YCBCR", f"JPEG_QUALITY={quality}",
                                "PROFILE=BASELINE", "TILED=YES", "BLOCKXSIZE=128",
                                "BLOCKYSIZE=128"]).FlushCache()
    out = gdal.Open(str(dst))  # read-only: georeferencing set now goes to the .aux.xml (PAM)
    out.SetGeoTransform(gt)
    out.SetProjection(_srs(WGS84).ExportToWkt())
    out = None
    return gt


def georef_without_sidecar(path: str | Path) -> tuple[str, Optional[tuple[float, ...]]]:
    """(projection, geotransform) GDAL reads from the TIFF alone (PAM sidecars ignored)."""
    gdal.SetConfigOption("GDAL_PAM_ENABLED", "NO")
    try:
        ds = gdal.Open(str(path))
        return ds.GetProjection(), ds.GetGeoTransform(can_return_null=True)
    finally:
        gdal.SetConfigOption("GDAL_PAM_ENABLED", None)


def vrt_mosaic(src: str | Path, chip_dir: str | Path, dst: str | Path) -> list[str]:
    """Cut ``src`` into 2x2 GeoTIFF chips (same CRS, no overlap) in ``chip_dir`` and write the VRT
    ``dst`` mosaicking them back into one scene; returns the chip paths."""
    s = gdal.Open(str(src))
    w, h = s.RasterXSize, s.RasterYSize
    Path(chip_dir).mkdir(parents=True, exist_ok=True)
    chips = []
    for r, (y0, y1) in enumerate(((0, h // 2), (h // 2, h))):
        for c, (x0, x1) in enumerate(((0, w // 2), (w // 2, w))):
            chip = os.path.join(str(chip_dir), f"{Path(dst).stem}_r{r}c{c}.tif")
            gdal.Translate(chip, s, srcWin=[x0, y0, x1 - x0, y1 - y0],
                           creationOptions=["COMPRESS=DEFLATE"], noData="none")
            chips.append(chip)
    gdal.BuildVRT(str(dst), chips).FlushCache()
    return chips


def open_geojson(path: str | Path) -> tuple[gdal.Dataset, ogr.Layer]:
    """A new GeoJSON file with one EPSG:4326 polygon layer ``buildings`` (field ``building``)."""
    if os.path.exists(path):
        os.remove(path)
    ds = ogr.GetDriverByName("GeoJSON").CreateDataSource(str(path))
    layer = ds.CreateLayer("buildings", _srs(WGS84), ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("building", ogr.OFTString))
    return ds, layer


def add_building_polygons(layer: ogr.Layer, mask_path: str | Path,
                          geotransform: Optional[Sequence[float]] = None,
                          crs: Optional[int | str] = None) -> int:
    """Vectorise the building pixels (value 1) of the mask raster on its grid (or on the given
    geotransform/CRS, for a re-georeferenced scene), reproject to EPSG:4326 and add them to
    ``layer``; returns the number of polygons added."""
    m = gdal.Open(str(mask_path))
    mem = gdal.GetDriverByName("MEM").Create("", m.RasterXSize, m.RasterYSize, 1, gdal.GDT_Byte)
    mem.SetGeoTransform(tuple(geotransform) if geotransform is not None else m.GetGeoTransform())
    src_srs = _srs(crs if crs is not None else m.GetProjection())
    mem.SetProjection(src_srs.ExportToWkt())
    building = (m.GetRasterBand(1).ReadAsArray() == 1).astype(np.uint8)
    mem.GetRasterBand(1).WriteArray(building)
    tmp = ogr.GetDriverByName("Memory").CreateDataSource("polys")
    tmp_layer = tmp.CreateLayer("polys", src_srs, ogr.wkbPolygon)
    tmp_layer.CreateField(ogr.FieldDefn("value", ogr.OFTInteger))
    band = mem.GetRasterBand(1)
    gdal.Polygonize(band, band, tmp_layer, 0)  # the band is its own mask: building pixels only
    to_wgs84 = osr.CoordinateTransformation(src_srs, _srs(WGS84))
    n = 0
    for feat in tmp_layer:
        geom = feat.GetGeometryRef().Clone()
        geom.Transform(to_wgs84)
        out = ogr.Feature(layer.GetLayerDefn())
        out.SetField("building", "yes")
        out.SetGeometry(geom)
        layer.CreateFeature(out)
        n += 1
    return n
