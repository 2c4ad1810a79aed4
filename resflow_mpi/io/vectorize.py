"""Building polygons from exported masks: GeoPackage (scene CRS) and optional GeoJSON (WGS84).

Polygon areas (``area_m2``) are ground areas on the CRS's ellipsoid, from ``io/area.py``. Each
polygon's ``confidence`` is the mean building probability of its pixels, read from the scene's
probability COG (``output.probability``) beside the mask; it is empty when there is none.
Polygons may be cleaned: a minimum ground area, Douglas-Peucker simplification and right-angle
regularisation (``io/footprints.py``), all in metres; a geographic CRS is regularised in a local
azimuthal equidistant projection, so its right angles are right angles on the ground.

``gdal.Polygonize`` reads the mask block by block, so a huge scene never sits in memory. Files
appear only complete: each is written under a ``.partial`` name and renamed at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence
from xml.sax.saxutils import escape

from osgeo import gdal, ogr, osr

import numpy as np
import shapely

from ..errors import InputError, OutputError, ResflowError
from .area import GroundArea
from .export import PROBABILITY_NODATA, PROBABILITY_SCALE
from .footprints import MAX_AREA_CHANGE, regularize
from .gdalenv import ensure_configured
from .oserrors import write_failure
from .naming import MASK, PROBABILITY, output_file_name

LAYER_NAME = "buildings"
# --merged extensions and the OGR drivers that write them.
MERGED_FORMATS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON",
                  ".shp": "ESRI Shapefile", ".fgb": "FlatGeobuf"}
MASK_SUFFIX = output_file_name("", MASK)
BUILDING_VALUE = 1
# Outline tolerance of --regularize without --simplify, in pixel sizes: removes the pixel staircase.
REGULARIZE_TOLERANCE_PX = 1.5


def _partial(path: Path) -> Path:
    """Temporary sibling name that keeps the suffix (drivers check it) but never looks final."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _open_mask(mask_tif: Path) -> gdal.Dataset:
    """Open a mask GeoTIFF and check it is a one-band Byte raster with a CRS."""
    if not mask_tif.is_file():
        raise InputError(f"{mask_tif}: mask file not found")
    try:
        ds = gdal.Open(str(mask_tif), gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise InputError(f"{mask_tif}: not a readable raster "
                         f"({str(exc).strip().splitlines()[0]})") from None
    band = ds.GetRasterBand(1)
    if ds.RasterCount != 1 or band.DataType != gdal.GDT_Byte:
        raise InputError(f"{mask_tif}: expected a one-band Byte mask (0/1/255) as written by "
                         f"`resflow run`, got {ds.RasterCount} band(s) of "
                         f"{gdal.GetDataTypeName(band.DataType)}")
    if not ds.GetProjection():
        raise InputError(f"{mask_tif}: mask has no CRS; polygons would have no location "
                         "(assign one with gdal_edit.py -a_srs)")
    return ds


def _building_selector(mask_tif: Path, width_px: int, height_px: int) -> gdal.Dataset:
    """A virtual band that is 1 where the mask is a building and 0 elsewhere (streams, no copy)."""
    # The LUT maps 0 -> 0, 1 -> 1 and every other value (2..255, nodata included) -> 0.
    xml = (f'<VRTDataset rasterXSize="{width_px}" rasterYSize="{height_px}">'
           '<VRTRasterBand dataType="Byte" band="1"><ComplexSource>'
           f'<SourceFilename relativeToVRT="0">{escape(str(mask_tif.resolve()))}</SourceFilename>'
           '<SourceBand>1</SourceBand>'
           f'<SrcRect xOff="0" yOff="0" xSize="{width_px}" ySize="{height_px}"/>'
           f'<DstRect xOff="0" yOff="0" xSize="{width_px}" ySize="{height_px}"/>'
           '<LUT>0:0,1:1,2:0,255:0</LUT>'
           '</ComplexSource></VRTRasterBand></VRTDataset>')
    return gdal.Open(xml)


def probability_path(mask_tif: Path) -> Path:
    """The probability COG a run exports beside a mask (``<scene>.resflow-probability.tif``)."""
    name = mask_tif.name
    stem = name[:-len(MASK_SUFFIX)] if name.endswith(MASK_SUFFIX) else mask_tif.stem
    return mask_tif.with_name(output_file_name(stem, PROBABILITY))


class PolygonConfidence:
    """Mean building probability of the pixels inside a polygon, from a probability COG on the
    mask's grid (pixel-edge polygons: a pixel is inside when its centre is)."""

    def __init__(self, prob_tif: Path, mask: gdal.Dataset):
        self.path = prob_tif
        try:
            self.ds = gdal.Open(str(prob_tif), gdal.GA_ReadOnly)
        except RuntimeError as exc:
            raise InputError(f"{prob_tif}: not a readable raster "
                             f"({str(exc).strip().splitlines()[0]})") from None
        if ((self.ds.RasterXSize, self.ds.RasterYSize) != (mask.RasterXSize, mask.RasterYSize)
                or self.ds.GetGeoTransform() != mask.GetGeoTransform()):
            raise InputError(f"{prob_tif}: not on the grid of its mask; rerun `resflow run` with "
                             "output.probability: true, or move the file away")
        self.gt = self.ds.GetGeoTransform()
        self.inv = gdal.InvGeoTransform(self.gt)
        self.band = self.ds.GetRasterBand(1)

    def mean(self, geom: ogr.Geometry) -> Optional[float]:
        """The polygon's mean probability (None when all its pixels are nodata)."""
        x0, x1, y0, y1 = geom.GetEnvelope()
        cols, rows = zip(*(gdal.ApplyGeoTransform(self.inv, x, y)
                           for x in (x0, x1) for y in (y0, y1)))
        c0, r0 = max(0, int(np.floor(min(cols)))), max(0, int(np.floor(min(rows))))
        c1 = min(self.ds.RasterXSize, int(np.ceil(max(cols))))
        r1 = min(self.ds.RasterYSize, int(np.ceil(max(rows))))
        if c1 <= c0 or r1 <= r0:
            return None
        q = self.band.ReadAsArray(c0, r0, c1 - c0, r1 - r0)
        cc, rr = np.meshgrid(np.arange(c0, c1) + 0.5, np.arange(r0, r1) + 0.5)
        g = self.gt
        x = g[0] + cc * g[1] + rr * g[2]
        y = g[3] + cc * g[4] + rr * g[5]
        inside = shapely.contains_xy(shapely.from_wkb(bytes(geom.ExportToWkb())), x, y)
        values = q[inside & (q != PROBABILITY_NODATA)]
        return float(values.mean()) / PROBABILITY_SCALE if values.size else None


class Regularizer:
    """Right-angle outlines (``footprints.regularize``) of polygons in ``srs``, in metres: a
    projected CRS in its own plane, a geographic one in a local azimuthal equidistant projection
    centred at (x, y)."""

    def __init__(self, srs: osr.SpatialReference, x: float, y: float, tolerance_m: float,
                 metres_per_unit: float):
        self.to_local = self.to_crs = None
        self.tolerance = tolerance_m / metres_per_unit
        if srs.IsGeographic():
            local = srs.CloneGeogCS()
            local.SetAE(y, x, 0.0, 0.0)
            local.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            self.to_local = osr.CoordinateTransformation(srs, local)
            self.to_crs = osr.CoordinateTransformation(local, srs)
            self.tolerance = tolerance_m
        self.methods: dict[str, int] = {}

    def __call__(self, geom: ogr.Geometry) -> ogr.Geometry:
        g = geom.Clone()
        if self.to_local is not None:
            g.Transform(self.to_local)
        result = regularize(shapely.from_wkb(bytes(g.ExportToWkb())), self.tolerance)
        self.methods[result.method] = self.methods.get(result.method, 0) + 1
        out = ogr.CreateGeometryFromWkb(shapely.to_wkb(result.polygon))
        if self.to_crs is not None:
            out.Transform(self.to_crs)
        return out


def vectorize_mask(mask_tif: str | Path, out_gpkg: str | Path, min_area_m2: float = 0.0,
                   simplify_m: float = 0.0, geojson_path: Optional[str | Path] = None,
                   regularize_corners: bool = False) -> dict[str, Any]:
    """Polygonize a mask's building pixels into a GeoPackage layer "buildings" (id, area_m2,
    confidence).

    Polygons smaller than ``min_area_m2`` (ground area, before simplification) are dropped;
    ``simplify_m`` > 0 simplifies with topology preserved; ``regularize_corners`` gives every
    polygon right-angle corners (``simplify_m``, or 1.5 pixels, is then the tolerance of the
    outline before its edges are snapped). ``confidence`` is the polygon's mean probability from
    the probability COG beside the mask (empty without one). Returns the paths written, the
    polygon count, the total area in m2 (of the written geometries), the confidence source
    (None without one) and how many polygons each regularisation method made.
    """
    ensure_configured()
    mask_tif, out_gpkg = Path(mask_tif), Path(out_gpkg)
    if min_area_m2 < 0 or simplify_m < 0:
        raise InputError(f"{mask_tif}: min_area_m2 and simplify_m must be >= 0 "
                         f"(got {min_area_m2:g}, {simplify_m:g})")
    ds = _open_mask(mask_tif)
    srs = osr.SpatialReference(wkt=ds.GetProjection())
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    selector = _building_selector(mask_tif, ds.RasterXSize, ds.RasterYSize)

    try:
        out_gpkg.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_gpkg.parent}: cannot create output directory "
                          f"({exc.strerror})") from None
    gpkg_tmp = _partial(out_gpkg)
    raw_tmp = out_gpkg.with_name(f"{out_gpkg.stem}.raw.partial.gpkg")
    polygons, dropped, total_area_m2 = 0, 0, 0.0
    try:
        for p in (gpkg_tmp, raw_tmp):
            p.unlink(missing_ok=True)
        gpkg_driver = ogr.GetDriverByName("GPKG")
        # Raw pixel-edge polygons go to a scratch file, not memory: a scene can hold millions.
        raw_ds = gpkg_driver.CreateDataSource(str(raw_tmp))
        raw_layer = raw_ds.CreateLayer("raw", srs=srs, geom_type=ogr.wkbPolygon)
        raw_layer.StartTransaction()
        gdal.Polygonize(ds.GetRasterBand(1), selector.GetRasterBand(1), raw_layer, -1, [])
        raw_layer.CommitTransaction()

        ground = GroundArea(ds.GetProjection(), str(mask_tif))
        tolerance = 0.0
        regularizer: Optional[Regularizer] = None
        if (simplify_m > 0 or regularize_corners) and raw_layer.GetFeatureCount():
            x0, x1, y0, y1 = raw_layer.GetExtent()
            m_per_unit = ground.metres_per_unit((x0 + x1) / 2, (y0 + y1) / 2)
            tolerance = simplify_m / m_per_unit
            if regularize_corners:
                pixel_m = abs(ds.GetGeoTransform()[1]) * m_per_unit
                regularizer = Regularizer(srs, (x0 + x1) / 2, (y0 + y1) / 2,
                                          simplify_m or REGULARIZE_TOLERANCE_PX * pixel_m,
                                          m_per_unit)
        prob_tif = probability_path(mask_tif)
        confidence = PolygonConfidence(prob_tif, ds) if prob_tif.is_file() else None
        out_ds = gpkg_driver.CreateDataSource(str(gpkg_tmp))
        layer = out_ds.CreateLayer(LAYER_NAME, srs=srs, geom_type=ogr.wkbPolygon,
                                   options=["FID=fid"])
        layer.CreateField(ogr.FieldDefn("id", ogr.OFTInteger64))
        layer.CreateField(ogr.FieldDefn("area_m2", ogr.OFTReal))
        layer.CreateField(ogr.FieldDefn("confidence", ogr.OFTReal))
        defn = layer.GetLayerDefn()
        layer.StartTransaction()
        for raw in raw_layer:
            geom = raw.GetGeometryRef()
            if min_area_m2 > 0 and ground.geometry_m2(geom) < min_area_m2:
                dropped += 1
                continue
            mean_p = confidence.mean(geom) if confidence is not None else None
            if regularizer is not None:
                geom = regularizer(geom)
            elif simplify_m > 0:
                geom = geom.SimplifyPreserveTopology(tolerance)
                if geom is None or geom.IsEmpty():
                    dropped += 1
                    continue
            area_m2 = ground.geometry_m2(geom)
            polygons += 1
            total_area_m2 += area_m2
            feat = ogr.Feature(defn)
            feat.SetField("id", polygons)
            feat.SetField("area_m2", area_m2)
            if mean_p is None:
                feat.SetFieldNull("confidence")
            else:
                feat.SetField("confidence", mean_p)
            feat.SetGeometry(geom)
            layer.CreateFeature(feat)
        layer.CommitTransaction()
        layer = None
        out_ds = None
        raw_layer = None
        raw_ds = None
        os.replace(gpkg_tmp, out_gpkg)

        if geojson_path is not None:
            geojson_path = Path(geojson_path)
            json_tmp = _partial(geojson_path)
            json_tmp.unlink(missing_ok=True)
            # RFC 7946 GeoJSON is WGS84 longitude/latitude only.
            gdal.VectorTranslate(str(json_tmp), str(out_gpkg), format="GeoJSON",
                                 dstSRS="EPSG:4326", layers=[LAYER_NAME],
                                 layerCreationOptions=["RFC7946=YES"])
            os.replace(json_tmp, geojson_path)
    except RuntimeError as exc:
        raise OutputError(write_failure(out_gpkg, exc, f"vectorizing {mask_tif} failed")) from None
    finally:
        selector = confidence = None
        ds = None
        leftovers = [gpkg_tmp, raw_tmp]
        if geojson_path is not None:
            leftovers.append(_partial(Path(geojson_path)))
        for p in leftovers:
            p.unlink(missing_ok=True)
    return {"mask": str(mask_tif), "gpkg": str(out_gpkg),
            "geojson": str(geojson_path) if geojson_path is not None else None,
            "polygons": polygons, "area_m2": total_area_m2, "dropped": dropped,
            "confidence": str(prob_tif) if prob_tif.is_file() else None,
            "probability_expected": str(prob_tif),
            "regularized": dict(regularizer.methods) if regularizer is not None else None}


