"""The one GeoTIFF / COG writer: creation options, CRS, geotransform, nodata, atomic renames.

Every raster resflow writes (exported masks and bucket maps, annotation chips, synthetic scenes
and their ground truth) is created here. GDAL failures propagate as ``RuntimeError`` (GDAL's own
text): each caller turns them into an ``OutputError`` with its own advice. Files that must appear
only complete are written under ``partial_path(path)`` and renamed by ``commit``.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from osgeo import gdal, ogr, osr

from ..errors import ConfigError
from .gdalenv import ensure_configured
from .outlock import partial_path as job_partial_path

# Tiled, DEFLATE-compressed GeoTIFF for large label rasters (exported masks).
TILED_OPTIONS = ("TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE",
                 "BIGTIFF=IF_SAFER")
# Cloud-optimized GeoTIFF of labels: overviews by nearest neighbour (they must not blend classes).
COG_LABEL_OPTIONS = ("COMPRESS=DEFLATE", "BLOCKSIZE=512", "OVERVIEWS=AUTO", "RESAMPLING=NEAREST",
                     "NUM_THREADS=1")
# Cloud-optimized GeoTIFF of quantised probabilities: overviews average (nodata excluded).
COG_PROBABILITY_OPTIONS = ("COMPRESS=DEFLATE", "PREDICTOR=YES", "BLOCKSIZE=512", "OVERVIEWS=AUTO",
                           "RESAMPLING=AVERAGE", "NUM_THREADS=1")

GDAL_TYPES = {
    np.dtype("uint8"): gdal.GDT_Byte, np.dtype("uint16"): gdal.GDT_UInt16,
    np.dtype("int16"): gdal.GDT_Int16, np.dtype("uint32"): gdal.GDT_UInt32,
    np.dtype("int32"): gdal.GDT_Int32, np.dtype("float32"): gdal.GDT_Float32,
    np.dtype("float64"): gdal.GDT_Float64,
}

Crs = Union[int, str]   # an EPSG code, or a WKT string ("" for none)


def gdal_type(dtype: Any) -> int:
    """The GDAL data type of a numpy dtype (ValueError for one GeoTIFF cannot hold here)."""
    dt = np.dtype(dtype)
    if dt not in GDAL_TYPES:
        raise ValueError(f"unsupported dtype {dt}; use one of {sorted(map(str, GDAL_TYPES))}")
    return GDAL_TYPES[dt]


def srs_wkt(crs: Crs) -> str:
    """WKT of an EPSG code (ConfigError when unknown); a string is taken as WKT already."""
    if isinstance(crs, str):
        return crs
    ensure_configured()
    srs = osr.SpatialReference()
    try:
        failed = srs.ImportFromEPSG(int(crs)) != 0
    except RuntimeError:
        failed = True
    if failed:
        raise ConfigError(f"EPSG:{crs} is not a known coordinate reference system; use a UTM code")
    return srs.ExportToWkt()


def partial_path(path: Path) -> Path:
    """The temporary sibling a file is written under before ``commit`` renames it; it carries the
    job's tag (Slurm job id, or host-pid-start), so two jobs never share a temporary name."""
    return job_partial_path(path)


def create(path: Path, width: int, height: int, bands: int, dtype: Any, crs: Crs,
           geotransform: Sequence[float], options: Sequence[str] = TILED_OPTIONS,
           nodata: Optional[float] = None,
           metadata: Optional[Mapping[str, str]] = None) -> gdal.Dataset:
    """A new GeoTIFF dataset at ``path`` (opened for writing), georeferenced, nodata on every band.

    ``dtype`` is a numpy dtype or a GDAL type code; ``crs`` an EPSG code or WKT."""
    ensure_configured()
    code = dtype if isinstance(dtype, int) else gdal_type(dtype)
    wkt = srs_wkt(crs)
    ds = gdal.GetDriverByName("GTiff").Create(str(path), width, height, bands, code,
                                              options=list(options))
    if ds is None:   # only when exceptions were turned off by a caller
        raise RuntimeError(gdal.GetLastErrorMsg() or f"cannot create {path}")
    ds.SetGeoTransform([float(v) for v in geotransform])
    ds.SetProjection(wkt)
    if nodata is not None:
        for b in range(1, bands + 1):
            ds.GetRasterBand(b).SetNoDataValue(float(nodata))
    if metadata:
        ds.SetMetadata(dict(metadata))
    return ds


