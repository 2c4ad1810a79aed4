"""Export masks from the HDF5 store to georeferenced GeoTIFF / COG, streaming by tile rows.

Files appear only complete: each is written under a ``.partial`` name and renamed at the end.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
from osgeo import gdal

from ..errors import OutputError
from .oserrors import write_failure

gdal.UseExceptions()

# Bucket colours (index -> RGB), in the spirit of the paper's Figures 7/11; nodata is black.
BUCKET_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                           [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                           [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
                           [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128]], np.uint8)
OOD_COLOUR = np.array([255, 255, 255], np.uint8)  # bucket -2: out of distribution, mapped by Mono


def confined(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name`` after checking it cannot escape ``out_dir`` (no '..', no absolute names)."""
    base = Path(out_dir).resolve()
    p = (base / name).resolve()
    if base != p and base not in p.parents:
        raise OutputError(f"{name}: output path escapes the output directory {base}")
    return p


def _creation_options(kind: str) -> list[str]:
    if kind == "cog":
        return ["COMPRESS=DEFLATE", "BLOCKSIZE=512", "OVERVIEWS=AUTO", "RESAMPLING=NEAREST",
                "NUM_THREADS=1"]  # labels: overviews must not blend classes
    return ["TILED=YES", "BLOCKXSIZE=256", "BLOCKYSIZE=256", "COMPRESS=DEFLATE", "BIGTIFF=IF_SAFER"]


def export_scene(h5_path: str, scene: int, out_tif: Path, cog_path: Optional[Path] = None,
                 bucket_tif: Optional[Path] = None, rows_per_block: int = 1024) -> list[Path]:
    """Write the scene's mask (and optional COG and colour bucket map); return the paths written."""
    written: list[Path] = []
    current = out_tif
    ds = band = None
    failure = ""
    with h5py.File(h5_path, "r") as f:
        g = f[f"scenes/{scene}"]
        mask = g["mask"]
        h, w = mask.shape
        gt = tuple(float(v) for v in g.attrs["geotransform"])
        wkt = str(g.attrs["crs_wkt"])
        tmp = _partial(out_tif)
        try:
            drv = gdal.GetDriverByName("GTiff")
            ds = drv.Create(str(tmp), w, h, 1, gdal.GDT_Byte, _creation_options("gtiff"))
            ds.SetGeoTransform(gt)
            ds.SetProjection(wkt)
            band = ds.GetRasterBand(1)
            band.SetNoDataValue(255)
            step = max(256, rows_per_block - rows_per_block % 256)
            for r0 in range(0, h, step):
                band.WriteArray(mask[r0:min(h, r0 + step), :], 0, r0)
            ds.SetMetadata({"RESFLOW_SOURCE": str(g.attrs["source_path"]),
                            "RESFLOW_VALUES": "0=background,1=building,255=nodata"})
            ds.FlushCache()
            ds = None
            os.replace(tmp, out_tif)
            written.append(out_tif)
            if cog_path is not None:
                current = cog_path
                ctmp = _partial(cog_path)
                gdal.Translate(str(ctmp), str(out_tif), format="COG",
                               creationOptions=_creation_options("cog"))
                os.replace(ctmp, cog_path)
                written.append(cog_path)
            if bucket_tif is not None:
                current = bucket_tif
                _export_buckets(g, gt, wkt, bucket_tif)
                written.append(bucket_tif)
        except (RuntimeError, OSError) as exc:
            failure = export_failure(current, exc)
            # Drop the half-written dataset now (the traceback's GDAL frames hold it open); its
            # close fails as well on a full disk, and that second error says nothing new.
            exc.__traceback__ = None
            gdal.DontUseExceptions()  # (a destructor cannot raise; only on this failure path)
            gdal.PushErrorHandler("CPLQuietErrorHandler")
            try:
                band = ds = None
            finally:
                gdal.PopErrorHandler()
                gdal.UseExceptions()
            for p in (out_tif, cog_path, bucket_tif):
                q = _partial(p) if p is not None else None
                if q is not None and (q.is_symlink() or q.is_file()):
                    q.unlink()
    if failure:
        raise OutputError(failure)
    return written


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def scaled_geotransform(gt: tuple[float, ...], factor_x: float, factor_y: float) -> tuple[float, ...]:
    """The geotransform of a raster whose pixel is ``factor_x`` x ``factor_y`` source pixels, same
    origin: every term that multiplies a column (gt[1], gt[4]) scales with factor_x, every term that
    multiplies a row (gt[2], gt[5]) with factor_y, so rotated grids stay exact."""
    return (gt[0], gt[1] * factor_x, gt[2] * factor_y, gt[3], gt[4] * factor_x, gt[5] * factor_y)


def export_failure(path: Path, exc: BaseException) -> str:
    """One-line message for a failed export of ``path`` (see ``write_failure``)."""
    return write_failure(path, exc, "export failed")


def _export_buckets(g: h5py.Group, gt: tuple[float, ...], wkt: str, path: Path) -> None:
    """A small RGB GeoTIFF with one pixel per tile coloured by bucket (paper's Fig. 7/11 style).

    Pixel (c, r) covers scene pixels from (c * tile_px, r * tile_px): the geotransform is the
    scene's scaled by tile_px in all four terms (rotated scenes included)."""
    rows, cols = int(g.attrs["grid_rows"]), int(g.attrs["grid_cols"])
    tile_px = int(g.file.attrs["tile_px"])
    b = g["bucket"][...].reshape(rows, cols).astype(np.int64)
    rgb = np.zeros((3, rows, cols), np.uint8)
    ok = b >= 0
    rgb[:, ok] = BUCKET_COLOURS[b[ok] % len(BUCKET_COLOURS)].T
    rgb[:, b == -2] = OOD_COLOUR[:, None]
    tmp = _partial(path)
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp), cols, rows, 3, gdal.GDT_Byte,
                                              ["COMPRESS=DEFLATE"])
    ds.SetGeoTransform(scaled_geotransform(gt, tile_px, tile_px))
    ds.SetProjection(wkt)
    ds.WriteArray(rgb)
    ds.SetMetadata({"RESFLOW_BUCKETS": ",".join(f"{i}={'#%02x%02x%02x' % tuple(c)}"
                                                for i, c in enumerate(BUCKET_COLOURS))
                    + ",-2=#ffffff (out of distribution: Mono)"})
    ds.FlushCache()
    ds = None
    os.replace(tmp, path)
