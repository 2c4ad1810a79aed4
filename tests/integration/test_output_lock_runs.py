"""Issue 13 end to end: two `resflow run` on one output.dir (one refused, the other's masks equal a
lone run's), and a SIGKILLed holder's lock recovered by the rerun (resumed, bit-identical)."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.io.outlock import LOCK_NAME
from tests.conftest import RESFLOW, env, resflow, resflow_with_fault



def masks(out: Path) -> dict[str, np.ndarray]:
    found = {p.name: gdal.Open(str(p)).ReadAsArray() for p in sorted(out.glob("*.resflow-mask.tif"))}
    assert found, f"no masks in {out}"
    return found


def start(cfg: Path, out: Path, slow_s: float = 0.0) -> subprocess.Popen:
    """``resflow run`` in the background; ``slow_s``: sleep after every write round (the
    engine's fault injection), so the job outlasts another process's start-up."""
    command = resflow_with_fault(f"slow:0:{slow_s}") if slow_s else [RESFLOW]
    return subprocess.Popen([*command, "run", str(cfg), "--quiet", "--no-report-html",
                             "--set", f"output.dir={out}"], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture()
def lone(run_config, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    cfg = run_config()
    out = tmp_path / "lone"
    resflow(["run", str(cfg), "--quiet", "--no-report-html", "--set", f"output.dir={out}"])
    return cfg, masks(out)


def test_two_concurrent_runs_on_one_output_dir(lone, tmp_path: Path) -> None:
    """Started together: both import for seconds, then one takes the lock and maps; the other
    reaches its setup while the first still runs (each write round sleeps 0.5 s: a tiny job
    could otherwise finish first, and the second would then rightly resume it) and is refused."""
    cfg, reference = lone
    out = tmp_path / "shared"
    runs = [start(cfg, out, slow_s=0.5), start(cfg, out, slow_s=0.5)]
    errs = [p.communicate(timeout=300)[1] for p in runs]
    codes = [p.returncode for p in runs]
    assert sorted(c == 0 for c in codes) == [False, True], (codes, errs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert "Traceback" not in errs[loser]
    errors = [ln for ln in errs[loser].splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, errs[loser]
    assert f"output.dir {out} is in use by pid {runs[winner].pid}" in errors[0]
    got = masks(out)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[k], reference[k]) for k in got)
    assert not (out / LOCK_NAME).exists()


def test_killed_holder_is_recovered_and_resumed(lone, tmp_path: Path) -> None:
    cfg, reference = lone
    out = tmp_path / "killed"
    # Killed mid-run (after a progress line: tiles written), each write round slowed to 0.5 s.
    first = subprocess.Popen([*resflow_with_fault("slow:0:0.5"), "run", str(cfg),
                              "--no-report-html", "--set", f"output.dir={out}",
                              "--set", "parallel.write_round_batches=1"], env=env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert first.stderr is not None
    line = ""
    for line in first.stderr:
        if line.startswith("[progress]"):
            break
    assert line.startswith("[progress]"), line
    done, total = map(int, line.split()[1].split("/"))
    assert done < total, line
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (out / LOCK_NAME).exists(), "a killed holder leaves its lock behind"
    again = resflow(["run", str(cfg), "--quiet", "--no-report-html", "--set", f"output.dir={out}"],
                    check=False)
    assert again.returncode == 0, again.stderr
    notes = [ln for ln in again.stderr.splitlines() if "recovered the stale lock" in ln]
    assert len(notes) == 1 and f"pid {first.pid} no longer runs" in notes[0], again.stderr
    got = masks(out)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[k], reference[k]) for k in got)
