"""Evaluation metrics as pure functions: confusion counts, IoU/F1 and trivial baselines.

Counts are of the building class over valid pixels: a pixel counts when the truth is not ignore
(255), the prediction is not nodata (255) and the optional ``valid`` mask is True. The
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


def iou_f1(c: Mapping[str, int]) -> dict[str, Optional[float]]:
    """IoU and F1 of the building class from confusion counts (None when undefined: no building
    in truth and none predicted)."""
    tp, fp, fn = c["tp"], c["fp"], c["fn"]
    denom = tp + fp + fn
    return {"iou": tp / denom if denom else None, "f1": 2 * tp / (tp + denom) if denom else None}


def baseline_counts(c: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """Counts of the two trivial maps over the same valid pixels: all building, all background."""
    pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
    return {"all_building": {"tp": pos, "fp": neg, "fn": 0, "tn": 0},
            "all_background": {"tp": 0, "fp": 0, "fn": pos, "tn": neg}}


def baselines(c: Mapping[str, int]) -> dict[str, dict[str, Optional[float]]]:
    """IoU/F1 of predicting building everywhere and background everywhere (same valid pixels)."""
    return {name: iou_f1(bc) for name, bc in baseline_counts(c).items()}
