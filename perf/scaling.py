#!/usr/bin/env python3
"""Strong and weak scaling of the MPI engine, with speed-up and parallel efficiency.

strong: the same workload (``--scenes`` scenes of each ``--sizes`` px) on each rank count.
weak:   ``--scenes`` scenes of each ``--sizes`` px *per rank* (N ranks map N times the work).
One torch thread per rank. Times are the run report's wall_s (inside the job: interpreter and MPI
start-up excluded; the command's own wall time is kept too). Speed-up and efficiency are taken
against the smallest rank count measured (1 unless told otherwise):
strong speed-up S = T(b)/T(N), efficiency S*b/N; weak efficiency T(b)/T(N), scaled speed-up
(N/b)*T(b)/T(N). Each rank runs under perf/rss_wrapper.py, so every run also records per-rank CPU
seconds: a CPU share below 1 means a rank waited (for MPI, or for a core that other work held), and
cpu_work_efficiency (CPU seconds at the baseline / at N) separates the job's own overhead from a
busy machine.

``--ranks 1,2,4`` measures several counts; a single ``--ranks N`` measures one (one Slurm array
task, launch/slurm-scaling-array.sbatch); ``--merge A.json B.json ...`` joins such results into
one table. Outputs (in --out, default perf/results/scaling/): scaling-<mode>.json,
scaling-<mode>.md (tables in the paper's layout: rows = ranks, columns = workload in GB and km2)
and scaling-<mode>.png (log-log speed-up vs ranks, like the paper's Fig. 9).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk


def parse_ints(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def workload_for(mode: str, size_px: int, scenes: int, ranks: int) -> bk.Workload:
    """Strong: the same workload at every rank count; weak: ``scenes`` per rank."""
    return bk.make_workload(scenes * ranks if mode == "weak" else scenes, size_px)


def add_speedups(mode: str, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-up and efficiency of every run against the smallest rank count of its column."""
    for run in runs:
        same = [r for r in runs if r["column"] == run["column"]]
        base = min(same, key=lambda r: r["ranks"])
        b, n = base["ranks"], run["ranks"]
        ratio = base["wall_s"] / run["wall_s"]
        run["baseline_ranks"] = b
        if mode == "strong":
            run["speedup"] = ratio * b
            run["efficiency"] = ratio * b / n
        else:
            run["speedup"] = ratio * n
            run["efficiency"] = ratio
        run["speedup_vs_baseline"] = ratio if mode == "strong" else ratio * n / b
        if "cpu_run_s_total" in run and "cpu_run_s_total" in base:
            # CPU seconds do not grow when other users' work slows the ranks down, only when the
            # job itself does more work (start-up, waiting in MPI, contention for memory).
            work = base["cpu_run_s_total"] * (n / b if mode == "weak" else 1.0)
            run["cpu_work_efficiency"] = work / run["cpu_run_s_total"]
    return runs


