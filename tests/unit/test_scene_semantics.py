"""Input semantics: pixel validity (nodata, mask band, alpha, override, blank fill), float ranges,
geodesic area, rotated geotransforms of outputs, honest write errors.
Every case uses real GDAL files made here."""
from __future__ import annotations

import errno
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import pytest
from osgeo import gdal, osr

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import InputError, OutputError
from resflow_mpi.io.export import export_failure, export_scene
from resflow_mpi.io.maskstore import MaskStore
from resflow_mpi.io.naming import output_file_name
from resflow_mpi.io.raster import (PixelRules, WindowReader, open_scene, prepare_scene,
                                   scene_statistics, tile_coverage, valid_pixels)
from resflow_mpi.tiling import Window, tile_grid

gdal.UseExceptions()
GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)
BANDS = (1, 2, 3)


def _wkt(epsg: int) -> str:
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    return srs.ExportToWkt()


def make_scene(path: Path, arr: np.ndarray, gt=GT, epsg: int = 32637, nodata: Optional[float] = None,
               mask: Optional[np.ndarray] = None, alpha: Optional[np.ndarray] = None,
               external_mask: bool = False) -> Path:
    """A GeoTIFF of (bands, h, w) ``arr``; optional per-dataset mask band (internal or .msk) or
    an extra alpha band (0 = transparent)."""
    c, h, w = arr.shape
    gtype = gdal.GDT_Float32 if arr.dtype == np.float32 else gdal.GDT_Byte
    opts = ["TILED=YES", "BLOCKXSIZE=32", "BLOCKYSIZE=32"] + (["ALPHA=YES"] if alpha is not None else [])
    ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, c + (alpha is not None), gtype, opts)
    ds.SetProjection(_wkt(epsg))
    ds.SetGeoTransform(gt)
    for i in range(c):
        ds.GetRasterBand(i + 1).WriteArray(arr[i])
        if nodata is not None:
            ds.GetRasterBand(i + 1).SetNoDataValue(nodata)
    if alpha is not None:
        ds.GetRasterBand(c + 1).WriteArray(alpha)
    if mask is not None:
        gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", "NO" if external_mask else "YES")
        try:
            ds.CreateMaskBand(gdal.GMF_PER_DATASET)
            ds.GetRasterBand(1).GetMaskBand().WriteArray(mask.astype(np.uint8) * 255)
        finally:
            gdal.SetConfigOption("GDAL_TIFF_INTERNAL_MASK", None)
    ds.FlushCache()
    ds = None
    return path


def tiled_validity(info, tile_px: int = 32, halo_px: int = 4) -> np.ndarray:
    """The scene's validity assembled from WindowReader.read_tile over the whole tile grid."""
    out = np.zeros((info.height, info.width), bool)
    reader = WindowReader(info, BANDS)
    for t in tile_grid(0, info.width, info.height, tile_px, halo_px):
        raw, valid = reader.read_tile(t)
        assert np.isfinite(raw).all()
        o = t.owned
        out[o.row:o.row + o.height, o.col:o.col + o.width] = valid
    reader.close()
    return out


