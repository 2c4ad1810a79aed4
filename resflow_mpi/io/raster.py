"""GDAL scene access: metadata, validation, window reads. Never reads a whole scene at once."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from osgeo import gdal, osr

from ..dtypes import DTYPE_RANGE
from ..errors import InputError
from ..tiling import PixelGrid, Tile, Window, grid_shape, resampled_grid, window_on_grid
from .area import GroundArea
from .gdalenv import ensure_configured
from .vsi import is_virtual
from .vsi import stat as vsi_stat

SUPPORTED_DTYPES = {"Byte": "uint8", "UInt16": "uint16", "Float32": "float32"}


@dataclass(frozen=True)
class PixelRules:
    """What the configuration adds to a file's own idea of which pixels are valid.

    ``nodata``: one value for every band, or one per selected band (replaces the file's nodata);
    ``blank_fill_ranges``: inclusive (low, high) value ranges; a pixel whose every selected band lies
    in one range and that sits in a horizontal run of at least ``blank_fill_min_run_px`` such pixels
    is blank fill (an image collar, the JPEG fringe 250-255), i.e. nodata. Empty: detector off.
    """

    nodata: Optional[tuple[float, ...]] = None
    blank_fill_ranges: tuple[tuple[float, float], ...] = ()
    blank_fill_min_run_px: int = 0

    @classmethod
    def from_scenes_config(cls, scenes: Any) -> "PixelRules":
        """The rules of a ScenesConfig (keys nodata, blank_fill, blank_fill_values, ...)."""
        nd = getattr(scenes, "nodata", None)
        nodata = None if nd is None else tuple(float(v) for v in (nd if isinstance(nd, list) else [nd]))
        ranges: tuple[tuple[float, float], ...] = ()
        if getattr(scenes, "blank_fill", False):
            ranges = tuple((float(lo), float(hi)) for lo, hi in scenes.blank_fill_values)
        return cls(nodata, ranges, int(getattr(scenes, "blank_fill_min_run_px", 0)) if ranges else 0)


@dataclass(frozen=True)
class SceneInfo:
    """What rank 0 learns about a scene from its header (no pixels).

    Pixel validity (see ``valid_pixels``) combines every source the scene declares: per-band nodata
    values (``band_nodata``, the file's or the config's), a GDAL mask band (internal or external,
    ``mask_band``), an alpha band (``alpha_band``) and the optional blank-fill detector.
    """

    path: str
    width: int
    height: int
    band_count: int
    dtype: str
    nodata: Optional[float]
    crs_wkt: str
    epsg: Optional[int]
    geotransform: tuple[float, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    # Per-band (mean, std) of valid pixels, when normalization.mode is "scene".
    band_stats: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
    # Nodata value of each band of the file (index band-1; None: that band declares none).
    band_nodata: tuple[Optional[float], ...] = ()
    mask_band: Optional[int] = None     # band whose GDAL mask band (not nodata-derived) is honoured
    alpha_band: Optional[int] = None    # 1-based alpha band (0 = transparent = invalid)
    blank_fill_ranges: tuple[tuple[float, float], ...] = ()
    blank_fill_min_run_px: int = 0
    # The file's own grid when the networks see the scene resampled (scenes.gsd_m): width,
    # height and geotransform above are then the resampled grid, read through ``open_grid``.
    native_grid: Optional[PixelGrid] = None
    resampling: str = ""  # GDAL resampling of those reads

    @property
    def file_grid(self) -> PixelGrid:
        """The grid of the file itself (where exported masks go)."""
        return self.native_grid or PixelGrid(self.width, self.height, self.geotransform)

    def pixel_sides_m(self) -> tuple[float, float]:
        """Ground lengths in metres of a pixel of the file, along a row and a column, at the
        scene's centre."""
        g = self.file_grid
        return self._ground.pixel_sides_m(g.geotransform, g.width / 2, g.height / 2)

    def native_gsd_m(self) -> float:
        """The file's ground sample distance in metres (geometric mean of a pixel's sides)."""
        sx, sy = self.pixel_sides_m()
        return math.sqrt(sx * sy)

    def nodata_of(self, band: int) -> Optional[float]:
        """The nodata value honoured for a 1-based band (config override or file)."""
        if self.band_nodata:
            return self.band_nodata[band - 1] if band <= len(self.band_nodata) else None
        return self.nodata

    def has_validity_source(self, bands: Sequence[int]) -> bool:
        """True when some pixel of the scene may be invalid (otherwise all pixels are valid)."""
        return (any(self.nodata_of(b) is not None for b in bands) or self.mask_band is not None
                or self.alpha_band is not None or bool(self.blank_fill_ranges))

    def validity_text(self, bands: Sequence[int]) -> str:
        """Where the scene's validity comes from, in words (for messages)."""
        parts = []
        values = [self.nodata_of(b) for b in bands]
        if any(v is not None for v in values):
            shown = sorted({"none" if v is None else f"{v:g}" for v in values})
            parts.append(f"nodata value{'s' if len(shown) > 1 else ''} {', '.join(shown)}")
        if self.mask_band is not None:
            parts.append("GDAL mask band")
        if self.alpha_band is not None:
            parts.append(f"alpha band {self.alpha_band}")
        if self.blank_fill_ranges:
            parts.append("blank-fill detector")
        return " + ".join(parts) or "no nodata declared"

    @functools.cached_property
    def _ground(self) -> GroundArea:
        return GroundArea(self.crs_wkt, self.path)

    @functools.cached_property
    def area_km2(self) -> float:
        """Ground area of the whole scene in km2 (on the CRS's ellipsoid, see ``io/area.py``)."""
        return self.window_area_km2(Window(0, 0, self.width, self.height))

    def window_area_km2(self, w: Window) -> float:
        """Ground area in km2 of a pixel window (e.g. a tile's owned window)."""
        return self._ground.window_m2(self.geotransform, w) / 1e6

    def window_extent(self, w: Window) -> tuple[float, float, float, float]:
        """Georeferenced (xmin, ymin, xmax, ymax) of a pixel window (any geotransform)."""
        gt = self.geotransform
        xs = [gt[0] + c * gt[1] + r * gt[2] for c in (w.col, w.col + w.width) for r in (w.row, w.row + w.height)]
        ys = [gt[3] + c * gt[4] + r * gt[5] for c in (w.col, w.col + w.width) for r in (w.row, w.row + w.height)]
        return (min(xs), min(ys), max(xs), max(ys))

    def window_extent_wgs84(self, w: Window) -> tuple[float, float, float, float]:
        """(lon_min, lat_min, lon_max, lat_max) of a pixel window in EPSG:4326, from its four
        corners and edge midpoints (so archives spanning UTM zones share one frame)."""
        ensure_configured()
        src = osr.SpatialReference(wkt=self.crs_wkt)
        dst = osr.SpatialReference()
        dst.ImportFromEPSG(4326)
        for srs in (src, dst):
            srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        to_wgs84 = osr.CoordinateTransformation(src, dst)
        gt = self.geotransform
        pts = [(gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5])
               for c in (w.col, w.col + w.width / 2, w.col + w.width)
               for r in (w.row, w.row + w.height / 2, w.row + w.height)]
        lonlat = [to_wgs84.TransformPoint(x, y)[:2] for x, y in pts]
        lons, lats = [p[0] for p in lonlat], [p[1] for p in lonlat]
        return (min(lons), min(lats), max(lons), max(lats))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def __getstate__(self) -> dict[str, Any]:
        # Fields only (and the area once computed): the cached ground-area model holds OSR objects.
        state = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "area_km2" in self.__dict__:
            state["area_km2"] = self.__dict__["area_km2"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            object.__setattr__(self, k, v)


def _check_local_path(path: str) -> None:
    """A local scene path names a non-empty file (GDAL virtual paths are checked by GDAL)."""
    if is_virtual(path):
        return
    if not os.path.exists(path):
        raise InputError(f"{path}: scene file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a GeoTIFF scene")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")


def _open(path: str) -> gdal.Dataset:
    ensure_configured()  # every scene read starts here
    _check_local_path(path)
    try:
        ds = gdal.Open(path, gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable raster ({str(exc).strip().splitlines()[0]})") from None
    if ds is None:
        raise InputError(f"{path}: not a readable raster")
    return ds


def open_scene(path: str | Path, bands: Sequence[int] = (1, 2, 3),
               expect_dtype: Optional[str] = None, rules: Optional[PixelRules] = None) -> SceneInfo:
    """Read and check a scene's header; raise InputError naming the file and the problem.

    ``rules`` (from the config) may replace the file's nodata and switch on blank-fill detection."""
    try:
        return _open_scene(str(path), bands, expect_dtype, rules or PixelRules())
    except RuntimeError as exc:  # any other GDAL complaint about a damaged header
        first = (str(exc).strip().splitlines() or ["unreadable"])[0]
        raise InputError(f"{path}: damaged raster ({first})") from None


def prepare_scene(path: str | Path, cfg: Any) -> SceneInfo:
    """A scene opened with every input-semantics setting of a RunConfig, checked before work:
    nodata override and blank fill (scenes.*), band statistics for normalization.mode=scene, and
    for float scenes an explicit value range that the sampled pixels respect."""
    bands = cfg.scenes.bands
    info = open_scene(path, bands, cfg.scenes.expect_dtype, PixelRules.from_scenes_config(cfg.scenes))
    info = at_gsd(info, cfg.scenes.gsd_m, cfg.scenes.gsd_resampling)
    if info.dtype == "float32":
        check_float_range(info, bands, cfg.normalization)
    elif cfg.normalization.mode == "range":
        check_integer_range(info, bands, cfg.normalization)
    return with_statistics(info, bands, cfg.normalization.mode)


def at_gsd(info: SceneInfo, gsd_m: Optional[float], resampling: str = "auto") -> SceneInfo:
    """The scene as the networks see it at ground sample distance ``gsd_m`` metres (None: as it
    is): its grid resampled (see ``tiling.resampled_grid``), the file's grid kept in
    ``native_grid``. ``resampling`` "auto" averages when coarsening and interpolates bilinearly
    when refining."""
    if gsd_m is None or info.native_grid is not None:
        return info
    grid = resampled_grid(info.file_grid, info.pixel_sides_m(), gsd_m)
    if grid is None:
        return info
    if resampling == "auto":
        resampling = "average" if grid.width < info.width else "bilinear"
    return replace(info, width=grid.width, height=grid.height, geotransform=grid.geotransform,
                   native_grid=info.file_grid, resampling=resampling)


def gsd_summary(scenes: Sequence[SceneInfo]) -> dict[str, float]:
    """Smallest, median and largest ground sample distance (m) of the scenes' files."""
    gsd = sorted(s.native_gsd_m() for s in scenes)
    if not gsd:
        return {}
    return {"min": round(gsd[0], 4), "median": round(float(np.median(gsd)), 4),
            "max": round(gsd[-1], 4)}


GSD_SPREAD = 1.5  # scenes whose pixel sizes differ more than this look different to the networks


def gsd_note(summary: dict[str, float], gsd_m: Optional[float]) -> tuple[str, bool]:
    """What init says about the training scenes' ground resolution, and whether it is a warning
    (pixel sizes spread over more than GSD_SPREAD x while the networks see each as it is)."""
    lo, hi = summary["min"], summary["max"]
    span = f"{lo:g} m/px" if lo == hi else f"{lo:g} to {hi:g} m/px"
    if gsd_m is not None:
        return f"ground resolution: scenes {span}, read resampled to {gsd_m:g} m (scenes.gsd_m)", False
    if hi > lo * GSD_SPREAD:
        return (f"training scenes range from {span} and the networks see each at its own pixel "
                f"size (a building spans {hi / lo:.1f}x more pixels in some); set scenes.gsd_m "
                f"(e.g. {summary['median']:g}) so they see one ground resolution"), True
    return f"ground resolution: scenes {span} (each at its own pixel size)", False


def gsd_mismatch(training: dict[str, float], scenes: Sequence[SceneInfo],
                 gsd_m: Optional[float]) -> Optional[str]:
    """A warning when a run maps scenes at their own pixel size that lies outside the pixel sizes
    the gallery was trained on (by more than GSD_SPREAD); None otherwise."""
    if gsd_m is not None or not training:
        return None
    lo, hi = training["min"] / GSD_SPREAD, training["max"] * GSD_SPREAD
    off = [s for s in scenes if not lo <= s.native_gsd_m() <= hi]
    if not off:
        return None
    first = off[0]
    return (f"{len(off)} scene(s) (e.g. {os.path.basename(first.path)} at "
            f"{first.native_gsd_m():.3g} m/px) are far from the {training['min']:g}-"
            f"{training['max']:g} m/px the gallery was trained on, and are mapped at their own "
            "pixel size; retrain with scenes.gsd_m set so every scene is resampled to one ground "
            "resolution")


def open_grid(info: SceneInfo) -> gdal.Dataset:
    """The scene's pixels on the grid the networks see: the file, or (scenes.gsd_m) a virtual
    raster that resamples the file inside each window read (GDAL reads only the source pixels a
    window needs; nothing is written). One handle per reader, as for the file."""
    ds = _open(info.path)
    if info.native_grid is None:
        return ds
    nodata = _resampling_nodata(info, ds)
    opts = gdal.TranslateOptions(format="VRT", width=info.width, height=info.height,
                                 resampleAlg=info.resampling,
                                 noData=nodata if nodata is not None else None)
    vrt = gdal.Translate("", ds, options=opts)
    if vrt is None:
        raise InputError(f"{info.path}: cannot be resampled to scenes.gsd_m")
    vrt.SetGeoTransform(info.geotransform)
    return vrt


def _resampling_nodata(info: SceneInfo, ds: gdal.Dataset) -> Optional[float]:
    """The nodata value the resampling must skip when the config replaces the file's (None: the
    file's own values hold). GDAL's resampled reads take one such value for all bands."""
    own = [ds.GetRasterBand(i).GetNoDataValue() for i in range(1, ds.RasterCount + 1)]
    wanted = list(info.band_nodata) or own
    if all(_same_nodata(a, b) for a, b in zip(own, wanted)):
        return None
    values = {("nan" if v is not None and math.isnan(v) else v) for v in wanted if v is not None}
    if len(values) != 1:
        raise InputError(f"{info.path}: scenes.gsd_m resamples with one nodata value for all "
                         f"bands, scenes.nodata gives {sorted(map(str, values))}; give one value")
    return next(v for v in wanted if v is not None)


def _same_nodata(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _check_not_truncated(path: str, ds: gdal.Dataset, bands: Sequence[int]) -> None:
    """A TIFF whose last block lies beyond the end of the file was cut short (copy interrupted)."""
    found = vsi_stat(path) if ds.GetDriver().ShortName == "GTiff" else None
    if found is None:
        return
    size = found[0]
    for b in bands:
        band = ds.GetRasterBand(b)
        bx, by = band.GetBlockSize()
        nx, ny = (ds.RasterXSize + bx - 1) // bx, (ds.RasterYSize + by - 1) // by
        for x, y in ((nx - 1, ny - 1), (0, 0)):
            off = band.GetMetadataItem(f"BLOCK_OFFSET_{x}_{y}", "TIFF")
            n = band.GetMetadataItem(f"BLOCK_SIZE_{x}_{y}", "TIFF")
            if off and n and int(off) + int(n) > size:
                raise InputError(f"{path}: file is truncated ({size} bytes, band {b} needs "
                                 f"{int(off) + int(n)}); copy it again")


def _open_scene(path: str, bands: Sequence[int], expect_dtype: Optional[str],
                rules: PixelRules) -> SceneInfo:
    ds = _open(path)
    if ds.RasterCount < max(bands):
        raise InputError(f"{path}: has {ds.RasterCount} band(s), the config needs band(s) "
                         f"{list(bands)}")
    b1 = ds.GetRasterBand(1)
    gdt = gdal.GetDataTypeName(b1.DataType)
    if gdt not in SUPPORTED_DTYPES:
        raise InputError(f"{path}: data type {gdt} is not supported (uint8, uint16 or float32)")
    dtype = SUPPORTED_DTYPES[gdt]
    for b in bands:
        if gdal.GetDataTypeName(ds.GetRasterBand(b).DataType) != gdt:
            raise InputError(f"{path}: band {b} has another data type than band 1")
    if expect_dtype and dtype != expect_dtype:
        raise InputError(f"{path}: data type {dtype}, the config expects {expect_dtype} "
                         "(scenes.expect_dtype)")
    wkt = ds.GetProjection() or ""
    gt = ds.GetGeoTransform(can_return_null=True)
    if not wkt or gt is None or tuple(gt) == (0.0, 1.0, 0.0, 0.0, 0.0, 1.0):
        raise InputError(f"{path}: has no georeferencing (CRS and geotransform are required to "
                         "write georeferenced masks)")
    _check_not_truncated(path, ds, bands)
    srs = osr.SpatialReference(wkt=wkt)
    epsg = srs.GetAuthorityCode(None)
    band_nodata = [ds.GetRasterBand(i).GetNoDataValue() for i in range(1, ds.RasterCount + 1)]
    if rules.nodata is not None:
        if len(rules.nodata) not in (1, len(bands)):
            raise InputError(f"{path}: scenes.nodata needs one value or one per band in "
                             f"scenes.bands ({len(bands)}), got {len(rules.nodata)}")
        per_band = rules.nodata * len(bands) if len(rules.nodata) == 1 else rules.nodata
        for b, v in zip(bands, per_band):
            band_nodata[b - 1] = v
    # A mask band GDAL derives from nodata is re-derived here from band_nodata (so an override
    # wins); an explicit mask (internal .msk band, external .msk file) is honoured as such.
    flags = ds.GetRasterBand(bands[0]).GetMaskFlags()
    file_nodata = ds.GetRasterBand(bands[0]).GetNoDataValue()
    explicit_mask = not (flags & (gdal.GMF_ALL_VALID | gdal.GMF_ALPHA)
                         or flags & gdal.GMF_NODATA and file_nodata is not None)
    alpha = next((i for i in range(1, ds.RasterCount + 1)
                  if ds.GetRasterBand(i).GetColorInterpretation() == gdal.GCI_AlphaBand), None)
    info = SceneInfo(path=path if is_virtual(path) else os.path.abspath(path),
                     width=ds.RasterXSize, height=ds.RasterYSize,
                     band_count=ds.RasterCount, dtype=dtype, nodata=band_nodata[bands[0] - 1],
                     crs_wkt=wkt, epsg=int(epsg) if epsg and epsg.isdigit() else None,
                     geotransform=tuple(gt), metadata=dict(ds.GetMetadata() or {}),
                     band_nodata=tuple(band_nodata),
                     mask_band=bands[0] if explicit_mask else None, alpha_band=alpha,
                     blank_fill_ranges=rules.blank_fill_ranges,
                     blank_fill_min_run_px=rules.blank_fill_min_run_px)
    ds = None
    # Computed once here: a georeferencing off its CRS's domain is refused before any work.
    if not info.area_km2 > 0:
        raise InputError(f"{path}: the geotransform {tuple(gt)} gives the scene no ground area; "
                         "fix its georeferencing (gdal_edit.py -a_ullr / -a_srs)")
    return info


# -- pixel validity: the one place that decides which pixels are data -------------------------
def _read_window(ds: gdal.Dataset, bands: Sequence[int], w: Window,
                 out_shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(C, h, w) pixels of a window, decimated (nearest) to out_shape=(h, w) when given."""
    kw: dict[str, Any] = {}
    if out_shape is not None:
        kw = {"buf_xsize": out_shape[1], "buf_ysize": out_shape[0],
              "resample_alg": gdal.GRIORA_NearestNeighbour}
    arr = ds.ReadAsArray(w.col, w.row, w.width, w.height, band_list=list(bands), **kw)
    return arr[None] if arr.ndim == 2 else arr


def _read_mask(band: gdal.Band, w: Window, out_shape: Optional[tuple[int, int]]) -> np.ndarray:
    kw: dict[str, Any] = {}
    if out_shape is not None:
        kw = {"buf_xsize": out_shape[1], "buf_ysize": out_shape[0],
              "resample_alg": gdal.GRIORA_NearestNeighbour}
    return band.ReadAsArray(w.col, w.row, w.width, w.height, **kw) > 0


def _nodata_pixels(info: SceneInfo, bands: Sequence[int], pixels: np.ndarray) -> Optional[np.ndarray]:
    """True where every band that declares a nodata value holds it (NaN nodata matches NaN), or
    where any band that declares NaN nodata is NaN (NaN is never a value, in any one band)."""
    hit: Optional[np.ndarray] = None
    nan: Optional[np.ndarray] = None
    for i, b in enumerate(bands):
        nd = info.nodata_of(b)
        if nd is None:
            continue
        eq = np.isnan(pixels[i]) if math.isnan(nd) else pixels[i] == nd
        hit = eq if hit is None else hit & eq
        if math.isnan(nd):
            nan = eq if nan is None else nan | eq
    return hit if nan is None or hit is None else hit | nan


# Blank fill decoded from JPEG is not exactly constant where it meets the image: chroma upsampling
# leaves short clusters of pixels just outside the fill range (248-249 beside 255 at quality 90).
# Gaps of at most min_run // FILL_GAP_DIVISOR pixels inside a run are bridged so the run (gap
# included) still counts as fill.
FILL_GAP_DIVISOR = 16


def _long_runs(flag: np.ndarray, min_run: int, max_gap: int = 0) -> np.ndarray:
    """True on pixels inside a horizontal run of at least ``min_run`` True pixels of their row;
    gaps of up to ``max_gap`` False pixels between two True segments of a row join them."""
    h, w = flag.shape
    width = w + 2
    padded = np.zeros((h, width), np.int8)
    padded[:, 1:-1] = flag
    d = np.diff(padded.ravel())
    starts, ends = np.flatnonzero(d == 1) + 1, np.flatnonzero(d == -1) + 1
    if max_gap > 0 and starts.size > 1:
        join = ((starts[1:] - ends[:-1] <= max_gap)
                & (starts[1:] // width == (ends[:-1] - 1) // width))
        starts = starts[np.concatenate([[True], ~join])]
        ends = ends[np.concatenate([~join, [True]])]
    keep = (ends - starts) >= min_run
    marks = np.zeros(padded.size + 1, np.int32)
    np.add.at(marks, starts[keep], 1)
    np.add.at(marks, ends[keep], -1)
    return (np.cumsum(marks)[:-1] > 0).reshape(h, w + 2)[:, 1:-1]


def _blank_fill(info: SceneInfo, pixels: np.ndarray, min_run: int) -> np.ndarray:
    in_range = np.zeros(pixels.shape[1:], bool)
    for lo, hi in info.blank_fill_ranges:
        in_range |= ((pixels >= lo) & (pixels <= hi)).all(axis=0)
    run = max(1, min_run)
    return _long_runs(in_range, run, run // FILL_GAP_DIVISOR)


def valid_pixels(ds: gdal.Dataset, info: SceneInfo, bands: Sequence[int], w: Window,
                 pixels: Optional[np.ndarray] = None,
                 out_shape: Optional[tuple[int, int]] = None) -> np.ndarray:
    """(h, w) bool: True where a pixel of window ``w`` is data.

    A pixel is invalid when every band that declares nodata holds its nodata value (or one band
    that declares NaN nodata is NaN), when the GDAL mask band or the alpha band is 0 there, or when
    it is blank fill (``SceneInfo.blank_fill_ranges``: scenes.blank_fill). Every route that asks
    which pixels are data reads it here: runs and evaluation (``WindowReader.read_tile``), training
    crops (``WindowReader.read_valid``), the nodata prescan, scene statistics and value-range
    checks (decimated), and the routing calibration's window choice. ``pixels`` (the window's
    bands, already read) saves a read; ``out_shape`` gives a nearest-neighbour decimated answer
    (blank-fill runs are then measured in decimated pixels).
    """
    shape = out_shape or (w.height, w.width)
    valid = np.ones(shape, bool)
    needs_pixels = any(info.nodata_of(b) is not None for b in bands) or info.blank_fill_ranges
    if needs_pixels and pixels is None:
        pixels = _read_window(ds, bands, w, out_shape)
    if pixels is not None and any(info.nodata_of(b) is not None for b in bands):
        nd = _nodata_pixels(info, bands, pixels)
        if nd is not None:
            valid &= ~nd
    if info.mask_band is not None:
        valid &= _read_mask(ds.GetRasterBand(info.mask_band).GetMaskBand(), w, out_shape)
    if info.alpha_band is not None:
        valid &= _read_mask(ds.GetRasterBand(info.alpha_band), w, out_shape)
    if info.blank_fill_ranges:
        run = info.blank_fill_min_run_px
        if out_shape is not None:  # decimated sample: runs scale with the decimation
            valid &= ~_blank_fill(info, pixels, round(run * out_shape[1] / max(1, w.width)))
        else:
            # A run may continue outside the window: read run-1 more columns on each side (clipped
            # to the scene) so each pixel's verdict does not depend on the window it is read in.
            c0 = max(0, w.col - run + 1)
            c1 = min(info.width, w.col + w.width + run - 1)
            wide = _read_window(ds, bands, Window(c0, w.row, c1 - c0, w.height))
            fill = _blank_fill(info, wide, run)[:, w.col - c0:w.col - c0 + w.width]
            valid &= ~fill
    return valid


SAMPLE_WINDOWS_PER_SIDE = 8  # a large scene without overviews is sampled in 8 x 8 windows


def _sample(info: SceneInfo, bands: Sequence[int], sample_px: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """At most sample_px^2 pixels per band: values (C, N) and validity (N) (see _sample_parts)."""
    parts = list(_sample_parts(info, bands, sample_px))
    arr = np.concatenate([a for a, _ in parts], axis=1)
    return arr.astype(np.float64), np.concatenate([v for _, v in parts])


def _sample_parts(info: SceneInfo, bands: Sequence[int], sample_px: int
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A sample of at most sample_px^2 pixels per band, part by part: values (C, n), validity (n).

    A scene that fits in sample_px, or one with overviews, is one decimated read (GDAL reads the
    overview); a larger scene without overviews is read in SAMPLE_WINDOWS_PER_SIDE^2 full-resolution
    windows spread evenly over it, each inside one block where the file is tiled, because a
    decimated read of it would decode every block of the scene."""
    scale = max(1.0, max(info.width, info.height) / sample_px)
    ds = open_grid(info)
    c = len(bands)
    try:
        if scale == 1.0 or ds.GetRasterBand(bands[0]).GetOverviewCount() > 0:
            shape = (max(1, int(info.height / scale)), max(1, int(info.width / scale)))
            full = Window(0, 0, info.width, info.height)
            arr = _read_window(ds, bands, full, shape)
            yield arr.reshape(c, -1), valid_pixels(ds, info, bands, full, arr, shape).ravel()
            return
        for w in _sample_windows(ds, info, bands, sample_px):
            arr = _read_window(ds, bands, w)
            yield arr.reshape(c, -1), valid_pixels(ds, info, bands, w, arr).ravel()
    except RuntimeError as exc:
        raise InputError(f"{info.path}: cannot sample the scene "
                         f"({str(exc).strip().splitlines()[0]})") from None


def _sample_windows(ds: gdal.Dataset, info: SceneInfo, bands: Sequence[int],
                    sample_px: int) -> list[Window]:
    """Evenly spread windows of (sample_px / SAMPLE_WINDOWS_PER_SIDE)^2 pixels, each starting on
    a block boundary (so a window inside one tile of a tiled file decodes that tile only)."""
    n = SAMPLE_WINDOWS_PER_SIDE
    bx, by = ds.GetRasterBand(bands[0]).GetBlockSize()

    def starts(extent: int, block: int, side: int) -> list[int]:
        out = []
        for i in range(n):
            at = (round(i * (extent - side) / max(1, n - 1)) // block) * block
            out.append(min(at, extent - side))
        return sorted(set(out))
    side = max(1, sample_px // n)
    sw, sh = min(side, info.width), min(side, info.height)
    return [Window(c, r, sw, sh) for r in starts(info.height, by, sh)
            for c in starts(info.width, bx, sw)]


def scene_statistics(info: SceneInfo, bands: Sequence[int], sample_px: int = 1024
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of valid pixels from a decimated read (at most sample_px^2 values
    per band; memory independent of the scene size)."""
    arr, valid = _sample(info, bands, sample_px)
    valid &= np.isfinite(arr).all(0)
    if not valid.any():
        raise InputError(f"{info.path}: scene is entirely nodata ({info.validity_text(bands)})")
    v = arr[:, valid]
    std = np.maximum(v.std(1), 1e-6)
    return tuple(float(m) for m in v.mean(1)), tuple(float(x) for x in std)


def check_float_range(info: SceneInfo, bands: Sequence[int], norm: Any,
                      sample_px: int = 1024) -> tuple[float, float]:
    """Refuse a float scene that has no explicit value range or whose sampled valid pixels fall
    outside [0, normalization.value_max]; return the sampled (min, max).

    Integer scenes have a natural range; float pixels can mean anything (reflectance 0-1, DN 0-255,
    radiance), so mode=range needs ``value_max`` set. Modes ``configured`` and ``scene`` carry
    their own statistics and only get the NaN/inf check.
    """
    arr, valid = _sample(info, bands, sample_px)
    finite = np.isfinite(arr).all(0)
    if (valid & ~finite).any():
        raise InputError(f"{info.path}: NaN or inf values in {int((valid & ~finite).sum())} sampled "
                         "pixel(s) not declared nodata; set scenes.nodata: .nan (or the file's "
                         "nodata value)")
    v = arr[:, valid & finite]
    if v.size == 0:
        raise InputError(f"{info.path}: scene is entirely nodata ({info.validity_text(bands)})")
    lo, hi = float(v.min()), float(v.max())
    if norm.mode != "range":
        return lo, hi
    if norm.value_max is None:
        raise InputError(f"{info.path}: float32 scene (sampled values {lo:g} to {hi:g}) needs an "
                         "explicit range: set normalization.value_max to the value that maps to "
                         "1.0 (the range the models were trained on, e.g. 255 or 1.0)")
    if lo < 0.0 or hi > norm.value_max:
        raise InputError(f"{info.path}: float32 values {lo:g} to {hi:g} fall outside the range "
                         f"0 to {norm.value_max:g} (normalization.value_max); set value_max to "
                         "the range the models were trained on, or declare the outliers nodata "
                         "(scenes.nodata)")
    return lo, hi


# Share of sampled valid pixels allowed above the range: specular highlights (the SpaceNet Atlanta
# 11-bit pan chip has 0.11% above 2047) are clipped as any display stretch clips them; a scene of a
# wider type read at a narrower full scale has a large share above (a 12-bit scene read as 11-bit:
# typically tens of percent).
OVER_RANGE_TOLERANCE = 0.01


def check_integer_range(info: SceneInfo, bands: Sequence[int], norm: Any,
                        sample_px: int = 512) -> float:
    """Refuse an integer scene whose sampled valid pixels exceed the divisor the networks expect
    (``normalization.value_max``, else the data type's default: 255 for uint8, 2047 for 11-bit
    uint16), since they would be clipped into saturation; return the sampled maximum."""
    default = DTYPE_RANGE.get(info.dtype)
    limit = norm.value_max if norm.value_max else default
    if limit is None:
        return 0.0
    arr, valid = _sample(info, bands, sample_px)
    v = arr[:, valid]
    if v.size == 0:
        return 0.0
    over = float((v > limit).any(0).mean())
    hi = float(v.max())
    if over > OVER_RANGE_TOLERANCE:
        source = ("normalization.value_max" if norm.value_max else
                  f"the {info.dtype} default, or the gallery's training range")
        raise InputError(f"{info.path}: {info.dtype} values up to {hi:g} ({over:.1%} of sampled "
                         f"pixels) exceed {limit:g} ({source}), the value the models take as "
                         "full scale; set normalization.value_max to the sensor's full scale "
                         "(e.g. 4095 for 12-bit) and train a gallery on such scenes")
    return hi


def with_statistics(info: SceneInfo, bands: Sequence[int], mode: str) -> SceneInfo:
    """The scene with band statistics attached when the normalization mode needs them."""
    if mode != "scene" or info.band_stats is not None:
        return info
    return replace(info, band_stats=scene_statistics(info, bands))


def _cells_under(file_index: np.ndarray, first: int, size: int, scale: float) -> list[np.ndarray]:
    """Along one axis: for file pixels ``file_index``, the resampled pixels (of a window starting
    at ``first``, ``size`` long; ``scale`` resampled pixels per file pixel) each one overlaps, as
    one index array per overlap step (clamped, so all of them together cover every overlap)."""
    lo = np.floor(file_index * scale + 1e-9).astype(np.int64) - first
    hi = np.ceil((file_index + 1) * scale - 1e-9).astype(np.int64) - first
    return [np.clip(np.minimum(lo + k, hi - 1), 0, size - 1) for k in range(int((hi - lo).max()))]


class WindowReader:
    """Reads tile windows of one scene (one open GDAL handle per reader, per thread)."""

    def __init__(self, info: SceneInfo, bands: Sequence[int]):
        self.info = info
        self.bands = list(bands)
        self._ds = open_grid(info)
        self.bytes_read = 0
        # scenes.gsd_m: the file itself, to keep every file nodata pixel nodata (``_valid``)
        self._file: Optional[gdal.Dataset] = None
        if info.native_grid is not None and info.has_validity_source(self.bands):
            g = info.native_grid
            self._file = _open(info.path)
            self._file_info = replace(info, width=g.width, height=g.height,
                                      geotransform=g.geotransform, native_grid=None)

    def read_tile(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of the tile's halo window padded to full network size (C, S, S) in the scene's
        dtype, and the owned region's validity mask (h, w) bool (see ``valid_pixels``)."""
        w = tile.read
        try:
            arr = _read_window(self._ds, self.bands, Window(*w))
        except RuntimeError as exc:
            raise InputError(f"{self.info.path}: read of window {tuple(w)} failed "
                             f"({str(exc).strip().splitlines()[0]}); the file may be truncated") from None
        if arr is None:
            raise InputError(f"{self.info.path}: read of window {tuple(w)} failed")
        self.bytes_read += arr.nbytes
        if arr.dtype.kind == "f":
            arr = self._finite(arr, w)
        top, bottom, left, right = tile.pad
        if any(tile.pad):
            arr = np.pad(arr, ((0, 0), (top, bottom), (left, right)), mode="edge")
        c = tile.crop
        owned = arr[:, c.row:c.row + c.height, c.col:c.col + c.width]
        try:
            valid = self._valid(tile.owned, owned)
        except RuntimeError as exc:
            raise InputError(f"{self.info.path}: read of the validity of window {tuple(w)} "
                             f"failed ({str(exc).strip().splitlines()[0]})") from None
        if arr.dtype.kind == "f":
            arr = np.nan_to_num(arr, nan=0.0)  # declared-NaN nodata, now recorded in ``valid``
        return arr, valid

    def read_window(self, w: Window) -> np.ndarray:
        """(C, h, w) raw pixels of a window inside the scene, in the scene's dtype."""
        try:
            return _read_window(self._ds, self.bands, w)
        except RuntimeError as exc:
            raise InputError(f"{self.info.path}: read of window {tuple(w)} failed "
                             f"({str(exc).strip().splitlines()[0]}); the file may be truncated") from None

    def read_valid(self, w: Window) -> tuple[np.ndarray, np.ndarray]:
        """(C, h, w) pixels of a window inside the scene and its validity (h, w) bool, checked
        as ``read_tile`` checks a tile: NaN/inf refused unless declared nodata, validity from
        ``valid_pixels``, then declared-NaN pixels zeroed (training crops read through here)."""
        arr = self.read_window(w)
        if arr.dtype.kind == "f":
            arr = self._finite(arr, w)
        try:
            valid = self._valid(w, arr)
        except RuntimeError as exc:
            raise InputError(f"{self.info.path}: read of the validity of window {tuple(w)} "
                             f"failed ({str(exc).strip().splitlines()[0]})") from None
        if arr.dtype.kind == "f":
            arr = np.nan_to_num(arr, nan=0.0)
        return arr, valid

    def _valid(self, w: Window, pixels: np.ndarray) -> np.ndarray:
        """Validity of window ``w`` (see ``valid_pixels``). Resampled (scenes.gsd_m), a pixel is
        valid only where every file pixel under it is: resampling fills a pixel from any valid
        file pixel, and a nodata pixel of the file must stay nodata in the outputs."""
        valid = valid_pixels(self._ds, self.info, self.bands, w, pixels)
        if self._file is None:
            return valid
        info, g = self.info, self._file_info
        src = window_on_grid(w, (info.width, info.height), (g.width, g.height))
        bad_r, bad_c = np.nonzero(~valid_pixels(self._file, g, self.bands, src))
        if len(bad_r):
            rows = _cells_under(src.row + bad_r, w.row, w.height, info.height / g.height)
            cols = _cells_under(src.col + bad_c, w.col, w.width, info.width / g.width)
            for r in rows:
                for c in cols:
                    valid[r, c] = False
        return valid

    def _finite(self, arr: np.ndarray, w: Any) -> np.ndarray:
        """Refuse NaN/inf unless the band declares NaN as its nodata."""
        bad = ~np.isfinite(arr)
        for i, b in enumerate(self.bands):
            nd = self.info.nodata_of(b)
            if nd is not None and math.isnan(nd):
                bad[i] &= ~np.isnan(arr[i])
        if bad.any():
            raise InputError(f"{self.info.path}: NaN or inf values in window {tuple(w)}; declare "
                             "them nodata (scenes.nodata: .nan) or mask them")
        return arr

    def close(self) -> None:
        self._ds = self._file = None


def tile_coverage(info: SceneInfo, tile_px: int, bands: Sequence[int]) -> np.ndarray:
    """Fraction of valid pixels per tile, (rows, cols) float32, exact (see ``valid_pixels``).

    Streams tile-row strips in column chunks of bounded size, so memory never holds a scene;
    a tile is all-nodata iff its coverage is exactly 0.
    """
    rows, cols = grid_shape(info.width, info.height, tile_px)
    if not info.has_validity_source(bands):
        return np.ones((rows, cols), np.float32)
    try:
        return _tile_coverage(info, tile_px, bands, rows, cols)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["read failed"])[0]
        raise InputError(f"{info.path}: cannot read the nodata footprint ({first}); the file is "
                         "damaged") from None


def known_empty_tiles(info: SceneInfo, tile_px: int, bands: Sequence[int]) -> np.ndarray:
    """(rows, cols) bool: True where the tile's owned window is known to be all nodata without
    reading a pixel (GDAL's data coverage API: the window has no block in the file, e.g. a sparse
    GeoTIFF, in every band that declares nodata, and such bands read missing blocks as their
    nodata value). False means not known: the tile is decided when it is read."""
    rows, cols = grid_shape(info.width, info.height, tile_px)
    empty = np.zeros((rows, cols), bool)
    declaring = [b for b in bands if info.nodata_of(b) is not None]
    if not declaring or info.native_grid is not None:  # scenes.gsd_m: blocks are on another grid
        return empty
    try:
        ds = _open(info.path)
        checked = []
        for b in declaring:
            band = ds.GetRasterBand(b)
            fill = band.GetNoDataValue()
            if not _same_value(0.0 if fill is None else fill, info.nodata_of(b)):
                return empty
            if band.GetDataCoverageStatus(0, 0, info.width, info.height, 0)[0] != \
                    gdal.GDAL_DATA_COVERAGE_STATUS_DATA | gdal.GDAL_DATA_COVERAGE_STATUS_EMPTY:
                return empty  # every block present, none present, or not implemented
            checked.append(band)
        for r in range(rows):
            for c in range(cols):
                x0, y0 = c * tile_px, r * tile_px
                w, h = min(tile_px, info.width - x0), min(tile_px, info.height - y0)
                empty[r, c] = all(band.GetDataCoverageStatus(x0, y0, w, h, 0)[0]
                                  == gdal.GDAL_DATA_COVERAGE_STATUS_EMPTY for band in checked)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["read failed"])[0]
        raise InputError(f"{info.path}: cannot read the block index ({first}); the file is "
                         "damaged") from None
    return empty


def _same_value(a: float, b: Optional[float]) -> bool:
    return b is not None and (a == b or (math.isnan(a) and math.isnan(b)))


def has_valid_pixel(info: SceneInfo, bands: Sequence[int], sample_px: int = 512) -> bool:
    """True when some pixel of the scene is data (see ``valid_pixels``): the sample's windows
    until one holds data, then, only when none did, an exact read of the whole scene."""
    if not info.has_validity_source(bands):
        return True
    if any(valid.any() for _, valid in _sample_parts(info, bands, sample_px)):
        return True
    return float(tile_coverage(info, 1024, bands).max()) > 0.0  # streamed in bounded strips


COVERAGE_CHUNK_PX = 1 << 22  # pixels per prescan read (x bands x dtype bytes of memory)


def _tile_coverage(info: SceneInfo, tile_px: int, bands: Sequence[int], rows: int,
                   cols: int) -> np.ndarray:
    ds = open_grid(info)
    cov = np.zeros((rows, cols), np.float32)
    tiles_per_read = max(1, COVERAGE_CHUNK_PX // (tile_px * tile_px))
    for r in range(rows):
        r0 = r * tile_px
        h = min(tile_px, info.height - r0)
        for c_first in range(0, cols, tiles_per_read):
            c_last = min(cols, c_first + tiles_per_read)
            x0 = c_first * tile_px
            x1 = min(info.width, c_last * tile_px)
            valid = valid_pixels(ds, info, bands, Window(x0, r0, x1 - x0, h))
            per_col = valid.sum(axis=0, dtype=np.int64)
            edges = np.arange(0, x1 - x0, tile_px)
            counts = np.add.reduceat(per_col, edges)
            widths = np.minimum(tile_px, (x1 - x0) - edges)
            cov[r, c_first:c_last] = counts / (widths * h)
    return cov


class RasterPreview:
    """A whole raster read at reduced resolution (quicklooks): size, bands, nodata, decimated reads
    (GDAL decimates while reading and uses overviews when present)."""

    def __init__(self, path: str | Path):
        ensure_configured()
        self.path = str(path)
        try:
            self._ds = gdal.Open(self.path, gdal.GA_ReadOnly)
        except RuntimeError as exc:
            raise InputError(f"{self.path}: not a readable raster "
                             f"({str(exc).strip().splitlines()[0]})") from None
        self.width, self.height = self._ds.RasterXSize, self._ds.RasterYSize
        self.count = self._ds.RasterCount
        self.geotransform = tuple(self._ds.GetGeoTransform())
        self.crs_wkt = self._ds.GetProjection() or ""

    def nodata(self, band: int) -> Optional[float]:
        """The nodata value a band declares (None when it declares none)."""
        return self._ds.GetRasterBand(band).GetNoDataValue()

    def read(self, bands: Sequence[int], size: Optional[tuple[int, int]] = None) -> list[np.ndarray]:
        """The given bands, whole, decimated to size=(width, height) when given."""
        kw: dict[str, Any] = {} if size is None else {"buf_xsize": size[0], "buf_ysize": size[1]}
        return [self._ds.GetRasterBand(b).ReadAsArray(**kw) for b in bands]
