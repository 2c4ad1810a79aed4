"""Tiles and informative random-weight stage models for the numerics tests (test_precision,
test_gpu_agreement).

An untrained hash head gives nearly the same code to every tile (its bias outweighs what the
random features tell tiles apart by), which would make any comparison of codes pass; as training
does, ``balanced_models`` makes every bit split the given tiles in half (many bits then sit near
zero, the hardest case for reduced precision).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from resflow_mpi.scenegen import REGIME_ORDER, SceneSpec, render_window
from resflow_mpi.stages import StageModels, TileStages, normalize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from make_fixtures import balance_hash_head  # noqa: E402


def scene_tiles(side_px: int, regimes: int, tile_px: int) -> np.ndarray:
    """Normalised (n, 3, tile_px, tile_px) float32 tiles of synthetic scenes of several regimes."""
    per_side = side_px // tile_px
    out = []
    for i, regime in enumerate(REGIME_ORDER[:regimes]):
        spec = SceneSpec(name=f"numerics-{i}", width=side_px, height=side_px, regime=regime,
                         region="numerics", split="test", seed=i + 1, epsg=32633,
                         origin_xy=(400000.0, 1000000.0), pixel_m=0.5)
        image, _ = render_window(spec, 0, 0, side_px, side_px)
        x = normalize(image, "uint8")
        out.append(x.reshape(3, per_side, tile_px, per_side, tile_px).transpose(1, 3, 0, 2, 4)
                   .reshape(-1, 3, tile_px, tile_px))
    return np.ascontiguousarray(np.concatenate(out))


def balanced_models(models: StageModels, tiles: np.ndarray) -> StageModels:
    """``models`` (on the CPU) with a hash head whose bits split ``tiles`` evenly and centroids
    taken from tiles spread over the set."""
    centroids = balance_hash_head(models.extractor, models.hash_head, tiles, len(models.centroids))
    return dataclasses.replace(models, centroids=centroids)


def codes_of(stages: TileStages, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes (n, K) and buckets (n,) of every tile, batch by batch."""
    codes, buckets = [], []
    for i in range(0, len(tiles), stages.batch_size):
        _, c, b = stages.embed_and_hash(tiles[i:i + stages.batch_size])
        codes.append(c)
        buckets.append(b)
    return np.concatenate(codes), np.concatenate(buckets)
