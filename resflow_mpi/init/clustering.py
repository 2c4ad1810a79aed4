"""Agglomerative clustering of embeddings with the bucket count chosen from the variance curve."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering


@dataclass
class ClusterChoice:
    """The chosen clustering and the curve that justified it."""

    k: int
    labels: np.ndarray                  # (N,) int
    ks: list[int]
    mean_intra_variance: list[float]    # average within-cluster variance per k
    knee_score: list[float]             # drop ratio V(k-1)/V(k): the elbow is its maximum


def mean_intra_cluster_variance(x: np.ndarray, labels: np.ndarray) -> float:
    """Average over clusters of the mean squared distance of members to their centroid."""
    vals = []
    for c in np.unique(labels):
        m = x[labels == c]
        vals.append(float(((m - m.mean(0)) ** 2).sum(1).mean()))
    return float(np.mean(vals))


def choose_k(x: np.ndarray, k_min: int, k_max: int, linkage: str = "ward",
             min_drop: float = 0.2) -> ClusterChoice:
    """Cluster ``x`` for every k in [k_min, k_max]; pick the elbow of the variance curve.

    The curve is the paper's average intra-cluster variance V(k). The bucket count is the largest
    k whose added cluster still cut V by more than ``min_drop`` (V(k-1) / V(k) > 1 + min_drop);
    past the elbow, splitting a real group only trims noise (a few percent per step). V(k_min - 1)
    is computed too, so k_min itself can be chosen; with no significant drop at all, k_min wins.
    """
    k_max = min(k_max, len(x) - 1)
    k_lo = max(2, k_min)
    if k_lo > k_max:
        raise ValueError(f"cannot cluster {len(x)} embeddings into {k_min}..{k_max} clusters")
    labels_by_k: dict[int, np.ndarray] = {}
    var: dict[int, float] = {}
    for k in range(k_lo - 1, k_max + 1):
        lab = (np.zeros(len(x), int) if k == 1
               else AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(x))
        labels_by_k[k] = lab
        var[k] = mean_intra_cluster_variance(x, lab)
    ks = list(range(k_lo, k_max + 1))
    ratio = [var[k - 1] / max(var[k], 1e-12) for k in ks]
    significant = [k for k, r in zip(ks, ratio) if r > 1.0 + min_drop]
    best = max(significant) if significant else k_lo
    return ClusterChoice(best, labels_by_k[best], ks, [var[k] for k in ks], ratio)


def soft_labels(x: np.ndarray, labels: np.ndarray, temperature: float = 0.5) -> np.ndarray:
    """Soft cluster memberships: softmax of negative distances to cluster centroids, scaled by the
    median distance so the temperature is unit-free."""
    cents = np.stack([x[labels == c].mean(0) for c in range(labels.max() + 1)])
    d = ((x[:, None, :] - cents[None]) ** 2).sum(-1)
    d = d / (np.median(d) + 1e-12)
    z = -d / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z)
    return (p / p.sum(1, keepdims=True)).astype(np.float32)
