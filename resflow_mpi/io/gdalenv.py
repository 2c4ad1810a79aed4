"""GDAL process settings in one place: exceptions on (gdal, ogr, osr) and a bounded block cache.

Importing any ``resflow_mpi`` module changes no GDAL state. Each entry point (the CLI, a Spark
executor function, a perf script) calls ``configure()`` once; every public I/O function calls
``ensure_configured()``, so nothing depends on which module happened to be imported first.
"""
from __future__ import annotations

import os
from typing import Optional

DEFAULT_CACHE_MB = 64
CACHE_ENV = "RESFLOW_GDAL_CACHE_MB"   # bounded block cache per process; reads are by window

_configured = False

# Remote scenes (/vsicurl/, /vsis3/, ...): a busy server gets retries, neighbouring ranges are
# merged into one request, and remote reads are cached. Each is set only where the user's
# environment has not set it. GDAL_DISABLE_READDIR_ON_OPEN is left alone: it is process-wide, and
# setting it would hide the sidecars of local scenes (.aux.xml georeferencing, .msk masks, .ovr
# overviews); a remote scene's open costs one directory listing instead.
# CPL_VSIL_CURL_ALLOWED_EXTENSIONS is left alone too: STAC hrefs are often signed URLs or have no
# extension at all.
REMOTE_OPTIONS = {"GDAL_HTTP_MAX_RETRY": "3", "GDAL_HTTP_RETRY_DELAY": "1",
                  "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES", "GDAL_HTTP_MULTIPLEX": "YES",
                  "VSI_CACHE": "TRUE"}


def cache_mb_default() -> int:
    """The block cache size (MB) used when ``configure`` is not given one."""
    return int(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB)))


def configure(cache_mb: Optional[int] = None) -> None:
    """Turn GDAL/OGR/OSR exceptions on, bound GDAL's block cache and set the remote-read options
    (``REMOTE_OPTIONS``) the environment leaves unset (idempotent)."""
    global _configured
    from osgeo import gdal, ogr, osr
    osr.UseExceptions()
    ogr.UseExceptions()
    gdal.UseExceptions()
    gdal.SetCacheMax((cache_mb if cache_mb is not None else cache_mb_default()) * 1024 * 1024)
    for key, value in REMOTE_OPTIONS.items():
        if gdal.GetConfigOption(key) is None:
            gdal.SetConfigOption(key, value)
    _configured = True


def ensure_configured() -> None:
    """``configure()`` with its defaults unless this process already configured GDAL."""
    if not _configured:
        configure()


def gdal_version() -> str:
    """The GDAL version of the Python bindings (for ``resflow info``)."""
    from osgeo import gdal
    return str(gdal.__version__)
