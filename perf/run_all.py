#!/usr/bin/env python3
"""Run every perf study one after another and summarise the figures and targets.

``--quick`` runs each on a tiny workload (the smoke test uses it; minutes, numbers meaningless);
without it each study runs at its modest default size (paper_scale at --size 10000). Each study
writes its own JSON + PNG under OUT/<study>/; this script adds OUT/summary.json and OUT/summary.md
(status, key figures and the performance targets: met, missed or not measured).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import benchkit as bk

# study -> (script, JSON files it writes, extra arguments in full mode)
STUDIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "throughput": ("throughput.py", ("throughput.json",), ()),
    "ceiling": ("ceiling.py", ("ceiling.json",), ()),
    "scaling": ("scaling.py", ("scaling-strong.json", "scaling-weak.json"), ()),
    "tile_size": ("tile_size.py", ("tile_size.json",), ()),
    "side_by_side": ("side_by_side.py", ("side_by_side.json",), ()),
    "paper_scale": ("paper_scale.py", ("paper_scale.json",), ("--size", "10000")),
    "h5_write": ("h5_write.py", ("h5_write.json",), ()),
}


def _fmt(v: Any, digits: int = 2) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def key_figures(study: str, data: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a study worth a line in the summary."""
    if study == "throughput":
        e = data["end_to_end"]
        return {"mpixel_per_s": e["mpixel_per_s"], "tiles_per_s": e["tiles_per_s"],
                "km2_per_s": e["km2_per_s"], "gb_per_s": e["gb_per_s"],
                "slowest_stage": data["slowest_stage"]}
    if study == "ceiling":
        return {"ceiling_tiles_per_s": data["ceiling"]["tiles_per_s"],
                "ceiling_gflop_per_s": data["ceiling"]["gflop_per_s"],
                "efficiency": data.get("efficiency"),
                "achieved_gflop_per_s": data.get("end_to_end", {}).get("gflop_per_s")}
    if study.startswith("scaling"):
        return {f"{r['column'][0]} @{r['ranks']}": {"wall_s": r["wall_s"], "speedup": r["speedup"],
                                                   "efficiency": r["efficiency"]}
                for r in data["runs"]}
    if study == "tile_size":
        return {f"{r['tile_px']}px": {"tiles_per_s": r["tiles_per_s"], "gb_per_s": r["gb_per_s"],
                                      "km2_per_s": r["km2_per_s"]} for r in data["rows"]}
    if study == "side_by_side":
        return {**data["speedup"],
                "naive_agreement": data["agreement"]["naive_vs_mpi"].get("agreement"),
                "spark": "error: " + data["spark"]["error"].splitlines()[0]
                if "error" in data["spark"] else "ran"}
    if study == "paper_scale":
        return {"scene_px": [data["scene"]["width_px"], data["scene"]["height_px"]],
                "generation_s": data["generation"]["seconds"],
                "map_command_wall_s": data["run"]["command_wall_s"],
                "km2_per_s": data["run"]["throughput"]["km2_per_s"],
                "peak_rss_mib": [round(r.get("vmhwm_kb", 0) / 1024) for r in data["peak_rss_per_rank"]],
                "iou": data["verification"]["iou_pooled"],
                "full_size_projected_s": data["paper_comparison"]["full_size_s_projected"]}
    if study == "h5_write":
        return {**{f"{v}_gb_per_s": d["gb_per_s"] for v, d in data["variants"].items()},
                **data["ratios"]}
    return {}


def markdown(summary: dict[str, Any]) -> str:
    """summary.md: one section per study, then the targets."""
    lines = [f"# perf summary ({'quick' if summary['quick'] else 'full'})", "",
             f"Machine: {summary['machine']['cpu']}, {summary['machine']['cores']} cores, "
             f"{summary['machine']['os']}; {summary['machine']['date']}", ""]
    for name, st in summary["studies"].items():
        lines.append(f"## {name}: {st['status']} ({st['seconds']:.0f} s)")
        lines.append(f"`{st['command']}`")
        if st["status"] != "ok":
            lines.append(f"```\n{st.get('error', '')[-1500:]}\n```")
        for key, val in st.get("figures", {}).items():
            lines.append(f"- {key}: {json.dumps(val) if isinstance(val, (dict, list)) else _fmt(val, 3)}")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in summary["targets"]:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['name']} | {_fmt(t['value'])} | >= {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def run_study(name: str, args: argparse.Namespace, extra: Sequence[str],
              say: Callable[[str], None]) -> dict[str, Any]:
    """One study as its own process (its documented command line)."""
    script, files, full_args = STUDIES[name]
    out = args.out / name
    base = [bk.PYTHON, str(bk.PERF_DIR / script), "--out", str(out), *extra]
    if args.gallery and name != "h5_write":
        base += ["--gallery", str(args.gallery)]
    if args.quick:
        base.append("--quick")
    else:
        base += list(full_args)
    commands = ([[*base, "--mode", m] for m in ("strong", "weak")] if name == "scaling" else [base])
    t0 = time.perf_counter()
    status: dict[str, Any] = {"status": "ok", "command": " ; ".join(bk.shell_line(c) for c in commands)}
    try:
        for cmd in commands:
            say(f"[run_all] {bk.shell_line(cmd)}")
            bk.run_command(cmd, env=bk.bench_env(1), timeout_s=args.timeout)
    except bk.BenchError as exc:
        status.update({"status": "error", "error": str(exc)})
    status["seconds"] = time.perf_counter() - t0
    status["json"] = [str(out / f) for f in files]
    figures, targets = {}, []
    for f in files:
        path = out / f
        if not path.is_file():
            if status["status"] == "ok":
                status.update({"status": "error", "error": f"{path} was not written"})
            continue
        data = json.loads(path.read_text())
        key = Path(f).stem if name == "scaling" else name
        figures.update({(f"{key}: {k}" if name == "scaling" else k): v
                        for k, v in key_figures(key, data).items()})
        targets += data.get("targets", [])
    status["figures"] = figures
    status["targets"] = targets
    return status


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: perf/results/quick or perf/results/all")
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(STUDIES))
    p.add_argument("--no-spark", action="store_true", help="leave the Spark engine out")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per study command")
    args = p.parse_args(argv)
    args.out = args.out or bk.default_out("quick" if args.quick else "all")
    names = list(STUDIES) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        p.error(f"unknown stud(y/ies) {unknown}; choose from {', '.join(STUDIES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.gallery is None:
        args.gallery = str(bk.ensure_gallery())
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    summary: dict[str, Any] = {"quick": args.quick, "command": bk.this_command(),
                               "machine": bk.machine_info(), "studies": {}, "targets": []}
    for name in names:
        extra: list[str] = []
        if name == "ceiling":
            report = args.out / "throughput" / "run" / "run_report.json"
            if report.is_file():
                extra = ["--e2e-report", str(report)]  # same workload and settings as throughput
        if name == "side_by_side" and args.no_spark:
            extra = ["--no-spark"]
        st = run_study(name, args, extra, say)
        summary["studies"][name] = st
        summary["targets"] += st.pop("targets")
        say(f"[run_all] {name}: {st['status']} in {st['seconds']:.0f} s")
    bk.write_json(args.out / "summary.json", summary)
    (args.out / "summary.md").write_text(markdown(summary))
    failed = [n for n, s in summary["studies"].items() if s["status"] != "ok"]
    say(f"[run_all] summary: {args.out / 'summary.md'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
