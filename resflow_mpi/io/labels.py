"""Ground-truth labels as data: one reader for raster and vector labels on a scene's pixel grid.

A scene's label is either

* a **raster** on exactly the scene's grid (same size, geotransform and CRS; any file name, any
  GDAL format). A raster on another grid is refused with the `gdalwarp` call that fixes it:
  warping class values silently would move building edges, and vectors are the way to bring
  labels of another grid; or
* a **vector** source (GeoJSON, GeoPackage, Shapefile, any OGR source) of building polygons in any
  CRS, optionally filtered by an OGR SQL ``where`` and classed by an attribute (``class_field``).
  Vectors are rasterised per window on the fly: only the features under the window (spatial
  filter) are reprojected to the scene CRS (traditional x/y axis order, so lat/lon never swap)
  and burnt into an in-memory raster on the window's own grid (rotation included), so a
  country-sized footprint file never becomes one big raster.

Every read returns uint8 on the scene grid: 0 background, 1 building, 255 ignore. What the label's
values mean comes from ``labels.values`` (see :class:`ValueMapping`); :meth:`LabelSource.check`
validates a label against its scene before any training or evaluation and refuses, in one line
naming the file and the values, anything that would silently train on the wrong thing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from osgeo import gdal, ogr, osr

from ..config import LabelsConfig
from ..errors import InputError
from .gdalenv import ensure_configured
from .raster import SceneInfo

BACKGROUND, BUILDING, IGNORE = 0, 1, 255
_CLASS_CODE = {"background": BACKGROUND, "building": BUILDING, "ignore": IGNORE}
# Burn order for vectors: later classes overwrite earlier ones where polygons overlap.
_BURN_ORDER = {BACKGROUND: 0, BUILDING: 1, IGNORE: 2}
_POLYGON_TYPES = {ogr.wkbPolygon, ogr.wkbMultiPolygon, ogr.wkbCurvePolygon, ogr.wkbMultiSurface}
DEFAULT_RASTER_VALUES = {"building": [1], "background": [0], "ignore": [255]}
SUMMARY_CELLS = 1024  # the coarse label map used for checks and crop stratification, per side
_VECTOR_DATASETS: dict[tuple[str, float], gdal.Dataset] = {}  # open vector labels, this process


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _key(value: Any) -> str:
    """Values compare as text so 1 (int field), "1" (text field) and 1.0 (float raster) agree."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


@dataclass(frozen=True)
class LabelSpec:
    """Where one scene's label is and how to read it (picklable; opened in each process)."""

    path: str
    layer: Optional[str] = None        # vector layer name (sources with several layers)
    where: Optional[str] = None        # OGR SQL attribute filter
    class_field: Optional[str] = None  # attribute mapped through labels.values


@dataclass(frozen=True)
class ValueMapping:
    """Which label values are building, background and ignore (compared as text)."""

    building: tuple[str, ...]
    background: tuple[str, ...]
    ignore: tuple[str, ...]
    declared: bool  # False: the default raster mapping (0 background, 1 building, 255 ignore)

    @staticmethod
    def from_config(cfg: LabelsConfig) -> "ValueMapping":
        values = cfg.values if cfg.values is not None else DEFAULT_RASTER_VALUES
        return ValueMapping(*(tuple(_key(v) for v in values.get(c, [])) for c in
                              ("building", "background", "ignore")),
                            declared=cfg.values is not None)

    def code_of(self, value: Any) -> Optional[int]:
        """0/1/255 for a mapped value, None for a value outside the mapping."""
        k = _key(value)
        for name, keys in (("building", self.building), ("background", self.background),
                           ("ignore", self.ignore)):
            if k in keys:
                return _CLASS_CODE[name]
        return None

    def describe(self) -> str:
        return ", ".join(f"{name} [{', '.join(keys)}]" for name, keys in
                         (("building", self.building), ("background", self.background),
                          ("ignore", self.ignore)))


