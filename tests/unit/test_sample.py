"""`resflow sample`: N tiles per bucket spread over scenes and space, GeoTIFF chips georeferenced
exactly as their scene windows, and a GeoPackage index that OGR opens with one feature per chip."""
from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, ogr

from resflow_mpi.errors import InputError
from resflow_mpi.galleries import ImageGallery
from resflow_mpi.init.sample import sample_command, select_stratified
from resflow_mpi.synth import write_raster_from_array
from tests.conftest import RESFLOW, env

TILE_PX = 32
SCENE_PX = 128   # 4 x 4 tiles per scene
# Per-bucket tile counts: bucket 2 has fewer tiles than asked for.
PER_BUCKET = 5


def _scenes(tmp: Path) -> list[dict]:
    """Three real GeoTIFF scenes: two in UTM 37N (different origins), one in UTM 33N."""
    rng = np.random.default_rng(0)
    out = []
    for i, (epsg, origin) in enumerate([(32637, (500000.0, 1000000.0)),
                                        (32637, (510000.0, 1002000.0)),
                                        (32633, (300000.0, 5000000.0))]):
        arr = rng.integers(1, 255, (3, SCENE_PX, SCENE_PX)).astype(np.uint8)
        gt = (origin[0], 0.5, 0.0, origin[1], 0.0, -0.5)
        path = write_raster_from_array(tmp / f"scene{i}.tif", arr, epsg, gt, 0)
        out.append({"name": f"scene{i}", "path": str(path), "epsg": epsg})
    return out


def _gallery(tmp: Path, scenes: list[dict]) -> tuple[Path, np.ndarray]:
    """images.h5 with every grid tile of every scene; buckets 0/1 large, bucket 2 has 3 tiles."""
    scene, window = [], []
    for s in range(len(scenes)):
        for row in range(0, SCENE_PX, TILE_PX):
            for col in range(0, SCENE_PX, TILE_PX):
                scene.append(s)
                window.append([col, row, TILE_PX, TILE_PX])
    n = len(scene)
    bucket = np.arange(n) % 2
    bucket[[3, 20, 40]] = 2
    codes = np.packbits(np.random.default_rng(1).integers(0, 2, (n, 16)).astype(np.uint8), axis=1)
    path = tmp / "gallery" / "images.h5"
    path.parent.mkdir()
    ImageGallery.write(path, codes, np.array(scene), np.array(window), np.zeros((n, 4)), bucket,
                       16, scenes)
    return path, bucket


def test_select_spreads_over_scenes_and_space() -> None:
    scene = np.repeat([0, 1, 2], 16)
    grid = np.array([[c, r, 32, 32] for r in range(0, 128, 32) for c in range(0, 128, 32)])
    window = np.tile(grid, (3, 1))
    bucket = np.zeros(48, int)
    picked = select_stratified(bucket, scene, window, 6, seed=0)[0]
    assert len(picked) == len(set(picked.tolist())) == 6
    assert np.bincount(scene[picked], minlength=3).tolist() == [2, 2, 2]
    # Two tiles of one scene are the farthest pair the farthest-point order can give: far apart.
    for s in range(3):
        a, b = window[picked[scene[picked] == s], :2]
        assert np.abs(a - b).max() >= 64
    assert np.array_equal(select_stratified(bucket, scene, window, 6, seed=0)[0], picked)
    assert not np.array_equal(select_stratified(bucket, scene, window, 6, seed=5)[0], picked)
    allowed = scene != 1
    only = select_stratified(bucket, scene, window, 40, seed=0, allowed=allowed)[0]
    assert len(only) == 32 and not (scene[only] == 1).any()
    with pytest.raises(ValueError):
        select_stratified(bucket, scene, window, 0, seed=0)


