"""Bad input: each case gives one clear line naming the file and the problem, a non-zero exit,
and no output that looks complete. The table in README's troubleshooting section mirrors these."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.synth import write_raster_from_array
from tests.conftest import RESFLOW, env, write_config

GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)


def scene(path: Path, bands: int = 3, dtype: type = np.uint8, size: int = 96, epsg: int = 32637,
          nodata: float | None = 0, fill: float | None = None) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.integers(1, 200, (bands, size, size)).astype(dtype)
    if fill is not None:
        arr[...] = fill
    return write_raster_from_array(path, arr, epsg, GT, nodata)


def run(cfg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([RESFLOW, "run", str(cfg), "--quiet", *extra], env=env(),
                          capture_output=True, text=True, timeout=180)


def assert_clear_error(p: subprocess.CompletedProcess, *fragments: str) -> str:
    assert p.returncode != 0, p.stdout + p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def assert_nothing_complete(out: Path) -> None:
    assert not list(out.glob("*.tif")), "no GeoTIFF may appear for a failed run"
    report = out / "run_report.json"
    if report.exists():
        assert not all(s["complete"] for s in json.loads(report.read_text())["scenes"])


def make_cfg(tmp_path: Path, gallery: Path, inputs: list[str], **sections: dict) -> Path:
    base = {"scenes": {"inputs": inputs, "split": "all"}, "models": {"gallery": str(gallery)},
            "output": {"dir": str(tmp_path / "out")}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return write_config(tmp_path / "cfg.yaml", **base)


def raw_file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def truncated(tmp: Path) -> Path:
    p = scene(tmp / "t.tif", size=700)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    return p


def no_georef(tmp: Path) -> Path:
    p = tmp / "nogeo.tif"
    ds = gdal.GetDriverByName("GTiff").Create(str(p), 64, 64, 3, gdal.GDT_Byte)
    ds.WriteArray(np.ones((3, 64, 64), np.uint8))
    ds = None
    return p


def float_nan(tmp: Path) -> Path:
    arr = np.ones((3, 64, 64), np.float32)
    arr[1, 10, 10] = np.nan
    return write_raster_from_array(tmp / "nan.tif", arr, 32637, GT, None)


SCENE_CASES: list[tuple[str, Callable[[Path], list[str]], dict, tuple[str, ...]]] = [
    ("missing file", lambda t: [str(t / "absent.tif")], {}, ("absent.tif", "not found")),
    ("empty file", lambda t: [raw_file(t / "e.tif", b"")], {}, ("e.tif", "empty")),
    ("non-TIFF file", lambda t: [raw_file(t / "x.tif", b"hello, not a TIFF")], {},
     ("x.tif", "not a readable raster")),
    ("truncated file", lambda t: [str(truncated(t))], {}, ("t.tif", "truncated")),
    ("wrong band count", lambda t: [str(scene(t / "one.tif", bands=1))], {},
     ("one.tif", "has 1 band(s)")),
    ("wrong data type", lambda t: [str(scene(t / "u16.tif", dtype=np.uint16))],
     {"scenes": {"expect_dtype": "uint8"}}, ("u16.tif", "data type uint16")),
    ("unsupported data type", lambda t: [str(scene(t / "i32.tif", dtype=np.int32))], {},
     ("i32.tif", "not supported")),
    ("no georeferencing", lambda t: [str(no_georef(t))], {}, ("nogeo.tif", "no georeferencing")),
    ("all-nodata scene", lambda t: [str(scene(t / "nd.tif", fill=0))], {},
     ("nd.tif", "entirely nodata")),
    ("NaN in float input", lambda t: [str(float_nan(t))], {}, ("nan.tif", "NaN or inf")),
]


@pytest.mark.parametrize("name, make, sections, fragments", SCENE_CASES,
                         ids=[c[0] for c in SCENE_CASES])
def test_bad_scene(tmp_path: Path, unit_gallery: Path, name: str, make: Callable,
                   sections: dict, fragments: tuple[str, ...]) -> None:
    cfg = make_cfg(tmp_path, unit_gallery, make(tmp_path), **sections)
    line = assert_clear_error(run(cfg), *fragments)
    assert_nothing_complete(tmp_path / "out")
    print(f"{name}: {line}")


def test_skip_policy_reports_bad_scene_and_maps_the_rest(tmp_path: Path, unit_gallery: Path) -> None:
    good, bad = scene(tmp_path / "good.tif"), tmp_path / "absent.tif"
    cfg = make_cfg(tmp_path, unit_gallery, [str(good), str(bad)],
                   scenes={"on_bad_scene": "skip"})
    p = run(cfg)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert [s["complete"] for s in report["scenes"]] == [True]
    assert report["skipped_scenes"][0]["path"] == str(bad)
    assert "not found" in report["skipped_scenes"][0]["reason"]


def test_scene_smaller_than_a_tile_is_mapped(tmp_path: Path, unit_gallery: Path) -> None:
    small = scene(tmp_path / "small.tif", size=40)
    cfg = make_cfg(tmp_path, unit_gallery, [str(small)])
    p = run(cfg)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    mask = gdal.Open(report["scenes"][0]["outputs"][0])
    assert (mask.RasterXSize, mask.RasterYSize) == (40, 40)


def test_gallery_missing_bucket(tmp_path: Path, unit_gallery: Path) -> None:
    gal = tmp_path / "gallery"
    shutil.copytree(unit_gallery, gal)
    victim = sorted(gal.glob("bucket-*.pt"))[0]
    victim.unlink()
    cfg = make_cfg(tmp_path, gal, [str(scene(tmp_path / "s.tif"))])
    assert_clear_error(run(cfg), victim.name, "missing from the model gallery")
    assert_nothing_complete(tmp_path / "out")


def test_gallery_corrupted_checkpoint(tmp_path: Path, unit_gallery: Path) -> None:
    gal = tmp_path / "gallery"
    shutil.copytree(unit_gallery, gal)
    victim = sorted(gal.glob("bucket-*.pt"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    cfg = make_cfg(tmp_path, gal, [str(scene(tmp_path / "s.tif"))])
    assert_clear_error(run(cfg), victim.name, "checksum mismatch")


def test_unknown_config_key_and_bad_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: {tile_px: 64, tile_sise: 3}\n")
    assert_clear_error(run(bad), "bad.yaml", "unknown key 'tiling.tile_sise'")
    bad.write_text("inference: {batch_size: -4}\n")
    assert_clear_error(run(bad), "bad.yaml", "inference.batch_size", ">= 1")


def test_output_dir_not_writable(tmp_path: Path, unit_gallery: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = make_cfg(tmp_path, unit_gallery, [str(scene(tmp_path / "s.tif"))],
                   output={"dir": str(blocker / "out")})
    assert_clear_error(run(cfg), "out", "not writable")


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs) that fills up during the run; needs root to mount."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({p.stderr.strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_fills_during_run(tmp_path: Path, unit_gallery: Path, small_disk: Path) -> None:
    big = scene(tmp_path / "big.tif", size=1500)  # a 2.25 MB mask cannot fit on 1 MiB
    cfg = make_cfg(tmp_path, unit_gallery, [str(big)], output={"dir": str(small_disk / "out")})
    p = run(cfg)
    assert_clear_error(p, "disk full")
    assert_nothing_complete(small_disk / "out")
    # Space back: the same command finishes the job.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    p = run(cfg)
    assert p.returncode == 0, p.stderr
    report = json.loads((small_disk / "out" / "run_report.json").read_text())
    assert all(s["complete"] for s in report["scenes"])
