"""CEM (compact embedding model): a small conv encoder that turns a tile into features + a vector.

Every tile is first average-pooled to ``input_px`` square, so the cost per tile does not depend on
the tile size and all tiles of a run are embedded in the same space.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_MAP_PX = 8  # side of the feature map handed to the hash head


def _down_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Stride-2 3x3 conv then a 3x3 conv, each with BatchNorm + ReLU (halves H and W)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class FeatureExtractor(nn.Module):
    """Tile (N, C, H, W) -> feature map (N, feat_ch, 8, 8) and learned embedding (N, embed_dim)."""

    def __init__(self, in_channels: int, embed_dim: int = 32, input_px: int = 64,
                 width: int = 16) -> None:
        super().__init__()
        n_down = math.log2(input_px / FEATURE_MAP_PX) if input_px > 0 else -1.0
        if n_down < 1 or not n_down.is_integer():
            raise ValueError(f"input_px must be {FEATURE_MAP_PX} times a power of two >= 2 "
                             f"(16, 32, 64, 128, ...), got {input_px}")
        if in_channels < 1 or embed_dim < 1 or width < 1:
            raise ValueError(f"FeatureExtractor needs in_channels, embed_dim, width >= 1; got "
                             f"{in_channels}, {embed_dim}, {width}")
        self.spec: dict[str, Any] = {"kind": "feature_extractor", "arch": "cem_conv",
                                     "in_channels": in_channels, "embed_dim": embed_dim,
                                     "input_px": input_px, "width": width}
        self.in_channels = in_channels
        self.input_px = input_px
        self.width = width
        self.n_down = int(n_down)
        widths = [width * 2 ** level for level in range(self.n_down)]
        self.feat_ch = widths[-1]
        self.embed_dim = embed_dim
        self.encoder = nn.Sequential(*(_down_block(in_ch, out_ch) for in_ch, out_ch
                                       in zip([in_channels] + widths[:-1], widths)))
        self.embed = nn.Linear(self.feat_ch, embed_dim)

    def pool_input(self, x: torch.Tensor) -> torch.Tensor:
        """Average-pool a tile batch (N, C, H, W) to (N, C, input_px, input_px)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a tile batch of shape (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        return F.adaptive_avg_pool2d(x, self.input_px)

    def encode_pooled(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map and embedding of an already pooled batch (N, C, input_px, input_px)."""
        feature_map = self.encoder(pooled)
        embedding = self.embed(feature_map.mean(dim=(2, 3)))
        return feature_map, embedding

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature_map (N, feat_ch, 8, 8), embedding (N, embed_dim)) of a tile batch."""
        return self.encode_pooled(self.pool_input(x))


def _up_block(in_ch: int, out_ch: int) -> nn.Sequential:
    """Stride-2 transposed conv with BatchNorm + ReLU (doubles H and W)."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True),
    )


class ConvAutoencoder(nn.Module):
    """Trains a FeatureExtractor unsupervised: decodes its feature map back to the pooled tile."""

    def __init__(self, extractor: FeatureExtractor) -> None:
        super().__init__()
        self.extractor = extractor
        widths = [extractor.width * 2 ** level for level in range(extractor.n_down)]
        # Mirror of the encoder: feat_ch -> ... -> width, then one more doubling to input_px.
        up_widths = list(reversed(widths)) + [extractor.width]
        self.decoder = nn.Sequential(
            *(_up_block(in_ch, out_ch) for in_ch, out_ch in zip(up_widths[:-1], up_widths[1:])),
            # Linear output: the target is a normalised image with negative values.
            nn.Conv2d(extractor.width, extractor.in_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, target), both (N, C, input_px, input_px); loss = mse(recon, target)."""
        target = self.extractor.pool_input(x)
        feature_map, _ = self.extractor.encode_pooled(target)
        return self.decoder(feature_map), target


def build_feature_extractor(in_channels: int, embed_dim: int = 32, input_px: int = 64,
                            width: int = 16) -> FeatureExtractor:
    """Build the CEM feature extractor (feature map 8x8 with ``width * input_px / 16`` channels)."""
    return FeatureExtractor(in_channels=in_channels, embed_dim=embed_dim, input_px=input_px,
                            width=width)
