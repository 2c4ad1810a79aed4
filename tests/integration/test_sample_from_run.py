"""`resflow sample --from-run OUT` on a real run (one process, untrained gallery, probabilities
kept): chips per bucket plus the least confident tiles, in the GeoPackage index of `resflow
sample`, each chip the scene's pixels; a run without probabilities is refused in one line."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
from osgeo import gdal, ogr

from resflow_mpi.init.sample import tile_confidence
from tests.conftest import RESFLOW, env
from tests.integration.test_bad_inputs import assert_clear_error, make_cfg, run, scene

TILE_PX = 32


def _sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([RESFLOW, "sample", *args], env=env(), capture_output=True, text=True,
                          timeout=120)


def test_sample_from_run(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "S.tif", size=96)
    cfg = make_cfg(tmp_path, unit_gallery, [str(s)], tiling={"tile_px": TILE_PX, "halo_px": 16},
                   inference={"save_probabilities": True})
    assert run(cfg).returncode == 0
    out, chips = tmp_path / "out", tmp_path / "chips"
    p = _sample("--from-run", str(out), "--per-bucket", "1", "--lowest", "2", "--out", str(chips))
    assert p.returncode == 0, p.stderr
    with h5py.File(out / "masks.h5", "r") as f:
        prob, mask = f["scenes/0/prob"][...], f["scenes/0/mask"][...]
        bucket = f["tiles/bucket"][...]
    conf = np.array([tile_confidence(prob[r:r + TILE_PX, c:c + TILE_PX],
                                     mask[r:r + TILE_PX, c:c + TILE_PX] != 255)
                     for r in range(0, 96, TILE_PX) for c in range(0, 96, TILE_PX)])
    index = ogr.Open(str(chips / "chips.gpkg"))
    rows = [{k: f.GetField(k) for k in ("tile", "bucket", "stratum", "confidence", "chip")}
            for f in index.GetLayerByName("chips")]
    index = None
    by_bucket = [r for r in rows if r["stratum"] == "bucket"]
    assert sorted(r["bucket"] for r in by_bucket) == sorted(set(bucket.tolist()) - {-1})
    low = [r for r in rows if r["stratum"] == "low-confidence"]
    assert len(low) == 2
    rest = sorted(set(range(9)) - {r["tile"] for r in by_bucket})
    assert sorted(r["tile"] for r in low) == sorted(sorted(rest, key=lambda t: conf[t])[:2])
    for r in rows:
        assert abs(r["confidence"] - conf[r["tile"]]) < 1e-6
        chip = gdal.Open(str(chips / r["chip"]))
        col, row = (r["tile"] % 3) * TILE_PX, (r["tile"] // 3) * TILE_PX
        assert np.array_equal(chip.ReadAsArray(),
                              gdal.Open(str(s)).ReadAsArray(col, row, TILE_PX, TILE_PX))
    summary = json.loads((chips / "sample.json").read_text())
    assert summary["complete"] and summary["chips"] == len(rows) == len(by_bucket) + 2
    print(p.stdout)


def test_sample_from_run_needs_probabilities(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "S.tif", size=64)
    cfg = make_cfg(tmp_path, unit_gallery, [str(s)], tiling={"tile_px": TILE_PX, "halo_px": 16})
    assert run(cfg).returncode == 0
    p = _sample("--from-run", str(tmp_path / "out"), "--per-bucket", "1",
                "--out", str(tmp_path / "chips"))
    print(assert_clear_error(p, "kept no probabilities", "inference.save_probabilities=true"))
    assert not (tmp_path / "chips").exists()
