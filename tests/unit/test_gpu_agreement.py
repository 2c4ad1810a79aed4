"""CPU and GPU choose the same bucket for (almost) every tile: hashing runs in float32 on both, so
only the order of floating-point sums differs. Runs where torch sees a CUDA device."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_mpi.galleries import ModelGallery
from resflow_mpi.stages import TileStages

from stage_tiles import balanced_models, codes_of, scene_tiles

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device visible to torch (CPU-only machine)")]

MIN_AGREEMENT = 0.999


def test_cpu_and_gpu_choose_the_same_bucket(unit_gallery: Path) -> None:
    tiles = scene_tiles(1024, 4, 64)                       # 1024 tiles of four regimes
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    models = balanced_models(ModelGallery(unit_gallery).stage_models(cpu), tiles)
    codes_cpu, buckets_cpu = codes_of(TileStages(models, cpu, 8, autocast="none"), tiles)
    on_gpu = ModelGallery(unit_gallery).stage_models(gpu)
    on_gpu.extractor.load_state_dict(models.extractor.state_dict())
    on_gpu.hash_head.load_state_dict(models.hash_head.state_dict())
    on_gpu.centroids = models.centroids
    # fp16 segmentation (the GPU default) must not touch the codes.
    codes_gpu, buckets_gpu = codes_of(TileStages(on_gpu, gpu, 8, autocast="fp16"), tiles)
    assert len(np.unique(buckets_cpu)) == len(models.centroids), "tiles in too few buckets"
    agree = float((buckets_cpu == buckets_gpu).mean())
    bits = np.unpackbits(codes_cpu ^ codes_gpu, axis=1).sum()
    assert agree >= MIN_AGREEMENT, (f"CPU and GPU buckets agree on {agree:.4%} of {len(tiles)} "
                                    f"tiles ({bits} code bits differ)")
