#!/usr/bin/env python3
"""Naive serial baseline: what a user would write by hand with the same gallery models.

One process, ``--threads`` torch threads, a sliding window over each scene: for every tile, one
GDAL ``ReadAsArray`` of the tile plus its halo (edges padded by repetition), a batch of one tile,
no read-ahead, CEM embedding -> hash code -> nearest bucket -> that bucket's segmentation model,
threshold, and the owned part written into a GeoTIFF with GDAL. No MPI, no HDF5, no queues.

Usage: perf/naive_baseline.py --gallery G --out-dir D [--tile-px 256 --halo-px 16 --threads 2]
       SCENE.tif [...]
Writes D/<scene stem>.resflow-mask.tif (0 background, 1 building, 255 nodata) and D/naive_report.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resflow_mpi without installing

# Divisors a hand-written script would use for 8-bit and 11-bit-in-16 imagery.
VALUE_MAX = {"Byte": 255.0, "UInt16": 2047.0}


def naive_map_scene(scene: str, models: Any, out_tif: Path, tile_px: int, halo_px: int,
                    threshold: float = 0.5) -> dict[str, Any]:
    """Map one scene tile by tile; return its counts and seconds."""
    import numpy as np
    import torch
    from osgeo import gdal
    from resflow_mpi.models.hashing import assign_buckets, codes_to_bits, pack_bits
    gdal.UseExceptions()
    src = gdal.Open(scene)
    width, height, n_bands = src.RasterXSize, src.RasterYSize, src.RasterCount
    bands = [1, 2, 3] if n_bands >= 3 else list(range(1, n_bands + 1))
    scale = VALUE_MAX[gdal.GetDataTypeName(src.GetRasterBand(1).DataType)]
    nodata = src.GetRasterBand(1).GetNoDataValue()
    dst = gdal.GetDriverByName("GTiff").Create(str(out_tif), width, height, 1, gdal.GDT_Byte,
                                               ["TILED=YES", "COMPRESS=DEFLATE"])
    dst.SetGeoTransform(src.GetGeoTransform())
    dst.SetProjection(src.GetProjection())
    out_band = dst.GetRasterBand(1)
    out_band.SetNoDataValue(255)
    centroids = torch.from_numpy(models.centroids)
    full = tile_px + 2 * halo_px
    tiles, read_s, compute_s, write_s = 0, 0.0, 0.0, 0.0
    t_start = time.perf_counter()
    for row in range(0, height, tile_px):
        for col in range(0, width, tile_px):
            t0 = time.perf_counter()
            own_w, own_h = min(tile_px, width - col), min(tile_px, height - row)
            c0, r0 = max(0, col - halo_px), max(0, row - halo_px)
            c1, r1 = min(width, col + own_w + halo_px), min(height, row + own_h + halo_px)
            arr = src.ReadAsArray(c0, r0, c1 - c0, r1 - r0, band_list=bands)
            left, top = halo_px - (col - c0), halo_px - (row - r0)
            pad = ((0, 0), (top, full - top - (r1 - r0)), (left, full - left - (c1 - c0)))
            arr = np.pad(arr, pad, mode="edge")
            t1 = time.perf_counter()
            x = torch.from_numpy(np.clip(arr.astype(np.float32) / scale, 0.0, 4.0))[None]
            with torch.inference_mode():
                fmap, _ = models.extractor(x)
                codes = pack_bits(codes_to_bits(models.hash_head(fmap)))
                bucket = int(assign_buckets(codes, centroids)[0])
                prob = torch.sigmoid(models.segmenter(bucket)(x))[0, 0].numpy()
            t2 = time.perf_counter()
            owned = prob[halo_px:halo_px + own_h, halo_px:halo_px + own_w]
            mask = (owned > threshold).astype(np.uint8)
            if nodata is not None:
                pixels = arr[:, halo_px:halo_px + own_h, halo_px:halo_px + own_w]
                mask[(pixels == nodata).all(axis=0)] = 255
            out_band.WriteArray(mask, col, row)
            write_s += time.perf_counter() - t2
            read_s += t1 - t0
            compute_s += t2 - t1
            tiles += 1
    out_band.FlushCache()
    dst = out_band = src = None  # closes both files
    return {"scene": scene, "mask": str(out_tif), "tiles": tiles, "pixels": width * height,
            "bytes_read_estimate": width * height * len(bands), "wall_s": time.perf_counter() - t_start,
            "read_s": read_s, "compute_s": compute_s, "write_s": write_s}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenes", nargs="+", help="GeoTIFF scenes")
    p.add_argument("--gallery", required=True, help="model gallery written by `resflow init`")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    args = p.parse_args(argv)
    import torch
    from resflow_mpi.galleries import ModelGallery
    t_start = time.perf_counter()  # like the engines' reports: after imports, gallery load included
    torch.set_num_threads(args.threads)
    models = ModelGallery(args.gallery).stage_models(torch.device("cpu"))
    models.extractor.eval()
    models.hash_head.eval()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    scenes = []
    for scene in args.scenes:
        out_tif = args.out_dir / f"{Path(scene).stem}.resflow-mask.tif"  # the engine's names
        scenes.append(naive_map_scene(scene, models, out_tif, args.tile_px, args.halo_px,
                                      args.threshold))
    wall = time.perf_counter() - t_start
    pixels = sum(s["pixels"] for s in scenes)
    tiles = sum(s["tiles"] for s in scenes)
    report = {"engine": "naive", "threads": args.threads, "wall_s": wall, "tiles": tiles,
              "megapixels": pixels / 1e6, "tiles_per_s": tiles / wall,
              "mpixel_per_s": pixels / 1e6 / wall,
              "stage_s_total": {k: sum(s[k] for s in scenes) for k in ("read_s", "compute_s",
                                                                         "write_s")},
              "scenes": scenes}
    (args.out_dir / "naive_report.json").write_text(json.dumps(report, indent=1))
    print(f"naive: {tiles} tiles, {pixels / 1e6:.1f} Mpx in {wall:.1f} s "
          f"({tiles / wall:.1f} tiles/s) with {args.threads} thread(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