def merged_driver(out_path: str | Path) -> str:
    """The OGR driver that ``--merged`` writes, from its extension; InputError (one line) for an
    extension without one, a missing folder or a directory in its place."""
    ensure_configured()
    path = Path(out_path)
    driver = MERGED_FORMATS.get(path.suffix.lower())
    if driver is None or ogr.GetDriverByName(driver) is None:
        known = ", ".join(e for e, d in MERGED_FORMATS.items() if ogr.GetDriverByName(d))
        raise InputError(f"--merged {out_path}: unsupported extension "
                         f"'{path.suffix or '(none)'}'; use one of {known}")
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"--merged {out_path}: folder {folder} does not exist; create it or "
                         "give a path in an existing folder")
    if path.is_dir():
        raise InputError(f"--merged {out_path}: is a directory; give a file name such as "
                         f"{path / 'buildings.gpkg'}")
    return driver


def merge_layers(gpkgs: Sequence[str | Path], out_path: str | Path,
                 target_crs: str = "EPSG:4326") -> dict[str, Any]:
    """One layer of every scene's polygons in ``target_crs`` (scenes in any CRSs), in the format
    the extension names (GeoPackage, GeoJSON, Shapefile, FlatGeobuf): columns ``scene`` (source
    GeoPackage stem), ``id``, ``area_m2`` (ground area, see ``io/area.py``) and ``confidence``.

    The files are written in a hidden folder beside the target and moved into place at the end
    (a Shapefile is several files)."""
    out_path = Path(out_path)
    driver_name = merged_driver(out_path)
    dst = osr.SpatialReference()
    try:
        dst.SetFromUserInput(target_crs)
    except RuntimeError:
        raise InputError(f"--merged-crs {target_crs}: not a known coordinate reference system "
                         "(use e.g. EPSG:4326)") from None
    dst.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    staging = out_path.parent / f".{out_path.name}.partial"
    count = 0
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        out_ds = ogr.GetDriverByName(driver_name).CreateDataSource(str(staging / out_path.name))
        layer = out_ds.CreateLayer(LAYER_NAME, srs=dst, geom_type=ogr.wkbPolygon)
        for name, kind in (("scene", ogr.OFTString), ("id", ogr.OFTInteger64),
                           ("area_m2", ogr.OFTReal), ("confidence", ogr.OFTReal)):
            layer.CreateField(ogr.FieldDefn(name, kind))
        defn = layer.GetLayerDefn()
        layer.StartTransaction()
        for g in gpkgs:
            src_ds = ogr.Open(str(g))
            src = src_ds.GetLayerByName(LAYER_NAME)
            srs = src.GetSpatialRef()
            srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            to_dst = osr.CoordinateTransformation(srs, dst)
            scene = Path(g).stem
            for f in src:
                geom = f.GetGeometryRef().Clone()
                geom.Transform(to_dst)
                feat = ogr.Feature(defn)
                feat.SetField("scene", scene)
                feat.SetField("id", f.GetField("id"))
                feat.SetField("area_m2", f.GetField("area_m2"))
                has_confidence = (f.GetFieldIndex("confidence") >= 0
                                  and f.IsFieldSetAndNotNull("confidence"))
                if has_confidence:
                    feat.SetField("confidence", f.GetField("confidence"))
                else:
                    feat.SetFieldNull("confidence")
                feat.SetGeometry(geom)
                layer.CreateFeature(feat)
                count += 1
            src_ds = None
        layer.CommitTransaction()
        layer = None
        out_ds = None
        for part in sorted(staging.iterdir()):
            os.replace(part, out_path.parent / part.name)
    except (RuntimeError, OSError) as exc:
        raise OutputError(write_failure(out_path, exc, "merging polygon layers failed")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"path": str(out_path), "polygons": count, "crs": target_crs}


