#!/usr/bin/env python3
"""Tile-size study (the paper's Fig. 8): tiles/s, GB/s and km2/s of the MPI engine vs tile size.

The same workload is mapped once per tile size (``--tile-sizes``, default 256,512,1000; add 1500
where memory allows) with the same ranks, threads, halo and batch size. Larger tiles mean fewer,
slower tiles but less halo overhead per owned pixel.

Outputs (in --out, default perf/results/tile_size/): tile_size.json, tile_size.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk
from scaling import parse_ints


def plot(rows: list[dict[str, Any]], png: Path, title: str) -> None:
    """Three panels vs tile size: tiles/s, GB/s read, km2/s."""
    plt = bk.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    xs = [r["tile_px"] for r in rows]
    for ax, key, label in zip(axes, ("tiles_per_s", "gb_per_s", "km2_per_s"),
                              ("tiles/s", "GB/s (image bytes read)", "km2/s")):
        ax.plot(xs, [r[key] for r in rows], "o-")
        ax.set_xlabel("tile size (px, owned)")
        ax.set_ylabel(label)
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("tile_size"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--tile-sizes", type=parse_ints, default=[256, 512, 1000])
    p.add_argument("--size", type=int, default=3000, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.tile_sizes, args.size, args.scenes, args.halo_px, args.batch_size = [64, 128], 256, 1, 8, 4
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("tile_size", args)
    gallery = bk.ensure_gallery(args.gallery)
    wl = bk.make_workload(args.scenes, args.size)
    result["workload"] = wl.to_dict()
    rows = []
    for tile in args.tile_sizes:
        cfg = bk.run_config(args.out / f"run-{tile}.yaml", wl.scenes, gallery, args.out / "run",
                            tile, args.halo_px, args.batch_size)
        run = bk.run_engine(cfg, args.out / "run", ranks=args.ranks, sets=args.set)
        t = run.report["throughput"]
        rows.append({"tile_px": tile, "input_px": tile + 2 * args.halo_px, "tiles": run.report["tiles"],
                     "wall_s": run.wall_s, "command_wall_s": run.command_wall_s,
                     "tiles_per_s": t["tiles_per_s"], "gb_per_s": t["gb_read_per_s"],
                     "km2_per_s": t["km2_per_s"], "mpixel_per_s": t["mpixel_per_s"],
                     "halo_overhead": (tile + 2 * args.halo_px) ** 2 / tile ** 2 - 1,
                     "stage_s_total": run.report["stage_s_total"], "command": run.command})
        print(f"[tile_size] {tile} px: {t['tiles_per_s']:.2f} tiles/s, {t['gb_read_per_s']:.4f} GB/s, "
              f"{t['km2_per_s']:.3f} km2/s", flush=True)
    result["rows"] = rows
    best = max(rows, key=lambda r: r["km2_per_s"])
    result["best_tile_px_by_km2_per_s"] = best["tile_px"]
    bk.write_json(args.out / "tile_size.json", result)
    plot(rows, args.out / "tile_size.png",
         f"{len(wl.scenes)} x {args.size}px, "
         f"{args.ranks} ranks x 1 thread, halo {args.halo_px}, batch {args.batch_size}")
    bk.print_done("tile_size", args.out / "tile_size.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