def expected_coverage(valid: np.ndarray, tile_px: int) -> np.ndarray:
    h, w = valid.shape
    rows, cols = -(-h // tile_px), -(-w // tile_px)
    return np.array([[valid[r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px].mean()
                      for c in range(cols)] for r in range(rows)], np.float32)


def pixels(h: int = 70, w: int = 100, value: int = 10) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (value + rng.integers(0, 5, (3, h, w))).astype(np.uint8)


# -- validity ---------------------------------------------------------------------------------
@pytest.mark.parametrize("external", [False, True], ids=["internal-mask", "external-msk"])
def test_mask_band_is_honoured_in_reads_prescan_and_statistics(tmp_path: Path, external: bool) -> None:
    arr = pixels()
    keep = np.zeros((70, 100), bool)
    keep[:, 50:] = True
    arr[:, ~keep] = 250  # masked pixels hold values that would skew the statistics
    p = make_scene(tmp_path / "m.tif", arr, mask=keep, external_mask=external)
    assert os.path.exists(str(p) + ".msk") == external
    info = open_scene(p, BANDS)
    assert info.mask_band == 1 and info.nodata is None
    assert np.array_equal(tiled_validity(info), keep)
    cov = tile_coverage(info, 32, BANDS)
    assert np.allclose(cov, expected_coverage(keep, 32))
    assert cov[0, 0] == 0.0 and cov[0, 3] == 1.0
    mean, _ = scene_statistics(info, BANDS)
    assert max(mean) < 15  # only the valid pixels (10..14)
    assert info.validity_text(BANDS) == "GDAL mask band"


def test_alpha_band_is_honoured_even_beside_a_nodata_value(tmp_path: Path) -> None:
    arr = pixels()
    alpha = np.full((70, 100), 255, np.uint8)
    alpha[:40, :] = 0
    arr[:, 60:, :] = 0  # nodata 0 too: both sources count
    p = make_scene(tmp_path / "a.tif", arr, alpha=alpha, nodata=0)
    info = open_scene(p, BANDS)
    assert info.alpha_band == 4
    want = (alpha > 0) & (np.arange(70) < 60)[:, None]
    assert np.array_equal(tiled_validity(info), want)
    assert np.allclose(tile_coverage(info, 32, BANDS), expected_coverage(want, 32))


def test_nodata_override_declares_and_replaces_nodata(tmp_path: Path) -> None:
    arr = pixels()
    arr[:, :20, :] = 0
    arr[:, 20:30, :] = 7
    p = make_scene(tmp_path / "n.tif", arr, nodata=7)  # the file says 7, the user says 0
    by_file = tiled_validity(open_scene(p, BANDS))
    assert not by_file[20:30].any() and by_file[:20].all()
    info = open_scene(p, BANDS, rules=PixelRules(nodata=(0.0,)))
    by_override = tiled_validity(info)
    assert not by_override[:20].any() and by_override[20:].all()
    assert tile_coverage(info, 32, BANDS)[0, 0] == pytest.approx(12 / 32)
    # one value per band: a pixel is nodata only where every band holds its own value
    arr2 = pixels()
    arr2[0, :10], arr2[1, :10], arr2[2, :10] = 1, 2, 3
    arr2[0, 10:20], arr2[1, 10:20], arr2[2, 10:20] = 1, 2, 9
    q = make_scene(tmp_path / "pb.tif", arr2)
    v = tiled_validity(open_scene(q, BANDS, rules=PixelRules(nodata=(1.0, 2.0, 3.0))))
    assert not v[:10].any() and v[10:].all()


def test_nan_nodata_in_a_float_scene(tmp_path: Path) -> None:
    arr = pixels().astype(np.float32)
    arr[:, 5:9, :] = np.nan
    p = make_scene(tmp_path / "f.tif", arr)
    with pytest.raises(InputError, match="NaN or inf"):
        tiled_validity(open_scene(p, BANDS))
    info = open_scene(p, BANDS, rules=PixelRules(nodata=(math.nan,)))
    v = tiled_validity(info)
    assert not v[5:9].any() and v[:5].all() and v[9:].all()


def blank_fill_scene() -> tuple[np.ndarray, np.ndarray]:
    """A scene with a white JPEG-fringed collar (rows 0-19, and a 70-px run on row 40) and small
    bright and dark objects (runs of 10 px) that are data."""
    rng = np.random.default_rng(1)
    arr = (60 + rng.integers(0, 40, (3, 70, 100))).astype(np.uint8)
    arr[:, :20, :] = (250 + rng.integers(0, 6, (3, 20, 100))).astype(np.uint8)
    arr[:, 40, 30:] = 255
    arr[:, 50, 45:55] = 255
    arr[:, 60, 5:15] = 0
    fill = np.zeros((70, 100), bool)
    fill[:20] = True
    fill[40, 30:] = True
    return arr, ~fill


def test_blank_fill_detector_marks_runs_not_objects(tmp_path: Path) -> None:
    arr, want = blank_fill_scene()
    p = make_scene(tmp_path / "b.tif", arr)
    assert tiled_validity(open_scene(p, BANDS)).all()  # detector off by default
    cfg = config_from_dict({"scenes": {"blank_fill": True, "blank_fill_min_run_px": 32}})
    info = open_scene(p, BANDS, rules=PixelRules.from_scenes_config(cfg.scenes))
    # exact per pixel, whatever window it is read in (runs crossing tile edges included)
    assert np.array_equal(tiled_validity(info, tile_px=32), want)
    assert np.array_equal(tiled_validity(info, tile_px=16, halo_px=2), want)
    ds = gdal.Open(str(p))
    assert np.array_equal(valid_pixels(ds, info, BANDS, Window(0, 0, 100, 70)), want)
    assert np.allclose(tile_coverage(info, 16, BANDS), expected_coverage(want, 16))


# -- float scenes -----------------------------------------------------------------------------
def test_float_scene_needs_an_explicit_range_that_its_values_respect(tmp_path: Path) -> None:
    arr = np.linspace(0, 255, 3 * 70 * 100, dtype=np.float32).reshape(3, 70, 100)
    p = make_scene(tmp_path / "f.tif", arr)
    with pytest.raises(InputError, match=r"float32 scene \(sampled values 0 to 255\) needs an "
                                         r"explicit range: set normalization.value_max"):
        prepare_scene(p, config_from_dict({}))
    with pytest.raises(InputError, match=r"float32 values 0 to 255 fall outside the range 0 to 1 "
                                         r"\(normalization.value_max\)"):
        prepare_scene(p, config_from_dict({"normalization": {"value_max": 1.0}}))
    info = prepare_scene(p, config_from_dict({"normalization": {"value_max": 255}}))
    assert info.dtype == "float32"
    # statistics modes carry their own scaling; the scene is accepted
    prepare_scene(p, config_from_dict({"normalization": {"mode": "scene"}}))


def test_float_scene_nodata_outliers_are_not_counted(tmp_path: Path) -> None:
    arr = np.full((3, 40, 40), 0.5, np.float32)
    arr[:, :5] = -9999.0
    p = make_scene(tmp_path / "f.tif", arr, nodata=-9999.0)
    prepare_scene(p, config_from_dict({"normalization": {"value_max": 1.0}}))


# -- area -------------------------------------------------------------------------------------
def test_geographic_area_equals_the_scene_warped_to_utm(tmp_path: Path) -> None:
    # 0.1 x 0.08 degrees at 45 N, near UTM 31N's central meridian (3 E)
    arr = np.full((3, 400, 500), 100, np.uint8)
    geo = make_scene(tmp_path / "geo.tif", arr, gt=(2.95, 0.0002, 0.0, 45.04, 0.0, -0.0002), epsg=4326)
    info = open_scene(geo, BANDS)
    utm = gdal.Warp(str(tmp_path / "utm.tif"), str(geo), dstSRS="EPSG:32631", xRes=5.0, yRes=5.0,
                    dstAlpha=True, resampleAlg="near")
    alpha = utm.GetRasterBand(4).ReadAsArray()
    gt = utm.GetGeoTransform()
    warped_km2 = float((alpha > 0).sum()) * abs(gt[1] * gt[5]) / 1e6
    utm = None
    assert info.area_km2 == pytest.approx(warped_km2, rel=0.01)
    assert 60 < info.area_km2 < 75  # ~7.9 km x ~8.9 km, never 2e-11
    # tiles add up to the scene; a tile's area follows its latitude
    tiles = list(tile_grid(0, 500, 400, 128, 0))
    assert sum(info.window_area_km2(t.owned) for t in tiles) == pytest.approx(info.area_km2, rel=1e-6)
    north, south = info.window_area_km2(Window(0, 0, 100, 10)), info.window_area_km2(Window(0, 390, 100, 10))
    assert north < south


def test_projected_area_uses_the_crs_linear_units(tmp_path: Path) -> None:
    # EPSG:2263 (NAD83 / New York Long Island, US survey feet): 2 ft pixels
    p = make_scene(tmp_path / "ft.tif", pixels(), gt=(1e6, 2.0, 0.0, 2e5, 0.0, -2.0), epsg=2263)
    info = open_scene(p, BANDS)
    # ground area within the conic's scale error (1e-4), never square feet
    assert info.area_km2 == pytest.approx(100 * 70 * (2 * 0.3048006096) ** 2 / 1e6, rel=1e-3)
    metric = open_scene(make_scene(tmp_path / "m.tif", pixels()), BANDS)
    assert metric.area_km2 == pytest.approx(100 * 70 * 0.25 / 1e6, rel=1e-3)


# -- geotransforms of outputs -----------------------------------------------------------------
def _corner_ground(gt: tuple[float, ...], col: float, row: float) -> tuple[float, float]:
    return gt[0] + col * gt[1] + row * gt[2], gt[3] + col * gt[4] + row * gt[5]


def test_outputs_of_a_rotated_scene_map_to_the_same_ground(tmp_path: Path) -> None:
    ang = math.radians(20)
    gt = (500000.0, 0.5 * math.cos(ang), 0.5 * math.sin(ang), 1000000.0,
          0.5 * math.sin(ang), -0.5 * math.cos(ang))
    p = make_scene(tmp_path / "rot.tif", pixels(600, 700))
    ds = gdal.Open(str(p), gdal.GA_Update)
    ds.SetGeoTransform(gt)
    ds = None
    info = open_scene(p, BANDS)
    assert info.geotransform == pytest.approx(gt)
    h5 = str(tmp_path / "masks.h5")
    store = MaskStore(h5, [info], tile_px=128, halo_px=8, code_bytes=2, config_checksum="c",
                      gallery_checksum="g")
    store.close()
    with h5py.File(h5, "a") as f:
        f["scenes/0/mask"][...] = 1
        f["tiles/bucket"][...] = np.arange(f["tiles/bucket"].shape[0]) % 3  # the one scene's
    out = tmp_path / "out"
    out.mkdir()
    names = [out / output_file_name("rot", k) for k in ("mask", "mask-cog", "buckets")]
    export_scene(h5, 0, *names)
    for path, step in ((names[0], 1), (names[1], 1), (names[2], 128)):
        d = gdal.Open(str(path))
        ogt = d.GetGeoTransform()
        for c, r in ((0, 0), (d.RasterXSize, 0), (0, d.RasterYSize), (3, 2)):
            assert _corner_ground(ogt, c, r) == pytest.approx(_corner_ground(gt, c * step, r * step))
    cog = gdal.Open(str(names[1]))
    assert cog.GetRasterBand(1).GetOverviewCount() >= 1
    ov = gdal.OpenEx(str(names[1]), open_options=["OVERVIEW_LEVEL=0"])
    fx, fy = 700 / ov.RasterXSize, 600 / ov.RasterYSize
    ogt = ov.GetGeoTransform()
    for c, r in ((0, 0), (ov.RasterXSize, ov.RasterYSize), (5, 1)):
        assert _corner_ground(ogt, c, r) == pytest.approx(_corner_ground(gt, c * fx, r * fy))


# -- honest write errors ----------------------------------------------------------------------
def _store(tmp_path: Path) -> str:
    info = open_scene(make_scene(tmp_path / "s.tif", pixels(300, 300)), BANDS)
    h5 = str(tmp_path / "masks.h5")
    MaskStore(h5, [info], tile_px=64, halo_px=8, code_bytes=2, config_checksum="c",
              gallery_checksum="g").close()
    return h5


def test_export_failure_quotes_gdal_and_is_not_called_disk_full(tmp_path: Path) -> None:
    h5 = _store(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = out / output_file_name("s", "mask")
    from resflow_mpi.io.geotiff import partial_path
    partial_path(target).mkdir()  # GDAL cannot create the file: not a space problem
    with pytest.raises(OutputError) as e:
        export_scene(h5, 0, target)
    msg = str(e.value)
    assert "GDAL: " in msg and "MiB free" in msg and "space left" not in msg and "\n" not in msg
    assert "disk full" not in msg


def test_os_errors_name_full_disk_and_quota(tmp_path: Path) -> None:
    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as fh:
            fh.write(b"x")
            fh.flush()
    assert full.value.errno == errno.ENOSPC
    assert "no space left on the device" in export_failure(tmp_path / "x.tif", full.value)
    quota = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert "disk quota exceeded" in export_failure(tmp_path / "x.tif", quota)
    other = OSError(errno.EACCES, os.strerror(errno.EACCES))
    msg = export_failure(tmp_path / "x.tif", other)
    assert "OS: Permission denied" in msg and "space left" not in msg


def test_export_on_a_really_full_filesystem_says_so(tmp_path: Path) -> None:
    h5 = _store(tmp_path)
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        with pytest.raises(OSError), open(mnt / "filler", "wb") as fh:  # fill it up
            for _ in range(1024):
                fh.write(b"\0" * 4096)
                fh.flush()
        with pytest.raises(OutputError) as e:
            export_scene(h5, 0, mnt / output_file_name("s", "mask"))
        assert "no space left on the device" in str(e.value), str(e.value)
        assert not list(mnt.glob("*.partial"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- bounded config ---------------------------------------------------------------------------
BOMB_SCRIPT = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20))
from resflow_mpi.config import load_config
from resflow_mpi.errors import ConfigError
try:
    load_config(sys.argv[1])
except ConfigError as exc:
    print(exc)
"""


def test_alias_bomb_under_a_valid_key_is_one_line_with_bounded_memory(tmp_path: Path) -> None:
    levels = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("scenes:\n  inputs: [" + ", ".join(levels) + "]\n")
    p = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(cfg)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "bomb.yaml" in lines[0] and "aliases" in lines[0], p.stdout


def test_error_messages_show_a_truncated_value(tmp_path: Path) -> None:
    from resflow_mpi.config import ConfigError, load_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiling:\n  tile_px: [" + ", ".join(["[1, 2, 3, 4, 5, 6, 7, 8]"] * 500) + "]\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert len(str(e.value)) < 200 and "..." in str(e.value)
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        load_config(big)
