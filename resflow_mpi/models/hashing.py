"""Deep hashing: a head that maps CEM feature maps to binary codes, and packed-bit utilities.

Codes are packed like ``numpy.packbits`` (MSB first within each byte, zero padding at the end),
so packed codes can be stored in HDF5/NumPy and compared with a 256-entry popcount table.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

# Bound on the (rows, centroids, bytes) intermediate of hamming_distance, in elements.
_HAMMING_CHUNK_ELEMENTS = 1 << 22

_POPCOUNT_LUT = torch.tensor([bin(value).count("1") for value in range(256)], dtype=torch.uint8)
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class HashHead(nn.Module):
    """Feature map (N, feat_ch, h, w) -> relaxed codes (N, n_bits) in (-1, 1) via tanh.

    ``classifier`` (n_bits -> n_classes) is only used by training's soft-label loss; inference
    thresholds the relaxed codes with :func:`codes_to_bits`.
    """

    def __init__(self, feat_ch: int, n_bits: int, n_classes: int, hidden_ch: int = 64) -> None:
        super().__init__()
        if min(feat_ch, n_bits, n_classes, hidden_ch) < 1:
            raise ValueError(f"HashHead needs feat_ch, n_bits, n_classes, hidden_ch >= 1; got "
                             f"{feat_ch}, {n_bits}, {n_classes}, {hidden_ch}")
        self.spec: dict[str, Any] = {"kind": "hash_head", "arch": "hash_cnn", "feat_ch": feat_ch,
                                     "n_bits": n_bits, "n_classes": n_classes,
                                     "hidden_ch": hidden_ch}
        self.feat_ch = feat_ch
        self.n_bits = n_bits
        self.body = nn.Sequential(
            nn.Conv2d(feat_ch, hidden_ch, 3, padding=1, bias=False), nn.BatchNorm2d(hidden_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_ch, hidden_ch, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden_ch), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(hidden_ch, n_bits),
        )
        self.classifier = nn.Linear(n_bits, n_classes)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Relaxed codes (N, n_bits) in (-1, 1)."""
        if feature_map.dim() != 4 or feature_map.shape[1] != self.feat_ch:
            raise ValueError(f"expected a feature map of shape (N, {self.feat_ch}, h, w), "
                             f"got {tuple(feature_map.shape)}")
        return torch.tanh(self.body(feature_map))


def build_hash_head(feat_ch: int, n_bits: int, n_classes: int) -> HashHead:
    """Build the hash head for a CEM feature map with ``feat_ch`` channels."""
    return HashHead(feat_ch=feat_ch, n_bits=n_bits, n_classes=n_classes)


def codes_to_bits(relaxed: torch.Tensor) -> torch.Tensor:
    """Threshold relaxed codes (N, n_bits) to bits (uint8 0/1): bit = relaxed > 0."""
    return (relaxed > 0).to(torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack bits (N, n_bits), non-zero = 1, into (N, ceil(n_bits/8)) uint8 like numpy.packbits."""
    if bits.dim() != 2:
        raise ValueError(f"expected bits of shape (N, n_bits), got {tuple(bits.shape)}")
    n_rows, n_bits = bits.shape
    n_bytes = -(-n_bits // 8)
    padded = torch.zeros((n_rows, n_bytes * 8), dtype=torch.uint8, device=bits.device)
    padded[:, :n_bits] = bits != 0
    weights = _BIT_WEIGHTS.to(bits.device)
    # Each byte's weighted bits sum to at most 255, so the uint8 sum cannot overflow.
    return (padded.view(n_rows, n_bytes, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n_bits: int) -> torch.Tensor:
    """Inverse of pack_bits: (N, K) uint8 -> bits (N, n_bits) uint8 0/1."""
    _check_packed(packed, "packed")
    if not 0 <= n_bits <= packed.shape[1] * 8:
        raise ValueError(f"n_bits={n_bits} does not fit in {packed.shape[1]} packed bytes")
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(2) & weights).ne(0).to(torch.uint8)
    return bits.reshape(packed.shape[0], -1)[:, :n_bits]


def _check_packed(packed: torch.Tensor, name: str) -> None:
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"{name} must be a (rows, bytes) uint8 tensor, got "
                         f"{packed.dtype} {tuple(packed.shape)}")


def hamming_distance(packed_a: torch.Tensor, packed_b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances (N, M) int64 between packed codes (N, K) and (M, K)."""
    _check_packed(packed_a, "packed_a")
    _check_packed(packed_b, "packed_b")
    if packed_a.shape[1] != packed_b.shape[1]:
        raise ValueError(f"packed codes have {packed_a.shape[1]} and {packed_b.shape[1]} bytes; "
                         f"both sides must use the same n_bits")
    n_a, n_bytes = packed_a.shape
    n_b = packed_b.shape[0]
    lut = _POPCOUNT_LUT.to(packed_a.device)
    distances = torch.empty((n_a, n_b), dtype=torch.int64, device=packed_a.device)
    # Rows are processed in blocks so the (rows, M, K) XOR table stays bounded for big N x M.
    rows_per_chunk = max(1, _HAMMING_CHUNK_ELEMENTS // max(1, n_b * n_bytes))
    for start in range(0, n_a, rows_per_chunk):
        block = packed_a[start:start + rows_per_chunk]
        xor = torch.bitwise_xor(block.unsqueeze(1), packed_b.unsqueeze(0))
        # int64 indices: indexing with a uint8 tensor would be taken as a boolean mask.
        distances[start:start + block.shape[0]] = lut[xor.long()].sum(dim=2, dtype=torch.int64)
    return distances


def assign_buckets(packed_codes: torch.Tensor, packed_centroids: torch.Tensor) -> torch.Tensor:
    """Index (N,) int64 of each code's nearest centroid by Hamming distance.

    Ties go to the LOWEST centroid index, so bucket assignment is reproducible whatever the
    platform's argmin does with equal values.
    """
    if packed_centroids.dim() == 2 and packed_centroids.shape[0] == 0:
        raise ValueError("assign_buckets needs at least one centroid")
    distances = hamming_distance(packed_codes, packed_centroids)
    n_centroids = packed_centroids.shape[0]
    # distance * M + index has a unique minimum: the smallest distance, then the lowest index.
    order = torch.arange(n_centroids, dtype=torch.int64, device=distances.device)
    return torch.argmin(distances * n_centroids + order, dim=1)