def markdown_table(mode: str, runs: list[dict[str, Any]]) -> str:
    """Rows = ranks, columns = workload (GB, km2); cells = time, speed-up, efficiency."""
    columns = sorted({r["column"] for r in runs}, key=lambda c: c[1])
    by = {(r["ranks"], r["column"]): r for r in runs}
    ranks = sorted({r["ranks"] for r in runs})
    what = "workload" if mode == "strong" else "work per rank"
    head = [f"ranks \\ {what}"]
    for col in columns:
        r = next(x for x in runs if x["column"] == col)
        gb, km2 = (r["per_rank_gb"], r["per_rank_km2"]) if mode == "weak" else (r["gb"], r["km2"])
        head.append(f"{gb:.3f} GB / {km2:.2f} km2 ({col[0]})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in ranks:
        cells = [str(n)]
        for col in columns:
            r = by.get((n, col))
            share = r and r.get("cpu_share_per_rank")
            cells.append("-" if r is None else
                         f"{r['wall_s']:.1f} s (S {r['speedup']:.2f}, E {r['efficiency']:.2f}"
                         + (f", CPU share {sum(share) / len(share):.2f}" if share else "") + ")")
        lines.append("| " + " | ".join(cells) + " |")
    note = ("S = speed-up T(1)/T(N), E = S/N" if mode == "strong"
            else "S = scaled speed-up N*T(1)/T(N), E = T(1)/T(N)")
    return "\n".join(lines) + (f"\n\n{note}; T = run report wall_s, 1 torch thread per rank; CPU "
                                "share = a rank's CPU seconds / its wall seconds (below 1: the "
                                "rank waited, for MPI or for a core other work held).\n")


def plot(mode: str, runs: list[dict[str, Any]], png: Path) -> None:
    """Log-log speed-up vs ranks per workload, with the ideal line (the paper's Fig. 9 style)."""
    plt = bk.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ranks = sorted({r["ranks"] for r in runs})
    for col in sorted({r["column"] for r in runs}, key=lambda c: c[1]):
        pts = sorted((r["ranks"], r["speedup"]) for r in runs if r["column"] == col)
        r0 = next(r for r in runs if r["column"] == col)
        gb = r0["per_rank_gb"] if mode == "weak" else r0["gb"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                label=f"{gb:.3f} GB{' per rank' if mode == 'weak' else ''}")
    ax.plot(ranks, ranks, "k--", lw=1, label="ideal")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("MPI ranks (1 thread each)")
    ax.set_ylabel("scaled speed-up" if mode == "weak" else "speed-up")
    ax.set_title(f"{mode} scaling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def finish(mode: str, result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Speed-ups, table, targets, JSON, Markdown and plot."""
    runs = add_speedups(mode, result["runs"])
    result["table_markdown"] = markdown_table(mode, runs)
    two = [r["efficiency"] for r in runs if r["ranks"] == 2 and r["baseline_ranks"] == 1]
    result["targets"] = [bk.target(f"{mode}-scaling efficiency at 2 ranks (worst workload)",
                                   min(two) if two else None, 0.85)] if mode == "strong" else []
    bk.write_json(out / f"scaling-{mode}.json", result)
    (out / f"scaling-{mode}.md").write_text(f"# {mode} scaling\n\n{result['table_markdown']}")
    plot(mode, runs, out / f"scaling-{mode}.png")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["strong", "weak"], required=True)
    p.add_argument("--ranks", type=parse_ints, default=[1, 2], help="e.g. 1,2,4 or a single 4")
    p.add_argument("--sizes", type=parse_ints, default=None,
                   help="scene sides in px, one column each (strong default 2048,4096; weak "
                        "default 1024,2048 per rank)")
    p.add_argument("--scenes", type=int, default=1, help="scenes per workload (weak: per rank)")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="runs per cell; the fastest is kept")
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every run, e.g. parallel.policy=dynamic (repeatable)")
    p.add_argument("--out", type=Path, default=bk.default_out("scaling"))
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="join scaling-<mode>.json files of earlier runs instead of measuring")
    p.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tile_px, args.halo_px, args.batch_size = [256], 64, 8, 4
    if args.sizes is None:
        args.sizes = [2048, 4096] if args.mode == "strong" else [1024, 2048]
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header(f"scaling-{args.mode}", args)
    result["mode"] = args.mode
    if args.merge:
        result["runs"] = []
        for path in args.merge:
            part = json.loads(path.read_text())
            result["runs"] += [{**r, "column": tuple(r["column"])} for r in part["runs"]]
        finish(args.mode, result, args.out)
        print(result["table_markdown"])
        return 0
    gallery = bk.ensure_gallery(args.gallery)
    rss_dir = args.out / "rss"
    runs = []
    for size in args.sizes:
        for n in args.ranks:
            wl = workload_for(args.mode, size, args.scenes, n)
            cfg = bk.run_config(args.out / f"run-{size}.yaml", wl.scenes, gallery,
                                args.out / "run", args.tile_px, args.halo_px, args.batch_size)
            best: Optional[bk.EngineRun] = None
            for _ in range(args.repeats):
                run = bk.run_engine(cfg, args.out / "run", ranks=n, sets=args.set,
                                    wrapper=bk.rss_wrapper(rss_dir))
                run.extra["rank_usage"] = bk.read_rss(rss_dir)
                if best is None or run.wall_s < best.wall_s:
                    best = run
            assert best is not None
            usage = best.extra["rank_usage"]
            r = best.report
            column = (f"{args.scenes} x {size}px" + (" per rank" if args.mode == "weak" else ""),
                      size)
            runs.append({"ranks": n, "column": column, "scene_px": size, "workload": wl.to_dict(),
                         "gb": wl.gigabytes, "km2": wl.area_km2,
                         "per_rank_gb": wl.gigabytes / (n if args.mode == "weak" else 1),
                         "per_rank_km2": wl.area_km2 / (n if args.mode == "weak" else 1),
                         "wall_s": best.wall_s, "command_wall_s": best.command_wall_s,
                         "tiles": r["tiles"], "throughput": r["throughput"],
                         "stage_s_total": r["stage_s_total"],
                         "cpu_run_s_per_rank": [u["cpu_run_s"] for u in usage],
                         "cpu_share_per_rank": [u["cpu_run_s"] / u["wall_run_s"] for u in usage],
                         "cpu_run_s_total": sum(u["cpu_run_s"] for u in usage),
                         "peak_rss_mib_per_rank": [u["vmhwm_kb"] / 1024 for u in usage],
                         "load_balance": r["load_balance"], "command": best.command})
            print(f"[scaling-{args.mode}] {column[0]}: {n} rank(s) {best.wall_s:.2f} s "
                  f"({r['throughput']['tiles_per_s']:.1f} tiles/s)", flush=True)
    result["runs"] = runs
    finish(args.mode, result, args.out)
    print(result["table_markdown"])
    bk.print_done(f"scaling-{args.mode}", args.out / f"scaling-{args.mode}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
