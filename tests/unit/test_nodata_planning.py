"""Planning without reading pixels: all-nodata tiles come from the block index (sparse GeoTIFFs)
or are found when read, and a tile with one valid pixel is always computed. Real GeoTIFFs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from osgeo import gdal

from resflow_mpi.config import load_config
from resflow_mpi.errors import InputError
from resflow_mpi.galleries import ModelGallery
from resflow_mpi.io.raster import has_valid_pixel, known_empty_tiles, open_scene
from resflow_mpi.pipeline import build_stages, build_tasks, plan_scenes
from resflow_mpi.processor import TileProcessor, list_source
from tests.conftest import write_config
from tests.unit.test_scene_semantics import BANDS, GT, _wkt

H, W, TILE_PX = 80, 112, 32  # 3 x 4 tiles; block 32 px, so the corner tile holds one block


def one_pixel_scene(path: Path, sparse: bool, at: tuple[int, int] = (H - 1, W - 1)) -> Path:
    """A uint8 scene of nodata 0 whose only valid pixel is ``at`` (row, col); with ``sparse``
    GDAL leaves every all-nodata block out of the file."""
    opts = ["TILED=YES", "BLOCKXSIZE=32", "BLOCKYSIZE=32", "COMPRESS=DEFLATE",
            f"SPARSE_OK={'YES' if sparse else 'NO'}"]
    ds = gdal.GetDriverByName("GTiff").Create(str(path), W, H, 3, gdal.GDT_Byte, opts)
    ds.SetProjection(_wkt(32637))
    ds.SetGeoTransform(GT)
    arr = np.zeros((H, W), np.uint8)
    arr[at] = 90
    for b in BANDS:
        ds.GetRasterBand(b).SetNoDataValue(0)
        ds.GetRasterBand(b).WriteArray(arr)
    ds = None
    return path


def _cfg(tmp_path: Path, gallery: Path, scene: Path, prescan: bool):
    return load_config(write_config(tmp_path / f"run-{prescan}.yaml",
                                    scenes={"inputs": [str(scene)]},
                                    models={"gallery": str(gallery)},
                                    tiling={"tile_px": TILE_PX, "halo_px": 4,
                                            "prescan_nodata": prescan},
                                    output={"dir": str(tmp_path / "out")}))


def _results(cfg, threads: int = 1) -> dict:
    plan = plan_scenes(cfg)
    tasks = build_tasks(plan, cfg)
    stages = build_stages(cfg, ModelGallery(cfg.models.gallery), torch.device("cpu"))
    proc = TileProcessor(plan.scenes, cfg, stages)
    out = {r.tile.index: r for r in proc.process(list_source(tasks, 4))}
    return {"tasks": tasks, "results": out, "stats": proc.stats}


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
def test_the_one_valid_corner_pixel_is_computed(tmp_path: Path, unit_gallery: Path,
                                                sparse: bool) -> None:
    scene = one_pixel_scene(tmp_path / "one.tif", sparse)
    got = _results(_cfg(tmp_path, unit_gallery, scene, prescan=False))
    corner = 11  # the last tile (row 2, column 3), a partial one
    planned_empty = {t.tile.index for t in got["tasks"] if t.empty}
    assert corner not in planned_empty
    assert planned_empty == (set(range(12)) - {corner} if sparse else set())
    results = got["results"]
    assert sorted(results) == list(range(12))
    for index, r in results.items():
        if index == corner:
            assert r.bucket >= 0                          # computed by a model
            assert r.mask[-1, -1] in (0, 1)               # the valid pixel has an answer
            assert (r.mask == 255).sum() == r.mask.size - 1
        else:
            assert r.bucket == -1 and (r.mask == 255).all()  # written as nodata, not computed
    assert (got["stats"].tiles_computed, got["stats"].tiles_empty) == (1, 11)


def test_found_when_read_equals_the_full_prescan(tmp_path: Path, unit_gallery: Path) -> None:
    scene = one_pixel_scene(tmp_path / "one.tif", sparse=False, at=(3, 40))
    lazy = _results(_cfg(tmp_path, unit_gallery, scene, prescan=False))["results"]
    full = _results(_cfg(tmp_path, unit_gallery, scene, prescan=True))["results"]
    assert sorted(lazy) == sorted(full)
    for i in lazy:
        a, b = lazy[i], full[i]
        assert a.bucket == b.bucket and np.array_equal(a.mask, b.mask)
        assert np.array_equal(a.code, b.code)


def test_block_index_needs_the_nodata_the_file_fills_with(tmp_path: Path) -> None:
    """Missing blocks read as the file's nodata (0); a config nodata of 5 makes them data."""
    scene = one_pixel_scene(tmp_path / "one.tif", sparse=True)
    assert known_empty_tiles(open_scene(scene, BANDS), TILE_PX, BANDS).sum() == 11
    from resflow_mpi.io.raster import PixelRules
    other = open_scene(scene, BANDS, rules=PixelRules(nodata=(5.0,)))
    assert not known_empty_tiles(other, TILE_PX, BANDS).any()


def test_a_sample_that_misses_the_one_pixel_falls_back_to_an_exact_read(tmp_path: Path) -> None:
    scene = one_pixel_scene(tmp_path / "one.tif", sparse=False, at=(45, 77))
    info = open_scene(scene, BANDS)
    assert has_valid_pixel(info, BANDS, sample_px=16)  # 8 x 8 windows of 2 px miss (45, 77)
    empty = one_pixel_scene(tmp_path / "none.tif", sparse=False)
    ds = gdal.Open(str(empty), gdal.GA_Update)
    for b in BANDS:
        ds.GetRasterBand(b).WriteArray(np.zeros((H, W), np.uint8))
    ds = None
    assert not has_valid_pixel(open_scene(empty, BANDS), BANDS, sample_px=16)


def test_an_entirely_nodata_sparse_scene_is_refused_at_planning(tmp_path: Path,
                                                                unit_gallery: Path) -> None:
    ds = gdal.GetDriverByName("GTiff").Create(str(tmp_path / "void.tif"), W, H, 3, gdal.GDT_Byte,
                                              ["TILED=YES", "SPARSE_OK=YES"])
    ds.SetProjection(_wkt(32637))
    ds.SetGeoTransform(GT)
    for b in BANDS:
        ds.GetRasterBand(b).SetNoDataValue(0)
    ds = None
    with pytest.raises(InputError, match="void.tif: scene is entirely nodata"):
        plan_scenes(_cfg(tmp_path, unit_gallery, tmp_path / "void.tif", prescan=False))


def test_a_large_scene_is_sampled_in_windows_inside_blocks(tmp_path: Path) -> None:
    """Larger than sample_px and without overviews: 8 x 8 windows, each inside one 32 px block,
    spread to the scene's far edges; the sample holds sample_px^2 pixels per band."""
    from resflow_mpi.io.raster import _open, _sample, _sample_windows
    path = one_pixel_scene(tmp_path / "s.tif", sparse=False)
    info = open_scene(path, BANDS)
    windows = _sample_windows(_open(str(path)), info, BANDS, sample_px=32)
    assert len(set(windows)) == 3 * 4  # only 3 x 4 blocks: one window per block
    for w in windows:
        assert w.width == w.height == 4
        assert w.col // 32 == (w.col + 3) // 32 and w.row // 32 == (w.row + 3) // 32
    assert max(w.col for w in windows) == 96 and max(w.row for w in windows) == 64
    values, valid = _sample(info, BANDS, sample_px=32)
    assert values.shape == (3, 12 * 16) and valid.shape == (12 * 16,)
