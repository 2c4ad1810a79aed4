"""Deep hashing: train the hash head on cluster soft labels, derive bucket centroid codes, mAP."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..models.hashing import HashHead, assign_buckets, codes_to_bits, hamming_distance, pack_bits
from .dataparallel import DataParallel, data_parallel_step


def train_hash_head(head: HashHead, fmaps: torch.Tensor, soft: np.ndarray, epochs: int,
                    batch_size: int, lr: float, seed: int,
                    dp: Optional[DataParallel] = None) -> list[float]:
    """Soft-label cross-entropy through the relaxed codes + quantisation + bit-balance losses.
    ``dp`` (init.dataparallel.DataParallel): each rank computes its share of every batch."""
    g = torch.Generator().manual_seed(seed)
    target = torch.from_numpy(soft)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    losses = []
    n = len(fmaps)
    head.train()

    def loss_of(fm: torch.Tensor, soft_target: torch.Tensor) -> torch.Tensor:
        h = head(fm)
        ce = -(soft_target * F.log_softmax(head.classifier(h), 1)).sum(1).mean()
        quant = ((h.abs() - 1) ** 2).mean()
        balance = (h.mean(0) ** 2).mean()
        return ce + 0.1 * quant + 0.05 * balance

    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            tot += data_parallel_step(head, opt, (fmaps[idx], target[idx]), loss_of, dp) * len(idx)
        losses.append(tot / n)
    head.eval()
    if dp is not None:
        dp.check_identical(head, "hash head")
    return losses


@torch.inference_mode()
def packed_codes(head: HashHead, fmaps: torch.Tensor) -> np.ndarray:
    """Packed binary codes (N, K) of feature maps."""
    return pack_bits(codes_to_bits(head(fmaps))).numpy()


def centroid_codes(codes_packed: np.ndarray, labels: np.ndarray, k: int, n_bits: int) -> np.ndarray:
    """Each cluster's centroid code: per-bit majority of its members (ties -> 1). Duplicate
    centroids get their least-agreed bit flipped so every bucket has a distinct code."""
    bits = np.unpackbits(codes_packed, axis=1)[:, :n_bits].astype(np.float64)
    cents = []
    for c in range(k):
        m = bits[labels == c].mean(0) if (labels == c).any() else np.full(n_bits, 0.5)
        code = (m >= 0.5).astype(np.uint8)
        while any((code == e).all() for e in cents):
            j = int(np.argmin(np.abs(m - 0.5) + 10 * np.array([
                any((np.where(np.arange(n_bits) == t, 1 - code, code) == e).all() for e in cents)
                for t in range(n_bits)])))
            code[j] ^= 1
            m[j] = 0.5 + 1e-6  # do not pick the same bit again
        cents.append(code)
    return np.packbits(np.stack(cents), axis=1)


def bucket_of(codes_packed: np.ndarray, centroids_packed: np.ndarray) -> np.ndarray:
    """Nearest centroid by Hamming distance (ties: lowest bucket)."""
    return assign_buckets(torch.from_numpy(codes_packed), torch.from_numpy(centroids_packed)).numpy()


def mean_average_precision(query_codes: np.ndarray, query_labels: np.ndarray,
                           db_codes: np.ndarray, db_labels: np.ndarray) -> float:
    """mAP of Hamming ranking: a database item is relevant when it shares the query's cluster.
    Ties in distance are ranked by database index (deterministic)."""
    d = hamming_distance(torch.from_numpy(query_codes), torch.from_numpy(db_codes)).numpy()
    aps = []
    for i in range(len(query_codes)):
        order = np.lexsort((np.arange(d.shape[1]), d[i]))
        rel = (db_labels[order] == query_labels[i]).astype(np.float64)
        if rel.sum() == 0:
            continue
        prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
        aps.append(float((prec * rel).sum() / rel.sum()))
    return float(np.mean(aps)) if aps else 0.0


def hamming_to_own_centroid(codes_packed: np.ndarray, centroids_packed: np.ndarray,
                            buckets: np.ndarray) -> np.ndarray:
    """Each code's Hamming distance (N,) int64 to the centroid of its bucket."""
    if len(codes_packed) == 0:
        return np.zeros(0, np.int64)
    d = hamming_distance(torch.from_numpy(codes_packed), torch.from_numpy(centroids_packed)).numpy()
    return d[np.arange(len(d)), buckets].astype(np.int64)
