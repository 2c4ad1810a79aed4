"""Out-of-distribution scores for routing tiles to Mono: how unlike the training data a tile is.

A tile's score is the mean L2 distance from its CEM embedding to the ``k`` nearest *reference*
embeddings, each dimension standardised on the reference set. Reference and calibration embeddings
come from windows cut exactly as a run cuts them (``tiling.tile_px`` + 2 ``halo_px``) from the
training scenes: the scenes trained on give the neighbours, the held-out scenes (which neither the
networks nor the reference saw) give the scores of new in-distribution windows. The routing
threshold at quantile q is their split-conformal ceil(q (n + 1))-th smallest, so a new window of
the training distribution exceeds it with probability at most 1 - q.

Pure compute (numpy/torch): ``galleries`` stores and loads it, ``init.workflow`` fits it.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import torch


def conformal_threshold(scores: np.ndarray, quantile: float) -> float:
    """The ceil(q (n + 1))-th smallest of ``scores`` (capped at the largest; inf when empty)."""
    s = np.sort(np.asarray(scores, np.float64))
    if len(s) == 0:
        return float("inf")
    return float(s[min(len(s), int(np.ceil(quantile * (len(s) + 1)))) - 1])


@dataclass
class EmbeddingReference:
    """Standardised reference embeddings and the calibration windows' scores."""

    mean: np.ndarray         # (D,)
    scale: np.ndarray        # (D,)
    reference: np.ndarray    # (n_ref, D) float32, standardised
    calibration: np.ndarray  # (n_cal,) float32 scores of the calibration windows, ascending
    k: int
    window_px: int           # the run window the statistics hold for (tile_px + 2 halo_px)

    @classmethod
    def fit(cls, reference: np.ndarray, calibration: np.ndarray, k: int,
            window_px: int) -> "EmbeddingReference":
        ref = np.asarray(reference, np.float64)
        mean, scale = ref.mean(0), ref.std(0) + 1e-6
        out = cls(mean.astype(np.float32), scale.astype(np.float32),
                  ((ref - mean) / scale).astype(np.float32), np.zeros(0, np.float32),
                  int(min(k, len(ref))), int(window_px))
        out.calibration = np.sort(out.scores(np.asarray(calibration, np.float32)))
        return out

    def scores(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """(n,) float32 mean distance to the k nearest reference embeddings."""
        e = torch.as_tensor(np.asarray(embeddings, np.float32) if not isinstance(
            embeddings, torch.Tensor) else embeddings.detach().float().cpu())
        if len(e) == 0:
            return np.zeros(0, np.float32)
        z = (e - torch.from_numpy(self.mean)) / torch.from_numpy(self.scale)
        d = torch.cdist(z, torch.from_numpy(self.reference))
        return d.topk(self.k, dim=1, largest=False).values.mean(1).numpy().astype(np.float32)

    def threshold(self, quantile: float) -> float:
        return conformal_threshold(self.calibration, quantile)

    def arrays(self) -> dict[str, np.ndarray]:
        """For ``np.savez``: every field as an array."""
        return {"mean": self.mean, "scale": self.scale, "reference": self.reference,
                "calibration": self.calibration, "k": np.array(self.k),
                "window_px": np.array(self.window_px)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> "EmbeddingReference":
        return cls(np.asarray(a["mean"], np.float32), np.asarray(a["scale"], np.float32),
                   np.asarray(a["reference"], np.float32), np.asarray(a["calibration"], np.float32),
                   int(a["k"]), int(a["window_px"]))
