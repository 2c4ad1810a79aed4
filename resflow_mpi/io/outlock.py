"""An exclusive lock on ``output.dir`` that works on shared filesystems (NFS, Lustre, GPFS).

One job at a time may write into an output directory. The lock is a file,
``<output.dir>/.resflow.lock``, created with ``O_CREAT | O_EXCL`` (atomic on NFSv3+ and on every
parallel filesystem; ``flock`` is not relied on). It holds one JSON record: host, pid, the process
start time (``/proc/<pid>/stat`` field 22, so a reused pid is never mistaken for the holder), the
job id (``SLURM_JOB_ID``), the command, a random token, the acquisition time and a heartbeat time.

A second job is refused at once with a message naming the holder. A lock whose holder is dead is
recovered automatically, with one note on stderr:

* **same host** (the lock's host is this host's name): the holder is dead when its pid does not
  exist, is a zombie, or belongs to a process with another start time;
* **other host**: the holder refreshes ``heartbeat_at`` every ``RESFLOW_LOCK_HEARTBEAT_S``
  (default 30 s) from a daemon thread; it is dead when the heartbeat is older than
  ``RESFLOW_LOCK_STALE_S`` (default 600 s = 10 min). Clocks of the nodes must agree to well within
  that age (NTP does this on every cluster).

Recovery is race-free between recoverers: a recoverer first takes a short-lived recovery mutex
(``.resflow.lock.recover``, also ``O_EXCL``), re-reads the lock under it, renames the stale lock
to a unique name (never deletes a lock it did not verify), checks that what it moved is the record
it judged dead (and links it back otherwise), and only then creates its own lock with ``O_EXCL``.
There is no way to break a live lock: ``--restart`` clears outputs, never another job's lock.
"""
from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Optional

from ..errors import OutputError

LOCK_NAME = ".resflow.lock"
RECOVER_SUFFIX = ".recover"
RECORD_BYTES = 2048          # the record is padded to a fixed size: heartbeats rewrite it in place
DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_S = 600.0
RECOVER_MUTEX_STALE_S = 60.0  # a recovery takes milliseconds; a mutex this old lost its holder
UNREADABLE_GRACE_S = 10.0     # an empty/garbled lock younger than this is being written right now


