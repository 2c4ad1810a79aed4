#!/usr/bin/env python3
"""Run the ``resflow`` command line in this process; record its peak RSS and CPU time at exit.

Usage (one JSON per rank): mpirun -n N python perf/rss_wrapper.py --rss-dir DIR -- run CFG [...]
Each rank writes DIR/rss-rank<R>.json with VmHWM (peak resident set) and VmRSS from
/proc/self/status in kB, the process's CPU seconds (user + system, all threads: ``cpu_s`` in all,
``cpu_run_s`` after the heavy imports), the wall seconds after those imports, and the command's
exit status; the exit status is passed on.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# resflow_mpi without installing: this checkout, or the one a before/after study names
sys.path.insert(0, os.environ.get("RESFLOW_BENCH_TREE") or str(Path(__file__).resolve().parents[1]))

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID")


def memory_kb() -> dict[str, int]:
    """VmHWM and VmRSS of this process in kB (Linux /proc)."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmHWM", "VmRSS"):
            out[key.lower() + "_kb"] = int(line.split()[1])
    return out


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def launcher_rank() -> int:
    """This process's rank as the launcher advertises it (0 outside a launcher)."""
    for var in RANK_VARS:
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Split off --rss-dir, run the CLI, write this rank's memory record."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] != "--rss-dir" or "--" not in args:
        print("usage: rss_wrapper.py --rss-dir DIR -- RESFLOW-ARGS...", file=sys.stderr)
        return 2
    rss_dir = Path(args[1])
    cli_args = args[args.index("--") + 1:]
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")  # before h5py's first import, as the CLI does
    # Heavy imports first, so cpu_run_s counts the run only (N ranks pay N times the imports).
    import h5py  # noqa: F401
    import torch  # noqa: F401
    from osgeo import gdal  # noqa: F401
    from resflow_mpi.cli import main as resflow_main
    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    status = 1
    try:
        status = resflow_main(cli_args)
    finally:
        rank = launcher_rank()
        cpu = cpu_seconds()
        record = {"rank": rank, "exit_status": status, **memory_kb(), "cpu_s": cpu,
                  "cpu_run_s": cpu - cpu0, "wall_run_s": time.perf_counter() - t0}
        rss_dir.mkdir(parents=True, exist_ok=True)
        (rss_dir / f"rss-rank{rank}.json").write_text(json.dumps(record))
    return status


if __name__ == "__main__":
    sys.exit(main())
