#!/usr/bin/env python3
"""GPU check: the real ``resflow run`` on a large scene with paper-size U-Nets, 1 and 2 ranks on one
device, the models-only ceiling, and whether CPU and device choose the same buckets.

What runs (all through the engine's own command line, ``python -m resflow_mpi.cli run`` under
``mpirun``): GDAL window reads of a DEFLATE-tiled GeoTIFF, the three stages, the HDF5 mask store
(parallel or serialized, whichever this h5py is) and the GeoTIFF export.

* the scene: a synthetic scene of ``--base-px`` (the project's generator; an odd size so no two
  tiles of the mosaic are alike) repeated into a ``--size`` x ``--size`` px DEFLATE GeoTIFF;
* two galleries with random weights (speed does not depend on weights) and the same seeded CEM,
  hash head and centroids, the hash head balanced on the scene's tiles as training leaves it:
  ``--preset`` U-Nets (paper: 13.4M parameters) for the speed runs, tiny U-Nets for the agreement
  runs, whose buckets depend only on the CEM and hash head;
* speed runs: ``--ranks`` (1,2) ranks on ``--device``; ``perf/ceiling.py --device`` on the same
  networks and tile shape; e2e / ceiling = computed tiles/s of a run / the ceiling's tiles/s;
* agreement: the ``--agree-size`` scene in ``--agree-tile-px`` tiles mapped on ``--device`` and on
  the CPU; the share of tiles whose bucket agrees (goal >= 0.999) and the hash bits that differ.

Usually started by perf/gpu_check.sh (wheels, venv, size knobs as environment variables).
Writes gpu_check.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resflow_mpi without installing
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "fixtures"))
import benchkit as bk  # noqa: E402

ENGINE = [bk.PYTHON, "-m", "resflow_mpi.cli"]   # the checkout's engine, no install needed
N_BUCKETS = 4
GALLERY_SEED = 7
AGREEMENT_GOAL = 0.999


def mosaic_scene(base: Path, path: Path, size_px: int) -> Path:
    """``base`` repeated into a ``size_px`` square DEFLATE-tiled GeoTIFF (kept when present)."""
    from resflow_mpi.io import geotiff
    from osgeo import gdal
    if path.is_file():
        ds = gdal.Open(str(path))
        if ds is not None and (ds.RasterXSize, ds.RasterYSize) == (size_px, size_px):
            return path
    src = gdal.Open(str(base))
    pixels = src.ReadAsArray()
    nodata = src.GetRasterBand(1).GetNoDataValue()
    bands, bh, bw = pixels.shape
    reps = -(-size_px // bw)
    strip = np.tile(pixels, (1, 1, reps))[:, :, :size_px]
    tmp = path.with_name(path.name + ".partial.tif")
    ds = geotiff.create(tmp, size_px, size_px, bands, pixels.dtype, src.GetProjection(),
                        src.GetGeoTransform(), (*geotiff.TILED_OPTIONS, "NUM_THREADS=ALL_CPUS"),
                        nodata)
    for row in range(0, size_px, bh):
        rows = min(bh, size_px - row)
        for b in range(bands):
            ds.GetRasterBand(b + 1).WriteArray(np.ascontiguousarray(strip[b, :rows]), 0, row)
    ds.FlushCache()
    ds = None
    os.replace(tmp, path)
    return path


def balance_tiles(base: Path, tile_px: int) -> np.ndarray:
    """Normalised tiles of the base scene, the hash head is balanced on."""
    from osgeo import gdal
    from resflow_mpi.stages import normalize
    pixels = gdal.Open(str(base)).ReadAsArray()
    n = pixels.shape[1] // tile_px
    x = normalize(pixels[:, :n * tile_px, :n * tile_px], str(pixels.dtype))
    return x.reshape(3, n, tile_px, n, tile_px).transpose(1, 3, 0, 2, 4).reshape(-1, 3, tile_px, tile_px)


def make_galleries(work: Path, base: Path, preset: str, tile_px: int) -> dict[str, Path]:
    """Galleries ``speed`` (``preset`` U-Nets) and ``agree`` (tiny U-Nets) sharing CEM, hash head
    and centroids."""
    import make_fixtures
    tiles = balance_tiles(base, tile_px)
    out = {}
    for name, p in (("speed", preset), ("agree", "tiny")):
        out[name] = make_fixtures.make_gallery(work / f"gallery-{name}", base, GALLERY_SEED,
                                               N_BUCKETS, preset=p, balance_tiles=tiles)
    shared = [{k: bk.gallery_manifest(g)[k]["sha256"] for k in ("extractor", "hash_head")}
              for g in out.values()]
    if shared[0] != shared[1]:
        raise bk.BenchError("the two galleries' CEM / hash head differ; delete " + str(work))
    return out


def engine_run(name: str, work: Path, scene: Path, gallery: Path, ranks: int, device: str,
               args: argparse.Namespace, tile_px: int, threads: int) -> bk.EngineRun:
    """One ``resflow run`` of ``scene`` into a fresh folder; its run report."""
    cfg = bk.run_config(work / f"{name}.yaml", [str(scene)], gallery, work / name, tile_px,
                        args.halo_px, args.batch_size, threads, device,
                        inference={"autocast": args.autocast, "compile": args.compile})
    t0 = time.perf_counter()
    run = bk.run_engine(cfg, work / name, ranks, threads_per_rank=threads, wrapper=ENGINE,
                        timeout_s=args.timeout_s)
    print(f"[gpu_check] {name}: {ranks} rank(s) on {device}, {time.perf_counter() - t0:.1f} s",
          flush=True)
    return run


def run_summary(run: bk.EngineRun, ceiling_tiles_s: Optional[float]) -> dict[str, Any]:
    """What the check reports of a run: rates, stage seconds, e2e / ceiling."""
    r = run.report
    computed = r.get("tiles_computed", r["tiles"])
    out = {"ranks": run.ranks, "wall_s": run.wall_s, "command_wall_s": run.command_wall_s,
           "tiles": r["tiles"], "tiles_computed": computed, "megapixels": r["megapixels"],
           "e2e_mpixel_per_s": r["throughput"]["mpixel_per_s"],
           "e2e_tiles_per_s": computed / run.wall_s,
           "stage_s_total": r["stage_s_total"],
           "stage_s_max_rank": {k: max(p[k] for p in r["per_rank"]) for k in r["stage_s_total"]},
           "bucket_histogram": r.get("bucket_histogram"),
           "writer": r.get("writer"), "writer_note": r.get("note"),
           "devices": sorted({str((p.get("binding") or {}).get("device", "?"))
                              for p in r["per_rank"]}),
           "command": run.command}
    out["e2e_over_ceiling"] = (out["e2e_tiles_per_s"] / ceiling_tiles_s) if ceiling_tiles_s else None
    return out


def ceiling(work: Path, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    """perf/ceiling.py on untrained ``--preset`` U-Nets of the runs' tile shape."""
    out = work / "ceiling"
    cmd = [bk.PYTHON, str(bk.PERF_DIR / "ceiling.py"), "--device", args.device, "--arch", "unet",
           "--preset", args.preset, "--tile-px", str(args.tile_px), "--halo-px", str(args.halo_px),
           "--batch-size", str(args.batch_size), "--hash-bits", "16", "--buckets", str(N_BUCKETS),
           "--ranks", "1", "--threads", str(threads), "--min-seconds", str(args.ceiling_seconds),
           "--min-batches", "3", "--warmup", "1", "--no-e2e", "--no-plot", "--out", str(out),
           "--autocast", args.autocast] + (["--compile"] if args.compile else [])
    bk.run_command(cmd, env=bk.bench_env(threads), timeout_s=args.timeout_s)
    res = json.loads((out / "ceiling.json").read_text())
    print(f"[gpu_check] ceiling: {res['ceiling']['tiles_per_s']:.2f} tiles/s", flush=True)
    return res


