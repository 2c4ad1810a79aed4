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
    knee_score: list[float]             # distance of each point below the chord (the elbow)


def mean_intra_cluster_variance(x: np.ndarray, labels: np.ndarray) -> float:
    """Average over clusters of the mean squared distance of members to their centroid."""
    vals = []
    for c in np.unique(labels):
        m = x[labels == c]
        vals.append(float(((m - m.mean(0)) ** 2).sum(1).mean()))
    return float(np.mean(vals))


def choose_k(x: np.ndarray, k_min: int, k_max: int, linkage: str = "ward") -> ClusterChoice:
    """Cluster ``x`` for every k in [k_min, k_max]; pick the elbow of the variance curve.

    Intra-cluster variance always falls as k grows; the paper's choice corresponds to the k where
    it stops falling steeply. We take the point of the normalised curve farthest below the chord
    joining its ends (the "knee"), which is stable and needs no tuning.
    """
    k_max = min(k_max, len(x) - 1)
    ks = list(range(max(1, k_min), k_max + 1))
    if not ks:
        raise ValueError(f"cannot cluster {len(x)} embeddings into {k_min}..{k_max} clusters")
    labels_by_k, var = {}, []
    for k in ks:
        lab = (np.zeros(len(x), int) if k == 1
               else AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(x))
        labels_by_k[k] = lab
        var.append(mean_intra_cluster_variance(x, lab))
    v = np.asarray(var)
    if len(ks) < 3 or v[0] == v[-1]:
        best, score = ks[0], np.zeros(len(ks))
    else:
        kn = (np.asarray(ks) - ks[0]) / (ks[-1] - ks[0])
        vn = (v - v[-1]) / (v[0] - v[-1])
        score = (1 - kn) - vn   # chord from (0,1) to (1,0) minus curve: how far below the chord
        best = ks[int(np.argmax(score))]
    return ClusterChoice(best, labels_by_k[best], ks, var, [float(s) for s in score])


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
