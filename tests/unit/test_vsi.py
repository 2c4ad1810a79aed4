"""GDAL virtual paths (io/vsi.py): URLs to GDAL paths, stat and first bytes of a file inside a
zip (/vsizip/) as of a local file, and the remote-read options io/gdalenv.py sets (never over
the user's own)."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from resflow_mpi.io.vsi import gdal_path, is_virtual, read_head, stat


@pytest.mark.parametrize("href,path", [
    ("https://h.example/a/S.tif?sig=1", "/vsicurl/https://h.example/a/S.tif?sig=1"),
    ("http://127.0.0.1:8000/S.tif", "/vsicurl/http://127.0.0.1:8000/S.tif"),
    ("s3://bucket/key/S.tif", "/vsis3/bucket/key/S.tif"),
    ("gs://bucket/S.tif", "/vsigs/bucket/S.tif"),
    ("file:///data/S.tif", "/data/S.tif"),
    ("/data/S.tif", "/data/S.tif"),
    ("/vsizip//data/a.zip/S.tif", "/vsizip//data/a.zip/S.tif"),
])
def test_gdal_path(href: str, path: str) -> None:
    assert gdal_path(href) == path
    assert is_virtual(path) == path.startswith("/vsi")


def test_stat_and_head_inside_a_zip(tmp_path: Path) -> None:
    data = bytes(range(256)) * 300
    (tmp_path / "S.bin").write_bytes(data)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.write(tmp_path / "S.bin", "inner/S.bin")
    inner = f"/vsizip/{tmp_path / 'a.zip'}/inner/S.bin"
    found = stat(inner)
    assert found is not None and found[0] == len(data) and found[1] > 0
    assert read_head(inner, 1000) == data[:1000] == read_head(str(tmp_path / "S.bin"), 1000)
    assert stat(str(tmp_path / "S.bin"))[0] == len(data)  # type: ignore[index]
    assert stat(f"/vsizip/{tmp_path / 'a.zip'}/absent") is None
    assert stat(str(tmp_path / "absent")) is None


def test_remote_options_never_override_the_environment() -> None:
    code = ("from osgeo import gdal; from resflow_mpi.io.gdalenv import configure; configure(); "
            "print(gdal.GetConfigOption('GDAL_DISABLE_READDIR_ON_OPEN'), "
            "gdal.GetConfigOption('GDAL_HTTP_MAX_RETRY'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GDAL_", "CPL_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["None", "3"]  # sidecars of local scenes stay visible
    env["GDAL_HTTP_MAX_RETRY"] = "7"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["None", "7"]
