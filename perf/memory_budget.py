#!/usr/bin/env python3
"""Memory budget check: the estimate of resflow_mpi/budget.py beside the measured peak RSS per rank.

For each workload (default: tiles of 512, 1024 and 2048 px with batches of 1 to 4, and the 4096 px
tile of issue 26 at the default batch of 8; 2 ranks, 2 scenes of 4096 x 4096 px) the script maps a
synthetic workload with `mpirun -n 2 resflow run`, reads ``peak_rss_mb_per_rank`` (VmHWM) and the
run's own ``memory_estimate`` (the figure the budget refuses on: baseline measured by the rank,
tiles per rank from the scene plan) from run_report.json and prints their ratio. Goal: every
estimate above the measured peak by a modest margin, 1.1-1.5x.

Outputs (in --out, default perf/results/): memory_budget.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk

# Rank-side probe: what `resflow run` has loaded when it reaches its setup, then this rank's VmRSS.
BASELINE_PROBE = r"""
import json, sys
from resflow_mpi.runners.mpi_runner import MPIRunner  # torch, GDAL, h5py, the pipeline
from resflow_mpi.io.sysmem import process_rss_bytes
from mpi4py import MPI
import torch
torch.set_num_threads(1)
comm = MPI.COMM_WORLD
rss = comm.gather(process_rss_bytes(), root=0)
if comm.Get_rank() == 0:
    print("BASELINE " + json.dumps(rss), flush=True)
"""

TINY_TRAINING = {"tile_px": 64, "tiles_per_scene": 16, "cem_epochs": 8, "hash_epochs": 30,
                 "seg_epochs": 6, "k_min": 2, "k_max": 6, "batch_size": 16}


def tiny_gallery(log: bool = True) -> Path:
    """A tiny gallery (the tests' training settings) trained once into the perf cache."""
    gallery = bk.CACHE_DIR / "memory-budget-gallery"
    with bk.cache_lock():
        if (gallery / "manifest.json").is_file():
            return gallery
        from resflow_mpi.synth import synth_archive
        if log:
            print(f"[memory_budget] training a tiny gallery into {gallery} (~1 min)", flush=True)
        archive = synth_archive(bk.CACHE_DIR / "tiny-archive", preset="tiny", seed=0)
        cfg = {"scenes": {"inputs": [str(archive)], "split": "train"},
               "tiling": {"tile_px": 64, "halo_px": 8},
               "models": {"gallery": str(gallery), "arch": "unet", "preset": "tiny", "hash_bits": 16},
               "inference": {"batch_size": 4, "threads_per_rank": 1},
               "output": {"dir": str(bk.CACHE_DIR / "memory-budget-init"), "quicklooks": False},
               "training": dict(TINY_TRAINING)}
        path = bk.write_yaml(bk.CACHE_DIR / "memory-budget-init.yaml", cfg)
        bk.run_command([*bk.mpirun(2), bk.resflow_exe(), "init", str(path)], timeout_s=1800)
    return gallery


def measure_baseline(ranks: int) -> list[int]:
    proc, _ = bk.run_command([*bk.mpirun(ranks), bk.PYTHON, "-c", BASELINE_PROBE],
                            env=bk.bench_env(1), timeout_s=600)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BASELINE "))
    return [int(v) for v in json.loads(line.split(" ", 1)[1])]


DEFAULT_WORKLOADS = "512x1,512x4,1024x1,1024x4,2048x1,2048x2,4096x8"
GOAL = (1.1, 1.5)   # estimate / measured peak


def parse_workload(text: str) -> tuple[int, int]:
    tile, batch = text.split("x")
    return int(tile), int(batch)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.RESULTS_DIR)
    p.add_argument("--gallery", default=None, help="model gallery (default: a cached tiny one)")
    p.add_argument("--workloads", type=lambda s: [parse_workload(w) for w in s.split(",")],
                   default=[parse_workload(w) for w in DEFAULT_WORKLOADS.split(",")],
                   help=f"TILExBATCH,... (default {DEFAULT_WORKLOADS})")
    p.add_argument("--size", type=int, default=4096, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--halo-px", type=int, default=16)
    args = p.parse_args(argv)
    sys.path.insert(0, str(bk.REPO))
    from resflow_mpi.budget import MIB

    gallery = Path(args.gallery).resolve() if args.gallery else tiny_gallery()
    work = bk.make_workload(args.scenes, args.size)
    baseline = measure_baseline(args.ranks)
    print(f"[memory_budget] baseline VmRSS per rank before work: "
          f"{', '.join(f'{b / MIB:.0f}' for b in baseline)} MiB", flush=True)
    rows: list[dict[str, Any]] = []
    for tile, batch in args.workloads:
        name = f"tile{tile}-batch{batch}"
        out_dir = args.out / "memory_budget" / name
        cfg_path = bk.run_config(out_dir.parent / f"{name}.yaml", work.scenes, gallery, out_dir,
                                 tile_px=tile, halo_px=args.halo_px, batch_size=batch)
        run = bk.run_engine(cfg_path, out_dir, ranks=args.ranks)
        measured = run.report["peak_rss_mb_per_rank"]
        est = run.report["memory_estimate"]
        est_mb = float(est["rank_mb"])
        for rank, peak_mb in enumerate(measured):
            ratio = est_mb / peak_mb
            rows.append({"workload": name, "tile_px": tile, "batch_size": batch, "rank": rank,
                         "measured_peak_rss_mb": peak_mb, "estimate_mb": est_mb,
                         "ratio": ratio, "within_goal": GOAL[0] <= ratio <= GOAL[1],
                         "estimate": est, "wall_s": run.wall_s})
            print(f"{name:18s} rank {rank}: estimate {est_mb:7.0f} MiB  measured {peak_mb:7.0f} "
                  f"MiB  ({ratio:.2f}x)", flush=True)
    result = {**bk.header("memory_budget", args), "gallery": str(gallery),
              "workload": work.to_dict(), "baseline_rss_mb": [b / MIB for b in baseline],
              "goal_ratio": list(GOAL), "rows": rows,
              "all_within_goal": all(r["within_goal"] for r in rows),
              "never_below_measured": all(r["ratio"] >= 1.0 for r in rows)}
    path = bk.write_json(args.out / "memory_budget.json", result)
    bk.print_done("memory_budget", path)
    return 0 if result["never_below_measured"] else 1


if __name__ == "__main__":
    sys.exit(main())
