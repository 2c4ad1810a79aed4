#!/usr/bin/env python3
"""The feed alone: how fast a rank reads, normalises, writes and exports when the networks cost
nothing, for 1 and 2 reader threads per rank and 1 and 2 ranks.

Each run is the real ``resflow run`` under ``mpirun`` (planning, the MPI runner, GDAL window
reads of DEFLATE GeoTIFFs in the reader threads, normalisation, the HDF5 mask store, GeoTIFF
export) with the stages replaced by null ones: every tile gets bucket 0 and probability 0, so
what is left is what a GPU would be waiting on. Reports Mpix/s per rank: ``mapping`` (the rank's
pixels / its mapping seconds: reads, stages, writes) and ``job`` (all pixels / the run's wall
time / ranks: planning and export included).

Usage: perf/feed.py [--size 8192 --scenes 1 --ranks 1,2 --reader-threads 1,2 --batch-size 8]
Outputs (in --out, default perf/results/feed/): feed.json.
Worker mode (used by the study itself): perf/feed.py --null-stages -- run CFG [...]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, os.environ.get("RESFLOW_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


class NullStages:
    """Stages that compute nothing: every tile bucket 0 with an all-zero code, probability 0."""

    def __init__(self, real: Any):
        self.centroids = real.centroids
        self.batch_size = real.batch_size
        self.segment_batch_size = real.batch_size
        self.device = real.device
        self.threshold = real.threshold
        self.times = real.times

    def on_device(self, x: Any) -> Any:
        return x

    def embed_hash_score(self, x: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = x.shape[0]
        return (np.zeros((n, 1), np.float32), np.zeros((n, self.centroids.shape[1]), np.uint8),
                np.zeros(n, np.int64), np.full(n, np.nan, np.float32))

    def segment(self, bucket: int, x: Any) -> np.ndarray:
        return np.zeros((x.shape[0],) + tuple(x.shape[2:]), np.float32)


def null_stages_worker(cli_args: Sequence[str]) -> int:
    """``resflow`` with the engine's stages replaced by NullStages (one MPI rank of the study)."""
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")
    from resflow_mpi import cli, pipeline
    real_build = pipeline.build_stages
    pipeline.build_stages = lambda *a, **kw: NullStages(real_build(*a, **kw))  # type: ignore
    return cli.main(list(cli_args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--null-stages"]:
        return null_stages_worker(argv[argv.index("--") + 1:])
    import benchkit as bk
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("feed"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--size", type=int, default=8192, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts")
    p.add_argument("--reader-threads", default="1,2", help="comma-separated reader threads")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.tile_px, args.halo_px, args.batch_size = 512, 64, 8, 4
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("feed", args)
    gallery = bk.ensure_gallery(args.gallery)
    wl = bk.make_workload(args.scenes, args.size)
    result["workload"] = wl.to_dict()
    cfg = bk.run_config(args.out / "run.yaml", wl.scenes, gallery, args.out / "run",
                        args.tile_px, args.halo_px, args.batch_size)
    worker = [bk.PYTHON, str(Path(__file__).resolve()), "--null-stages", "--"]
    runs = []
    for ranks in (int(r) for r in args.ranks.split(",")):
        for threads in (int(t) for t in args.reader_threads.split(",")):
            run = bk.run_engine(cfg, args.out / f"r{ranks}-t{threads}", ranks=ranks,
                                wrapper=worker,
                                sets=[f"parallel.reader_threads={threads}", *args.set])
            r = run.report
            mapping = [pr["pixels"] / 1e6 / pr["wall_s"] for pr in r["per_rank"] if pr["wall_s"]]
            entry = {"ranks": ranks, "reader_threads": threads,
                     "mpix_per_s_per_rank_mapping": float(np.mean(mapping)),
                     "mpix_per_s_per_rank_job": r["megapixels"] / run.wall_s / ranks,
                     "plan_s": r.get("plan_s"), **run.summary()}
            runs.append(entry)
            print(f"[feed] {ranks} rank(s), {threads} reader thread(s): "
                  f"{entry['mpix_per_s_per_rank_mapping']:.1f} Mpix/s per rank mapping, "
                  f"{entry['mpix_per_s_per_rank_job']:.1f} per rank end to end "
                  f"({run.wall_s:.1f} s)", flush=True)
    result["runs"] = runs
    bk.write_json(args.out / "feed.json", result)
    bk.print_done("feed", args.out / "feed.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
