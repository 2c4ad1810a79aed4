"""Evaluation metrics as pure functions: confusion counts, IoU/F1 and the trivial baselines.

Counts are of the building class over valid pixels: a pixel counts when the truth is not ignore
(255), the prediction is not nodata (255) and the optional ``valid`` mask is True. The one
definition of IoU and F1 is ``iou``/``f1`` over count arrays (``..., 4`` in ``COUNT_KEYS``
order); training's validation (``iou_f1``) and ``resflow evaluate`` both call them. The
baselines come from the same counts, so a user sees what "good" means on their data: predicting
building everywhere scores IoU = building share; predicting background everywhere scores 0.
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

IGNORE = 255
COUNT_KEYS = ("tp", "fp", "fn", "tn")


def confusion_counts(pred: np.ndarray, truth: np.ndarray,
                     valid: Optional[np.ndarray] = None) -> dict[str, int]:
    """TP/FP/FN/TN of the building class; pred and truth hold 0/1 (255: nodata / ignore)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    v = (pred != IGNORE) & (truth != IGNORE)
    if valid is not None:
        v &= np.asarray(valid, bool)
    p, t = (pred == 1) & v, (truth == 1) & v
    tp = int((p & t).sum())
    fp = int(p.sum()) - tp
    fn = int(t.sum()) - tp
    tn = int(v.sum()) - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def add_counts(total: dict[str, int], part: Mapping[str, int]) -> dict[str, int]:
    """Accumulate confusion counts in place (missing keys start at 0); returns ``total``."""
    for k in COUNT_KEYS:
        total[k] = total.get(k, 0) + int(part.get(k, 0))
    return total


def iou(counts: np.ndarray) -> np.ndarray:
    """IoU of the building class over the last axis of counts (..., 4) in COUNT_KEYS order;
    NaN where undefined (no building in truth and none predicted)."""
    c = np.asarray(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, tp / np.maximum(den, 1), np.nan)


def f1(counts: np.ndarray) -> np.ndarray:
    """F1 (Dice) of the building class over the last axis of counts (..., 4); NaN where undefined."""
    c = np.asarray(counts)
    tp, fp, fn = c[..., 0], c[..., 1], c[..., 2]
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan)


def iou_f1(c: Mapping[str, int]) -> dict[str, Optional[float]]:
    """IoU and F1 of one set of confusion counts (None when undefined)."""
    row = np.array([c[k] for k in COUNT_KEYS], np.int64)
    out: dict[str, Optional[float]] = {}
    for name, fn in (("iou", iou), ("f1", f1)):
        v = float(fn(row))
        out[name] = None if np.isnan(v) else v
    return out


def baseline_counts(counts: np.ndarray) -> dict[str, np.ndarray]:
    """Counts (..., 4) of the two trivial maps over the same valid pixels as ``counts``:
    building everywhere ("all_building") and background everywhere ("all_background")."""
    c = np.asarray(counts)
    pos, neg = c[..., 0] + c[..., 2], c[..., 1] + c[..., 3]
    zeros = np.zeros_like(pos)
    return {"all_building": np.stack([pos, neg, zeros, zeros], -1),
            "all_background": np.stack([zeros, zeros, pos, neg], -1)}
