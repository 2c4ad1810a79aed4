"""GDAL scene access: metadata, validation, window reads. Never reads a whole scene at once."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from osgeo import gdal, osr

from ..errors import InputError
from ..tiling import Tile, Window, grid_shape

gdal.UseExceptions()
# Bounded GDAL block cache per process (MB): reading is by window; the cache never needs a scene.
gdal.SetCacheMax(int(os.environ.get("RESFLOW_GDAL_CACHE_MB", "64")) * 1024 * 1024)

SUPPORTED_DTYPES = {"Byte": "uint8", "UInt16": "uint16", "Float32": "float32"}


@dataclass(frozen=True)
class SceneInfo:
    """What rank 0 learns about a scene from its header (no pixels)."""

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

    @property
    def pixel_area_m2(self) -> float:
        gt = self.geotransform
        return abs(gt[1] * gt[5] - gt[2] * gt[4])

    @property
    def area_km2(self) -> float:
        return self.width * self.height * self.pixel_area_m2 / 1e6

    def window_extent(self, w: Window) -> tuple[float, float, float, float]:
        """Georeferenced (xmin, ymin, xmax, ymax) of a pixel window (north-up geotransform)."""
        gt = self.geotransform
        xs = [gt[0] + c * gt[1] + r * gt[2] for c in (w.col, w.col + w.width) for r in (w.row, w.row + w.height)]
        ys = [gt[3] + c * gt[4] + r * gt[5] for c in (w.col, w.col + w.width) for r in (w.row, w.row + w.height)]
        return (min(xs), min(ys), max(xs), max(ys))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _open(path: str) -> gdal.Dataset:
    if not os.path.exists(path):
        raise InputError(f"{path}: scene file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, expected a GeoTIFF scene")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty (0 bytes)")
    try:
        ds = gdal.Open(path, gdal.GA_ReadOnly)
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable raster ({str(exc).strip().splitlines()[0]})") from None
    if ds is None:
        raise InputError(f"{path}: not a readable raster")
    return ds


def open_scene(path: str | Path, bands: Sequence[int] = (1, 2, 3),
               expect_dtype: Optional[str] = None) -> SceneInfo:
    """Read and check a scene's header; raise InputError naming the file and the problem."""
    try:
        return _open_scene(str(path), bands, expect_dtype)
    except RuntimeError as exc:  # any other GDAL complaint about a damaged header
        first = (str(exc).strip().splitlines() or ["unreadable"])[0]
        raise InputError(f"{path}: damaged raster ({first})") from None


def _check_not_truncated(path: str, ds: gdal.Dataset, bands: Sequence[int]) -> None:
    """A TIFF whose last block lies beyond the end of the file was cut short (copy interrupted)."""
    if ds.GetDriver().ShortName != "GTiff":
        return
    size = os.path.getsize(path)
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


def _open_scene(path: str, bands: Sequence[int], expect_dtype: Optional[str]) -> SceneInfo:
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
    nodata = b1.GetNoDataValue()
    info = SceneInfo(path=os.path.abspath(path), width=ds.RasterXSize, height=ds.RasterYSize,
                     band_count=ds.RasterCount, dtype=dtype, nodata=nodata, crs_wkt=wkt,
                     epsg=int(epsg) if epsg and epsg.isdigit() else None, geotransform=tuple(gt),
                     metadata=dict(ds.GetMetadata() or {}))
    ds = None
    return info


