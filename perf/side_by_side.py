#!/usr/bin/env python3
"""Same data, same cores, one run: MPI engine vs Spark engine vs the naive serial baseline.

On ``--cores`` cores (default 2): ``mpirun -n CORES resflow run`` with 1 torch thread per rank,
``resflow run --engine spark`` with ``spark.master=local[CORES]`` and 1 thread per task, and
perf/naive_baseline.py (one process, CORES torch threads, tile by tile). Reports each engine's
wall time — the command's own (what a user waits for, start-up included; the primary figure) and
the in-process time of its report — and the ratios MPI/Spark and MPI/naive as speed-ups (how many
times faster MPI is). The masks are compared pixel by pixel: agreement = equal pixels / pixels
valid in both (nodata must match too). When Spark (pyspark, Java or the engine) is missing or
fails, its entry holds {"error": ...} and the other figures are still reported.

Outputs (in --out, default perf/results/side_by_side/): side_by_side.json, side_by_side.png.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk


def compare_masks(a: Path, b: Path, rows_per_block: int = 1024) -> dict[str, Any]:
    """Pixel agreement of two mask GeoTIFFs (0/1, 255 nodata), streamed by row blocks."""
    from osgeo import gdal
    gdal.UseExceptions()
    da, db = gdal.Open(str(a)), gdal.Open(str(b))
    if (da.RasterXSize, da.RasterYSize) != (db.RasterXSize, db.RasterYSize):
        return {"a": str(a), "b": str(b), "error": "masks differ in size"}
    w, h = da.RasterXSize, da.RasterYSize
    both_valid = equal = nodata_mismatch = 0
    for r0 in range(0, h, rows_per_block):
        n = min(rows_per_block, h - r0)
        xa = da.GetRasterBand(1).ReadAsArray(0, r0, w, n)
        xb = db.GetRasterBand(1).ReadAsArray(0, r0, w, n)
        va, vb = xa != 255, xb != 255
        both = va & vb
        both_valid += int(both.sum())
        equal += int((both & (xa == xb)).sum())
        nodata_mismatch += int((va != vb).sum())
    return {"a": str(a), "b": str(b), "pixels": w * h, "both_valid": both_valid,
            "agreement": equal / both_valid if both_valid else None,
            "differing_pixels": both_valid - equal, "nodata_mismatch": nodata_mismatch,
            "identical": equal == both_valid and nodata_mismatch == 0}


def compare_runs(reference: list[Path], other: list[Path]) -> dict[str, Any]:
    """Scene-by-scene agreement and the pooled fraction."""
    if len(reference) != len(other) or not reference:
        return {"error": f"mask counts differ ({len(reference)} vs {len(other)})"}
    per = [compare_masks(a, b) for a, b in zip(reference, other)]
    valid = sum(p.get("both_valid", 0) for p in per)
    diff = sum(p.get("differing_pixels", 0) for p in per)
    return {"agreement": (valid - diff) / valid if valid else None,
            "nodata_mismatch": sum(p.get("nodata_mismatch", 0) for p in per),
            "identical": all(p.get("identical") for p in per), "per_scene": per}


def spark_missing() -> Optional[str]:
    """Why the Spark engine cannot run here, or None."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed"
    if shutil.which("java") is None:
        return "java is not on PATH (Spark needs a JRE)"
    if importlib.util.find_spec("resflow_mpi.runners.spark_runner") is None:
        return "resflow_mpi.runners.spark_runner is not importable"
    return None


