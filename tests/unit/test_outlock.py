"""The output-directory lock with real processes: contention, dead holders, other hosts, recoverers."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resflow_mpi.errors import OutputError
from resflow_mpi.io.outlock import (LOCK_NAME, RECORD_BYTES, LockRecord, OutputLock, job_tag,
                                    partial_path, process_alive, process_start_time)

REPO = Path(__file__).resolve().parents[2]

# A contender: waits for the "go" file, tries the lock, prints GOT or REFUSED <message>, and
# holds a won lock until the "release" file appears.
CONTENDER = r"""
import os, sys, time
from pathlib import Path
from resflow_mpi.errors import OutputError
from resflow_mpi.io.outlock import OutputLock
out, go, release = (Path(a) for a in sys.argv[1:4])
print("READY", flush=True)
while not go.exists():
    time.sleep(0.005)
try:
    lock = OutputLock(out, "resflow run contender " + str(os.getpid())).acquire()
except OutputError as exc:
    print("REFUSED " + str(exc), flush=True)
    sys.exit(0)
print("GOT", flush=True)
while not release.exists():
    time.sleep(0.02)
lock.release()
"""


def contender(tmp: Path, out: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **(extra_env or {}))
    p = subprocess.Popen([sys.executable, "-c", CONTENDER, str(out), str(tmp / "go"),
                          str(tmp / "release")], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "READY"
    return p


def outcomes(procs: list[subprocess.Popen]) -> list[str]:
    return [p.stdout.readline().strip() for p in procs]  # type: ignore[union-attr]


def finish(tmp: Path, procs: list[subprocess.Popen]) -> list[str]:
    (tmp / "release").touch()
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        errs.append(err)
    return errs


def write_record(out: Path, **fields) -> LockRecord:
    base = LockRecord.mine("resflow run other.yaml")
    rec = LockRecord(**{**base.__dict__, **fields})
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_bytes(rec.encode())
    return rec


def test_two_processes_exactly_one_wins(tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [contender(tmp_path, out) for _ in range(3)]
    (tmp_path / "go").touch()
    got = outcomes(procs)
    finish(tmp_path, procs)
    assert sorted(g.split()[0] for g in got) == ["GOT", "REFUSED", "REFUSED"], got
    winner = procs[got.index("GOT")].pid
    for line in got:
        if line.startswith("REFUSED"):
            assert f"output.dir {out} is in use by pid {winner} on host {socket.gethostname()}" in line
            assert "wait for it to finish or use another output.dir" in line
            assert "command resflow run contender" in line
    assert not (out / LOCK_NAME).exists(), "the winner removes its lock on release"


def test_killed_holder_is_recovered_with_a_note(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    holder = contender(tmp_path, out)
    (tmp_path / "go").touch()
    assert outcomes([holder]) == ["GOT"]
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with OutputLock(out, "resflow run again") as lock:
        assert lock.record is not None and lock.record.pid == os.getpid()
    err = capsys.readouterr().err
    assert f"recovered the stale lock of pid {holder.pid}" in err
    assert f"pid {holder.pid} no longer runs" in err
    assert len(err.strip().splitlines()) == 1


def test_unreaped_zombie_holder_is_dead(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    holder = contender(tmp_path, out)
    (tmp_path / "go").touch()
    assert outcomes([holder]) == ["GOT"]
    holder.send_signal(signal.SIGKILL)
    while Path(f"/proc/{holder.pid}/stat").read_text().split(") ")[1][0] != "Z":
        time.sleep(0.01)
    with OutputLock(out, "resflow run again"):
        pass
    holder.wait(timeout=30)
    assert f"recovered the stale lock of pid {holder.pid}" in capsys.readouterr().err


def test_live_holder_is_never_broken(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = contender(tmp_path, out)
    (tmp_path / "go").touch()
    assert outcomes([holder]) == ["GOT"]
    before = (out / LOCK_NAME).read_bytes()
    for stale_s in (None, 1e-6):  # even a tiny stale age never breaks a same-host live holder
        with pytest.raises(OutputError, match=f"in use by pid {holder.pid}"):
            OutputLock(out, "resflow run --restart cfg.yaml", stale_s=stale_s).acquire()
    assert (out / LOCK_NAME).read_bytes() == before
    finish(tmp_path, [holder])


def test_reused_pid_is_not_the_holder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    me = os.getpid()
    write_record(out, pid=me, start_time=(process_start_time(me) or 0) - 1)
    with OutputLock(out, "resflow run"):
        pass
    assert "now belongs to another process" in capsys.readouterr().err


def test_other_host_heartbeat_rule(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    fresh = write_record(out, host="node-elsewhere", pid=12345, job="777",
                         heartbeat_at=time.time() - 5)
    with pytest.raises(OutputError) as e:
        OutputLock(out, "resflow run", stale_s=600).acquire()
    assert "in use by pid 12345 on host node-elsewhere (job 777, started" in str(e.value)
    assert (out / LOCK_NAME).read_bytes() == fresh.encode()
    write_record(out, host="node-elsewhere", pid=12345, job="777", heartbeat_at=time.time() - 700)
    with OutputLock(out, "resflow run", stale_s=600):
        pass
    err = capsys.readouterr().err
    assert "recovered the stale lock of pid 12345 on host node-elsewhere" in err
    assert "heartbeat is 700 s old" in err


def test_stale_age_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    write_record(out, host="node-elsewhere", heartbeat_at=time.time() - 120)
    monkeypatch.setenv("RESFLOW_LOCK_STALE_S", "3600")
    with pytest.raises(OutputError, match="in use by"):
        OutputLock(out, "resflow run").acquire()
    monkeypatch.setenv("RESFLOW_LOCK_STALE_S", "60")
    with OutputLock(out, "resflow run"):
        pass
    monkeypatch.setenv("RESFLOW_LOCK_STALE_S", "soon")
    with pytest.raises(OutputError, match="RESFLOW_LOCK_STALE_S='soon': not a number"):
        OutputLock(out, "resflow run")


def test_concurrent_recoverers_exactly_one_gets_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dead = write_record(out, host="node-elsewhere", pid=4242, heartbeat_at=time.time() - 3600)
    procs = [contender(tmp_path, out) for _ in range(4)]
    (tmp_path / "go").touch()
    got = outcomes(procs)
    errs = finish(tmp_path, procs)
    assert sorted(g.split()[0] for g in got) == ["GOT", "REFUSED", "REFUSED", "REFUSED"], got
    winner = procs[got.index("GOT")].pid
    assert all(f"in use by pid {winner}" in g for g in got if g.startswith("REFUSED")), got
    notes = [ln for e in errs for ln in e.splitlines() if "recovered the stale lock" in ln]
    assert len(notes) == 1 and f"pid {dead.pid} on host node-elsewhere" in notes[0], errs
    assert not list(out.glob(LOCK_NAME + "*")), "no lock, mutex or moved-aside file is left"


def test_heartbeat_refreshes_and_detects_takeover(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    lock = OutputLock(out, "resflow run", heartbeat_s=3600).acquire()
    first = LockRecord.decode((out / LOCK_NAME).read_bytes())
    assert len((out / LOCK_NAME).read_bytes()) == RECORD_BYTES
    assert lock.refresh()
    second = LockRecord.decode((out / LOCK_NAME).read_bytes())
    assert second.token == first.token and second.heartbeat_at >= first.heartbeat_at
    write_record(out, host="node-elsewhere")  # someone took it over
    assert not lock.refresh() and lock.lost
    with pytest.raises(OutputError, match="taken over by another job"):
        lock.check()
    lock.release()
    assert (out / LOCK_NAME).exists(), "release never removes another job's lock"
    assert "taken over" in capsys.readouterr().err


def test_lock_record_is_json_with_holder_details(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "98765")
    out = tmp_path / "out"
    with OutputLock(out, "resflow run cfg.yaml"):
        raw = json.loads((out / LOCK_NAME).read_text())
    assert raw["host"] == socket.gethostname() and raw["pid"] == os.getpid()
    assert raw["start_time"] == process_start_time(os.getpid())
    assert raw["job"] == "98765" and raw["command"] == "resflow run cfg.yaml"
    assert raw["heartbeat_at"] >= raw["acquired_at"] > 0


def test_job_tag_and_partial_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    tag = job_tag()
    assert tag.startswith(f"{socket.gethostname()}-{os.getpid()}-".replace("/", "_"))
    assert partial_path("/x/a_mask.tif") == Path(f"/x/a_mask.tif.{tag}.partial")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert job_tag() == "job123.0"


def test_process_liveness_is_one_function_for_locks_and_tickets() -> None:
    """outlock.process_alive decides for the output lock and the GPU tickets alike: a running
    process is alive, with its own start time too; another start time, an exited pid, an unreaped
    zombie and impossible pids are dead."""
    from resflow_mpi.runners import tickets
    me = os.getpid()
    started = process_start_time(me)
    assert started is not None
    assert process_alive(me) and process_alive(me, started)
    assert not process_alive(me, started - 1)
    assert not process_alive(0) and not process_alive(-1) and not process_alive(2**62)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    for _ in range(200):  # exited but not reaped: a zombie
        if not process_alive(child.pid):
            break
        time.sleep(0.02)
    assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)
    assert tickets.process_alive is process_alive
    assert tickets.holder_start_time(me) == str(started)
