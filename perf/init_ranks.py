#!/usr/bin/env python3
"""`resflow init` on 1 and 2 ranks, shared models on rank 0 vs data-parallel: seconds per stage.

Trains galleries on the demo archive with the benchmark training settings (benchkit.BENCH_TRAINING)
for each (ranks, training.data_parallel) cell, ``--repeats`` times, and reports the median wall
time, rank 0's seconds per stage (from init's ``seconds on rank 0`` line), the speed-up over one
rank, and whether the repeats of a cell wrote identical model files (sha256 of every checkpoint:
init is repeatable for a fixed rank count). Outputs: init_ranks.json / .md in --out.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import benchkit as bk

STAGE_LINE = re.compile(r"seconds on rank 0: (.*) \(")


def gallery_checksum(gallery: Path) -> str:
    m = json.loads((gallery / "manifest.json").read_text())
    entries = [m["extractor"], m["hash_head"], m["mono"], *m["buckets"]]
    return hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()[:16]


def one_init(archive: Path, out: Path, ranks: int, data_parallel: bool, tag: str) -> dict[str, Any]:
    gallery = out / f"gallery-{tag}"
    cfg = {"scenes": {"inputs": [str(archive)], "split": "train"},
           "tiling": {"tile_px": 256, "halo_px": 16},
           "models": {"gallery": str(gallery), "arch": "unet", "preset": "tiny", "hash_bits": 32},
           "inference": {"batch_size": 8, "threads_per_rank": 0},
           "output": {"dir": str(out / "init-out"), "quicklooks": False},
           "training": {**bk.BENCH_TRAINING, "data_parallel": data_parallel}}
    path = bk.write_yaml(out / f"init-{tag}.yaml", cfg)
    threads = max(1, 2 // ranks)
    proc, wall_s = bk.run_command([*bk.mpirun(ranks), bk.resflow_exe(), "init", str(path)],
                                  env=bk.bench_env(threads), timeout_s=3600)
    match = STAGE_LINE.search(proc.stderr)
    stages = {}
    if match:
        for part in match.group(1).split(", "):
            name, value = part.rsplit(" ", 1)
            stages[name] = float(value)
    return {"ranks": ranks, "data_parallel": data_parallel, "wall_s": wall_s,
            "stage_s": stages, "checksum": gallery_checksum(gallery)}


def same_text(row: dict[str, Any]) -> str:
    """'yes'/'NO' for two or more repeats; one run proves nothing about repeatability."""
    if row["runs"] < 2:
        return "one run"
    return "yes" if row["repeatable"] else "NO"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or bk.default_out("init_ranks")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from resflow_mpi.synth import synth_archive
    archive = synth_archive(bk.CACHE_DIR / "demo-archive", preset="demo", seed=0)
    cells = [(1, False), (2, False), (2, True)]
    runs = []
    for rep in range(args.repeats):
        for ranks, dp in cells:
            r = one_init(archive, out, ranks, dp, f"n{ranks}-dp{int(dp)}-r{rep}")
            print(f"[init_ranks] ranks {ranks} data_parallel {dp}: {r['wall_s']:.1f} s "
                  f"{r['stage_s']} checksum {r['checksum']}", flush=True)
            runs.append(r)
    table = []
    base = None
    for ranks, dp in cells:
        mine = [r for r in runs if r["ranks"] == ranks and r["data_parallel"] == dp]
        wall = statistics.median(r["wall_s"] for r in mine)
        stages = {k: statistics.median(r["stage_s"].get(k, 0.0) for r in mine)
                  for k in mine[0]["stage_s"]}
        base = base or wall
        table.append({"ranks": ranks, "data_parallel": dp, "median_wall_s": wall,
                      "speedup_vs_1_rank": base / wall, "median_stage_s": stages,
                      "checksums": sorted({r["checksum"] for r in mine}),
                      "runs": len(mine),
                      "repeatable": len({r["checksum"] for r in mine}) == 1})
    result = {**bk.header("init_ranks", args), "runs": runs, "table": table}
    bk.write_json(out / "init_ranks.json", result)
    stage_names = list(table[0]["median_stage_s"])
    lines = ["| ranks | shared models | init wall s (median) | speed-up | "
             + " | ".join(stage_names) + " | repeats identical |",
             "|" + "---|" * (5 + len(stage_names))]
    for row in table:
        lines.append(f"| {row['ranks']} | {'data-parallel' if row['data_parallel'] else 'rank 0'} "
                     f"| {row['median_wall_s']:.1f} | {row['speedup_vs_1_rank']:.2f}x | "
                     + " | ".join(f"{row['median_stage_s'][k]:.1f}" for k in stage_names)
                     + f" | {same_text(row)} ({', '.join(row['checksums'])}) |")
    (out / "init_ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bk.print_done("init_ranks", out / "init_ranks.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
