"""Export masks from the HDF5 store to georeferenced GeoTIFF / COG, streaming by tile rows.

Files appear only complete: each is written under a ``.partial`` name and renamed at the end.
Every output carries an ``OutputRecord`` in its GeoTIFF metadata: the id of the store it was
exported from, the store's configuration checksum, the source scene and what mapped the tiles.
An output whose record differs from the store's belongs to another store and is rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import OutputError
from . import geotiff
from ..tiling import scaled_geotransform
from .maskstore import MaskReader, SceneMeta
from .oserrors import write_failure

# Bucket colours (index -> RGB), in the spirit of the paper's Figures 7/11; nodata is black.
BUCKET_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                           [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230],
                           [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
                           [128, 0, 0], [170, 255, 195], [128, 128, 0], [0, 0, 128]], np.uint8)
OOD_COLOUR = np.array([255, 255, 255], np.uint8)  # bucket -2: flagged out of distribution
MONO_COLOUR = OOD_COLOUR  # white: a tile mapped by Mono (every computed tile of a Mono run)
MAPPED_BY = ("buckets", "mono")  # what mapped the tiles: each its bucket's model, or Mono

STORE_ID_KEY = "RESFLOW_STORE_ID"
CONFIG_KEY = "RESFLOW_CONFIG_CHECKSUM"
SOURCE_KEY = "RESFLOW_SOURCE"
MAPPED_BY_KEY = "RESFLOW_MAPPED_BY"

# The probability COG's byte values: p in [0, 1] is stored as round(p * 254); 255 is nodata.
PROBABILITY_SCALE = 254
PROBABILITY_NODATA = 255


def quantize_probability(prob: np.ndarray, nodata: np.ndarray) -> np.ndarray:
    """uint8 bytes of building probabilities ``prob`` (any float array in [0, 1]): round(p * 254),
    and PROBABILITY_NODATA where ``nodata`` (a bool array of the same shape) is set."""
    q = np.rint(np.clip(prob.astype(np.float32), 0.0, 1.0) * PROBABILITY_SCALE).astype(np.uint8)
    q[nodata] = PROBABILITY_NODATA
    return q


def dequantize_probability(q: np.ndarray) -> np.ndarray:
    """float32 probabilities of probability-COG bytes; NaN where a byte is PROBABILITY_NODATA."""
    p = q.astype(np.float32) / PROBABILITY_SCALE
    p[q == PROBABILITY_NODATA] = np.nan
    return p


@dataclass(frozen=True)
class OutputRecord:
    """Which store made an exported output: written into every output's GeoTIFF metadata."""

    store_id: str
    config_checksum: str
    source_path: str
    mapped_by: str  # one of MAPPED_BY

    def metadata(self) -> dict[str, str]:
        """The record as GeoTIFF metadata items."""
        return {STORE_ID_KEY: self.store_id, CONFIG_KEY: self.config_checksum,
                SOURCE_KEY: self.source_path, MAPPED_BY_KEY: self.mapped_by}

    @staticmethod
    def of_file(path: Path) -> Optional["OutputRecord"]:
        """The record of an existing output; None when the file is absent, unreadable or has none."""
        meta = geotiff.read_metadata(path)
        if meta is None or STORE_ID_KEY not in meta:
            return None
        return OutputRecord(meta[STORE_ID_KEY], meta.get(CONFIG_KEY, ""),
                            meta.get(SOURCE_KEY, ""), meta.get(MAPPED_BY_KEY, ""))

    @staticmethod
    def of_store(reader: MaskReader, scene: int, mapped_by: str) -> "OutputRecord":
        """The record every output of ``scene`` exported from ``reader``'s store carries."""
        if mapped_by not in MAPPED_BY:
            raise ValueError(f"mapped_by {mapped_by!r}: one of {MAPPED_BY}")
        if not reader.store_id:
            raise OutputError(f"{reader.path}: the mask store has no store id (made by an older "
                              "resflow); rerun with --restart")
        return OutputRecord(reader.store_id, reader.config_checksum,
                            reader.scene_meta(scene).source_path, mapped_by)