def test_sample_command_writes_georeferenced_chips_and_index(tmp_path: Path) -> None:
    scenes = _scenes(tmp_path)
    images, bucket = _gallery(tmp_path, scenes)
    out = tmp_path / "sample"
    p = subprocess.run([RESFLOW, "sample", str(images), "--per-bucket", str(PER_BUCKET),
                        "--seed", "7", "--out", str(out)], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert "bucket 2: 3 chip(s) (the bucket has only 3 tile(s)" in p.stdout
    summary = json.loads((out / "sample.json").read_text())
    assert summary["per_bucket_written"] == {"0": 5, "1": 5, "2": 3}
    gal = ImageGallery(images)
    ds = ogr.Open(str(out / "chips.gpkg"))
    layer = ds.GetLayerByName("chips")
    assert layer.GetFeatureCount() == 13
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "4326"   # mixed CRSs -> lon/lat
    counts: dict[int, int] = {}
    for feature in layer:
        b, tile = feature.GetField("bucket"), feature.GetField("tile")
        counts[b] = counts.get(b, 0) + 1
        assert bucket[tile] == b
        meta = scenes[int(gal.scene[tile])]
        col, row, w, h = (int(v) for v in gal.window[tile])
        assert feature.GetField("window") == f"{col},{row},{w},{h}"
        assert feature.GetField("scene") == meta["name"]
        assert len(feature.GetField("code")) == 16
        chip = gdal.Open(str(out / feature.GetField("chip")))
        src = gdal.Open(meta["path"])
        gt, sgt = chip.GetGeoTransform(), src.GetGeoTransform()
        assert gt == pytest.approx((sgt[0] + col * sgt[1], sgt[1], 0.0,
                                    sgt[3] + row * sgt[5], 0.0, sgt[5]))
        assert chip.GetProjection() == src.GetProjection()
        assert (chip.RasterXSize, chip.RasterYSize, chip.RasterCount) == (w, h, 3)
        assert np.array_equal(chip.ReadAsArray(), src.ReadAsArray(col, row, w, h))
        env_ = feature.GetGeometryRef().GetEnvelope()   # lon/lat footprint near the scene
        lon = 39.0 if meta["epsg"] == 32637 else 15.0
        assert abs((env_[0] + env_[1]) / 2 - lon) < 3
    assert counts == {0: 5, 1: 5, 2: 3}
    # Spread: the five tiles of bucket 0 come from all three scenes.
    layer.SetAttributeFilter("bucket = 0")
    assert len({f.GetField("scene") for f in layer}) == 3


def test_sample_one_crs_keeps_it_and_filters_scenes(tmp_path: Path) -> None:
    scenes = _scenes(tmp_path)
    images, _ = _gallery(tmp_path, scenes)
    out = tmp_path / "only01"
    p = subprocess.run([RESFLOW, "sample", str(images), "--per-bucket", "2", "--scenes", "scene0",
                        "scene1.tif", "--out", str(out)], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    ds = ogr.Open(str(out / "chips.gpkg"))   # keep the data source alive while using its layer
    layer = ds.GetLayerByName("chips")
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "32637"
    assert {f.GetField("scene") for f in layer} <= {"scene0", "scene1"}
    layer.ResetReading()
    for f in layer:   # footprint = the window in the scene's own coordinates
        sgt = gdal.Open(scenes[int(f.GetField("scene")[-1])]["path"]).GetGeoTransform()
        x0 = sgt[0] + f.GetField("col") * sgt[1]
        y0 = sgt[3] + f.GetField("row") * sgt[5]
        assert f.GetGeometryRef().GetEnvelope() == pytest.approx(
            (x0, x0 + TILE_PX * sgt[1], y0 + TILE_PX * sgt[5], y0))
    bad = subprocess.run([RESFLOW, "sample", str(images), "--per-bucket", "2", "--scenes", "nope",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         env=env(), timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "--scenes nope: not a scene of the image gallery" in bad.stderr


def _sample(images: Path, out: Path, per_bucket: int, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run([RESFLOW, "sample", str(images), "--per-bucket", str(per_bucket),
                           "--seed", str(seed), "--out", str(out)], capture_output=True, text=True,
                          env=env(), timeout=120)


def _sample_here(images: Path, out: Path, per_bucket: int, seed: int) -> int:
    """`resflow sample` in this process (the CLI's own function)."""
    return sample_command(argparse.Namespace(gallery=str(images), per_bucket=per_bucket,
                                             scenes=None, seed=seed, out=str(out)))


def _indexed_chips(out: Path) -> set[str]:
    ds = ogr.Open(str(out / "chips.gpkg"))
    return {f.GetField("chip") for f in ds.GetLayerByName("chips")}


def test_second_sample_into_one_folder_leaves_only_its_own_chips(tmp_path: Path) -> None:
    images, _ = _gallery(tmp_path, _scenes(tmp_path))
    out = tmp_path / "sample"
    assert _sample_here(images, out, PER_BUCKET, 7) == 0
    first = _indexed_chips(out)
    (out / "notes.txt").write_text("mine")                      # the user's files stay
    (out / "bucket-00" / "labels").mkdir()
    (out / "bucket-00" / "labels" / "a.tif").write_text("label")
    (out / "bucket-00" / "my_label.tif").write_text("label")   # named like a chip, not one
    assert _sample_here(images, out, 1, 3) == 0
    second = _indexed_chips(out)
    on_disk = {str(q.relative_to(out)) for q in out.glob("bucket-*/*.tif")}
    assert on_disk == second | {"bucket-00/my_label.tif"} and len(second) == 3 and first - second
    assert set(json.loads((out / "sample.json").read_text())["chip_files"]) == second
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "bucket-00" / "labels" / "a.tif").is_file()
    assert not list(out.glob("bucket-*/*.partial*"))


def test_sample_refuses_a_file_or_a_folder_it_did_not_make(tmp_path: Path) -> None:
    images, _ = _gallery(tmp_path, _scenes(tmp_path))
    a_file = tmp_path / "chips.txt"
    a_file.write_text("x")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.tif").write_text("not a chip")
    p = _sample(images, a_file, 1, 0)   # what a user sees: one line, no traceback
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"error: --out {a_file}: is a file, not a folder"), lines[0]
    with pytest.raises(InputError, match=f"--out {foreign}: folder is not empty and holds no "
                                         "sample.json of an earlier `resflow sample`"):
        _sample_here(images, foreign, 1, 0)
    assert a_file.read_text() == "x" and [q.name for q in foreign.iterdir()] == ["holiday.tif"]


# -- what to label next (--from-run) ---------------------------------------------------------------
def test_tile_confidence_over_building_ish_pixels() -> None:
    from resflow_mpi.init.sample import tile_confidence
    valid = np.ones((4, 4), bool)
    background = np.full((4, 4), 0.02)
    assert tile_confidence(background, valid) == pytest.approx(0.96)
    unsure = background.copy()
    unsure[0, :2] = 0.5          # two building-ish pixels at 0.5: confidence 0
    assert tile_confidence(unsure, valid) == pytest.approx(0.0)
    sure = background.copy()
    sure[0, :2] = [1.0, 0.75]    # building-ish: |1-.5|*2=1, |.75-.5|*2=.5
    assert tile_confidence(sure, valid) == pytest.approx(0.75)
    sure[0, 0] = 0.5
    assert tile_confidence(sure, valid & ~(np.arange(16).reshape(4, 4) == 0)) == \
        pytest.approx(0.5), "invalid pixels never count"
    assert np.isnan(tile_confidence(sure, np.zeros((4, 4), bool)))


def test_select_to_label_strata() -> None:
    from resflow_mpi.init.sample import MappedTiles, select_to_label
    n = 40
    bucket = np.array([0] * 20 + [1] * 15 + [-2] * 5)
    confidence = np.linspace(1.0, 0.0, n)          # the last tiles are the least sure
    confidence[20] = 0.0                           # but a bucket-1 tile is as unsure
    window = np.array([[(i % 5) * 32, (i // 5) * 32, 32, 32] for i in range(n)])
    tiles = MappedTiles(np.zeros(n, np.int64), np.arange(n), bucket, np.zeros((n, 2), np.uint8),
                        window, confidence, ["s.tif"])
    strata = dict(select_to_label(tiles, per_bucket=2, lowest=3, seed=0))
    assert list(strata) == ["bucket-00", "bucket-01", "flagged", "low-confidence"]
    assert all(len(strata[k]) == 2 for k in ("bucket-00", "bucket-01", "flagged"))
    assert set(bucket[strata["flagged"]]) == {-2}
    drawn = np.concatenate([strata[k] for k in ("bucket-00", "bucket-01", "flagged")])
    low = strata["low-confidence"]
    assert not set(low) & set(drawn), "a tile is drawn once"
    rest = np.setdiff1d(np.arange(n), drawn)
    assert set(low) == set(rest[np.argsort(confidence[rest], kind="stable")][:3])
