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
