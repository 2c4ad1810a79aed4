"""Reader threads (parallel.reader_threads): the same results with one thread or several, and a
damaged block read in any thread surfaces as the one-line InputError of a serial read."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from osgeo import gdal

from resflow_mpi.config import load_config
from resflow_mpi.errors import InputError
from resflow_mpi.galleries import ModelGallery
from resflow_mpi.pipeline import build_stages, build_tasks, plan_scenes
from resflow_mpi.processor import TileProcessor, list_source
from tests.conftest import write_config
from tests.unit.test_scene_semantics import GT, _wkt

H, W = 96, 160  # 3 x 5 tiles of 32 px: four batches of 4


def scene(path: Path) -> Path:
    ds = gdal.GetDriverByName("GTiff").Create(str(path), W, H, 3, gdal.GDT_Byte,
                                              ["TILED=YES", "BLOCKXSIZE=32", "BLOCKYSIZE=32",
                                               "COMPRESS=DEFLATE"])
    ds.SetProjection(_wkt(32637))
    ds.SetGeoTransform(GT)
    rng = np.random.default_rng(5)
    for b in (1, 2, 3):
        ds.GetRasterBand(b).SetNoDataValue(0)
        ds.GetRasterBand(b).WriteArray(rng.integers(1, 256, (H, W), dtype=np.uint8))
    ds = None
    return path


def damage_block(path: Path, x: int, y: int) -> None:
    """Overwrite the compressed bytes of block (x, y) of band 1 with garbage."""
    ds = gdal.Open(str(path))
    band = ds.GetRasterBand(1)
    offset = int(band.GetMetadataItem(f"BLOCK_OFFSET_{x}_{y}", "TIFF"))
    size = int(band.GetMetadataItem(f"BLOCK_SIZE_{x}_{y}", "TIFF"))
    ds = None
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\x00" * (size // 2))


def run(tmp_path: Path, gallery: Path, path: Path, threads: int, damaged: bool = False) -> dict:
    cfg = load_config(write_config(tmp_path / f"run-{threads}.yaml",
                                   scenes={"inputs": [str(path)]},
                                   models={"gallery": str(gallery)},
                                   tiling={"tile_px": 32, "halo_px": 4},
                                   parallel={"reader_threads": threads},
                                   inference={"batch_size": 4, "prefetch_batches": 2},
                                   output={"dir": str(tmp_path / "out")}))
    plan = plan_scenes(cfg)
    if damaged:
        damage_block(path, 3, 2)  # after planning: the read finds it
    stages = build_stages(cfg, ModelGallery(cfg.models.gallery), torch.device("cpu"))
    proc = TileProcessor(plan.scenes, cfg, stages)
    return {r.tile.index: r for r in proc.process(list_source(build_tasks(plan, cfg), 4))}


def test_reader_threads_give_the_same_results(tmp_path: Path, unit_gallery: Path) -> None:
    path = scene(tmp_path / "s.tif")
    one = run(tmp_path, unit_gallery, path, 1)
    three = run(tmp_path, unit_gallery, path, 3)
    assert sorted(one) == sorted(three) == list(range(15))
    for i in one:
        assert one[i].bucket == three[i].bucket and np.array_equal(one[i].mask, three[i].mask)
        assert np.array_equal(one[i].code, three[i].code)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_damaged_block_is_one_input_error_line(tmp_path: Path, unit_gallery: Path,
                                                 threads: int) -> None:
    path = scene(tmp_path / "s.tif")
    with pytest.raises(InputError) as err:
        run(tmp_path, unit_gallery, path, threads, damaged=True)
    line = str(err.value)
    assert "\n" not in line
    # the first tile in order whose halo window holds the block, whichever thread read it
    assert line.startswith(f"{path}: read of window (60, 28, 40, 40) failed (")
    assert "X offset 3, Y offset 2" in line and line.endswith("the file may be truncated")


def test_reader_threads_auto() -> None:
    from resflow_mpi.processor import GPU_READER_THREADS, reader_threads
    assert reader_threads(0, torch.device("cpu")) == 1
    assert reader_threads(0, torch.device("cuda", 0)) == GPU_READER_THREADS > 1
    assert reader_threads(3, torch.device("cpu")) == reader_threads(3, torch.device("cuda")) == 3
