#!/usr/bin/env python3
"""Parallel HDF5 write bandwidth of the mask store vs one writer vs the disk's own rate.

Under ``mpirun -n RANKS`` a mask-sized uint8 scene (``--width`` x ``--height``) is written through
resflow_mpi.io.maskstore.MaskStore exactly as the engine writes it: tile-aligned blocks, tiles
dealt cyclically over ranks, ``--batch-size`` tiles per round, plus the per-tile records (bucket,
code, writer rank, done flag). Variants:

  collective   every rank writes its own blocks, collective mpio (the static policy's default)
  independent  every rank writes its own blocks, independent mpio (the dynamic policy's default)
  gather       blocks are sent to rank 0, which writes them all (the paper's serial merge)
  mask_only    as collective, but only the mask blocks (no per-tile records): splits the cost of
               the records from that of the pixels
  sequential   rank 0 writes the same number of bytes to a plain file, sequentially

Each variant's time runs from the first write to the file being closed and fsync'ed (so the bytes
are on disk, not in the page cache); GB/s = mask bytes / time. Ratios are taken against
``sequential``, the disk's own rate. Each variant runs ``--repeats`` times (interleaved); the best
is reported beside the median.

Outputs (in --out, default perf/results/h5_write/): h5_write.json, h5_write.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resflow_mpi without installing
import benchkit as bk  # noqa: E402

VARIANTS = ("collective", "independent", "gather", "mask_only", "sequential")


def fsync_path(path: Path) -> None:
    """Force a closed file's pages to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store_variant(variant: str, comm: Any, path: Path, info: Any, results: list, args: Any) -> float:
    """Write this rank's tile results the way the engine's writer ``variant`` does."""
    from mpi4py import MPI
    from resflow_mpi.io.maskstore import MaskStore
    rank = comm.Get_rank()
    store = MaskStore(str(path), [info], args.tile_px, 0, 4, "bench", "bench", comm=comm,
                      restart=True)
    bs = args.batch_size
    rounds = comm.allreduce(-(-len(results) // bs), op=MPI.MAX)
    comm.Barrier()
    t0 = time.perf_counter()
    for k in range(rounds):
        buf = results[k * bs:(k + 1) * bs]
        if variant == "collective":
            n = comm.allreduce(len(buf), op=MPI.MAX)
            store.write_results(buf, collective=True, n_calls=n)
        elif variant == "independent":
            store.write_results(buf, collective=False)
        else:
            parts = comm.gather(buf, root=0)
            if rank == 0:
                store.write_results([r for part in parts for r in part], collective=False)
    store.flush()
    store.close()
    if rank == 0:
        fsync_path(path)
    comm.Barrier()
    return time.perf_counter() - t0


def _mask_only(comm: Any, path: Path, info: Any, results: list, args: Any) -> float:
    """Collective tile-block writes into a tile-chunked uint8 dataset, nothing else."""
    import h5py
    import numpy as np
    from mpi4py import MPI
    rank = comm.Get_rank()
    with h5py.File(path, "w", driver="mpio", comm=comm) as f:
        chunk = (min(args.tile_px, info.height), min(args.tile_px, info.width))
        dset = f.create_dataset("mask", (info.height, info.width), np.uint8, chunks=chunk,
                                fillvalue=0)
        bs = args.batch_size
        rounds = comm.allreduce(-(-len(results) // bs), op=MPI.MAX)
        dxpl = h5py.h5p.create(h5py.h5p.DATASET_XFER)
        dxpl.set_dxpl_mpio(h5py.h5fd.MPIO_COLLECTIVE)
        comm.Barrier()
        t0 = time.perf_counter()
        for k in range(rounds):
            buf = results[k * bs:(k + 1) * bs]
            n = comm.allreduce(len(buf), op=MPI.MAX)
            for i in range(n):
                fspace = dset.id.get_space()
                if i < len(buf):
                    o = buf[i].tile.owned
                    fspace.select_hyperslab((o.row, o.col), (o.height, o.width))
                    mspace = h5py.h5s.create_simple((o.height, o.width))
                    block = np.ascontiguousarray(buf[i].mask)
                else:
                    fspace.select_none()
                    mspace = h5py.h5s.create_simple((1, 1))
                    mspace.select_none()
                    block = np.zeros((1, 1), np.uint8)
                dset.id.write(mspace, fspace, block, dxpl=dxpl)
    if rank == 0:
        fsync_path(path)
    comm.Barrier()
    return time.perf_counter() - t0


def _sequential(comm: Any, path: Path, nbytes: int, chunk_bytes: int = 16 << 20) -> float:
    """Rank 0 writes ``nbytes`` to a plain file in large sequential chunks, then fsync."""
    import numpy as np
    comm.Barrier()
    t0 = time.perf_counter()
    if comm.Get_rank() == 0:
        chunk = np.random.default_rng(0).integers(0, 2, chunk_bytes, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            left = nbytes
            while left > 0:
                f.write(chunk[:min(left, chunk_bytes)])
                left -= chunk_bytes
            f.flush()
            os.fsync(f.fileno())
    comm.Barrier()
    return time.perf_counter() - t0


def worker(args: argparse.Namespace) -> None:
    """Every rank: build its tile results, time each variant; rank 0 writes the JSON."""
    import numpy as np
    from mpi4py import MPI
    from osgeo import osr
    from resflow_mpi.io.maskstore import TileResult
    from resflow_mpi.io.raster import SceneInfo
    from resflow_mpi.tiling import split_cyclic, tile_grid
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(bk.BENCH_EPSG)
    # The store records its source file's identity; the benchmark reads no pixels, so a
    # placeholder file stands in for the scene.
    source = Path(args.dir) / "h5-write-benchmark.source"
    if rank == 0:
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_bytes(b"h5-write benchmark: no pixels are read from this file\n")
    comm.Barrier()
    info = SceneInfo(path=str(source), width=args.width, height=args.height, band_count=3,
                     dtype="uint8", nodata=0.0, crs_wkt=srs.ExportToWkt(), epsg=bk.BENCH_EPSG,
                     geotransform=(400000.0, bk.BENCH_PIXEL_M, 0.0, 1000000.0, 0.0, -bk.BENCH_PIXEL_M))
    tiles = list(tile_grid(0, args.width, args.height, args.tile_px, 0))
    block = np.random.default_rng(rank).integers(0, 2, (args.tile_px, args.tile_px), dtype=np.uint8)
    code = np.zeros(4, np.uint8)
    results = [TileResult(t, block[:t.owned.height, :t.owned.width], 0, code)
               for t in (tiles[i] for i in split_cyclic(len(tiles), rank, size))]
    scratch = Path(args.dir)
    if rank == 0:
        scratch.mkdir(parents=True, exist_ok=True)
    comm.Barrier()
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            path = scratch / f"{variant}.{'bin' if variant == 'sequential' else 'h5'}"
            if variant == "sequential":
                t = _sequential(comm, path, args.width * args.height)
            elif variant == "mask_only":
                t = _mask_only(comm, path, info, results, args)
            else:
                t = _store_variant(variant, comm, path, info, results, args)
            times[variant].append(t)
            comm.Barrier()
            if rank == 0:
                path.unlink(missing_ok=True)
            comm.Barrier()
    if rank == 0:
        bk.write_json(Path(args.worker), {"ranks": size, "tiles": len(tiles), "times_s": times})


def summarise(raw: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """GB/s per variant (best and median) and ratios against the sequential disk rate."""
    variants = {}
    for v, ts in raw["times_s"].items():
        variants[v] = {"times_s": ts, "best_s": min(ts), "median_s": statistics.median(ts),
                       "gb_per_s": nbytes / 1e9 / min(ts),
                       "gb_per_s_median": nbytes / 1e9 / statistics.median(ts)}
    seq = variants.get("sequential")
    ratios = {}
    for v in variants:
        if v != "sequential" and seq:
            ratios[f"{v}_vs_sequential"] = variants[v]["gb_per_s"] / seq["gb_per_s"]
    if "collective" in variants and "gather" in variants:
        ratios["collective_vs_gather"] = variants["collective"]["gb_per_s"] / variants["gather"]["gb_per_s"]
    return {"variants": variants, "ratios": ratios}


def plot(result: dict[str, Any], png: Path) -> None:
    """GB/s per variant (best and median of repeats)."""
    plt = bk.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = list(result["variants"])
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result["variants"][n]["gb_per_s"] for n in names], 0.4, label="best")
    ax.bar([x + 0.2 for x in xs], [result["variants"][n]["gb_per_s_median"] for n in names], 0.4,
           label="median")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("GB/s (mask bytes, fsync'ed)")
    ax.set_title(f"{result['mask']['width_px']} x {result['mask']['height_px']} uint8 mask, "
                 f"{result['ranks']} ranks, tile {result['mask']['tile_px']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("h5_write"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--width", type=int, default=16384)
    p.add_argument("--height", type=int, default=16384)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="tiles per write round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    p.add_argument("--dir", type=Path, default=None, help="scratch folder (default: OUT/scratch)")
    p.add_argument("--quick", action="store_true", help="small mask (smoke test)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in str(args.variants).split(",") if v] \
        if isinstance(args.variants, str) else args.variants
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.width = args.height = 1024
        args.tile_px, args.repeats = 128, 1
    args.dir = args.dir or args.out / "scratch"
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("h5_write", args)
    raw_json = args.out / "h5_write-raw.json"
    cmd = [*bk.mpirun(args.ranks), bk.PYTHON, str(Path(__file__).resolve()), "--worker", str(raw_json),
           "--width", str(args.width), "--height", str(args.height), "--tile-px", str(args.tile_px),
           "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
           "--variants", ",".join(args.variants), "--dir", str(args.dir)]
    bk.run_command(cmd)
    raw = json.loads(raw_json.read_text())
    nbytes = args.width * args.height
    result.update({"ranks": raw["ranks"], "mask": {"width_px": args.width, "height_px": args.height,
                                                   "tile_px": args.tile_px, "tiles": raw["tiles"],
                                                   "gigabytes": nbytes / 1e9},
                   "worker_command": bk.shell_line(cmd)})
    result.update(summarise(raw, nbytes))
    best_parallel = result["ratios"].get("collective_vs_sequential")
    result["targets"] = [bk.target("parallel HDF5 write (collective) / sequential disk rate",
                                   best_parallel, 0.7)]
    bk.write_json(args.out / "h5_write.json", result)
    plot(result, args.out / "h5_write.png")
    print("[h5_write] " + ", ".join(f"{v} {d['gb_per_s']:.3f} GB/s" for v, d in result["variants"].items())
          + "; " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()), flush=True)
    try:
        args.dir.rmdir()
    except OSError:
        pass
    bk.print_done("h5_write", args.out / "h5_write.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
