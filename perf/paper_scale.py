#!/usr/bin/env python3
"""One paper-size scene end to end: a synthetic 40,000 x 35,000 px RGB scene with the demo models.

1. The scene (and its ground-truth mask) is written with resflow_mpi.synth.write_scene from a
   SceneSpec of that size; generation time is reported on its own (a cached scene is reused and
   its first generation time reported).
2. ``mpirun -n RANKS`` maps it (1 torch thread per rank), each rank under perf/rss_wrapper.py so
   its peak RSS (VmHWM) is recorded: wall time, Mpx/s, km2/s, peak RSS per rank.
3. The exported mask is checked against the ground truth: IoU (building class) on ``--windows``
   random windows of ``--window-px`` px (pixels nodata in either are left out).
4. Comparison with the RESFlow paper's serial baseline for a scene of this size: 35 minutes on
   one NVIDIA V100 GPU with the paper's ~13.4M-parameter U-Net — different hardware (here: CPU
   cores) and a different model (here: the benchmark gallery's tiny U-Net), so the ratio is only
   an order-of-magnitude placement. Smaller runs (``--size 10000``) are projected to full size
   linearly in pixels.

Outputs (in --out, default perf/results/paper_scale/): paper_scale.json, paper_scale.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk

PAPER_WIDTH_PX, PAPER_HEIGHT_PX = 40_000, 35_000
PAPER_SERIAL_S = 35 * 60
PAPER_SETUP = "RESFlow paper: serial baseline, 1 NVIDIA V100 GPU, U-Net (~13.4M parameters)"


def scene_spec(width_px: int, height_px: int, seed: int) -> Any:
    """The benchmark scene: dense temperate-urban regime, no nodata collar, 0.5 m pixels."""
    from resflow_mpi.synth import SceneSpec
    return SceneSpec(name=f"paper-scale-{width_px}x{height_px}-s{seed}", width=width_px,
                     height=height_px, regime="temperate-urban", region="benchmark", split="test",
                     seed=seed + 4242, epsg=bk.BENCH_EPSG, pixel_m=bk.BENCH_PIXEL_M)


def ensure_scene(spec: Any, scene_dir: Path) -> tuple[Path, Path, float, bool]:
    """(image, ground truth, generation seconds, reused?) — written once, kept when valid."""
    from resflow_mpi.synth import scene_is_complete, scene_paths, write_scene
    sidecar = scene_dir / f"{spec.name}.generation.json"
    if scene_is_complete(spec, scene_dir) and sidecar.is_file():
        image, mask = scene_paths(spec, scene_dir)
        return image, mask, float(json.loads(sidecar.read_text())["generation_s"]), True
    t0 = time.perf_counter()
    image, mask = write_scene(spec, scene_dir, block_px=2048)
    gen_s = time.perf_counter() - t0
    bk.write_json(sidecar, {"generation_s": gen_s, "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return image, mask, gen_s, False


def window_iou(pred_tif: Path, truth_tif: Path, n_windows: int, window_px: int,
               seed: int = 0) -> dict[str, Any]:
    """IoU of the building class on random windows (nodata in either mask left out)."""
    import numpy as np
    from osgeo import gdal
    gdal.UseExceptions()
    dp, dt = gdal.Open(str(pred_tif)), gdal.Open(str(truth_tif))
    w, h = dp.RasterXSize, dp.RasterYSize
    ww, wh = min(window_px, w), min(window_px, h)
    rng = np.random.default_rng(seed)
    rows = []
    inter_all = union_all = correct_all = valid_all = 0
    for _ in range(n_windows):
        col, row = int(rng.integers(0, w - ww + 1)), int(rng.integers(0, h - wh + 1))
        p = dp.GetRasterBand(1).ReadAsArray(col, row, ww, wh)
        t = dt.GetRasterBand(1).ReadAsArray(col, row, ww, wh)
        valid = (p != 255) & (t != 255)
        pb, tb = (p == 1) & valid, (t == 1) & valid
        inter, union = int((pb & tb).sum()), int((pb | tb).sum())
        correct = int(((p == t) & valid).sum())
        rows.append({"window": [col, row, ww, wh], "iou": inter / union if union else None,
                     "pixel_accuracy": correct / int(valid.sum()) if valid.any() else None,
                     "building_fraction_truth": float(tb.sum() / max(1, valid.sum()))})
        inter_all, union_all = inter_all + inter, union_all + union
        correct_all, valid_all = correct_all + correct, valid_all + int(valid.sum())
    ious = [r["iou"] for r in rows if r["iou"] is not None]
    return {"windows": rows, "iou_pooled": inter_all / union_all if union_all else None,
            "iou_mean": sum(ious) / len(ious) if ious else None,
            "pixel_accuracy": correct_all / valid_all if valid_all else None,
            "window_px": window_px, "n_windows": n_windows}


def plot(result: dict[str, Any], png: Path) -> None:
    """Time split (generation, mapping) and peak RSS per rank."""
    plt = bk.pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.bar(["generate scene", "map (command)", "map (in job)"],
           [result["generation"]["seconds"], result["run"]["command_wall_s"], result["run"]["wall_s"]],
           color=["tab:gray", "tab:blue", "tab:cyan"])
    a1.set_ylabel("seconds")
    s = result["scene"]
    a1.set_title(f"{s['width_px']} x {s['height_px']} px ({s['area_km2']:.0f} km2)", fontsize=10)
    rss = result["peak_rss_per_rank"]
    a2.bar([f"rank {r['rank']}" for r in rss], [r.get("vmhwm_kb", 0) / 1024 for r in rss])
    a2.set_ylabel("peak RSS (MiB)")
    a2.set_title("VmHWM per rank", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("paper_scale"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--width", type=int, default=PAPER_WIDTH_PX)
    p.add_argument("--height", type=int, default=PAPER_HEIGHT_PX)
    p.add_argument("--size", type=int, default=None, help="square scene of this side instead")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--windows", type=int, default=16, help="random windows for the IoU check")
    p.add_argument("--window-px", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scene-dir", type=Path, default=bk.CACHE_DIR / "paper_scale")
    p.add_argument("--delete-scene", action="store_true", help="remove the scene afterwards")
    p.add_argument("--keep-output", action="store_true", help="keep masks.h5 and the mask GeoTIFF")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for the run (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny scene (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.tile_px, args.halo_px, args.batch_size = 384, 64, 8, 4
        args.windows, args.window_px = 4, 128
    if args.size:
        args.width = args.height = args.size
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("paper_scale", args)
    gallery = bk.ensure_gallery(args.gallery)
    spec = scene_spec(args.width, args.height, args.seed)
    image, truth, gen_s, reused = ensure_scene(spec, args.scene_dir)
    megapixels = args.width * args.height / 1e6
    result["scene"] = {"path": str(image), "ground_truth": str(truth), "width_px": args.width,
                       "height_px": args.height, "bands": 3, "megapixels": megapixels,
                       "gigabytes": megapixels * 3 / 1e3,
                       "area_km2": megapixels * bk.BENCH_PIXEL_M ** 2}
    result["generation"] = {"seconds": gen_s, "reused_cached_scene": reused,
                            "mpixel_per_s": megapixels / gen_s if gen_s else None}
    print(f"[paper_scale] scene {args.width}x{args.height}: generated in {gen_s:.0f} s"
          + (" (cached)" if reused else ""), flush=True)
    rss_dir = args.out / "rss"
    cfg = bk.run_config(args.out / "run.yaml", [str(image)], gallery, args.out / "run",
                        args.tile_px, args.halo_px, args.batch_size)
    run = bk.run_engine(cfg, args.out / "run", ranks=args.ranks, wrapper=bk.rss_wrapper(rss_dir),
                        sets=args.set,
                        timeout_s=6 * 3600)
    result["run"] = run.summary()
    rep = run.report
    result["per_rank_export_s"] = [r.get("export_s") for r in rep["per_rank"]]
    result["peak_rss_per_rank"] = bk.read_rss(rss_dir)
    masks = bk.mask_outputs(args.out / "run")
    result["verification"] = window_iou(masks[0], truth, args.windows, args.window_px, args.seed)
    full_px = PAPER_WIDTH_PX * PAPER_HEIGHT_PX
    scale = full_px / (args.width * args.height)
    projected = run.command_wall_s * scale
    result["paper_comparison"] = {
        "paper_serial_s": PAPER_SERIAL_S, "paper_setup": PAPER_SETUP,
        "this_setup": (f"{args.ranks} MPI ranks x 1 thread on {result['machine']['cpu']} "
                       f"({result['machine']['cores']} cores), no GPU; gallery "
                       f"{bk.gallery_manifest(gallery).get('arch')}/"
                       f"{bk.gallery_manifest(gallery).get('preset')} U-Net"),
        "measured_full_size": scale == 1.0,
        "full_size_s_projected": projected,
        "speedup_vs_paper_serial": PAPER_SERIAL_S / projected,
        "paper_mpixel_per_s": full_px / 1e6 / PAPER_SERIAL_S,
        "this_mpixel_per_s": megapixels / run.command_wall_s}
    result["full_size_estimate_s"] = {"generation": gen_s * scale, "mapping": projected}
    bk.write_json(args.out / "paper_scale.json", result)
    plot(result, args.out / "paper_scale.png")
    if not args.keep_output:
        for f in (args.out / "run").glob("*"):
            if f.suffix in (".h5", ".tif"):
                f.unlink()
    if args.delete_scene:
        image.unlink(missing_ok=True)
        truth.unlink(missing_ok=True)
    v, t = result["verification"], run.report["throughput"]
    print(f"[paper_scale] mapped in {run.command_wall_s:.0f} s ({run.wall_s:.0f} s in job): "
          f"{t['mpixel_per_s']:.2f} Mpx/s, {t['km2_per_s']:.3f} km2/s; peak RSS per rank "
          f"{[round(r.get('vmhwm_kb', 0) / 1024) for r in result['peak_rss_per_rank']]} MiB; "
          f"IoU {v['iou_pooled']}; full size projected {projected / 60:.1f} min vs paper "
          f"{PAPER_SERIAL_S / 60:.0f} min", flush=True)
    bk.print_done("paper_scale", args.out / "paper_scale.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
