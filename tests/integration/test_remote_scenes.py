"""Remote and virtual scenes (`resflow run`, one process, untrained gallery): a GeoTIFF inside a
zip (/vsizip/) and one served over HTTP with byte ranges by a server on 127.0.0.1 (/vsicurl/)
are mapped like local files (the HTTP one on 2 ranks); a rerun skips the finished tiles (scene
identity through GDAL's stat), and the output lock on local disk still refuses a second job."""
from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import threading
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import pytest
from osgeo import gdal

from resflow_mpi.io.outlock import OutputLock
from tests.conftest import resflow
from tests.integration.test_bad_inputs import assert_clear_error, make_cfg, run, scene

TILING = {"tile_px": 64, "halo_px": 8}


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP byte ranges (the stdlib handler ignores Range), counting bytes sent."""

    sent: list[int]

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        wanted = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
            end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
            body = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Last-Modified", self.date_time_string(os.stat(path).st_mtime))
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)
            self.sent.append(len(body))

    do_HEAD = do_GET


@pytest.fixture()
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str, list[int]]]:
    """A folder served on 127.0.0.1 with Range support: (folder, base URL, bytes per response)."""
    root = tmp_path / "served"
    root.mkdir()
    sent: list[int] = []
    handler = type("Handler", (RangeHandler,), {"sent": sent})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}", sent
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _report(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text())


def _map_twice(tmp_path: Path, gallery: Path, path: str, ranks: Optional[int] = None) -> dict:
    """Run twice on ``path`` (under mpirun with ``ranks``): the first maps every tile, the
    second only finds them finished."""
    cfg = make_cfg(tmp_path, gallery, [path], tiling=TILING)

    def go() -> subprocess.CompletedProcess:
        return run(cfg) if ranks is None else resflow(["run", str(cfg), "--quiet"], ranks=ranks,
                                                      check=False)
    first = go()
    assert first.returncode == 0, first.stderr
    report = _report(tmp_path / "out")
    assert [s["path"] for s in report["scenes"]] == [path]
    assert report["tiles"] == 4 and report["invocation"]["tiles"] == 4
    again = go()
    assert again.returncode == 0, again.stderr
    rerun = _report(tmp_path / "out")
    assert rerun["invocation"]["tiles"] == 0 and rerun["invocation"]["tiles_resumed"] == 4
    return rerun


def test_vsizip_scene_is_mapped_and_resumed(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "S.tif", size=96)
    archive = tmp_path / "scenes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(s, "inner/S.tif")
    s.unlink()
    path = f"/vsizip/{archive}/inner/S.tif"
    report = _map_twice(tmp_path, unit_gallery, path)
    mask = tmp_path / "out" / "S.resflow-mask.tif"
    assert str(mask) in report["scenes"][0]["outputs"]
    ds = gdal.Open(str(mask))
    assert (ds.RasterXSize, ds.RasterYSize) == (96, 96)


@pytest.mark.mpi
def test_vsicurl_scene_over_http_ranges(tmp_path: Path, unit_gallery: Path,
                                        http_root: tuple[Path, str, list[int]]) -> None:
    root, url, sent = http_root
    s = scene(root / "S.tif", size=96)
    path = f"/vsicurl/{url}/S.tif"
    _map_twice(tmp_path, unit_gallery, path, ranks=2)
    assert sent, "the scene was read over HTTP"
    assert (tmp_path / "out" / "S.resflow-mask.tif").exists()
    # the scene replaced on the server: its output is refused in one line (identity by HTTP stat)
    scene(s, size=160)
    cfg = make_cfg(tmp_path, unit_gallery, [path], tiling=TILING)
    assert_clear_error(run(cfg), path, "changed since this output was started", "--restart")
    missing = run(make_cfg(tmp_path, unit_gallery, [f"/vsicurl/{url}/absent.tif"],
                           tiling=TILING))
    print(assert_clear_error(missing, f"/vsicurl/{url}/absent.tif"))


def test_output_lock_holds_for_a_remote_scene(tmp_path: Path, unit_gallery: Path,
                                               http_root: tuple[Path, str, list[int]]) -> None:
    root, url, _ = http_root
    scene(root / "S.tif", size=96)
    cfg = make_cfg(tmp_path, unit_gallery, [f"/vsicurl/{url}/S.tif"], tiling=TILING)
    (tmp_path / "out").mkdir()
    with OutputLock(tmp_path / "out", "another job"):
        p = run(cfg)
    assert_clear_error(p, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "masks.h5").exists()
