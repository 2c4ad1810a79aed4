"""Agglomerative clustering of embeddings with the bucket count chosen from the variance curve."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from sklearn.cluster import AgglomerativeClustering


@dataclass
class ClusterChoice:
    """The chosen clustering and the curve that justified it."""

    k: int
    labels: np.ndarray                  # (N,) int
    ks: list[int]
    mean_intra_variance: list[float]    # average within-cluster variance per k
    knee_score: list[float]             # drop ratio V(k-1)/V(k) (1.0 for k = 1: nothing to cut)
    reason: str = ""                    # one line: why this k
    # k_min = 1: the same drop ratio on structureless reference data (None otherwise)
    reference_knee_score: Optional[list[float]] = None
    labels_by_k: dict[int, np.ndarray] = field(default_factory=dict)

    def candidates(self, n: int) -> list[int]:
        """Up to ``n`` bucket counts to train and compare on held-out scenes: the elbow's k,
        then the other k >= 2 by falling drop ratio (the variance curve as a pre-filter)."""
        others = sorted((k for k in self.labels_by_k if k >= 2 and k != self.k),
                        key=lambda k: (-self.knee_score[self.ks.index(k)], k))
        return ([self.k] + others)[:max(1, n)]


def mean_intra_cluster_variance(x: np.ndarray, labels: np.ndarray) -> float:
    """Average over clusters of the mean squared distance of members to their centroid."""
    vals = []
    for c in np.unique(labels):
        m = x[labels == c]
        vals.append(float(((m - m.mean(0)) ** 2).sum(1).mean()))
    return float(np.mean(vals))


def reference_knee_scores(x: np.ndarray, k_max: int, draws: int = 10,
                          seed: int = 0) -> dict[int, float]:
    """Mean drop ratio V(k-1)/V(k), k = 2..k_max, of Ward clustering on structureless data: Gaussian
    samples with the mean and covariance of ``x`` (the reference of the gap statistic). Even one
    elongated blob loses variance when split; this is how much it loses with no groups at all."""
    from scipy.cluster.hierarchy import fcluster, linkage
    rng = np.random.default_rng(seed)
    eigval, eigvec = np.linalg.eigh(np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]))
    scale = np.sqrt(np.clip(eigval, 0.0, None))
    ratios: dict[int, list[float]] = {k: [] for k in range(2, k_max + 1)}
    for _ in range(draws):
        ref = (rng.standard_normal(x.shape) * scale) @ eigvec.T
        tree = linkage(ref, "ward")
        var = {k: mean_intra_cluster_variance(ref, fcluster(tree, k, "maxclust"))
               for k in range(1, k_max + 1)}
        for k in ratios:
            ratios[k].append(var[k - 1] / max(var[k], 1e-12))
    return {k: float(np.mean(v)) for k, v in ratios.items()}


def choose_k(x: np.ndarray, k_min: int, k_max: int, linkage: str = "ward",
             min_drop: float = 0.2, seed: int = 0) -> ClusterChoice:
    """Cluster ``x`` for every k in [k_min, k_max]; pick the elbow of the variance curve.

    The curve is the paper's average intra-cluster variance V(k). The bucket count is the largest
    k whose added cluster still cut V by more than ``min_drop`` (V(k-1) / V(k) > 1 + min_drop);
    past the elbow, splitting a real group only trims noise (a few percent per step). V(k_min - 1)
    is computed too, so k_min itself can be chosen; with ``k_min >= 2`` and no significant drop,
    k_min is kept as a floor.

    ``k_min = 1`` also asks whether the tiles have any bucket structure: any cloud of points loses
    variance when split (an elongated one a lot), so a drop counts only when it beats the same
    split of structureless data of the same spread by ``min_drop``
    (V(k-1)/V(k) > (1 + min_drop) * reference, see :func:`reference_knee_scores`). When no k does,
    the honest answer is one bucket: the gallery is Mono alone.
    """
    k_max = min(k_max, len(x) - 1)
    k_lo = max(2, k_min)
    if k_min < 1 or (k_lo > k_max and k_min > 1) or len(x) < 2:
        raise ValueError(f"cannot cluster {len(x)} embeddings into {k_min}..{k_max} clusters")
    labels_by_k: dict[int, np.ndarray] = {}
    var: dict[int, float] = {}
    for k in range(k_lo - 1, k_max + 1):
        lab = (np.zeros(len(x), int) if k == 1
               else AgglomerativeClustering(n_clusters=k, linkage=linkage).fit_predict(x))
        labels_by_k[k] = lab
        var[k] = mean_intra_cluster_variance(x, lab)
    split_ks = list(range(k_lo, k_max + 1))
    ratio = {k: var[k - 1] / max(var[k], 1e-12) for k in split_ks}
    significant = [k for k in split_ks if ratio[k] > 1.0 + min_drop]
    ks = ([1] if k_min == 1 else []) + split_ks
    scores = [ratio.get(k, 1.0) for k in ks]
    reference: Optional[list[float]] = None
    if k_min == 1 and split_ks:
        ref = reference_knee_scores(x, k_max, seed=seed)
        reference = [ref.get(k, 1.0) for k in ks]
        beats = [k for k in split_ks if ratio[k] > (1.0 + min_drop) * ref[k]]
        if not beats:
            top = max(split_ks, key=lambda k: ratio[k] / ref[k])
            reason = (f"k = 1: no split cut the mean intra-cluster variance by more than "
                      f"{min_drop:.0%} beyond what it cuts in structureless data of the same "
                      f"spread (best: k = {top}, V({top - 1})/V({top}) = {ratio[top]:.2f} against "
                      f"{ref[top]:.2f}); one bucket, the gallery is Mono only")
            return ClusterChoice(1, labels_by_k[1], ks, [var[k] for k in ks], scores, reason,
                                 reference, labels_by_k)
    if significant:
        best = max(significant)
        reason = (f"k = {best}: the largest k whose added cluster cut the mean intra-cluster "
                  f"variance by more than {min_drop:.0%} (V({best - 1})/V({best}) = "
                  f"{ratio[best]:.2f} > {1 + min_drop:.2f})")
    elif k_min == 1 and not split_ks:
        best, reason = 1, "k = 1: k_max allows one bucket only; the gallery is Mono only"
    else:
        best = k_lo
        top = max(split_ks, key=lambda k: ratio[k])
        reason = (f"k = {best}: no split cut the mean intra-cluster variance by more than "
                  f"{min_drop:.0%} (best: V({top - 1})/V({top}) = {ratio[top]:.2f}); k_min is "
                  "the floor")
    return ClusterChoice(best, labels_by_k[best], ks, [var[k] for k in ks], scores, reason,
                         reference, labels_by_k)


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
