#!/usr/bin/env python3
"""Planning seconds of one large scene: header checks, value-range sample and the search for
all-nodata tiles (``pipeline.plan_scenes`` in one process), for this tree and optionally another
checkout (``--tree DIR``, e.g. a worktree of main for before/after), in alternation.

Usage: perf/planning.py [--size 12288 --scenes 1 --repeats 3 --collar] [--tree DIR --label L]
Outputs (in --out, default perf/results/planning/): planning.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk

CHILD = """
import json, sys, time
from resflow_mpi.config import load_config
from resflow_mpi.io.gdalenv import configure
from resflow_mpi.pipeline import plan_scenes
configure()
cfg = load_config(sys.argv[1])
t0 = time.perf_counter()
plan = plan_scenes(cfg)
dt = time.perf_counter() - t0
known = sum(int((c == 0).sum()) for c in plan.coverage if c is not None)
print(json.dumps({"plan_s": dt, "tiles_known_empty": known,
                  "prescan_nodata": cfg.tiling.prescan_nodata}))
"""


def plan_once(config: Path, tree: Path) -> dict[str, Any]:
    """plan_scenes of ``config`` in a fresh interpreter importing resflow_mpi from ``tree``."""
    env = bk.bench_env(1)
    env["PYTHONPATH"] = str(tree)
    proc, _ = bk.run_command([bk.PYTHON, "-c", CHILD, str(config)], env=env, cwd=tree)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("planning"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--size", type=int, default=12288, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--collar", action="store_true", help="scenes with a nodata collar")
    p.add_argument("--tree", type=Path, default=None, help="another checkout, timed beside")
    p.add_argument("--label", default="other", help="name of --tree in the results")
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.repeats = 512, 1
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("planning", args)
    gallery = bk.ensure_gallery(args.gallery)
    wl = bk.make_workload(args.scenes, args.size, collar=args.collar)
    result["workload"] = wl.to_dict()
    cfg = bk.run_config(args.out / "run.yaml", wl.scenes, gallery, args.out / "run")
    trees = {"this": bk.REPO, **({args.label: args.tree.resolve()} if args.tree else {})}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(plan_once(cfg, tree))
    result["runs"] = runs
    result["median_plan_s"] = {n: statistics.median(r["plan_s"] for r in rs)
                               for n, rs in runs.items()}
    bk.write_json(args.out / "planning.json", result)
    for name, s in result["median_plan_s"].items():
        print(f"[planning] {name}: {s:.2f} s (median of {args.repeats}) for "
              f"{wl.megapixels:.1f} Mpx", flush=True)
    bk.print_done("planning", args.out / "planning.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
