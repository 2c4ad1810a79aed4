"""GDAL virtual file system paths (/vsicurl/, /vsis3/, /vsizip/, ...): the one place that tells
them from local paths and stats or reads them (size, modification time, first bytes)."""
from __future__ import annotations

import os
from typing import Optional

from .gdalenv import ensure_configured

VSI_PREFIX = "/vsi"
# URL schemes and the GDAL virtual file system that reads them (http(s) keeps its URL whole).
SCHEME_PREFIXES = {"http://": "/vsicurl/http://", "https://": "/vsicurl/https://",
                   "s3://": "/vsis3/", "gs://": "/vsigs/", "az://": "/vsiaz/"}


def is_virtual(path: str) -> bool:
    """True for a GDAL virtual path (read by GDAL, unknown to the operating system)."""
    return path.startswith(VSI_PREFIX)


def gdal_path(href: str) -> str:
    """A local path, GDAL virtual path or URL (http(s), s3, gs, az) as a path GDAL opens."""
    for scheme, prefix in SCHEME_PREFIXES.items():
        if href.startswith(scheme):
            return prefix + href[len(scheme):]
    if href.startswith("file://"):
        return href[len("file://"):]
    return href


def stat(path: str) -> Optional[tuple[int, int]]:
    """(size in bytes, modification time in ns) of a local or virtual file; None when missing
    (or, for a remote file, unreachable)."""
    if not is_virtual(path):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns
    ensure_configured()
    from osgeo import gdal
    st = gdal.VSIStatL(path, gdal.VSI_STAT_EXISTS_FLAG | gdal.VSI_STAT_SIZE_FLAG)
    if st is None:
        return None
    return int(st.size), int(st.mtime) * 1_000_000_000


def read_head(path: str, n_bytes: int) -> bytes:
    """The first ``n_bytes`` of a local or virtual file (fewer when it is shorter)."""
    if not is_virtual(path):
        with open(path, "rb") as f:
            return f.read(n_bytes)
    ensure_configured()
    from osgeo import gdal
    f = gdal.VSIFOpenL(path, "rb")
    if f is None:
        raise OSError(f"{path}: cannot open")
    try:
        return bytes(gdal.VSIFReadL(1, n_bytes, f) or b"")
    finally:
        gdal.VSIFCloseL(f)
