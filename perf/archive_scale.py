#!/usr/bin/env python3
"""Archive scale: the same pixels as 10, 100 and 1,000 scenes, mapped by the MPI engine.

Each archive holds about the same total pixels (``--total-px`` squared, default 8192: 1,000
scenes of 256 px, 16 tiles each), cut into N equal square scenes (side total_px / sqrt(N), rounded
to whole tiles), so every archive is about the same work in tiles. Costs that grow with the
archive instead of the work (serial planning on rank 0, per-scene collectives in every write
round) show as time per tile or peak RSS rising with N. ``--total-px 2048`` is the extreme case
(1,000 scenes of one 64 px tile each): there, what every scene costs whatever its size (opening
and checking it, its outputs' files) is measured per scene. Figures per archive: tiles/s, time per
tile, the networks' share of it and the rest (planning, reads, writes, layout, export: what the
archive's size can change; the networks' time is the same work at every count and carries most of
a shared machine's noise), planning seconds (scene checks + nodata prescan), write seconds and
peak RSS per rank (each rank under perf/rss_wrapper.py).

``--tree DIR`` runs another checkout of the project (e.g. an older commit in a git worktree) on
the same archives, for before/after tables. Outputs: archive_scale.json and archive_scale.md in
--out (default perf/results/archive_scale/).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

import benchkit as bk

EPSG = 32637


def write_archive(root: Path, n_scenes: int, total_px: int, tile_px: int,
                  seed: int = 0) -> list[str]:
    """N square uint8 scenes (random texture with bright blocks) covering about total_px^2
    pixels, each side a whole number of tiles (so every archive has about the same tiles)."""
    from resflow_mpi.synth import write_raster_from_array
    side = max(1, int(round(total_px / math.sqrt(n_scenes) / tile_px))) * tile_px
    out = root / f"a{n_scenes}x{side}"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(seed)
    for i in range(n_scenes):
        path = out / f"s{i:04d}.tif"
        if not path.is_file():
            img = rng.integers(40, 120, (3, side, side), dtype=np.uint8)
            for _ in range(max(1, side // 32)):  # a few "roofs"
                r, c = rng.integers(0, max(1, side - 16), 2)
                img[:, r:r + 16, c:c + 16] = 220
            gt = (400000.0 + (i % 100) * side * 0.5, 0.5, 0.0,
                  1000000.0 - (i // 100) * side * 0.5, 0.0, -0.5)
            write_raster_from_array(path, img, EPSG, gt, 0)
        paths.append(str(path))
    return paths


def measure(n: int, paths: list[str], gallery: Path, out: Path, tile_px: int, ranks: int,
            env_tree: str | None) -> dict[str, Any]:
    cfg = bk.run_config(out / f"run-{n}.yaml", paths, gallery, out / f"out-{n}", tile_px=tile_px,
                        halo_px=16, batch_size=8)
    rss_dir = out / f"rss-{n}"
    rss_dir.mkdir(parents=True, exist_ok=True)
    if env_tree:
        os.environ["RESFLOW_BENCH_TREE"] = env_tree
    run = bk.run_engine(cfg, out / f"out-{n}", ranks=ranks, wrapper=bk.rss_wrapper(rss_dir))
    rss = bk.read_rss(rss_dir)
    r = run.report
    tiles = r["tiles"]
    # The networks' time is the same work at every scene count (and the noisiest part on a shared
    # machine); what the archive's size can change is everything else: planning, reads, writes,
    # layout, export. Reported apart, per tile.
    net_s = sum(p["segment_s"] + p["embed_s"] + p["hash_s"] for p in r["per_rank"]) / len(r["per_rank"])
    return {"scenes": n, "scene_px": int(round(math.sqrt(r["megapixels"] * 1e6 / n))),
            "network_ms_per_tile": 1000 * net_s / tiles,
            "other_ms_per_tile": 1000 * (r["wall_s"] - net_s) / tiles,
            "tiles": tiles, "wall_s": r["wall_s"], "command_wall_s": run.command_wall_s,
            "tiles_per_s": tiles / r["wall_s"], "ms_per_tile": 1000 * r["wall_s"] / tiles,
            "plan_s": r.get("plan_s"), "write_s_max": max(p["write_s"] for p in r["per_rank"]),
            "peak_rss_mb_per_rank": [x["vmhwm_kb"] / 1024 for x in rss if "vmhwm_kb" in x] or
            r.get("peak_rss_mb_per_rank"), "writer": r.get("writer")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="10,100,1000")
    ap.add_argument("--total-px", type=int, default=8192, help="side of the equivalent one scene")
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gallery", default=None)
    ap.add_argument("--tree", default=None, help="checkout to run instead of this one")
    ap.add_argument("--label", default="this tree")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out) if args.out else bk.default_out("archive_scale")
    out.mkdir(parents=True, exist_ok=True)
    gallery = bk.ensure_gallery(args.gallery)
    rows = []
    for n in [int(x) for x in args.counts.split(",")]:
        paths = write_archive(bk.CACHE_DIR / "archive-scale", n, args.total_px, args.tile_px)
        row = measure(n, paths, gallery, out, args.tile_px, args.ranks, args.tree)
        rows.append(row)
        print(f"[archive_scale] {n} scenes of {row['scene_px']} px: {row['tiles']} tiles, "
              f"{row['tiles_per_s']:.1f} tiles/s, plan {row['plan_s']} s, write "
              f"{row['write_s_max']:.2f} s, RSS {row['peak_rss_mb_per_rank']} MB", flush=True)
    base = rows[0]
    for r in rows:
        r["ms_per_tile_vs_first"] = r["ms_per_tile"] / base["ms_per_tile"]
    result = {**bk.header("archive_scale", args), "label": args.label, "rows": rows}
    bk.write_json(out / "archive_scale.json", result)
    md = [f"Archive scale ({args.label}): {args.total_px}^2 px as N scenes, tile {args.tile_px}, "
          f"{args.ranks} MPI ranks", "",
          "| scenes | scene px | tiles | tiles/s | ms/tile (vs 10) | networks ms/tile | "
          "other ms/tile | plan s | write s | peak RSS MB per rank |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plan = "n/a" if r["plan_s"] is None else f"{r['plan_s']:.2f}"
        rss = ", ".join(f"{x:.0f}" for x in r["peak_rss_mb_per_rank"] if x is not None)
        md.append(f"| {r['scenes']} | {r['scene_px']} | {r['tiles']} | {r['tiles_per_s']:.1f} | "
                  f"{r['ms_per_tile']:.1f} ({r['ms_per_tile_vs_first']:.2f}x) | "
                  f"{r['network_ms_per_tile']:.2f} | {r['other_ms_per_tile']:.2f} | {plan} | "
                  f"{r['write_s_max']:.2f} | {rss} |")
    (out / "archive_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    bk.print_done("archive_scale", out / "archive_scale.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