def read_metadata(path: Path) -> Optional[dict[str, str]]:
    """The default-domain metadata of an existing raster; None when absent or not readable
    by GDAL (a half-copied file, another format)."""
    ensure_configured()
    if not Path(path).is_file():
        return None
    try:
        with quietly():
            ds = gdal.Open(str(path))
        if ds is None:
            return None
        meta = ds.GetMetadata() or {}
        ds = None
        return dict(meta)
    except RuntimeError:
        return None


def check_write(err: int) -> None:
    """Raise GDAL's message when a write returned an error code (exceptions off)."""
    if err != 0:
        raise RuntimeError(gdal.GetLastErrorMsg() or "write failed")


@contextmanager
def quietly() -> Iterator[None]:
    """GDAL errors neither raised nor printed inside: for dropping a half-written dataset after a
    failure (its close fails as well on a full disk, and that second error says nothing new; a
    destructor cannot raise)."""
    # GDAL 3.6 keeps one error-handler stack for the gdal, ogr and osr modules and turns a
    # module's exceptions off only when its handler is on top: unwind down to gdal's, then
    # restore in reverse order (the stack ends as it was).
    off: list[Any] = []
    while gdal.GetUseExceptions():
        for module in (gdal, ogr, osr):
            if module.GetUseExceptions():
                try:
                    module.DontUseExceptions()
                except RuntimeError:
                    continue
                off.append(module)
                break
        else:
            break
    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        yield
    finally:
        gdal.PopErrorHandler()
        for module in reversed(off):
            module.UseExceptions()


def commit(tmp: Path, path: Path) -> Path:
    """Rename a finished temporary file to its final name (atomic on one filesystem)."""
    os.replace(tmp, path)
    return path


def remove_partial(*paths: Optional[Path]) -> None:
    """Remove the temporary files of the given final paths, if any were left."""
    for p in paths:
        q = partial_path(p) if p is not None else None
        if q is not None and (q.is_symlink() or q.is_file()):
            q.unlink()


def write_array(path: Path, array: np.ndarray, crs: Crs, geotransform: Sequence[float],
                nodata: Optional[float], options: Sequence[str] = TILED_OPTIONS,
                metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as one GeoTIFF at ``path``."""
    data = np.asarray(array)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise ValueError(f"array must be HW or CHW, got shape {np.shape(array)}")
    bands, height, width = data.shape
    ds = create(path, width, height, bands, data.dtype, crs, geotransform, options, nodata,
                metadata)
    try:
        for b in range(bands):
            check_write(ds.GetRasterBand(b + 1).WriteArray(np.ascontiguousarray(data[b])))
        ds.FlushCache()
    finally:
        ds = None
    return path


def translate(src: Union[str, Path, gdal.Dataset], path: Path, fmt: str = "GTiff",
              options: Sequence[str] = TILED_OPTIONS,
              src_win: Optional[Sequence[int]] = None) -> Path:
    """Copy ``src`` (or its window col, row, width, height) to ``path`` in ``fmt``, atomically."""
    ensure_configured()
    tmp = partial_path(path)
    kw: dict[str, Any] = {"format": fmt, "creationOptions": list(options)}
    if src_win is not None:
        kw["srcWin"] = list(src_win)
    source = src if isinstance(src, gdal.Dataset) else str(src)
    try:
        out = gdal.Translate(str(tmp), source, **kw)
        if out is None:
            raise RuntimeError(gdal.GetLastErrorMsg() or f"cannot write {path}")
        out = None
        return commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def translate_cog(src: Union[str, Path], path: Path,
                  options: Sequence[str] = COG_LABEL_OPTIONS) -> Path:
    """A cloud-optimized GeoTIFF copy of ``src`` at ``path`` (labels: nearest overviews)."""
    return translate(src, path, "COG", options)


def regrid(src: Union[str, Path], path: Path, width: int, height: int,
           geotransform: Sequence[float], options: Sequence[str] = TILED_OPTIONS,
           fmt: str = "GTiff") -> Path:
    """A copy of ``src`` at ``path`` (in ``fmt``) on a grid of the same extent with ``width`` x
    ``height`` pixels (nearest neighbour: classes and nodata stay as they are), atomically. GDAL
    streams it block by block."""
    ensure_configured()
    vrt = gdal.Translate("", str(src), format="VRT", width=width, height=height,
                         resampleAlg="nearest")
    if vrt is None:
        raise RuntimeError(gdal.GetLastErrorMsg() or f"cannot resample {src}")
    vrt.SetGeoTransform(list(geotransform))
    try:
        return translate(vrt, path, fmt, options)
    finally:
        vrt = None