def expand_mask_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Mask GeoTIFFs from files and output directories (their ``*.resflow-mask.tif``, or the
    ``*_mask.tif`` of older runs; COGs excluded)."""
    masks: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob(f"*{MASK_SUFFIX}") if q.is_file())
            found = found or sorted(q for q in p.glob("*_mask.tif") if q.is_file())
            if not found:
                raise InputError(f"{p}: no *{MASK_SUFFIX} in this directory; pass a `resflow run` "
                                 "output directory or mask files")
            masks.extend(found)
        elif p.is_file():
            masks.append(p)
        else:
            raise InputError(f"{p}: mask file or directory not found")
    unique: dict[Path, None] = dict.fromkeys(m.resolve() for m in masks)
    return list(unique)


def output_paths(mask_tif: Path, out_dir: Optional[str | Path]) -> tuple[Path, Path]:
    """Where a mask's GeoPackage and GeoJSON go: ``<stem>.resflow-buildings.gpkg/.geojson``."""
    name = mask_tif.name
    stem = next((name[:-len(s)] for s in (MASK_SUFFIX, "_mask.tif") if name.endswith(s)),
                mask_tif.stem)
    folder = Path(out_dir) if out_dir is not None else mask_tif.parent
    return (folder / output_file_name(stem, "buildings", ".gpkg"),
            folder / output_file_name(stem, "buildings", ".geojson"))