def run_naive(gallery: Path, wl: bk.Workload, out: Path, cores: int, tile_px: int,
              halo_px: int) -> dict[str, Any]:
    """The naive baseline as its own process (its command wall time included)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [bk.PYTHON, str(bk.PERF_DIR / "naive_baseline.py"), "--gallery", str(gallery),
           "--out-dir", str(out), "--tile-px", str(tile_px), "--halo-px", str(halo_px),
           "--threads", str(cores), *wl.scenes]
    _, wall = bk.run_command(cmd, env=bk.bench_env(cores))
    report = json.loads((out / "naive_report.json").read_text())
    return {"engine": "naive", "processes": 1, "threads": cores, "wall_s": report["wall_s"],
            "command_wall_s": wall, "tiles": report["tiles"], "megapixels": report["megapixels"],
            "tiles_per_s": report["tiles"] / report["wall_s"],
            "stage_s_total": report["stage_s_total"], "command": bk.shell_line(cmd),
            "out_dir": str(out)}


def ratio(slow: Optional[dict[str, Any]], fast: dict[str, Any], key: str) -> Optional[float]:
    """How many times faster ``fast`` is than ``slow`` on wall-time ``key``."""
    if not slow or "error" in slow:
        return None
    return slow[key] / fast[key]


def plot(result: dict[str, Any], png: Path) -> None:
    """Wall times of the three engines (command and in-process)."""
    plt = bk.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [n for n in ("mpi", "spark", "naive") if "error" not in result[n]]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result[n]["command_wall_s"] for n in names], 0.4,
           label="command wall (start-up included)")
    ax.bar([x + 0.2 for x in xs], [result[n]["wall_s"] for n in names], 0.4, label="in-process wall")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("seconds")
    w = result["workload"]
    ax.set_title(f"{w['megapixels']:.1f} Mpx on {result['cores']} cores", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("side_by_side"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--size", type=int, default=2048, help="scene side in pixels")
    p.add_argument("--scenes", type=int, default=1)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--collar", action="store_true", help="scenes with a nodata collar")
    p.add_argument("--no-spark", action="store_true", help="leave the Spark engine out")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for both engines, e.g. parallel.policy=dynamic")
    p.add_argument("--quick", action="store_true", help="tiny workload (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.scenes, args.tile_px, args.halo_px, args.batch_size = 256, 1, 64, 8, 4
        args.collar = True
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("side_by_side", args)
    gallery = bk.ensure_gallery(args.gallery)
    wl = bk.make_workload(args.scenes, args.size, collar=args.collar)
    result.update({"workload": wl.to_dict(), "cores": args.cores})
    cfg = bk.run_config(args.out / "run.yaml", wl.scenes, gallery, args.out / "mpi",
                        args.tile_px, args.halo_px, args.batch_size)
    mpi = bk.run_engine(cfg, args.out / "mpi", ranks=args.cores, sets=args.set)
    result["mpi"] = {**mpi.summary(), "processes": args.cores, "threads": 1}
    print(f"[side_by_side] mpi: {mpi.command_wall_s:.1f} s ({mpi.wall_s:.1f} s in process)", flush=True)
    spark: dict[str, Any]
    why = "left out (--no-spark)" if args.no_spark else spark_missing()
    if why:
        spark = {"error": why}
    else:
        try:
            run = bk.run_engine(cfg, args.out / "spark", ranks=args.cores, engine="spark",
                                sets=args.set)
            spark = {**run.summary(), "processes": f"local[{args.cores}]", "threads": 1}
        except bk.BenchError as exc:
            spark = {"error": str(exc)[-3000:]}
    result["spark"] = spark
    print(f"[side_by_side] spark: " + (f"error: {spark['error'].splitlines()[0]}" if "error" in spark
                                      else f"{spark['command_wall_s']:.1f} s "
                                           f"({spark['wall_s']:.1f} s in process)"), flush=True)
    naive = run_naive(gallery, wl, args.out / "naive", args.cores, args.tile_px, args.halo_px)
    result["naive"] = naive
    print(f"[side_by_side] naive: {naive['command_wall_s']:.1f} s ({naive['wall_s']:.1f} s in "
          "process)", flush=True)
    result["speedup"] = {
        "mpi_vs_spark": ratio(spark, result["mpi"], "command_wall_s"),
        "mpi_vs_naive": ratio(naive, result["mpi"], "command_wall_s"),
        "mpi_vs_spark_in_process": ratio(spark, result["mpi"], "wall_s"),
        "mpi_vs_naive_in_process": ratio(naive, result["mpi"], "wall_s")}
    mpi_masks = bk.mask_outputs(args.out / "mpi")
    result["agreement"] = {
        "naive_vs_mpi": compare_runs(mpi_masks, bk.mask_outputs(args.out / "naive")),
        "spark_vs_mpi": ({"error": "no Spark output"} if "error" in spark
                         else compare_runs(mpi_masks, bk.mask_outputs(args.out / "spark")))}
    result["targets"] = [
        bk.target("MPI speed-up over Spark (command wall)", result["speedup"]["mpi_vs_spark"], 2.0),
        bk.target("MPI speed-up over naive serial (command wall)",
                  result["speedup"]["mpi_vs_naive"], 1.5)]
    bk.write_json(args.out / "side_by_side.json", result)
    plot(result, args.out / "side_by_side.png")
    s = result["speedup"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
    print(f"[side_by_side] MPI vs Spark {fmt(s['mpi_vs_spark'])} (in process "
          f"{fmt(s['mpi_vs_spark_in_process'])}), MPI vs naive {fmt(s['mpi_vs_naive'])} (in process "
          f"{fmt(s['mpi_vs_naive_in_process'])}); naive agreement "
          f"{result['agreement']['naive_vs_mpi'].get('agreement')}")
    bk.print_done("side_by_side", args.out / "side_by_side.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