def outputs_current(paths: Sequence[Path], record: OutputRecord) -> bool:
    """True when every path exists and carries ``record`` (an output of this very store)."""
    return all(OutputRecord.of_file(p) == record for p in paths)


def confined(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name`` after checking it cannot escape ``out_dir`` (no '..', no absolute names)."""
    base = Path(out_dir).resolve()
    p = (base / name).resolve()
    if base != p and base not in p.parents:
        raise OutputError(f"{name}: output path escapes the output directory {base}")
    return p


def export_scene(source: str | MaskReader, scene: int, out_tif: Path,
                 cog_path: Optional[Path] = None, bucket_tif: Optional[Path] = None,
                 rows_per_block: int = 1024, mapped_by: str = "buckets",
                 probability_cog: Optional[Path] = None) -> list[Path]:
    """Write the scene's mask (and optional COG, colour bucket map and probability COG); return
    the paths written.

    ``source``: the mask store's path, or an open ``MaskReader`` (one per process for many
    scenes: opening the store per scene would cost more than a small scene's export).
    ``mapped_by``: "mono" when every tile was mapped by the Mono model (the bucket map then
    shows Mono, not the buckets of the tiles' codes). Every file gets the store's record."""
    if not isinstance(source, MaskReader):
        with MaskReader(source) as reader:
            return export_scene(reader, scene, out_tif, cog_path, bucket_tif, rows_per_block,
                                mapped_by, probability_cog)
    store = source
    written: list[Path] = []
    current = out_tif
    ds = band = None
    failure = ""
    meta = store.scene_meta(scene)
    record = OutputRecord.of_store(store, scene, mapped_by)
    # A mask resampled for the networks (scenes.gsd_m) is written on its own grid first, then
    # brought back onto the scene file's grid.
    on_grid = out_tif if meta.native is None else out_tif.with_name(out_tif.name + ".grid.tif")
    tmp = geotiff.partial_path(on_grid)
    try:
        ds = geotiff.create(tmp, meta.width, meta.height, 1, np.uint8, meta.crs_wkt,
                            meta.geotransform, geotiff.TILED_OPTIONS, nodata=255)
        band = ds.GetRasterBand(1)
        step = max(256, rows_per_block - rows_per_block % 256)
        for r0, block in store.iter_mask_rows(scene, step):
            geotiff.check_write(band.WriteArray(block, 0, r0))
        ds.SetMetadata({**record.metadata(),
                        "RESFLOW_VALUES": "0=background,1=building,255=nodata"})
        ds.FlushCache()
        band = ds = None
        if meta.native is None:
            written.append(geotiff.commit(tmp, out_tif))
        else:
            n = meta.native
            written.append(geotiff.regrid(tmp, out_tif, n.width, n.height, n.geotransform))
            tmp.unlink()
        if cog_path is not None:
            current = cog_path
            written.append(geotiff.translate_cog(out_tif, cog_path))
        if bucket_tif is not None:
            current = bucket_tif
            _export_buckets(store.bucket_grid(scene), meta, bucket_tif, record)
            written.append(bucket_tif)
        if probability_cog is not None:
            current = probability_cog
            written.append(_export_probability(store, scene, meta, probability_cog, record, step))
    except (RuntimeError, OSError) as exc:
        failure = export_failure(current, exc)
        # Drop the half-written dataset now (the traceback's GDAL frames hold it open).
        exc.__traceback__ = None
        with geotiff.quietly():
            band = ds = None
        geotiff.remove_partial(out_tif, on_grid, cog_path, bucket_tif, probability_cog,
                               _probability_source(probability_cog))
    if failure:
        raise OutputError(failure)
    return written


def export_failure(path: Path, exc: BaseException) -> str:
    """One-line message for a failed export of ``path`` (see ``write_failure``)."""
    return write_failure(path, exc, "export failed")


def bucket_map_rgb(buckets: np.ndarray, mapped_by: str = "buckets") -> np.ndarray:
    """(3, rows, cols) uint8 colours of a bucket grid: each bucket its colour, out-of-distribution
    tiles (-2) white, nodata (-1) black; with ``mapped_by`` "mono" every computed tile is white
    (Mono mapped it, whatever bucket its code fell into)."""
    rgb = np.zeros((3,) + buckets.shape, np.uint8)
    if mapped_by == "mono":
        rgb[:, buckets != -1] = MONO_COLOUR[:, None]
        return rgb
    ok = buckets >= 0
    rgb[:, ok] = BUCKET_COLOURS[buckets[ok] % len(BUCKET_COLOURS)].T
    rgb[:, buckets == -2] = OOD_COLOUR[:, None]
    return rgb


def bucket_map_legend(mapped_by: str) -> str:
    """The bucket map's legend as written into its metadata (RESFLOW_BUCKETS)."""
    if mapped_by == "mono":
        return "-1=#000000 (nodata),mono=#ffffff (every tile mapped by the Mono model)"
    return (",".join(f"{i}={'#%02x%02x%02x' % tuple(c)}" for i, c in enumerate(BUCKET_COLOURS))
            + ",-2=#ffffff (flagged out of distribution)")


def _export_buckets(buckets: np.ndarray, meta: SceneMeta, path: Path,
                    record: OutputRecord) -> None:
    """A small RGB GeoTIFF with one pixel per tile coloured by what mapped it (paper's Fig. 7/11
    style): its bucket's model, or Mono.

    Pixel (c, r) covers scene pixels from (c * tile_px, r * tile_px): the geotransform is the
    scene's scaled by tile_px in all four terms (rotated scenes included)."""
    rows, cols = buckets.shape
    rgb = bucket_map_rgb(buckets, record.mapped_by)
    tmp = geotiff.partial_path(path)
    ds = geotiff.create(tmp, cols, rows, 3, np.uint8, meta.crs_wkt,
                        scaled_geotransform(meta.geotransform, meta.tile_px, meta.tile_px),
                        ["COMPRESS=DEFLATE"])
    geotiff.check_write(ds.WriteArray(rgb))
    ds.SetMetadata({**record.metadata(), "RESFLOW_BUCKETS": bucket_map_legend(record.mapped_by)})
    ds.FlushCache()
    ds = None
    geotiff.commit(tmp, path)


def _probability_source(cog: Optional[Path]) -> Optional[Path]:
    """The tiled GeoTIFF the probability COG is translated from (removed once the COG exists)."""
    return cog.with_name(f"{cog.name}.source.tif") if cog is not None else None


def _export_probability(store: MaskReader, scene: int, meta: SceneMeta, path: Path,
                        record: OutputRecord, rows_per_block: int) -> Path:
    """The scene's probabilities as a uint8 COG (see ``quantize_probability``) on its grid,
    nodata where the mask is nodata; streamed by row blocks into a tiled GeoTIFF first (the COG
    driver only copies)."""
    if not store.has_probabilities(scene):
        raise OutputError(f"{store.path}: the mask store kept no probabilities for scene "
                          f"{scene}; rerun with --restart and output.probability: true")
    source = geotiff.partial_path(_probability_source(path))
    ds = geotiff.create(source, meta.width, meta.height, 1, np.uint8, meta.crs_wkt,
                        meta.geotransform, geotiff.TILED_OPTIONS, nodata=PROBABILITY_NODATA)
    try:
        band = ds.GetRasterBand(1)
        for r0, prob, mask in store.iter_probability_rows(scene, rows_per_block):
            geotiff.check_write(band.WriteArray(quantize_probability(prob, mask == 255), 0, r0))
        ds.SetMetadata({**record.metadata(),
                        "RESFLOW_VALUES": f"0-{PROBABILITY_SCALE}=building probability x "
                                          f"{PROBABILITY_SCALE},{PROBABILITY_NODATA}=nodata"})
        ds.FlushCache()
        band = ds = None
        if meta.native is not None:  # scenes.gsd_m: back onto the scene file's grid
            n = meta.native
            return geotiff.regrid(source, path, n.width, n.height, n.geotransform,
                                  geotiff.COG_PROBABILITY_OPTIONS, fmt="COG")
        return geotiff.translate(source, path, "COG", geotiff.COG_PROBABILITY_OPTIONS)
    finally:
        band = ds = None
        source.unlink(missing_ok=True)