def agreement(work: Path, scene: Path, gallery: Path, args: argparse.Namespace,
              threads: int) -> dict[str, Any]:
    """Buckets and codes of every tile mapped on the device vs on the CPU."""
    from resflow_mpi.io.maskstore import MaskReader
    runs = {dev: engine_run(f"agree-{dev}", work, scene, gallery, 1, dev, args,
                            args.agree_tile_px, threads)
            for dev in dict.fromkeys((args.device, "cpu"))}
    records = {}
    for dev, run in runs.items():
        with MaskReader(str(run.out_dir / "masks.h5")) as reader:
            records[dev] = reader.tile_records(0)
    a, b = records[args.device], records["cpu"]
    done = a["done"].astype(bool) & b["done"].astype(bool) & (a["bucket"] >= 0)
    same = int((a["bucket"][done] == b["bucket"][done]).sum())
    bits = int(np.unpackbits(a["code"][done] ^ b["code"][done], axis=1).sum())
    n = int(done.sum())
    return {"device": args.device, "reference": "cpu", "tiles": n, "same_bucket": same,
            "agreement": same / n if n else None, "code_bits_differing": bits,
            "buckets_used": int(len(np.unique(b["bucket"][done]))), "tile_px": args.agree_tile_px,
            "goal": AGREEMENT_GOAL,
            "met": bool(n and same / n >= AGREEMENT_GOAL)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--size", type=int, default=16000, help="scene side of the speed runs, px")
    p.add_argument("--base-px", type=int, default=1999, help="side of the generated scene that "
                                                             "is repeated into the large ones")
    p.add_argument("--tile-px", type=int, default=1000)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--preset", choices=["tiny", "small", "paper"], default="paper")
    p.add_argument("--ranks", default="1,2", help="rank counts of the speed runs (one device)")
    p.add_argument("--agree-size", type=int, default=8192, help="scene side of the agreement runs")
    p.add_argument("--agree-tile-px", type=int, default=256)
    p.add_argument("--autocast", choices=["auto", "none", "fp16", "bf16"], default="auto")
    p.add_argument("--compile", action="store_true", help="inference.compile: true")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: cores / ranks)")
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
    p.add_argument("--timeout-s", type=float, default=420.0, help="limit for each command")
    p.add_argument("--work", type=Path, default=Path("/tmp/resflow-gpu-check"))
    p.add_argument("--out", type=Path, default=bk.default_out("gpu_check"))
    args = p.parse_args(argv)
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device (torch "
              f"{torch.__version__}); run with DEVICE=cpu for the CPU smoke run", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    rank_counts = [int(r) for r in args.ranks.split(",")]
    result = bk.header("gpu_check", args)
    result["device_name"] = (torch.cuda.get_device_name(0) if args.device == "cuda"
                             else result["machine"]["cpu"])
    wl = bk.make_workload(1, args.base_px, root=args.work / "base")
    base = Path(wl.scenes[0])
    scene = mosaic_scene(base, args.work / f"scene-{args.size}.tif", args.size)
    agree_scene = mosaic_scene(base, args.work / f"scene-{args.agree_size}.tif", args.agree_size)
    galleries = make_galleries(args.work, base, args.preset, args.agree_tile_px)
    print(f"[gpu_check] scenes and galleries ready, {time.perf_counter() - t_start:.1f} s",
          flush=True)
    ceil = ceiling(args.work, args, args.threads or cores)
    ceiling_tiles_s = ceil["ceiling"]["tiles_per_s"]
    result["ceiling"] = {"tiles_per_s": ceiling_tiles_s,
                         "mpixel_per_s": ceil["ceiling"]["mpixel_per_s"],
                         "tflop_per_s": ceil["ceiling"]["gflop_per_s"] / 1e3,
                         "gflop_per_tile": ceil["flops"]["gflop_per_tile"],
                         "segmenter_parameters": ceil["models"]["segmenter_parameters"]}
    result["runs"] = []
    for n in rank_counts:
        run = engine_run(f"speed-{n}rank", args.work, scene, galleries["speed"], n, args.device,
                         args, args.tile_px, args.threads or max(1, cores // n))
        result["runs"].append(run_summary(run, ceiling_tiles_s))
    result["agreement"] = agreement(args.work, agree_scene, galleries["agree"], args,
                                    args.threads or cores)
    result["total_s"] = time.perf_counter() - t_start
    bk.write_json(args.out / "gpu_check.json", result)
    print_summary(result, args)
    bk.print_done("gpu_check", args.out / "gpu_check.json")
    return 0


def print_summary(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The figures, one line each."""
    c = result["ceiling"]
    print(f"device: {result['device_name']}; scene {args.size} x {args.size} px, tiles "
          f"{args.tile_px} + 2 x {args.halo_px} px, batch {args.batch_size}, U-Net "
          f"{args.preset} ({c['segmenter_parameters']:,} parameters), autocast {args.autocast}, "
          f"compile {args.compile}")
    print(f"ceiling (models only): {c['tiles_per_s']:.2f} tiles/s, {c['mpixel_per_s']:.2f} Mpx/s, "
          f"{c['tflop_per_s']:.2f} TFLOP/s")
    for r in result["runs"]:
        st = r["stage_s_total"]
        stages = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in st.items())
        print(f"resflow run, {r['ranks']} rank(s) on {'/'.join(r['devices'])}: e2e "
              f"{r['e2e_mpixel_per_s']:.2f} Mpx/s ({r['e2e_tiles_per_s']:.2f} tiles/s, "
              f"wall {r['wall_s']:.1f} s, command {r['command_wall_s']:.1f} s); e2e / ceiling "
              f"{r['e2e_over_ceiling']:.2f}; stage s (sum over ranks): {stages}; mask store "
              f"writer {r['writer']}" + (f" ({r['writer_note']})" if r["writer_note"] else ""))
    a = result["agreement"]
    print(f"bucket agreement {a['device']} vs cpu: {a['same_bucket']}/{a['tiles']} tiles "
          f"({a['agreement']:.4%}, goal {a['goal']:.1%}: {'met' if a['met'] else 'MISSED'}), "
          f"{a['buckets_used']} buckets used, {a['code_bits_differing']} code bits differ")
    print(f"total {result['total_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