def _env_seconds(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise OutputError(f"{name}={text!r}: not a number of seconds (environment); "
                          f"unset it or give seconds, e.g. {default:g}") from None
    if value <= 0:
        raise OutputError(f"{name}={text!r}: must be > 0 seconds (environment)")
    return value


def _proc_stat(pid: int) -> Optional[tuple[str, int]]:
    """(state, start time in clock ticks since boot) of ``pid`` from ``/proc/<pid>/stat``
    (fields 3 and 22), or None when the process or /proc is not there."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])  # fields[0] is field 3 (state); field 22 is fields[19]


def process_start_time(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None
    when the process does not exist (or /proc is not available)."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def process_alive(pid: int, start_time: Optional[int] = None) -> bool:
    """Whether process ``pid`` runs on this host and, when ``start_time`` is given, is the process
    that started then (a reused pid is another process). A zombie or dying process is dead; a
    process hidden by /proc's hidepid, or a host without /proc, counts by its pid alone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def job_tag() -> str:
    """A name part unique to this job: ``job<SLURM_JOB_ID>`` (plus the step when set) under Slurm,
    else ``<host>-<pid>-<start time>``; safe in file names (use it in ``.partial`` names)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        step = os.environ.get("SLURM_STEP_ID")
        tag = f"job{job}" + (f".{step}" if step else "")
    else:
        pid = os.getpid()
        tag = f"{socket.gethostname()}-{pid}-{process_start_time(pid) or 0}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", tag)[:120]


def partial_path(path: str | Path) -> Path:
    """``<name>.<job_tag>.partial`` beside ``path``: two jobs never share a temporary name."""
    p = Path(path)
    return p.with_name(f"{p.name}.{job_tag()}.partial")


@dataclass(frozen=True)
class LockRecord:
    """What the lock file says about its holder."""

    host: str
    pid: int
    start_time: Optional[int]
    job: Optional[str]
    command: str
    token: str
    acquired_at: float
    heartbeat_at: float

    @staticmethod
    def mine(command: str) -> "LockRecord":
        pid, now = os.getpid(), time.time()
        return LockRecord(socket.gethostname(), pid, process_start_time(pid),
                          os.environ.get("SLURM_JOB_ID"), command[:1000], uuid.uuid4().hex, now, now)

    def encode(self) -> bytes:
        data = json.dumps(asdict(self)).encode()
        if len(data) > RECORD_BYTES - 1:
            raise ValueError("lock record too long")
        return data + b" " * (RECORD_BYTES - 1 - len(data)) + b"\n"

    @staticmethod
    def decode(data: bytes) -> "LockRecord":
        raw = json.loads(data.decode())
        return LockRecord(str(raw["host"]), int(raw["pid"]),
                          None if raw.get("start_time") is None else int(raw["start_time"]),
                          None if raw.get("job") is None else str(raw["job"]),
                          str(raw.get("command", "")), str(raw["token"]),
                          float(raw["acquired_at"]), float(raw["heartbeat_at"]))

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.acquired_at))
        cmd = self.command if len(self.command) <= 160 else self.command[:157] + "..."
        return (f"pid {self.pid} on host {self.host} (job {self.job or '-'}, started {when}, "
                f"command {cmd})")


def _read_record(path: Path) -> tuple[Optional[LockRecord], Optional[float]]:
    """(record or None when unreadable, file mtime or None when the file is gone)."""
    try:
        with open(path, "rb") as f:
            data = f.read(RECORD_BYTES * 2)
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None, None
    try:
        return LockRecord.decode(data), mtime
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None, mtime


def holder_dead_reason(rec: LockRecord, stale_s: float, now: Optional[float] = None) -> Optional[str]:
    """Why the lock's holder is dead, or None when it may be alive (then the lock stands)."""
    now = time.time() if now is None else now
    if rec.host == socket.gethostname():
        if not process_alive(rec.pid):
            return f"pid {rec.pid} no longer runs on {rec.host}"
        if not process_alive(rec.pid, rec.start_time):
            return f"pid {rec.pid} on {rec.host} now belongs to another process"
        return None
    age = now - rec.heartbeat_at
    if age > stale_s:
        return (f"its heartbeat is {age:.0f} s old (stale after {stale_s:.0f} s, "
                "RESFLOW_LOCK_STALE_S)")
    return None


class OutputLock:
    """``with OutputLock(out_dir, command):`` holds ``out_dir`` exclusively for this process.

    Raises OutputError naming the holder when another live job holds it; recovers dead holders'
    locks with a note on stderr. ``lost`` turns true if the heartbeat finds the lock taken over."""

    def __init__(self, out_dir: str | Path, command: str, stale_s: Optional[float] = None,
                 heartbeat_s: Optional[float] = None):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.command = command
        self.stale_s = stale_s if stale_s is not None else _env_seconds("RESFLOW_LOCK_STALE_S",
                                                                        DEFAULT_STALE_S)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else _env_seconds(
            "RESFLOW_LOCK_HEARTBEAT_S", DEFAULT_HEARTBEAT_S)
        self.record: Optional[LockRecord] = None
        self.lost = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- acquisition -----------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        if self.record is not None:
            raise RuntimeError("OutputLock.acquire called twice")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out_dir}: cannot create the output directory "
                              f"({exc.strerror}) (output.dir): fix the path or its permissions") from None
        for _ in range(50):
            if self._try_create():
                self._start_heartbeat()
                return self
            rec, mtime = self._read_settled()
            if mtime is None:
                continue  # vanished between our create and read: try again
            if rec is None:
                if time.time() - mtime < UNREADABLE_GRACE_S:
                    raise OutputError(f"output.dir {self.out_dir} is being locked by another job "
                                      f"right now ({self.path}): wait for it to finish or use "
                                      "another output.dir")
                reason = f"the lock file is unreadable and {time.time() - mtime:.0f} s old"
            else:
                reason = holder_dead_reason(rec, self.stale_s)
                if reason is None:
                    raise OutputError(f"output.dir {self.out_dir} is in use by {rec.describe()}: "
                                      "wait for it to finish or use another output.dir")
            self._recover(rec, reason)
            time.sleep(0.01)
        raise OutputError(f"output.dir {self.out_dir}: could not take the lock {self.path} "
                          "(other jobs keep taking it): use another output.dir")

    def _try_create(self) -> bool:
        rec = LockRecord.mine(self.command)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the output lock ({exc.strerror}) "
                              "(output.dir): check the directory's permissions") from None
        try:
            os.write(fd, rec.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.record = rec
        return True

    def _read_settled(self) -> tuple[Optional[LockRecord], Optional[float]]:
        """Read the lock, giving a holder that is writing it right now a moment to finish."""
        for _ in range(20):
            rec, mtime = _read_record(self.path)
            if rec is not None or mtime is None:
                return rec, mtime
            time.sleep(0.05)
        return _read_record(self.path)

    def _recover(self, judged: Optional[LockRecord], reason: str) -> None:
        """Move a dead holder's lock aside (under the recovery mutex); the caller then retries."""
        mutex = self.path.with_name(LOCK_NAME + RECOVER_SUFFIX)
        if not self._take_mutex(mutex):
            return  # another recoverer is at work: the caller retries and sees its result
        try:
            rec, mtime = _read_record(self.path)
            if mtime is None:
                return
            same = (rec is None and judged is None) or (rec is not None and judged is not None
                                                       and rec.token == judged.token)
            if not same:
                return  # the lock changed since we judged it: judge again
            aside = self.path.with_name(f"{LOCK_NAME}.stale.{uuid.uuid4().hex[:12]}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return
            moved, _ = _read_record(aside)
            if judged is not None and (moved is None or moved.token != judged.token):
                try:  # not what we judged dead: put it back (link fails if a lock exists again)
                    os.link(aside, self.path)
                    os.unlink(aside)
                except OSError:
                    pass
                return
            who = judged.describe() if judged is not None else "an unknown holder"
            print(f"note: output.dir {self.out_dir}: recovered the stale lock of {who}: {reason}",
                  file=sys.stderr, flush=True)
            try:
                os.unlink(aside)
            except OSError:
                pass
        finally:
            try:
                os.unlink(mutex)
            except OSError:
                pass

    @staticmethod
    def _take_mutex(mutex: Path) -> bool:
        try:
            os.close(os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return True
        except FileExistsError:
            pass
        try:
            age = time.time() - mutex.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > RECOVER_MUTEX_STALE_S:  # its holder died mid-recovery: move it aside, retry later
            try:
                os.rename(mutex, mutex.with_name(f"{mutex.name}.stale.{uuid.uuid4().hex[:12]}"))
            except OSError:
                pass
        time.sleep(0.05)
        return False

    # -- heartbeat and release -------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="resflow-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.refresh():
                return

    def refresh(self) -> bool:
        """Rewrite the heartbeat in place (fixed-size record, one write); False if the lock is no
        longer ours (then ``lost`` is set and a warning printed)."""
        assert self.record is not None
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return self._mark_lost()
        try:
            current = LockRecord.decode(os.pread(fd, RECORD_BYTES * 2, 0))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            os.close(fd)
            return self._mark_lost()
        try:
            if current.token != self.record.token:
                return self._mark_lost()
            self.record = LockRecord(**{**asdict(self.record), "heartbeat_at": time.time()})
            os.pwrite(fd, self.record.encode(), 0)
            os.fsync(fd)
        except OSError:
            return True  # a transient write error: the next beat tries again
        finally:
            os.close(fd)
        return True

    def _mark_lost(self) -> bool:
        if not self.lost:
            self.lost = True
            print(f"warning: output.dir {self.out_dir}: this job's lock {self.path} was taken "
                  "over by another job (was this job suspended for longer than "
                  "RESFLOW_LOCK_STALE_S?); its outputs may be overwritten", file=sys.stderr,
                  flush=True)
        return False

    def check(self) -> None:
        """Raise OutputError when the lock was taken over while this job ran."""
        if self.lost:
            raise OutputError(f"output.dir {self.out_dir}: the lock {self.path} was taken over by "
                              "another job while this one ran: rerun when that job has finished")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.record is None:
            return
        rec, _ = _read_record(self.path)
        if rec is not None and rec.token == self.record.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.record = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.release()

