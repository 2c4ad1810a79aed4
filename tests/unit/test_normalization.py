"""Normalisation by dtype range, configured statistics and per-scene statistics."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resflow_mpi.config import config_from_dict
from resflow_mpi.io.raster import WindowReader, open_scene, scene_statistics, with_statistics
from resflow_mpi.pipeline import normalize_scene
from resflow_mpi.stages import normalize
from resflow_mpi.synth import write_raster_from_array
from resflow_mpi.tiling import make_tile

GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)


def test_range_mode_per_dtype() -> None:
    raw = np.full((3, 2, 2), 255, np.uint8)
    assert np.allclose(normalize(raw, "uint8"), 1.0)
    assert np.allclose(normalize(np.full((3, 2, 2), 2047, np.uint16), "uint16"), 1.0)
    assert np.allclose(normalize(raw, "uint8", value_max=510.0), 0.5)


def test_scene_mode_is_invariant_to_sensor_gain_and_offset(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(20, 120, (3, 300, 300)).astype(np.float64)
    base[:, :50, :] = 0  # nodata collar, excluded from the statistics
    bright = np.where(base > 0, base * 2 + 10, 0)
    a = write_raster_from_array(tmp_path / "a.tif", base.astype(np.uint16), 32637, GT, 0)
    b = write_raster_from_array(tmp_path / "b.tif", bright.astype(np.uint16), 32637, GT, 0)
    cfg = config_from_dict({"normalization": {"mode": "scene"}})
    infos = [with_statistics(open_scene(p), [1, 2, 3], "scene") for p in (a, b)]
    mean, std = infos[0].band_stats
    valid = base[:, 50:, :].reshape(3, -1)
    assert np.allclose(mean, valid.mean(1), rtol=0.02) and np.allclose(std, valid.std(1), rtol=0.05)
    tile = make_tile(0, 1, 1, 300, 300, 128, 8)
    x = [normalize_scene(WindowReader(i, [1, 2, 3]).read_tile(tile)[0], i, cfg.normalization)
         for i in infos]
    assert np.allclose(x[0], x[1], atol=0.03)
    assert abs(float(x[0].mean())) < 0.3


def test_scene_mode_needs_statistics(tmp_path: Path) -> None:
    p = write_raster_from_array(tmp_path / "a.tif", np.ones((3, 8, 8), np.uint8), 32637, GT, None)
    info = open_scene(p)
    cfg = config_from_dict({"normalization": {"mode": "scene"}})
    with pytest.raises(ValueError, match="statistics were not computed"):
        normalize_scene(np.ones((3, 4, 4), np.uint8), info, cfg.normalization)
    assert scene_statistics(info, [1, 2, 3])[1][0] == pytest.approx(1e-6)