@dataclass
class LabelSummary:
    """What a whole-scene look at a label found (checks passed; warnings to print)."""

    path: str
    scene: str
    kind: str                              # "raster" or "vector"
    values: dict[str, int]                 # raw value -> pixels (raster) or features (vector)
    building_fraction: float
    background_fraction: float
    ignore_fraction: float
    cell_px: int                           # side of one coarse cell in scene pixels
    building_cells: np.ndarray             # (rows, cols) bool: a building touches the cell
    warnings: list[str] = field(default_factory=list)


def _coarse_grid(scene: SceneInfo, max_cells: int) -> tuple[int, int, int]:
    """(cell_px, cols, rows) of the coarse grid covering the scene with at most max_cells a side."""
    cell = max(1, math.ceil(max(scene.width, scene.height) / max_cells))
    return cell, math.ceil(scene.width / cell), math.ceil(scene.height / cell)


def _window_geotransform(gt: Sequence[float], col: float, row: float,
                         scale: float = 1.0) -> tuple[float, ...]:
    """Geotransform of a window starting at (col, row), pixels ``scale`` times the scene's."""
    return (gt[0] + col * gt[1] + row * gt[2], gt[1] * scale, gt[2] * scale,
            gt[3] + col * gt[4] + row * gt[5], gt[4] * scale, gt[5] * scale)


