"""Synthetic archive generator: real GeoTIFFs with the right grid, deterministic, seamless."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from resflow_mpi import synth
from resflow_mpi.errors import ConfigError
from resflow_mpi.synth import REGIMES, SceneSpec


def _spec(**overrides) -> SceneSpec:
    fields = dict(name="scene", width=300, height=260, regime="temperate-urban", region="midland",
                  split="train", seed=11, epsg=32636, origin_xy=(412000.0, 5432100.0))
    fields.update(overrides)
    return SceneSpec(**fields)


def _read(path: Path) -> np.ndarray:
    ds = gdal.Open(str(path))
    assert ds is not None, path
    return ds.ReadAsArray()


def _pixels_per_regime(spec_by_regime: dict[str, SceneSpec], out_dir: Path) -> dict[str, np.ndarray]:
    means = {}
    for regime, spec in spec_by_regime.items():
        image_path, mask_path = synth.write_scene(spec, out_dir)
        image, mask = _read(image_path).astype(np.float64), _read(mask_path)
        means[regime] = image[:, mask != synth.MASK_NODATA].mean(axis=1)
    return means


def test_scene_geotiff_layout(tmp_path: Path) -> None:
    spec = _spec()
    image_path, mask_path = synth.write_scene(spec, tmp_path)
    assert (image_path.name, mask_path.name) == ("scene.tif", "scene_mask.tif")
    for path, bands, dtype, nodata in ((image_path, 3, gdal.GDT_Byte, 0),
                                       (mask_path, 1, gdal.GDT_Byte, 255)):
        ds = gdal.Open(str(path))
        assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (300, 260, bands)
        srs = osr.SpatialReference(wkt=ds.GetProjection())
        srs.AutoIdentifyEPSG()
        assert srs.IsProjected() and srs.GetAuthorityCode(None) == "32636"
        assert ds.GetGeoTransform() == pytest.approx((412000.0, 0.5, 0.0, 5432100.0, 0.0, -0.5))
        assert ds.GetMetadata("IMAGE_STRUCTURE")["COMPRESSION"] == "DEFLATE"
        for b in range(1, bands + 1):
            band = ds.GetRasterBand(b)
            assert band.DataType == dtype
            assert band.GetBlockSize() == [256, 256]
            assert band.GetNoDataValue() == nodata
    meta = gdal.Open(str(image_path)).GetMetadata()
    assert meta["RESFLOW_REGIME"] == "temperate-urban" and meta["RESFLOW_REGION"] == "midland"
    assert meta["SENSOR"] == REGIMES["temperate-urban"].sensor
    assert 0 < float(meta["SUN_ELEVATION"]) < 90
    year, month, day = map(int, meta["ACQUISITION_DATE"].split("-"))
    assert month == REGIMES["temperate-urban"].month and 1 <= day <= 28 and year >= 2000
    assert not list(tmp_path.glob(".*partial")), "temporary files must be renamed or removed"


def test_mask_is_nodata_exactly_where_image_is(tmp_path: Path) -> None:
    for seed in (1, 2, 3):   # covers corner and side collars
        spec = _spec(name=f"collar{seed}", seed=seed, nodata_collar=True)
        image_path, mask_path = synth.write_scene(spec, tmp_path)
        image, mask = _read(image_path), _read(mask_path)
        all_zero = (image == 0).all(axis=0)
        assert 0.01 < all_zero.mean() < 0.5
        np.testing.assert_array_equal(mask == 255, all_zero)
        assert set(np.unique(mask)) <= {0, 1, 255}
    plain_mask = _read(synth.write_scene(_spec(name="plain"), tmp_path)[1])
    assert not (plain_mask == 255).any()


def test_same_seed_same_pixels_other_seed_differs(tmp_path: Path) -> None:
    first = _read(synth.write_scene(_spec(), tmp_path / "a")[0])
    again = _read(synth.write_scene(_spec(), tmp_path / "b")[0])
    other = _read(synth.write_scene(_spec(seed=12), tmp_path / "c")[0])
    assert first.tobytes() == again.tobytes()
    assert (first != other).mean() > 0.5


@pytest.mark.parametrize("regime", ["temperate-urban", "snow-rural"])
def test_block_size_leaves_no_seams(tmp_path: Path, regime: str) -> None:
    spec = _spec(regime=regime, width=520, height=390, nodata_collar=True)
    small = synth.write_scene(spec, tmp_path / "small", block_px=128)
    large = synth.write_scene(spec, tmp_path / "large", block_px=1024)
    np.testing.assert_array_equal(_read(small[0]), _read(large[0]))
    np.testing.assert_array_equal(_read(small[1]), _read(large[1]))


def test_regimes_differ_in_colour(tmp_path: Path) -> None:
    specs = {name: _spec(name=name, regime=name, width=256, height=256) for name in REGIMES}
    means = _pixels_per_regime(specs, tmp_path)
    assert len(REGIMES) >= 6
    names = sorted(means)
    gaps = [np.abs(means[a] - means[b]).max() for i, a in enumerate(names) for b in names[i + 1:]]
    assert min(gaps) > 8, f"two regimes have nearly the same mean colour: {means}"
    green, snow = means["tropical-suburban"], means["snow-rural"]
    assert green[1] > green[0] and green[1] > green[2]
    assert snow.min() > green.max() and snow.mean() > green.mean() + 50


def test_heldout_region_resembles_its_source_regime(tmp_path: Path) -> None:
    specs = {name: _spec(name=name, regime=name, width=256, height=256) for name in REGIMES}
    means = _pixels_per_regime(specs, tmp_path)
    for region, (source, epsg) in synth.HELDOUT_REGIONS.items():
        held = _spec(name=region, regime=source, region=region, split="test", seed=99, epsg=epsg,
                     width=256, height=256, perturb=synth.HELDOUT_PERTURB)
        held_mean = _pixels_per_regime({source: held}, tmp_path / region)[source]
        nearest = min(means, key=lambda name: np.linalg.norm(means[name] - held_mean))
        assert nearest == source, region


@pytest.mark.parametrize("regime", ["temperate-urban", "hazy-megacity", "desert-city"])
def test_urban_scenes_have_buildings(tmp_path: Path, regime: str) -> None:
    mask = _read(synth.write_scene(_spec(regime=regime, width=512, height=512), tmp_path)[1])
    assert 0.02 < (mask == 1).mean() < 0.6


def test_buildings_look_different_from_their_surroundings(tmp_path: Path) -> None:
    image_path, mask_path = synth.write_scene(_spec(regime="desert-city", width=512, height=512),
                                              tmp_path)
    image, mask = _read(image_path).astype(np.float64), _read(mask_path)
    roof, ground = image[:, mask == 1].mean(axis=1), image[:, mask == 0].mean(axis=1)
    assert np.abs(roof - ground).max() > 10


def test_uint16_scene_uses_11_bit_range_and_nir(tmp_path: Path) -> None:
    spec = _spec(dtype="uint16", bands=4, nodata_collar=True, seed=4)
    image_path, mask_path = synth.write_scene(spec, tmp_path)
    ds = gdal.Open(str(image_path))
    assert ds.RasterCount == 4 and ds.GetRasterBand(1).DataType == gdal.GDT_UInt16
    assert ds.GetRasterBand(4).GetDescription() == "nir"
    image, mask = ds.ReadAsArray(), _read(mask_path)
    valid = image[:, mask != 255]
    assert valid.min() >= 1 and valid.max() <= 2047
    assert valid.max() > 255, "11-bit data should use more than the 8-bit range"


def test_tiny_archive_lists_train_and_test(tmp_path: Path) -> None:
    archive_path = synth.synth_archive(tmp_path / "arch", preset="tiny", seed=0)
    entries = json.loads(archive_path.read_text())
    assert {e["split"] for e in entries} == {"train", "test"}
    train = [e for e in entries if e["split"] == "train"]
    test = [e for e in entries if e["split"] == "test"]
    assert len(train) >= 6 and len({e["regime"] for e in train}) >= 3
    assert len(test) >= 2 and all(e["region"].startswith("heldout-") for e in test)
    assert not {e["region"] for e in test} & {e["region"] for e in train}
    keys = {"name", "image", "mask", "regime", "region", "split", "width", "height", "dtype",
            "bands", "epsg"}
    origins = set()
    for e in entries:
        assert keys <= set(e)
        ds = gdal.Open(str(archive_path.parent / e["image"]))
        assert (ds.RasterXSize, ds.RasterYSize, ds.RasterCount) == (e["width"], e["height"], e["bands"])
        assert ds.GetMetadataItem("RESFLOW_REGION") == e["region"]
        origins.add(ds.GetGeoTransform()[:4:3])
        assert gdal.Open(str(archive_path.parent / e["mask"])).RasterXSize == e["width"]
    # One archive, one projection (mixed CRS is refused by the engine); origins all differ.
    assert {e["epsg"] for e in entries} == {synth.ARCHIVE_EPSG}
    assert len(origins) == len(entries)
    mixed = synth.archive_specs("tiny", epsg=None)
    assert len({s.epsg for s in mixed}) >= 3


def test_archive_rerun_keeps_finished_scenes_and_redoes_partial_ones(tmp_path: Path) -> None:
    out = tmp_path / "arch"
    archive_path = synth.synth_archive(out, preset="tiny", seed=0)
    entries = json.loads(archive_path.read_text())
    kept, broken = out / entries[0]["image"], out / entries[1]["image"]
    kept_mtime = kept.stat().st_mtime_ns
    broken.unlink()                        # as if a crash hit between the two renames
    synth.synth_archive(out, preset="tiny", seed=0)
    assert kept.stat().st_mtime_ns == kept_mtime
    assert gdal.Open(str(broken)).RasterXSize == entries[1]["width"]


def test_presets_and_size_override() -> None:
    demo = synth.archive_specs("demo", seed=0)
    train = [s for s in demo if s.split == "train"]
    assert len(train) == 2 * len(REGIMES) and {s.regime for s in train} == set(REGIMES)
    test = [s for s in demo if s.split == "test"]
    assert {s.region for s in test} == set(synth.EVAL_REGIONS)
    assert all(sum(s.region == r for s in test) >= 4 for r in synth.EVAL_REGIONS)
    assert all(s.width == s.height == 1024 for s in train)
    assert all(s.width == s.height == synth.EVAL_SCENE_PX for s in test)
    (large,) = synth.archive_specs("large", size_px=3000)
    assert large.width == large.height == 3000
    assert synth.archive_specs("demo", seed=1)[0].seed != demo[0].seed
    assert all(s.width == 64 for s in synth.archive_specs("tiny", size_px=64))


def test_bad_inputs_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="preset"):
        synth.archive_specs("huge")
    with pytest.raises(ConfigError, match="regime"):
        _spec(regime="moon")
    with pytest.raises(ConfigError, match="dtype"):
        _spec(dtype="float32")
    with pytest.raises(ConfigError, match="split"):
        _spec(split="validation")
    with pytest.raises(ConfigError, match="bands"):
        dataclasses.replace(_spec(), bands=5)


def test_write_raster_from_array_round_trip(tmp_path: Path) -> None:
    data = np.arange(2 * 40 * 30, dtype=np.uint16).reshape(2, 40, 30)
    geotransform = (300000.0, 0.5, 0.0, 4000000.0, 0.0, -0.5)
    path = synth.write_raster_from_array(tmp_path / "chw.tif", data, 32612, geotransform, 0)
    ds = gdal.Open(str(path))
    np.testing.assert_array_equal(ds.ReadAsArray(), data)
    assert ds.GetGeoTransform() == geotransform and ds.GetRasterBand(2).GetNoDataValue() == 0
    hw = synth.write_raster_from_array(tmp_path / "hw.tif", np.ones((5, 7), np.float32), 32612,
                                       geotransform, None)
    ds = gdal.Open(str(hw))
    assert ds.RasterCount == 1 and ds.GetRasterBand(1).GetNoDataValue() is None
    np.testing.assert_array_equal(ds.ReadAsArray(), np.ones((5, 7), np.float32))


def test_unseen_regime_looks_unlike_every_training_regime(tmp_path: Path) -> None:
    specs = {name: _spec(name=name, regime=name, width=256, height=256) for name in REGIMES}
    means = _pixels_per_regime(specs, tmp_path)
    unseen = _spec(name="unseen", regime=synth.UNSEEN_REGIME, region="heldout-unseen",
                   split="test", width=256, height=256)
    u = _pixels_per_regime({"u": unseen}, tmp_path / "u")["u"]
    assert synth.UNSEEN_REGIME not in REGIMES
    assert min(np.abs(means[n] - u).max() for n in means) > 20, (u, means)
