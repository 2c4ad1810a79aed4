"""A rank SIGKILLed mid-run: the job stops promptly, nothing looks complete, and a rerun resumes
to output bit-identical to an uninterrupted run, recomputing fewer tiles than the total."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import env, resflow, resflow_with_fault, store_scenes

pytestmark = pytest.mark.mpi


def masks(out: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(s["mask"], s["bucket"]) for _, s in sorted(store_scenes(out / "masks.h5").items())]


def test_kill_one_rank_then_resume(tmp_path: Path, run_config) -> None:
    common = {"tiling": {"tile_px": 32, "halo_px": 8}, "scenes": {"split": "all"}}
    full_cfg = run_config("full.yaml", output={"dir": str(tmp_path / "full")}, **common)
    resflow(["run", str(full_cfg), "--quiet"], ranks=2)
    report_full = json.loads((tmp_path / "full" / "run_report.json").read_text())
    total = report_full["tiles"]

    cfg = run_config("crash.yaml", output={"dir": str(tmp_path / "crash")}, **common)
    # A hang would exceed the timeout and fail the test (TimeoutExpired): the job must stop.
    p = subprocess.run(["mpirun", "-n", "2", "--oversubscribe",
                        *resflow_with_fault(f"kill:1:{total // 6}"), "run", str(cfg), "--quiet"],
                       env=env(), capture_output=True, text=True, timeout=90)
    assert p.returncode != 0, "a job that lost a rank must fail"
    out = tmp_path / "crash"
    assert not (out / "run_report.json").exists()
    assert not list(out.glob("*_mask.tif")) and not list(out.glob("*.tif"))
    partial = store_scenes(out / "masks.h5")
    done = sum(int(s["done"].sum()) for s in partial.values())
    assert not any(s["attrs"]["complete"] for s in partial.values())
    assert 0 < done < total

    resflow(["run", str(cfg), "--quiet"], ranks=2)  # same command: resumes
    report = json.loads((out / "run_report.json").read_text())
    assert all(s["complete"] for s in report["scenes"])
    assert report["invocation"]["tiles"] == total - done < total  # only unfinished tiles
    assert report["tiles"] == total  # the report describes the whole job, resumed tiles included
    assert report["area_km2"] == pytest.approx(report_full["area_km2"], rel=1e-12)
    assert report["bucket_histogram"] == report_full["bucket_histogram"]
    for (m, b), (m_ref, b_ref) in zip(masks(out), masks(tmp_path / "full")):
        assert np.array_equal(m, m_ref) and np.array_equal(b, b_ref)


def test_rank_raising_aborts_job_with_rank_and_reason(tmp_path: Path, run_config) -> None:
    cfg = run_config("raise.yaml", tiling={"tile_px": 32, "halo_px": 8})
    p = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", *resflow_with_fault("raise:1:1"),
                        "run", str(cfg), "--quiet"], env=env(), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    assert "[rank 1]" in p.stderr and "injected fault" in p.stderr and "aborting" in p.stderr


def test_rerun_with_other_config_refused_unless_restart(tmp_path: Path, run_config) -> None:
    cfg = run_config("a.yaml")
    resflow(["run", str(cfg), "--quiet"], ranks=2)
    other = run_config("b.yaml", inference={"threshold": 0.6})
    p = resflow(["run", str(other), "--quiet"], ranks=2, check=False)
    assert p.returncode == 2
    assert "different configuration" in p.stderr and "--restart" in p.stderr
    resflow(["run", str(other), "--quiet", "--restart"], ranks=2)
    rerun = resflow(["run", str(other), "--quiet"], ranks=2)  # complete: nothing recomputed
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["invocation"]["tiles"] == 0 and all(s["complete"] for s in report["scenes"])
    assert report["tiles"] == sum(s["tiles_total"] for s in report["scenes"])  # the whole job
    assert rerun.returncode == 0


def test_sigint_to_mpirun_ends_with_a_line_and_the_rerun_resumes(tmp_path: Path,
                                                                  run_config) -> None:
    """Ctrl-C (or Slurm's SIGTERM at the time limit) mid-run: one line saying how to resume,
    nothing looks complete, and the same command then finishes the job."""
    import signal
    import time
    cfg = run_config("int.yaml", tiling={"tile_px": 32, "halo_px": 8}, scenes={"split": "all"},
                     parallel={"write_round_batches": 1})
    out = tmp_path / "out"
    # rank 1 pauses after each write round: ~10 s of work
    p = subprocess.Popen(["mpirun", "-n", "2", "--oversubscribe", *resflow_with_fault("slow:1:0.2"),
                          "run", str(cfg)], env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    assert p.stderr is not None
    for line in p.stderr:  # wait for the first progress line: tiles are being written
        if line.startswith("[progress]") or time.monotonic() > deadline:
            break
    assert line.startswith("[progress]"), line
    done, total = map(int, line.split()[1].split("/"))
    assert done < total, line  # interrupted mid-run, not after the last tile
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert "Traceback" not in err, err
    stop_lines = [ln for ln in err.splitlines() if "error: stopped by" in ln]
    assert stop_lines and "rerun the same command to resume" in stop_lines[0], err
    assert not (out / "run_report.json").exists()
    resflow(["run", str(cfg), "--quiet"], ranks=2)
    report = json.loads((out / "run_report.json").read_text())
    assert all(s["complete"] for s in report["scenes"])
    total = sum(-(-s["width"] // 32) * -(-s["height"] // 32) for s in report["scenes"])
    assert report["invocation"]["tiles"] < total  # the rerun computed only what was left
    assert report["tiles"] == total
