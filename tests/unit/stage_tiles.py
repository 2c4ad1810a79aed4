"""Tiles and informative random-weight stage models for the numerics tests (test_precision,
test_gpu_agreement).

An untrained hash head gives nearly the same code to every tile (its bias outweighs what the
random features tell tiles apart by), which would make any comparison of codes pass. As training
does, ``balanced_models`` rescales its last layer so that every bit splits the given tiles in
half, and takes the bucket centroids from the codes of tiles of different regimes: many bits then
sit near zero, the hardest case for reduced precision.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from resflow_mpi.models.hashing import codes_to_bits, pack_bits
from resflow_mpi.scenegen import REGIME_ORDER, SceneSpec, render_window
from resflow_mpi.stages import StageModels, TileStages, normalize


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


@torch.inference_mode()
def balanced_models(models: StageModels, tiles: np.ndarray) -> StageModels:
    """``models`` (on the CPU) with a hash head whose bits split ``tiles`` evenly and centroids
    taken from tiles spread over the set."""
    head = models.hash_head.eval()
    last = head.body[-1]
    features = models.extractor.eval()(torch.from_numpy(tiles))[0]
    z = head.body(features)
    centre, scale = z.median(dim=0).values, z.std(dim=0).clamp_min(1e-12)
    last.weight.div_(scale[:, None])
    last.bias.sub_(centre).div_(scale)
    codes = pack_bits(codes_to_bits(head(features))).numpy()
    n_buckets = len(models.centroids)
    picks = np.linspace(0, len(tiles) - 1, n_buckets).astype(int)
    return dataclasses.replace(models, centroids=np.ascontiguousarray(codes[picks]))


def codes_of(stages: TileStages, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes (n, K) and buckets (n,) of every tile, batch by batch."""
    codes, buckets = [], []
    for i in range(0, len(tiles), stages.batch_size):
        _, c, b = stages.embed_and_hash(tiles[i:i + stages.batch_size])
        codes.append(c)
        buckets.append(b)
    return np.concatenate(codes), np.concatenate(buckets)