def vectorize_one(mask: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One mask, with a user-caused failure turned into an error entry instead of an exception."""
    gpkg, geojson = output_paths(mask, args.out)
    try:
        return vectorize_mask(mask, gpkg, args.min_area_m2, args.simplify_m,
                              geojson if args.geojson else None,
                              getattr(args, "regularize", False))
    except ResflowError as exc:
        return {"mask": str(mask), "error": str(exc), "exit_code": exc.exit_code}


def result_line(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"{result['mask']}: error: {result['error']}"
    extra = f", {result['geojson']}" if result["geojson"] else ""
    if result.get("confidence"):
        source = f"; confidence from {Path(result['confidence']).name}"
    else:
        source = (f"; confidence empty: no probability COG {result['probability_expected']} "
                  "(run with output.probability: true)")
    methods = result.get("regularized")
    shapes = ""
    if methods:
        shapes = "; right angles: " + ", ".join(
            f"{methods[m]} {m}" for m in ("rectangle", "orthogonal") if methods.get(m))
        if methods.get("simplified"):
            shapes += (f", {methods['simplified']} left simplified (no right-angle outline "
                       f"within {MAX_AREA_CHANGE:.0%} of their area)")
    return (f"{result['mask']}: {result['polygons']} polygon(s), {result['area_m2']:.1f} m2 "
            f"-> {result['gpkg']}{extra}{source}{shapes}")


def prepare_outputs(args: argparse.Namespace) -> None:
    """Check the outputs before any work: create ``--out``, and check ``--merged`` (its format,
    its folder) and ``--merged-crs``; a one-line error for each problem."""
    if args.out is not None:
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{args.out}: cannot create output directory "
                              f"({exc.strerror})") from None
    if getattr(args, "merged", None):
        merged_driver(args.merged)
        merged_crs = getattr(args, "merged_crs", "EPSG:4326")
        try:
            osr.SpatialReference().SetFromUserInput(merged_crs)
        except RuntimeError:
            raise InputError(f"--merged-crs {merged_crs}: not a known coordinate reference "
                             "system (use e.g. EPSG:4326)") from None


def summarise(results: Sequence[dict[str, Any]], ranks: int = 1) -> int:
    """Print the totals line; exit code 0 when every mask succeeded."""
    ok = [r for r in results if "error" not in r]
    failed = len(results) - len(ok)
    print(f"vectorized {len(ok)}/{len(results)} mask(s) on {ranks} rank(s): "
          f"{sum(r['polygons'] for r in ok)} polygon(s), "
          f"{sum(r['area_m2'] for r in ok):.1f} m2" + (f", {failed} failed" if failed else ""),
          flush=True)
    if failed:
        return max(int(r.get("exit_code", 2)) for r in results if "error" in r)
    return 0
