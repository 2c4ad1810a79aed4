"""Export masks from the HDF5 store to georeferenced GeoTIFF / COG, streaming by tile rows.

Files appear only complete: each is written under a ``.partial`` name and renamed at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import OutputError
from . import geotiff
from .maskstore import MaskReader, SceneMeta
from .oserrors import write_failure

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


def export_scene(source: str | MaskReader, scene: int, out_tif: Path,
                 cog_path: Optional[Path] = None, bucket_tif: Optional[Path] = None,
                 rows_per_block: int = 1024) -> list[Path]:
    """Write the scene's mask (and optional COG and colour bucket map); return the paths written.

    ``source``: the mask store's path, or an open ``MaskReader`` (one per process for many
    scenes: opening the store per scene would cost more than a small scene's export)."""
    if not isinstance(source, MaskReader):
        with MaskReader(source) as reader:
            return export_scene(reader, scene, out_tif, cog_path, bucket_tif, rows_per_block)
    store = source
    written: list[Path] = []
    current = out_tif
    ds = band = None
    failure = ""
    meta = store.scene_meta(scene)
    tmp = geotiff.partial_path(out_tif)
    try:
        ds = geotiff.create(tmp, meta.width, meta.height, 1, np.uint8, meta.crs_wkt,
                            meta.geotransform, geotiff.TILED_OPTIONS, nodata=255)
        band = ds.GetRasterBand(1)
        step = max(256, rows_per_block - rows_per_block % 256)
        for r0, block in store.iter_mask_rows(scene, step):
            geotiff.check_write(band.WriteArray(block, 0, r0))
        ds.SetMetadata({"RESFLOW_SOURCE": meta.source_path,
                        "RESFLOW_VALUES": "0=background,1=building,255=nodata"})
        ds.FlushCache()
        band = ds = None
        written.append(geotiff.commit(tmp, out_tif))
        if cog_path is not None:
            current = cog_path
            written.append(geotiff.translate_cog(out_tif, cog_path))
        if bucket_tif is not None:
            current = bucket_tif
            _export_buckets(store.bucket_grid(scene), meta, bucket_tif)
            written.append(bucket_tif)
    except (RuntimeError, OSError) as exc:
        failure = export_failure(current, exc)
        # Drop the half-written dataset now (the traceback's GDAL frames hold it open).
        exc.__traceback__ = None
        with geotiff.quietly():
            band = ds = None
        geotiff.remove_partial(out_tif, cog_path, bucket_tif)
    if failure:
        raise OutputError(failure)
    return written


def scaled_geotransform(gt: tuple[float, ...], factor_x: float, factor_y: float) -> tuple[float, ...]:
    """The geotransform of a raster whose pixel is ``factor_x`` x ``factor_y`` source pixels, same
    origin: every term that multiplies a column (gt[1], gt[4]) scales with factor_x, every term that
    multiplies a row (gt[2], gt[5]) with factor_y, so rotated grids stay exact."""
    return (gt[0], gt[1] * factor_x, gt[2] * factor_y, gt[3], gt[4] * factor_x, gt[5] * factor_y)


def export_failure(path: Path, exc: BaseException) -> str:
    """One-line message for a failed export of ``path`` (see ``write_failure``)."""
    return write_failure(path, exc, "export failed")


def _export_buckets(buckets: np.ndarray, meta: SceneMeta, path: Path) -> None:
    """A small RGB GeoTIFF with one pixel per tile coloured by bucket (paper's Fig. 7/11 style).

    Pixel (c, r) covers scene pixels from (c * tile_px, r * tile_px): the geotransform is the
    scene's scaled by tile_px in all four terms (rotated scenes included)."""
    rows, cols = buckets.shape
    rgb = np.zeros((3, rows, cols), np.uint8)
    ok = buckets >= 0
    rgb[:, ok] = BUCKET_COLOURS[buckets[ok] % len(BUCKET_COLOURS)].T
    rgb[:, buckets == -2] = OOD_COLOUR[:, None]
    tmp = geotiff.partial_path(path)
    ds = geotiff.create(tmp, cols, rows, 3, np.uint8, meta.crs_wkt,
                        scaled_geotransform(meta.geotransform, meta.tile_px, meta.tile_px),
                        ["COMPRESS=DEFLATE"])
    geotiff.check_write(ds.WriteArray(rgb))
    ds.SetMetadata({"RESFLOW_BUCKETS": ",".join(f"{i}={'#%02x%02x%02x' % tuple(c)}"
                                                for i, c in enumerate(BUCKET_COLOURS))
                    + ",-2=#ffffff (out of distribution: Mono)"})
    ds.FlushCache()
    ds = None
    geotiff.commit(tmp, path)
