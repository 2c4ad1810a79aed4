#!/usr/bin/env python3
"""End-to-end and per-stage throughput of the MPI engine, per rank and in total.

Maps a synthetic workload with ``mpirun -n RANKS resflow run`` (1 torch thread per rank) and turns
its run_report.json into rates: Mpixel/s, tiles/s, km2/s and GB/s end to end, and the rate each
stage (read, embed, hash, segment, write, export) would sustain if it were the only work (pixels
handled / seconds spent in that stage); the job's rate for a stage is all pixels / the slowest
rank's seconds in it, since ranks run side by side. ``--report`` analyses an existing
run_report.json instead of running.

Outputs (in --out, default perf/results/throughput/): throughput.json, throughput.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk

STAGES = ("read", "read_wait", "embed", "hash", "segment", "write", "export")


def _rates(pixels: float, tiles: float, seconds: float) -> dict[str, Optional[float]]:
    ok = seconds > 0
    return {"s": seconds, "mpixel_per_s": pixels / 1e6 / seconds if ok else None,
            "tiles_per_s": tiles / seconds if ok else None}


def analyse_report(report: dict[str, Any]) -> dict[str, Any]:
    """Rates from a run report: end to end, each stage per rank, and each stage for the job."""
    wall = float(report["wall_s"])
    pixel_area_km2 = report["area_km2"] / report["megapixels"] / 1e6 if report["megapixels"] else 0.0
    per_rank = []
    for r in report["per_rank"]:
        px, tiles = float(r["pixels"]), float(r["tiles"])
        stages = {st: _rates(px, tiles, float(r.get(f"{st}_s", 0.0))) for st in STAGES}
        busy = sum(float(r.get(f"{st}_s", 0.0)) for st in STAGES if st != "read")
        per_rank.append({
            "rank": r["rank"], "tiles": r["tiles"], "tiles_computed": r["tiles_computed"],
            "megapixels": px / 1e6, "bytes_read": r["bytes_read"], "wall_s": r["wall_s"],
            "end_to_end": {"mpixel_per_s": px / 1e6 / r["wall_s"], "tiles_per_s": tiles / r["wall_s"],
                           "km2_per_s": px * pixel_area_km2 / r["wall_s"],
                           "gb_per_s": r["bytes_read"] / 1e9 / r["wall_s"]},
            "stages": stages,
            # read overlaps compute (reader thread): its share is not part of the busy time.
            "share_of_wall": {st: float(r.get(f"{st}_s", 0.0)) / r["wall_s"] for st in STAGES},
            "unaccounted_s": max(0.0, r["wall_s"] - busy),
        })
    total_px, total_tiles = float(report["megapixels"]) * 1e6, float(report["tiles"])
    total_stages = {}
    for st in STAGES:
        secs = [pr["stages"][st]["s"] for pr in per_rank]
        # Ranks run side by side, so a stage alone would take the job as long as its slowest rank.
        total_stages[st] = {"s_sum": sum(secs), "s_max": max(secs),
                            **{k: v for k, v in _rates(total_px, total_tiles, max(secs)).items()
                               if k != "s"}}
    slowest = min((st for st in ("embed", "hash", "segment", "write", "export")
                   if total_stages[st]["mpixel_per_s"]), key=lambda s: total_stages[s]["mpixel_per_s"])
    return {
        "end_to_end": {"wall_s": wall, "ranks": report["ranks"], "tiles": report["tiles"],
                       "tiles_computed": report.get("tiles_computed"),
                       "megapixels": report["megapixels"], "area_km2": report["area_km2"],
                       "gb_read": report["bytes_read"] / 1e9,
                       "mpixel_per_s": report["megapixels"] / wall,
                       "tiles_per_s": report["tiles"] / wall,
                       "km2_per_s": report["area_km2"] / wall,
                       "gb_per_s": report["bytes_read"] / 1e9 / wall},
        "stages_total": total_stages,
        "slowest_stage": slowest,
        "per_rank": per_rank,
        "load_balance": report.get("load_balance"),
    }


def plot(result: dict[str, Any], png: Path) -> None:
    """Bar chart: Mpixel/s of each stage per rank and for the job, with the end-to-end rate."""
    plt = bk.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    stages = [s for s in STAGES if s != "read_wait"]
    n = len(result["per_rank"]) + 1
    width = 0.8 / n
    for k, pr in enumerate(result["per_rank"]):
        vals = [pr["stages"][s]["mpixel_per_s"] or 0 for s in stages]
        ax.bar([i + k * width for i in range(len(stages))], vals, width, label=f"rank {pr['rank']}")
    vals = [result["stages_total"][s]["mpixel_per_s"] or 0 for s in stages]
    ax.bar([i + (n - 1) * width for i in range(len(stages))], vals, width, label="job", color="k")
    ax.axhline(result["end_to_end"]["mpixel_per_s"], color="r", ls="--",
               label=f"end to end {result['end_to_end']['mpixel_per_s']:.2f} Mpx/s")
    ax.set_xticks([i + width * (n - 1) / 2 for i in range(len(stages))], stages)
    ax.set_yscale("log")
    ax.set_ylabel("Mpixel/s (pixels / seconds in stage)")
    ax.set_title(f"Throughput per stage, {result['end_to_end']['ranks']} rank(s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def measure(gallery: Path, workload: bk.Workload, out: Path, ranks: int, tile_px: int, halo_px: int,
            batch_size: int, sets: Sequence[str] = ()) -> bk.EngineRun:
    """Run the workload once with the MPI engine (1 thread per rank, config overrides ``sets``)."""
    cfg = bk.run_config(out / "run.yaml", workload.scenes, gallery, out / "run", tile_px, halo_px,
                        batch_size)
    return bk.run_engine(cfg, out / "run", ranks=ranks, sets=sets)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("throughput"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--report", type=Path, default=None, help="analyse this run_report.json instead")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for the run, e.g. parallel.policy=dynamic (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.scenes, args.tile_px, args.halo_px, args.batch_size = 256, 2, 64, 8, 4
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("throughput", args)
    if args.report:
        report = json.loads(args.report.read_text())
        result["run"] = {"report": str(args.report)}
    else:
        gallery = bk.ensure_gallery(args.gallery)
        wl = bk.make_workload(args.scenes, args.size)
        run = measure(gallery, wl, args.out, args.ranks, args.tile_px, args.halo_px, args.batch_size,
                      args.set)
        report = run.report
        result["workload"] = wl.to_dict()
        result["run"] = run.summary()
    result.update(analyse_report(report))
    bk.write_json(args.out / "throughput.json", result)
    plot(result, args.out / "throughput.png")
    e = result["end_to_end"]
    print(f"[throughput] {e['ranks']} rank(s): {e['mpixel_per_s']:.2f} Mpx/s, "
          f"{e['tiles_per_s']:.1f} tiles/s, {e['km2_per_s']:.3f} km2/s, {e['gb_per_s']:.4f} GB/s; "
          f"slowest stage {result['slowest_stage']}")
    bk.print_done("throughput", args.out / "throughput.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
