"""Honest causes of failed writes: disk full and quota by name, anything else quoted."""
from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Optional

PROBE_BYTES = 1 << 20


def _free_mib(folder: Path) -> Optional[float]:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize / 2**20


def _probe_space(folder: Path) -> Optional[int]:
    """errno of writing PROBE_BYTES (flushed to the device) into ``folder``; None when it works.

    GDAL's error texts do not carry the OS cause ("IO error writing tag data"), so the cause is
    asked of the filesystem itself right after the failure."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".resflow-space-probe-") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return exc.errno
    return None


def write_failure(path: Path, exc: BaseException, action: str = "write failed") -> str:
    """One-line message ``<path>: <action> ...`` for a failed write: disk full and quota exceeded
    by name (from the OS error number, or, when GDAL or HDF5 give only text, from a probe write
    into the directory right after the failure); any other cause is quoted as the OS, GDAL or
    HDF5 gave it, with the free space beside it. Usable for any output (masks, HDF5, vectors)."""
    folder = path.parent
    code: Optional[int] = exc.errno if isinstance(exc, OSError) else None
    if isinstance(exc, OSError) and exc.errno is not None:
        text = f"OS: {exc.strerror or exc}"
    else:
        first = (str(exc).strip().splitlines() or ["unknown error"])[0]
        text = ("GDAL: " if isinstance(exc, RuntimeError) else "") + first
    if code is None:
        code = _probe_space(folder)
    free = _free_mib(folder)
    free_text = f"{free:.0f} MiB free" if free is not None else "free space unknown"
    if code == errno.ENOSPC:
        return (f"{path}: {action}, disk full: no space left on the device ({folder}, "
                f"{free_text}); free space and rerun (finished tiles are kept)")
    if code == getattr(errno, "EDQUOT", -1):
        return (f"{path}: {action}, disk quota exceeded ({folder}); free space or raise the "
                "quota and rerun (finished tiles are kept)")
    return (f"{path}: {action} ({text}; {free_text} in {folder}); fix the cause and rerun "
            "(finished tiles are kept)")