def scene_statistics(info: SceneInfo, bands: Sequence[int], sample_px: int = 1024
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of valid pixels from a decimated read (at most sample_px^2 values
    per band; memory independent of the scene size)."""
    scale = max(1.0, max(info.width, info.height) / sample_px)
    bw, bh = max(1, int(info.width / scale)), max(1, int(info.height / scale))
    ds = _open(info.path)
    try:
        arr = ds.ReadAsArray(band_list=list(bands), buf_xsize=bw, buf_ysize=bh,
                             resample_alg=gdal.GRIORA_NearestNeighbour).astype(np.float64)
    except RuntimeError as exc:
        raise InputError(f"{info.path}: cannot sample the scene for its statistics "
                         f"({str(exc).strip().splitlines()[0]})") from None
    arr = arr.reshape(len(bands), -1)
    valid = np.ones(arr.shape[1], bool) if info.nodata is None else (arr != info.nodata).any(0)
    if not valid.any():
        raise InputError(f"{info.path}: scene is entirely nodata (value {info.nodata:g})")
    v = arr[:, valid]
    std = np.maximum(v.std(1), 1e-6)
    return tuple(float(m) for m in v.mean(1)), tuple(float(x) for x in std)


def with_statistics(info: SceneInfo, bands: Sequence[int], mode: str) -> SceneInfo:
    """The scene with band statistics attached when the normalization mode needs them."""
    if mode != "scene" or info.band_stats is not None:
        return info
    import dataclasses
    return dataclasses.replace(info, band_stats=scene_statistics(info, bands))


def same_crs(a: SceneInfo, b: SceneInfo) -> bool:
    """True when two scenes share one coordinate reference system."""
    sa, sb = osr.SpatialReference(wkt=a.crs_wkt), osr.SpatialReference(wkt=b.crs_wkt)
    return bool(sa.IsSame(sb))


def resolve_scene_inputs(inputs: Sequence[str], split: str = "all") -> list[str]:
    """Expand globs, directories, .txt lists and archive.json manifests into sorted scene paths."""
    out: list[str] = []
    for item in inputs:
        if item.endswith(".json") and os.path.isfile(item):
            try:
                entries = json.loads(Path(item).read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"{item}: not a readable archive manifest ({exc})") from None
            base = os.path.dirname(os.path.abspath(item))
            out += [os.path.join(base, e["image"]) for e in entries
                    if split == "all" or e.get("split") == split]
        elif item.endswith(".txt") and os.path.isfile(item):
            out += [ln.strip() for ln in Path(item).read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
        elif os.path.isdir(item):
            out += sorted(p for p in glob.glob(os.path.join(item, "*.tif"))
                          if not p.endswith("_mask.tif"))
        elif any(ch in item for ch in "*?["):
            hits = sorted(glob.glob(item))
            if not hits:
                raise InputError(f"{item}: pattern matches no scene")
            out += hits
        else:
            out.append(item)  # a single path; open_scene reports it when missing
    seen: set[str] = set()
    unique = [p for p in out if not (p in seen or seen.add(p))]  # type: ignore[func-returns-value]
    return unique


class WindowReader:
    """Reads tile windows of one scene (one open GDAL handle per reader, per thread)."""

    def __init__(self, info: SceneInfo, bands: Sequence[int]):
        self.info = info
        self.bands = list(bands)
        self._ds = _open(info.path)
        self.bytes_read = 0

    def read_tile(self, tile: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of the tile's halo window padded to full network size (C, S, S) in the scene's
        dtype, and the owned region's validity mask (h, w) bool (False where all bands are nodata)."""
        w = tile.read
        try:
            arr = self._ds.ReadAsArray(w.col, w.row, w.width, w.height, band_list=self.bands)
        except RuntimeError as exc:
            raise InputError(f"{self.info.path}: read of window {tuple(w)} failed "
                             f"({str(exc).strip().splitlines()[0]}); the file may be truncated") from None
        if arr is None:
            raise InputError(f"{self.info.path}: read of window {tuple(w)} failed")
        if arr.ndim == 2:
            arr = arr[None]
        self.bytes_read += arr.nbytes
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"{self.info.path}: NaN or inf values in window {tuple(w)}; mask them "
                             "with a nodata value first")
        top, bottom, left, right = tile.pad
        if any(tile.pad):
            arr = np.pad(arr, ((0, 0), (top, bottom), (left, right)), mode="edge")
        c = tile.crop
        owned = arr[:, c.row:c.row + c.height, c.col:c.col + c.width]
        nd = self.info.nodata
        valid = np.ones(owned.shape[1:], bool) if nd is None else (owned != nd).any(axis=0)
        return arr, valid

    def close(self) -> None:
        self._ds = None


def tile_coverage(info: SceneInfo, tile_px: int, bands: Sequence[int]) -> np.ndarray:
    """Fraction of valid (non-nodata) pixels per tile, (rows, cols) float32, exact.

    GDAL averages each band's validity mask over every tile footprint while streaming blocks, so
    memory stays at one block; a tile is all-nodata iff its coverage is exactly 0.
    """
    rows, cols = grid_shape(info.width, info.height, tile_px)
    if info.nodata is None:
        return np.ones((rows, cols), np.float32)
    try:
        return _tile_coverage(info, tile_px, bands, rows, cols)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["read failed"])[0]
        raise InputError(f"{info.path}: cannot read the nodata footprint ({first}); the file is "
                         "damaged") from None


def _tile_coverage(info: SceneInfo, tile_px: int, bands: Sequence[int], rows: int,
                   cols: int) -> np.ndarray:
    ds = _open(info.path)
    cov = np.zeros((rows, cols), np.float32)
    # Read one tile-row strip at a time so the (rows*tile_px) grid's ragged last row/col is exact.
    for r in range(rows):
        r0 = r * tile_px
        h = min(tile_px, info.height - r0)
        for b in bands:
            m = ds.GetRasterBand(b).GetMaskBand()
            full_cols = info.width // tile_px
            if full_cols:
                strip = m.ReadAsArray(0, r0, full_cols * tile_px, h, buf_xsize=full_cols, buf_ysize=1,
                                      buf_type=gdal.GDT_Float32,
                                      resample_alg=gdal.GRIORA_Average)
                cov[r, :full_cols] = np.maximum(cov[r, :full_cols], strip[0] / 255.0)
            if full_cols < cols:
                last = m.ReadAsArray(full_cols * tile_px, r0, info.width - full_cols * tile_px, h,
                                     buf_xsize=1, buf_ysize=1, buf_type=gdal.GDT_Float32,
                                     resample_alg=gdal.GRIORA_Average)
                cov[r, cols - 1] = max(cov[r, cols - 1], float(last[0, 0]) / 255.0)
    return cov
