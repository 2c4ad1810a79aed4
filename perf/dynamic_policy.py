#!/usr/bin/env python3
"""The dynamic policy's batches: tiles/s and padded embedding slots, this tree against another.

Under ``parallel.policy: dynamic`` ranks pull ``chunk_tiles`` tiles at a time from a shared
counter. If each pull becomes one embedding call, a chunk smaller than ``inference.batch_size``
pads the fixed-shape batch with zeros (half of every batch at chunk 4, batch 8). This study maps
one workload with MPI 2 ranks, dynamic policy, chunk_tiles 4, batch_size 8, alternating this tree
and ``--tree`` (e.g. a git worktree of an older commit) ``--repeats`` times, and reports median
tiles/s per tree, their ratio, and embedding slots per computed tile (1.0 = no padding; older
trees do not count slots). Outputs: dynamic_policy.json / .md in --out.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import benchkit as bk

THIS_TREE = str(Path(__file__).resolve().parents[1])


def one_run(tree: str, cfg: Path, out: Path) -> dict[str, Any]:
    os.environ["RESFLOW_BENCH_TREE"] = tree
    run = bk.run_engine(cfg, out, ranks=2, sets=["parallel.policy=dynamic",
                                                 "parallel.chunk_tiles=4",
                                                 "inference.batch_size=8"])
    r = run.report
    slots = r.get("embed_slots")
    st = r["stage_s_total"]
    return {"tiles": r["tiles"], "tiles_computed": r["tiles_computed"], "wall_s": r["wall_s"],
            "tiles_per_s": r["tiles"] / r["wall_s"],
            # stages 1-2 (embedding + hashing) per computed tile: what padded slots waste
            "embed_hash_ms_per_tile": 1000 * (st["embed_s"] + st["hash_s"]) / r["tiles_computed"],
            "segment_ms_per_tile": 1000 * st["segment_s"] / r["tiles_computed"],
            "slots_per_tile": slots / r["tiles_computed"] if slots else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", required=True, help="the other checkout (before)")
    ap.add_argument("--scenes", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gallery", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out) if args.out else bk.default_out("dynamic_policy")
    out.mkdir(parents=True, exist_ok=True)
    gallery = bk.ensure_gallery(args.gallery)
    work = bk.make_workload(args.scenes, args.size)
    cfg = bk.run_config(out / "run.yaml", work.scenes, gallery, out / "out", tile_px=args.tile_px)
    trees = {"before": str(Path(args.tree).resolve()), "after": THIS_TREE}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for i in range(args.repeats):
        for name, tree in trees.items():
            r = one_run(tree, cfg, out / f"out-{name}")
            runs[name].append(r)
            print(f"[dynamic_policy] {name} #{i}: {r['tiles_per_s']:.1f} tiles/s, embed+hash "
                  f"{r['embed_hash_ms_per_tile']:.1f} ms/tile, slots/tile {r['slots_per_tile']}",
                  flush=True)
    med = {k: statistics.median(r["tiles_per_s"] for r in v) for k, v in runs.items()}
    emb = {k: statistics.median(r["embed_hash_ms_per_tile"] for r in v) for k, v in runs.items()}
    slots = {k: v[-1]["slots_per_tile"] for k, v in runs.items()}
    result = {**bk.header("dynamic_policy", args), "trees": trees, "runs": runs,
              "median_tiles_per_s": med, "after_over_before": med["after"] / med["before"],
              "median_embed_hash_ms_per_tile": emb,
              "embed_hash_before_over_after": emb["before"] / emb["after"],
              "slots_per_tile": slots}
    bk.write_json(out / "dynamic_policy.json", result)
    md = [f"Dynamic policy, chunk_tiles 4, batch_size 8, MPI 2 ranks, {work.megapixels:.1f} Mpx "
          f"({args.scenes} x {args.size} px, tile {args.tile_px}), median of {args.repeats}", "",
          "| tree | median tiles/s (whole job) | embed + hash ms per tile | embedding slots per "
          "computed tile |", "|---|---|---|---|"]
    for k in trees:
        md.append(f"| {k} | {med[k]:.1f} | {emb[k]:.1f} | "
                  f"{'n/a' if slots[k] is None else f'{slots[k]:.2f}'} |")
    md.append(f"\ntiles/s after / before = {result['after_over_before']:.2f}; embed + hash time per "
              f"tile before / after = {result['embed_hash_before_over_after']:.2f} (the job's wall "
              "time includes setup, which now also checks the gallery contract and the memory "
              "budget)")
    (out / "dynamic_policy.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
