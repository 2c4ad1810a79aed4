"""Errors a user can cause. Each message names the file, key or rank and says what to do."""
from __future__ import annotations


class ResflowError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero (no traceback)."""

    exit_code = 2


class ConfigError(ResflowError):
    """A configuration file is missing, malformed, has an unknown key or a bad value."""


class InputError(ResflowError):
    """A scene (or a list of scenes) cannot be used: missing, corrupt, wrong bands/type/CRS."""


class GalleryError(ResflowError):
    """A model or image gallery is missing, corrupted, incomplete or of another architecture."""


class OutputError(ResflowError):
    """The output location cannot be written (permissions, full disk, path outside out_dir)."""


class Interrupted(ResflowError):
    """The job was stopped by a signal (Ctrl-C, Slurm's time limit); a rerun resumes."""

    exit_code = 130


def os_error_cause(exc: BaseException) -> str:
    """An honest cause for an I/O failure: disk full / quota for ENOSPC / EDQUOT, else the
    operating system's (or library's) own words."""
    import errno
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code == errno.ENOSPC or "No space left" in text:
        return "disk full: no space left on device; free space and rerun"
    if code == errno.EDQUOT or "Disk quota exceeded" in text:
        return "disk quota exceeded; free space or raise the quota and rerun"
    strerror = getattr(exc, "strerror", None)
    detail = (strerror or text or type(exc).__name__).strip().splitlines()[0][:300]
    return detail