class LabelSource:
    """A scene's label read window by window on the scene's pixel grid (0/1/255 uint8)."""

    kind = "label"

    def __init__(self, spec: LabelSpec, scene: SceneInfo, cfg: LabelsConfig):
        self.spec, self.scene, self.cfg = spec, scene, cfg
        self.path = spec.path
        self.mapping = ValueMapping.from_config(cfg)

    def read_window(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        """The label under a scene pixel window, (height, width) uint8; ignore outside the scene."""
        raise NotImplementedError

    def check(self, max_cells: int = SUMMARY_CELLS) -> LabelSummary:
        """Validate the label against its scene (InputError naming file and values); summarise."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the GDAL handle."""

    def _refuse_ignore(self, frac: float, what: str) -> None:
        limit = self.cfg.max_ignore_fraction
        if frac > limit:
            raise InputError(f"{self.path}: {frac:.0%} of the label over scene {self.scene.path} "
                             f"is ignore ({what}), more than labels.max_ignore_fraction={limit:g}; "
                             "check labels.values, or raise labels.max_ignore_fraction if intended")


class RasterLabelSource(LabelSource):
    """A one-band raster on the scene's grid; values mapped through labels.values."""

    kind = "raster"

    def __init__(self, spec: LabelSpec, scene: SceneInfo, cfg: LabelsConfig, ds: gdal.Dataset):
        super().__init__(spec, scene, cfg)
        self._ds = ds
        where = f"{self.path}: label raster"
        if ds.RasterCount != 1:
            raise InputError(f"{where} has {ds.RasterCount} bands; a label is one band of class "
                             "values (write band 1 alone, e.g. gdal_translate -b 1)")
        self._warnings = [w for w in [self._check_grid()] if w]
        if scene.native_grid is not None:  # scenes.gsd_m: the label follows its scene's grid
            ds = self._ds = gdal.Translate("", ds, format="VRT", width=scene.width,
                                           height=scene.height, resampleAlg="mode")
            ds.SetGeoTransform(list(scene.geotransform))
        band = ds.GetRasterBand(1)
        self.nodata = band.GetNoDataValue()
        self._dtype = gdal.GetDataTypeName(band.DataType)
        self._lut = self._lookup_table()

    def _check_grid(self) -> Optional[str]:
        ds, s = self._ds, self.scene
        g = s.file_grid  # the scene file's own grid (also when read at scenes.gsd_m)
        gt = ds.GetGeoTransform(can_return_null=True)
        wkt = ds.GetProjection() or ""
        georef = gt is not None and tuple(gt) != (0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
        size_ok = (ds.RasterXSize, ds.RasterYSize) == (g.width, g.height)
        if not georef and not wkt:
            if not size_ok:
                raise InputError(f"{self.path}: label raster is {ds.RasterXSize}x{ds.RasterYSize} "
                                 f"px without georeferencing, its scene {s.path} is "
                                 f"{g.width}x{g.height}; give a label on the scene's grid")
            return (f"{self.path}: label raster has no georeferencing; taken as pixel-aligned with "
                    f"its scene {os.path.basename(s.path)}")
        diffs = []
        if not size_ok:
            diffs.append(f"size {ds.RasterXSize}x{ds.RasterYSize} vs {g.width}x{g.height}")
        if georef:
            px = max(abs(g.geotransform[1]), abs(g.geotransform[5]), 1e-12)
            # Origin within 1/1000 pixel, pixel size and rotation within a millionth of a pixel.
            tol = (px * 1e-3, px * 1e-6, px * 1e-6, px * 1e-3, px * 1e-6, px * 1e-6)
            if any(abs(a - b) > t for a, b, t in zip(gt, g.geotransform, tol)):
                diffs.append(f"geotransform {tuple(round(v, 6) for v in gt)} vs "
                             f"{tuple(round(v, 6) for v in g.geotransform)}")
        if wkt and not osr.SpatialReference(wkt=wkt).IsSame(osr.SpatialReference(wkt=s.crs_wkt)):
            diffs.append("CRS")
        if not diffs:
            return None
        fix = ""
        if g.geotransform[2] == 0 and g.geotransform[4] == 0:
            x0, y0 = g.geotransform[0], g.geotransform[3]
            x1, y1 = x0 + g.width * g.geotransform[1], y0 + g.height * g.geotransform[5]
            srs = f"EPSG:{s.epsg}" if s.epsg else "<scene CRS>"
            fix = (f" (gdalwarp -r near -t_srs {srs} -te {min(x0, x1):.6f} {min(y0, y1):.6f} "
                   f"{max(x0, x1):.6f} {max(y0, y1):.6f} -ts {g.width} {g.height} "
                   f"{os.path.basename(self.path)} label_on_scene_grid.tif)")
        raise InputError(f"{self.path}: label raster is on another grid than its scene {s.path} "
                         f"({'; '.join(diffs)}); warp it onto the scene grid{fix}, or give the "
                         "labels as vector polygons")

    def _lookup_table(self) -> Optional[np.ndarray]:
        """Raw value -> code for 8/16-bit unsigned rasters (fast path); unmapped values -> 255."""
        if self._dtype not in ("Byte", "UInt16"):
            return None
        n = 256 if self._dtype == "Byte" else 65536
        lut = np.full(n, IGNORE, np.uint8)
        for keys, code in ((self.mapping.ignore, IGNORE), (self.mapping.background, BACKGROUND),
                           (self.mapping.building, BUILDING)):
            for k in keys:
                if k.isdigit() and int(k) < n and self._code(int(k)) == code:
                    lut[int(k)] = code
        return lut

    def _code(self, value: Any) -> Optional[int]:
        code = self.mapping.code_of(value)
        if code is None and self.nodata is not None and _key(value) == _key(self.nodata):
            return IGNORE  # the raster's declared nodata, unless the mapping says otherwise
        return code

    def _map(self, raw: np.ndarray) -> np.ndarray:
        if self._lut is not None:
            return self._lut[raw]
        out = np.full(raw.shape, IGNORE, np.uint8)
        for v in np.unique(raw):
            code = self._code(v.item())
            if code is not None:
                out[raw == v] = code
        return out

    def _read_raw(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        try:
            return self._ds.GetRasterBand(1).ReadAsArray(col, row, width, height)
        except RuntimeError as exc:
            raise InputError(f"{self.path}: read of label window {(col, row, width, height)} "
                             f"failed ({_first_line(exc)}); the file may be damaged") from None

    def read_window(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        out = np.full((height, width), IGNORE, np.uint8)
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = min(col + width, self.scene.width), min(row + height, self.scene.height)
        if c1 > c0 and r1 > r0:
            out[r0 - row:r1 - row, c0 - col:c1 - col] = self._map(self._read_raw(c0, r0, c1 - c0,
                                                                                 r1 - r0))
        return out

    def check(self, max_cells: int = SUMMARY_CELLS) -> LabelSummary:
        """One streamed pass over the label (strips of one coarse cell): exact value counts and
        the coarse building map; memory is one strip."""
        s = self.scene
        cell, cols, rows = _coarse_grid(s, max_cells)
        counts: dict[Any, int] = {}
        building = np.zeros((rows, cols), bool)
        per_code = np.zeros(256, np.int64)
        for r in range(rows):
            r0 = r * cell
            h = min(cell, s.height - r0)
            raw = self._read_raw(0, r0, s.width, h)
            if self._lut is not None:
                hist = np.bincount(raw.ravel(), minlength=1)
                for v in np.flatnonzero(hist):
                    counts[int(v)] = counts.get(int(v), 0) + int(hist[v])
            else:
                vals, n = np.unique(raw, return_counts=True)
                for v, k in zip(vals, n):
                    counts[v.item()] = counts.get(v.item(), 0) + int(k)
            codes = self._map(raw)
            per_code += np.bincount(codes.ravel(), minlength=256)
            pad = cols * cell - s.width
            b = np.pad(codes == BUILDING, ((0, 0), (0, pad)))
            building[r] = b.reshape(h, cols, cell).any(axis=(0, 2))
        total = s.width * s.height
        values = {_key(v): n for v, n in sorted(counts.items())}
        unknown = [v for v in values if self._code(v) is None]
        if unknown:
            raise InputError(f"{self.path}: label values {', '.join(unknown)} are not in "
                             f"labels.values ({self.mapping.describe()}); declare what they mean "
                             "in labels.values")
        present = set(values)
        if not self.mapping.declared and "255" in present and "1" not in present \
                and present <= {"0", "255"}:
            raise InputError(f"{self.path}: label holds only the values 0 and 255 "
                             f"({values['255'] / total:.0%} 255); by default 1 is building and "
                             "255 is ignore, so it would train on no building at all; if 255 marks "
                             "buildings set labels.values: {building: [255], background: [0]}")
        fractions = {c: per_code[c] / total for c in (BACKGROUND, BUILDING, IGNORE)}
        ignored = [v for v in values if self._code(v) == IGNORE]
        self._refuse_ignore(fractions[IGNORE], "values " + ", ".join(ignored))
        warnings = list(self._warnings)
        if per_code[BUILDING] == 0:
            warnings.append(f"{self.path}: no building pixel in the label of scene "
                            f"{os.path.basename(s.path)} (values {', '.join(values)})")
        return LabelSummary(self.path, s.path, self.kind, values, fractions[BUILDING],
                            fractions[BACKGROUND], fractions[IGNORE], cell, building, warnings)

    def close(self) -> None:
        self._ds = None


class VectorLabelSource(LabelSource):
    """Building polygons from an OGR source, rasterised per window on the scene's grid."""

    kind = "vector"

    def __init__(self, spec: LabelSpec, scene: SceneInfo, cfg: LabelsConfig, ds: gdal.Dataset):
        super().__init__(spec, scene, cfg)
        self._ds = ds
        self.layer_name = self._pick_layer()
        self._layer = ds.GetLayerByName(self.layer_name)
        # Sources without a spatial index (GeoJSON, a Shapefile without .qix) scan every feature
        # on each query (seconds per window for 200k features): such a layer is copied once per
        # process into an in-memory FlatGeobuf, whose index answers a window in under a ms.
        self.indexed = bool(self._layer.TestCapability(ogr.OLCFastSpatialFilter))
        if not self.indexed:
            copy = _indexed_copy(self.path, ds, self.layer_name)
            if copy is not None:
                self._ds, self._layer = copy, copy.GetLayerByName(self.layer_name)
        defn = self._layer.GetLayerDefn()
        fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
        if spec.class_field is not None:
            if spec.class_field not in fields:
                raise InputError(f"{self.path}: class field {spec.class_field!r} not in layer "
                                 f"{self.layer_name!r} (fields: {', '.join(fields) or 'none'}); "
                                 "fix labels.class_field or the manifest's class_field")
            if cfg.values is None:
                raise InputError(f"{self.path}: labels by class field {spec.class_field!r} need "
                                 "labels.values (which values are building, background, ignore)")
        self.where = spec.where
        if self.where:
            try:
                self._layer.SetAttributeFilter(self.where)
            except RuntimeError as exc:
                raise InputError(f"{self.path}: where filter {self.where!r} is not valid OGR SQL "
                                 f"for layer {self.layer_name!r} ({_first_line(exc)}; fields: "
                                 f"{', '.join(fields) or 'none'})") from None
        layer_srs = self._layer.GetSpatialRef()
        if layer_srs is None:
            raise InputError(f"{self.path}: layer {self.layer_name!r} has no CRS (for a Shapefile "
                             "the .prj file is missing); assign one, e.g. ogr2ogr -a_srs EPSG:4326")
        self._layer_srs = layer_srs.Clone()
        self._layer_srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        scene_srs = osr.SpatialReference(wkt=scene.crs_wkt)
        scene_srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        self._same_crs = bool(self._layer_srs.IsSame(scene_srs))
        self._to_scene = None if self._same_crs else \
            osr.CoordinateTransformation(self._layer_srs, scene_srs)
        self._to_layer = None if self._same_crs else \
            osr.CoordinateTransformation(scene_srs, self._layer_srs)

    def _pick_layer(self) -> str:
        ds = self._ds
        names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]
        if self.spec.layer is not None:
            if self.spec.layer not in names:
                raise InputError(f"{self.path}: no layer {self.spec.layer!r} (layers: "
                                 f"{', '.join(names)}); fix labels.layer or the manifest's "
                                 "label_layer")
            return self.spec.layer
        if len(names) != 1:
            raise InputError(f"{self.path}: holds {len(names)} layers ({', '.join(names)}); name "
                             "the one with building polygons in labels.layer or the manifest's "
                             "label_layer")
        return names[0]

    # -- geometry ----------------------------------------------------------------------------
    def _window_bbox_in_layer(self, gt: Sequence[float], width: float, height: float
                              ) -> tuple[float, float, float, float]:
        """The window's footprint (edges densified) as a bounding box in the layer CRS."""
        n = 16
        pts = []
        for t in np.linspace(0.0, 1.0, n + 1):
            for c, r in ((t * width, 0.0), (t * width, height), (0.0, t * height),
                         (width, t * height)):
                pts.append((gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5]))
        if self._to_layer is not None:
            try:
                pts = [p[:2] for p in self._to_layer.TransformPoints(pts)]
            except RuntimeError as exc:
                raise InputError(f"{self.path}: cannot transform scene "
                                 f"{os.path.basename(self.scene.path)}'s extent into the label "
                                 f"CRS ({_first_line(exc)})") from None
            pts = [p for p in pts if all(math.isfinite(v) for v in p)]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if not xs:
            return (0.0, 0.0, -1.0, -1.0)
        # A small margin: features only touching the edge cost nothing, missing one costs pixels.
        mx, my = (max(xs) - min(xs)) * 1e-3 + 1e-9, (max(ys) - min(ys)) * 1e-3 + 1e-9
        return (min(xs) - mx, min(ys) - my, max(xs) + mx, max(ys) + my)

    def _features(self, bbox: tuple[float, float, float, float]
                  ) -> Iterator[tuple[Optional[int], Any, Optional[ogr.Geometry]]]:
        """(class code or None, raw class value, geometry in scene CRS or None if not a polygon)
        for every feature whose envelope meets ``bbox`` (layer CRS)."""
        layer = self._layer
        if bbox[2] < bbox[0]:
            return
        # The layer may be shared with other scenes' sources: set both filters every time.
        layer.SetAttributeFilter(self.where)
        layer.SetSpatialFilterRect(*bbox)
        layer.ResetReading()
        cf = self.spec.class_field
        try:
            for feat in layer:
                raw = feat.GetField(cf) if cf is not None else None
                code = self.mapping.code_of(raw) if cf is not None else BUILDING
                geom = feat.GetGeometryRef()
                if geom is None or ogr.GT_Flatten(geom.GetGeometryType()) not in _POLYGON_TYPES:
                    yield code, raw, None
                    continue
                geom = geom.Clone()
                if self._to_scene is not None:
                    geom.Transform(self._to_scene)
                yield code, raw, geom
        except RuntimeError as exc:
            raise InputError(f"{self.path}: reading layer {self.layer_name!r} failed "
                             f"({_first_line(exc)})") from None
        finally:
            layer.SetSpatialFilter(None)

    def _burn(self, geoms: list[tuple[int, ogr.Geometry]], gt: Sequence[float], width: int,
              height: int, fill: int, all_touched: bool = False) -> np.ndarray:
        """Rasterise (code, geometry) pairs onto a grid; later burn-order classes win."""
        out = gdal.GetDriverByName("MEM").Create("", width, height, 1, gdal.GDT_Byte)
        out.SetGeoTransform(list(gt))  # no CRS on purpose: geometries are already in scene CRS
        out.GetRasterBand(1).Fill(fill)
        if geoms:
            vds = ogr.GetDriverByName("Memory").CreateDataSource("")
            lyr = vds.CreateLayer("labels", None, ogr.wkbUnknown)
            lyr.CreateField(ogr.FieldDefn("burn", ogr.OFTInteger))
            defn = lyr.GetLayerDefn()
            for code, geom in sorted(geoms, key=lambda cg: _BURN_ORDER[cg[0]]):
                f = ogr.Feature(defn)
                f.SetField("burn", int(code))
                f.SetGeometry(geom)
                lyr.CreateFeature(f)
            opts = ["ATTRIBUTE=burn"] + (["ALL_TOUCHED=TRUE"] if all_touched else [])
            # Neither side has a CRS on purpose; GDAL warns about that on every call.
            gdal.PushErrorHandler("CPLQuietErrorHandler")
            try:
                gdal.RasterizeLayer(out, [1], lyr, options=opts)
            finally:
                gdal.PopErrorHandler()
        return out.GetRasterBand(1).ReadAsArray()

    @property
    def _fill(self) -> int:
        return IGNORE if self.cfg.outside == "ignore" else BACKGROUND

    def read_window(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        gt = _window_geotransform(self.scene.geotransform, col, row)
        geoms = [(code if code is not None else IGNORE, g)
                 for code, _, g in self._features(self._window_bbox_in_layer(gt, width, height))
                 if g is not None]
        out = self._burn(geoms, gt, width, height, self._fill)
        # Pixels outside the scene are ignore, as for raster labels.
        if col < 0 or row < 0 or col + width > self.scene.width or row + height > self.scene.height:
            rr, cc = np.ogrid[row:row + height, col:col + width]
            out[(rr < 0) | (rr >= self.scene.height) | (cc < 0) | (cc >= self.scene.width)] = IGNORE
        return out

    def _layer_extent_text(self) -> str:
        try:
            x0, x1, y0, y1 = self._layer.GetExtent()
        except RuntimeError:
            return "unknown"
        return f"{x0:.6g}, {y0:.6g}, {x1:.6g}, {y1:.6g}"

    def check(self, max_cells: int = SUMMARY_CELLS) -> LabelSummary:
        s = self.scene
        cell, cols, rows = _coarse_grid(s, max_cells)
        bbox = self._window_bbox_in_layer(s.geotransform, s.width, s.height)
        geoms: list[tuple[int, ogr.Geometry]] = []
        values: dict[str, int] = {}
        unknown: dict[str, int] = {}
        other_geoms = 0
        for code, raw, geom in self._features(bbox):
            key = _key(raw) if self.spec.class_field else "feature"
            values[key] = values.get(key, 0) + 1
            if code is None:
                unknown[key] = unknown.get(key, 0) + 1
            if geom is None:
                other_geoms += 1
            elif code is not None:
                geoms.append((code, geom))
        name = os.path.basename(s.path)
        if not values:
            self._refuse_no_overlap(bbox)
        if unknown:
            raise InputError(f"{self.path}: class field {self.spec.class_field!r} values "
                             f"{', '.join(sorted(unknown))} are not in labels.values "
                             f"({self.mapping.describe()}); declare what they mean in "
                             "labels.values or exclude them with labels.where")
        n = sum(values.values())
        if other_geoms == n and n:
            raise InputError(f"{self.path}: all {n} feature(s) over scene {name} are points or "
                             "lines; building labels must be polygons")
        gt = _window_geotransform(s.geotransform, 0, 0, scale=cell)
        classes = self._burn(geoms, gt, cols, rows, self._fill)
        touched = self._burn([(c, g) for c, g in geoms if c == BUILDING], gt, cols, rows,
                             BACKGROUND, all_touched=True) == BUILDING
        frac = {c: float((classes == c).mean()) for c in (BACKGROUND, BUILDING, IGNORE)}
        what = ("pixels no polygon covers, labels.outside=ignore" if self.cfg.outside == "ignore"
                else "polygons classed ignore")
        self._refuse_ignore(frac[IGNORE], what)
        warnings = []
        if other_geoms:
            warnings.append(f"{self.path}: {other_geoms} point/line feature(s) over scene {name} "
                            "skipped (building labels must be polygons)")
        if not any(c == BUILDING for c, _ in geoms):
            warnings.append(f"{self.path}: no building polygon over scene {name}; it trains as "
                            "background only")
        return LabelSummary(self.path, s.path, self.kind, values, frac[BUILDING],
                            frac[BACKGROUND], frac[IGNORE], cell, touched, warnings)

    def _refuse_no_overlap(self, bbox: tuple[float, float, float, float]) -> None:
        """No feature over the scene: a wrong CRS or file is refused; an empty area is not."""
        layer, name = self._layer, os.path.basename(self.scene.path)
        layer.SetSpatialFilter(None)
        layer.SetAttributeFilter(self.where)
        matching = layer.GetFeatureCount()
        if matching == 0 and self.where:
            raise InputError(f"{self.path}: no feature of layer {self.layer_name!r} matches the "
                             f"where filter {self.where!r}; fix labels.where")
        if matching == 0:
            raise InputError(f"{self.path}: layer {self.layer_name!r} holds no features")
        try:
            x0, x1, y0, y1 = layer.GetExtent()
        except RuntimeError:
            return
        if x1 < bbox[0] or x0 > bbox[2] or y1 < bbox[1] or y0 > bbox[3]:
            crs = self._layer_srs.GetName() or "the label CRS"
            raise InputError(f"{self.path}: labels do not overlap scene {name} (label extent "
                             f"{x0:.6g}, {y0:.6g}, {x1:.6g}, {y1:.6g}; scene extent "
                             f"{bbox[0]:.6g}, {bbox[1]:.6g}, {bbox[2]:.6g}, {bbox[3]:.6g}; both in "
                             f"{crs}); check the label file and its CRS")

    def close(self) -> None:
        self._layer = None
        self._ds = None


_INDEXED_COPIES: dict[tuple[str, float, str], Optional[gdal.Dataset]] = {}


def _indexed_copy(path: str, ds: gdal.Dataset, layer: str) -> Optional[gdal.Dataset]:
    """An in-memory, spatially indexed FlatGeobuf copy of one layer (once per process); None
    when the copy fails (the slow, unindexed reads still give the same pixels)."""
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0.0, layer)
    if key not in _INDEXED_COPIES:
        name = f"/vsimem/resflow-labels-{len(_INDEXED_COPIES)}.fgb"
        gdal.PushErrorHandler("CPLQuietErrorHandler")
        try:
            gdal.VectorTranslate(name, ds, format="FlatGeobuf", layers=[layer],
                                 layerName=layer)
            copy = gdal.OpenEx(name, gdal.OF_VECTOR | gdal.OF_READONLY)
        except RuntimeError:
            copy = None
        finally:
            gdal.PopErrorHandler()
        _INDEXED_COPIES[key] = copy
    return _INDEXED_COPIES[key]


def open_label_source(spec: LabelSpec, scene: SceneInfo, cfg: LabelsConfig) -> LabelSource:
    """Open a scene's label as a raster or vector source (InputError naming the file)."""
    ensure_configured()
    path = spec.path
    if not path.startswith("/vsi") and not os.path.exists(path):
        raise InputError(f"{path}: label file not found (label of scene {scene.path}); fix the "
                         "manifest entry, labels.file or labels.pattern")
    key = (os.path.abspath(path), os.path.getmtime(path) if os.path.exists(path) else 0.0)
    ds = _VECTOR_DATASETS.get(key)
    if ds is None:
        try:
            ds = gdal.OpenEx(path, gdal.OF_RASTER | gdal.OF_VECTOR | gdal.OF_READONLY)
        except (RuntimeError, UnicodeDecodeError) as exc:  # newer bindings decode GDAL's message
            raise InputError(f"{path}: not a readable raster or vector label "
                             f"({_first_line(exc)})") from None
        if ds is None:
            raise InputError(f"{path}: not a readable raster or vector label")
    try:
        if ds.GetLayerCount() > 0 and (ds.RasterCount == 0 or spec.layer is not None):
            # One label file often serves many scenes; some drivers (GeoJSON) parse the whole
            # file on open, so the handle is kept for the next scene in this process.
            _VECTOR_DATASETS[key] = ds
            return VectorLabelSource(spec, scene, cfg, ds)
        if ds.RasterCount > 0:
            if spec.where or spec.class_field:
                raise InputError(f"{path}: a raster label takes no where filter or class field "
                                 "(those are for vector labels); map raster values with "
                                 "labels.values")
            return RasterLabelSource(spec, scene, cfg, ds)
    except RuntimeError as exc:  # any other GDAL complaint about a damaged file
        raise InputError(f"{path}: damaged label file ({_first_line(exc)})") from None
    raise InputError(f"{path}: holds neither raster bands nor vector layers")


class TruthReader:
    """Ground truth for `resflow evaluate`: each scene's label opened lazily in this process,
    read per owned tile window (0 background, 1 building, 255 ignore)."""

    def __init__(self, scenes: Sequence[SceneInfo], labels: Sequence[Optional[LabelSpec]],
                 cfg: LabelsConfig):
        if len(scenes) != len(labels):
            raise ValueError("one label spec (or None) per scene")
        self.scenes, self.labels, self.cfg = list(scenes), list(labels), cfg
        self._open: dict[int, LabelSource] = {}

    def source(self, scene_index: int) -> LabelSource:
        """The scene's label source (InputError when the scene has no label)."""
        if scene_index not in self._open:
            spec = self.labels[scene_index]
            if spec is None:
                raise InputError(f"{self.scenes[scene_index].path}: scene has no label to "
                                 "evaluate against; give it one in the manifest, or set "
                                 "labels.file or labels.pattern")
            self._open[scene_index] = open_label_source(spec, self.scenes[scene_index], self.cfg)
        return self._open[scene_index]

    def window(self, scene_index: int, col: int, row: int, width: int, height: int
               ) -> np.ndarray:
        """The truth under a scene pixel window, (height, width) uint8."""
        return self.source(scene_index).read_window(col, row, width, height)

    def check_all(self) -> list[str]:
        """Check every label against its scene (InputError on the first bad one, before any
        inference); returns the warnings to print."""
        warnings: list[str] = []
        for i in range(len(self.scenes)):
            warnings += self.source(i).check().warnings
        return warnings

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()
