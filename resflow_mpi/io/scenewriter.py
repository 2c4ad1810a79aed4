"""Writing synthetic scenes as GeoTIFFs: the rendered pixels (``resflow_mpi.scenegen``) of a
scene and its ground-truth mask, block by block, through the one GeoTIFF writer (io/geotiff.py).

A scene is written under a hidden temporary name and renamed when complete, and its spec digest
is stored in the file, so an interrupted write never passes for a finished scene and a rerun
keeps scenes already written from the same spec.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from osgeo import gdal

from resflow_mpi.errors import OutputError
from resflow_mpi.io import geotiff
from resflow_mpi.scenegen import (BAND_NAMES, IMAGE_NODATA, MASK_NODATA, TIFF_BLOCK_PX, SceneSpec,
                                  render_window, scene_metadata)

_CREATE_OPTIONS = ["TILED=YES", f"BLOCKXSIZE={TIFF_BLOCK_PX}", f"BLOCKYSIZE={TIFF_BLOCK_PX}",
                   "COMPRESS=DEFLATE", "PREDICTOR=2", "BIGTIFF=IF_SAFER", "NUM_THREADS=ALL_CPUS"]

def _create(path: Path, width: int, height: int, bands: int, gdal_type: int, epsg: int,
            geotransform: Sequence[float], extra_options: Sequence[str] = ()) -> gdal.Dataset:
    try:
        return geotiff.create(path, width, height, bands, gdal_type, int(epsg), geotransform,
                              list(_CREATE_OPTIONS) + list(extra_options))
    except RuntimeError as exc:
        raise OutputError(f"{path}: cannot create GeoTIFF ({exc}); check the directory is writable") from exc


def _check_write(err: int, path: Path) -> None:
    if err != 0:
        raise OutputError(f"{path}: write failed ({gdal.GetLastErrorMsg()}); check free disk space")


def write_raster_from_array(path: str | Path, array: np.ndarray, epsg: int,
                            geotransform: Sequence[float], nodata: float | None) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as a tiled, DEFLATE-compressed GeoTIFF."""
    path = Path(path)
    float_options = ["PREDICTOR=3"] if np.asarray(array).dtype.kind == "f" else []
    try:
        return geotiff.write_array(path, array, int(epsg), geotransform, nodata,
                                   list(_CREATE_OPTIONS) + float_options)
    except RuntimeError as exc:
        raise OutputError(f"{path}: cannot write GeoTIFF ({exc}); check the directory is "
                          "writable and has free space") from exc


def _partial_path(path: Path) -> Path:
    # Not ending in .tif and hidden: an interrupted write can never pass for a finished scene.
    return path.with_name(f".{path.name}.partial")


def scene_paths(spec: SceneSpec, out_dir: str | Path) -> tuple[Path, Path]:
    """Where write_scene puts a scene: (<out_dir>/<name>.tif, <out_dir>/<name>_mask.tif)."""
    out_dir = Path(out_dir)
    return out_dir / f"{spec.name}.tif", out_dir / f"{spec.name}_mask.tif"


def write_scene(spec: SceneSpec, out_dir: str | Path, block_px: int = 1024) -> tuple[Path, Path]:
    """Write <name>.tif and <name>_mask.tif; returns (image_path, mask_path)."""
    if block_px <= 0:
        raise ValueError(f"block_px must be positive, got {block_px}")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot create output directory ({exc.strerror})") from exc
    image_path, mask_path = scene_paths(spec, out_dir)
    image_tmp, mask_tmp = _partial_path(image_path), _partial_path(mask_path)
    image_type = gdal.GDT_Byte if spec.dtype == "uint8" else gdal.GDT_UInt16
    # RGB photometric so viewers show true colour; a NIR fourth band is a plain extra sample.
    image_options = ["PHOTOMETRIC=RGB"] + (["ALPHA=UNSPECIFIED"] if spec.bands == 4 else [])
    image_ds = mask_ds = None
    try:
        image_ds = _create(image_tmp, spec.width, spec.height, spec.bands, image_type, spec.epsg,
                           spec.geotransform, image_options)
        mask_ds = _create(mask_tmp, spec.width, spec.height, 1, gdal.GDT_Byte, spec.epsg,
                          spec.geotransform)
        image_ds.SetMetadata(scene_metadata(spec))
        interp = (gdal.GCI_RedBand, gdal.GCI_GreenBand, gdal.GCI_BlueBand, gdal.GCI_Undefined)
        for b in range(spec.bands):
            band = image_ds.GetRasterBand(b + 1)
            band.SetNoDataValue(IMAGE_NODATA)
            band.SetDescription(BAND_NAMES[b])
            band.SetColorInterpretation(interp[b])
        mask_band = mask_ds.GetRasterBand(1)
        mask_band.SetNoDataValue(MASK_NODATA)
        mask_band.SetDescription("building")
        mask_ds.SetMetadata({"RESFLOW_ROLE": "ground_truth", "RESFLOW_SCENE": spec.name,
                             "RESFLOW_CLASSES": "0=background,1=building,255=nodata",
                             "RESFLOW_SPEC_DIGEST": spec.digest()})
        band_list = list(range(1, spec.bands + 1))
        for row in range(0, spec.height, block_px):
            h = min(block_px, spec.height - row)
            for col in range(0, spec.width, block_px):
                w = min(block_px, spec.width - col)
                image, mask = render_window(spec, col, row, w, h)
                _check_write(image_ds.WriteRaster(col, row, w, h, image.tobytes(),
                                                  band_list=band_list), image_tmp)
                _check_write(mask_band.WriteArray(mask, col, row), mask_tmp)
            if (row + h) % TIFF_BLOCK_PX == 0:
                # A full row of TIFF tiles is complete: hand it to disk now so GDAL's cache never
                # holds more than one strip (flushing mid-tile would rewrite tiles and bloat the file).
                image_ds.FlushCache()
                mask_ds.FlushCache()
        image_ds.FlushCache()
        mask_ds.FlushCache()
        image_ds = mask_ds = mask_band = band = None   # closes the files
        os.replace(mask_tmp, mask_path)
        os.replace(image_tmp, image_path)
    except BaseException:
        image_ds = mask_ds = None
        for tmp in (image_tmp, mask_tmp):
            tmp.unlink(missing_ok=True)
        raise
    return image_path, mask_path


def scene_is_complete(spec: SceneSpec, out_dir: str | Path) -> bool:
    """True if both files of the scene exist and were written from exactly this spec."""
    image_path, mask_path = scene_paths(spec, out_dir)
    if not (image_path.is_file() and mask_path.is_file()):
        return False
    for path, bands in ((image_path, spec.bands), (mask_path, 1)):
        try:
            ds = gdal.Open(str(path))
        except RuntimeError:
            return False
        if ds is None or (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) != (spec.width, spec.height, bands):
            return False
        if ds.GetMetadataItem("RESFLOW_SPEC_DIGEST") != spec.digest():
            return False
    return True
