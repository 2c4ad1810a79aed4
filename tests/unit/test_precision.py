"""Numerics of the stages: embedding and hashing stay float32 whatever ``inference.autocast`` says,
so a tile's bucket does not depend on the segmentation precision; autocast and compile are config
choices with clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import ConfigError
from resflow_mpi.galleries import ModelGallery
from resflow_mpi.stages import TileStages, segment_precision

from stage_tiles import balanced_models, codes_of, scene_tiles

TILE_PX = 64


@pytest.fixture(scope="module")
def tiles() -> np.ndarray:
    return scene_tiles(256, 4, TILE_PX)


def test_bucket_codes_under_bf16_autocast_equal_float32(unit_gallery: Path, tiles: np.ndarray) -> None:
    cpu = torch.device("cpu")
    models = balanced_models(ModelGallery(unit_gallery).stage_models(cpu), tiles)
    fp32 = TileStages(models, cpu, batch_size=8, autocast="none")
    bf16 = TileStages(models, cpu, batch_size=8, autocast="bf16")
    assert (fp32.precision, bf16.precision) == ("none", "bf16")
    codes32, buckets32 = codes_of(fp32, tiles)
    codes16, buckets16 = codes_of(bf16, tiles)
    np.testing.assert_array_equal(codes16, codes32)
    np.testing.assert_array_equal(buckets16, buckets32)
    assert len(np.unique(codes32, axis=0)) >= 16 and len(np.unique(buckets32)) == 2
    # The comparison can fail: the same networks under bf16 autocast flip hash bits.
    x = torch.from_numpy(tiles)
    with torch.inference_mode():
        exact = models.hash_head(models.extractor(x)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rough = models.hash_head(models.extractor(x)[0]).float()
    assert ((exact > 0) != (rough > 0)).any()


def test_segmentation_runs_at_the_autocast_precision(unit_gallery: Path, tiles: np.ndarray) -> None:
    cpu = torch.device("cpu")
    models = ModelGallery(unit_gallery).stage_models(cpu)
    x = tiles[:2]
    p32 = TileStages(models, cpu, 8, autocast="none", segment_batch_size=2).segment(0, x)
    p16 = TileStages(models, cpu, 8, autocast="bf16", segment_batch_size=2).segment(0, x)
    assert p16.dtype == np.float32 and p16.shape == p32.shape == (2, TILE_PX, TILE_PX)
    diff = np.abs(p16 - p32).max()
    assert 0 < diff < 0.05, f"bf16 probabilities differ from float32 by {diff}"


def test_segment_precision_choices() -> None:
    assert segment_precision("auto", "cuda") == "fp16"
    assert segment_precision("auto", "cpu") == "none"
    assert segment_precision("bf16", "cpu") == "bf16"
    assert segment_precision("none", "cuda") == "none"
    with pytest.raises(ValueError, match="auto, none, fp16 or bf16"):
        segment_precision("fp8", "cuda")


def test_autocast_and_compile_are_config_choices() -> None:
    cfg = config_from_dict({"inference": {"autocast": "bf16", "compile": True}})
    assert (cfg.inference.autocast, cfg.inference.compile) == ("bf16", True)
    assert config_from_dict({}).inference.autocast == "auto"
    with pytest.raises(ConfigError, match=r"inference.autocast.*fp8"):
        config_from_dict({"inference": {"autocast": "fp8"}}, "run.yaml")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'inference.mixed_precision' is now "
                                          r"'inference.autocast'"):
        config_from_dict({"inference": {"mixed_precision": True}}, "run.yaml")
