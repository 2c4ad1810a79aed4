"""Model selection on held-out tiles: paired bootstrap gains, bucket acceptance, k, flagged tiles.

All decisions compare maps of the *same* held-out tiles (per-tile TP/FP/FN/TN counts, (n, 4)):
the IoU of summed counts, and its difference between two maps resampled with the same draws
(paired), scenes first and then tiles within them where the tiles come from several scenes. Pure numpy: ``workflow`` trains and counts, this module decides.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .metrics import iou

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
# Fewer held-out tiles than this: no evidence, the bucket maps with Mono.
MIN_EVIDENCE_TILES = 3
# Held-out tiles most unlike the training scenes (by the embedding score), as a share of all
# held-out tiles: the stand-in for the tiles routing flags when choosing their model.
FLAGGED_PROXY_SHARE = 0.2


@dataclass(frozen=True)
class Gain:
    """IoU of map A and map B on the same tiles, and A - B with its paired bootstrap interval."""

    tiles: int
    iou_a: Optional[float]
    iou_b: Optional[float]
    gain: Optional[float]
    low: Optional[float]
    high: Optional[float]

    def record(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def text(self) -> str:
        if self.gain is None or self.low is None or self.high is None:
            return "n/a"
        return f"{self.gain:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def _f(v: Any) -> Optional[float]:
    v = float(v)
    return None if np.isnan(v) else v


def resample_indices(n: int, groups: Optional[np.ndarray], samples: int, seed: int
                     ) -> list[np.ndarray]:
    """Bootstrap draws of tile indices: plain (tiles with replacement), or two-stage when
    ``groups`` (e.g. each tile's scene) holds two or more groups: groups with replacement, then
    tiles with replacement within each drawn group. Tiles of one scene share its acquisition, so
    resampling scenes first keeps their correlation in the interval."""
    rng = np.random.default_rng(seed)
    if groups is None or len(np.unique(groups)) < 2:
        return list(rng.integers(0, n, size=(samples, n)))
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    draws = []
    for _ in range(samples):
        picked = rng.integers(0, len(members), len(members))
        draws.append(np.concatenate([m[rng.integers(0, len(m), len(m))]
                                     for m in (members[i] for i in picked)]))
    return draws


def paired_gain(a: np.ndarray, b: np.ndarray, seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                confidence: float = CONFIDENCE, groups: Optional[np.ndarray] = None) -> Gain:
    """IoU(A) - IoU(B) over the same tiles, with the percentile interval of the paired bootstrap
    (``a``, ``b``: (n, 4) per-tile counts; ``groups``: each tile's scene for the two-stage
    bootstrap of ``resample_indices``)."""
    a, b = np.asarray(a, np.int64).reshape(-1, 4), np.asarray(b, np.int64).reshape(-1, 4)
    n = len(a)
    if n == 0:
        return Gain(0, None, None, None, None, None)
    ia, ib = iou(a.sum(0)), iou(b.sum(0))
    draws = resample_indices(n, groups, samples, seed)
    diff = np.array([iou(a[i].sum(0)) - iou(b[i].sum(0)) for i in draws])
    diff = diff[~np.isnan(diff)]
    if len(diff) == 0:
        return Gain(n, _f(ia), _f(ib), None, None, None)
    q = (1 - confidence) / 2
    return Gain(n, _f(ia), _f(ib), _f(ia - ib), float(np.quantile(diff, q)),
                float(np.quantile(diff, 1 - q)))


@dataclass(frozen=True)
class BucketVerdict:
    """Whether one bucket keeps its own model, with the evidence."""

    bucket: int
    train_tiles: int
    held_out_tiles: int
    gain: Gain            # bucket model - Mono on the bucket's held-out tiles
    kept: bool
    reason: str
    shifted: Optional[Gain] = None   # the same under acquisition shift
    confidence: float = CONFIDENCE

    def record(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "train_tiles": self.train_tiles,
                "held_out_tiles": self.held_out_tiles, "bucket_iou": self.gain.iou_a,
                "mono_iou": self.gain.iou_b, "gain": self.gain.gain,
                "gain_ci": [self.gain.low, self.gain.high],
                "shifted_gain": None if self.shifted is None else self.shifted.gain,
                "shifted_gain_ci": None if self.shifted is None else
                [self.shifted.low, self.shifted.high],
                "confidence": round(self.confidence, 5), "kept": self.kept,
                "reason": self.reason}


def family_confidence(tests: int, confidence: float = CONFIDENCE) -> float:
    """Per-test confidence so that ``tests`` intervals hold together with ``confidence``
    (Bonferroni): with several buckets tested, one of them clearing its bound by chance is
    likely at 95 % each."""
    return 1 - (1 - confidence) / max(1, tests)


def judge_bucket(bucket: int, train_tiles: int, own: Optional[np.ndarray], mono: np.ndarray,
                 min_gain: float, seed: int = 0, groups: Optional[np.ndarray] = None,
                 shifted: Optional[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = None,
                 confidence: float = CONFIDENCE) -> BucketVerdict:
    """Keep the bucket's model only where the lower bound of its paired gain over Mono on the
    bucket's held-out tiles is above ``min_gain``, and, with ``shifted`` (own, Mono counts and
    groups on the same tiles under acquisition shifts), there too (``own`` None: it has no
    model; ``groups``: the tiles' scenes, see ``resample_indices``; ``confidence``: of each
    interval, see ``family_confidence``)."""
    n = len(mono)
    if own is None:
        return BucketVerdict(bucket, train_tiles, n, paired_gain(mono, mono), False,
                             "no model of its own (too few training tiles)", None, confidence)
    g = paired_gain(own, mono, seed=seed, groups=groups, confidence=confidence)
    gs = (paired_gain(shifted[0], shifted[1], seed=seed, groups=shifted[2],
                      confidence=confidence) if shifted is not None and n else None)

    def verdict(kept: bool, reason: str) -> BucketVerdict:
        return BucketVerdict(bucket, train_tiles, n, g, kept, reason, gs, confidence)
    if n < MIN_EVIDENCE_TILES or g.low is None:
        return verdict(False, f"{n} held-out tile(s): too few to show a gain, maps with Mono")
    if g.low <= min_gain:
        return verdict(False, f"not shown better than Mono (gain lower bound {g.low:+.3f} <= "
                              f"{min_gain:+.3f}): maps with Mono")
    if gs is not None and (gs.low is None or gs.low <= min_gain):
        low = "n/a" if gs.low is None else f"{gs.low:+.3f}"
        return verdict(False, f"better than Mono as acquired, not under acquisition shift (gain "
                              f"lower bound {low} <= {min_gain:+.3f}): maps with Mono")
    return verdict(True, f"beats Mono: gain lower bound {g.low:+.3f}"
                         + (f" ({gs.low:+.3f} under shift)" if gs is not None else "")
                         + f" > {min_gain:+.3f}")


def gallery_counts(buckets: np.ndarray, kept: dict[int, np.ndarray], mono: np.ndarray) -> np.ndarray:
    """Per-tile counts of the gallery's map: a tile's bucket model where the bucket kept one
    (``kept``: bucket -> counts of that bucket model on *every* held-out tile), else Mono."""
    out = np.array(mono, copy=True)
    for b, counts in kept.items():
        sel = buckets == b
        out[sel] = counts[sel]
    return out


def verdict_table(verdicts: Sequence[BucketVerdict], codes: Sequence[str],
                  hash_map: Sequence[Optional[float]]) -> list[str]:
    """The per-bucket acceptance table, one line per bucket (init's log, report.html)."""
    conf = verdicts[0].confidence if verdicts else CONFIDENCE
    lines = ["bucket  code      train  held-out  hash mAP  bucket IoU  Mono IoU  "
             + f"gain [{100 * conf:.4g} %]".ljust(26) + "gain under shift".ljust(26) + "verdict"]
    for v, code, m in zip(verdicts, codes, hash_map):
        def f(x: Optional[float]) -> str:
            return "   n/a" if x is None else f"{x:6.3f}"
        lines.append(f"{v.bucket:>6}  {code[:8]:<8}  {v.train_tiles:>5}  {v.held_out_tiles:>8}  "
                     f"{f(m):>8}  {f(v.gain.iou_a):>10}  {f(v.gain.iou_b):>8}  "
                     f"{v.gain.text():<24}  "
                     f"{(v.shifted.text() if v.shifted is not None else 'n/a'):<24}  "
                     f"{'kept' if v.kept else 'Mono'}")
    return lines


def flagged_proxy(scores: np.ndarray, share: float = FLAGGED_PROXY_SHARE) -> np.ndarray:
    """Boolean (n,): the ``share`` of held-out tiles with the highest out-of-distribution scores
    (at least one where there are tiles)."""
    s = np.asarray(scores, np.float64)
    out = np.zeros(len(s), bool)
    if len(s) == 0:
        return out
    m = max(1, int(round(share * len(s))))
    out[np.argsort(-s, kind="stable")[:m]] = True
    return out


def choose_flagged_model(candidates: dict[str, np.ndarray], seed: int = 0,
                         groups: Optional[np.ndarray] = None) -> tuple[str, dict[str, Any]]:
    """The model for flagged tiles: Mono unless another candidate beats it on the flagged
    stand-in tiles with a paired-bootstrap lower bound above 0 (family-wise over the candidates;
    then the best such one).
    ``candidates``: name -> per-tile counts on those tiles; must hold "mono"."""
    mono = candidates["mono"]
    conf = family_confidence(len(candidates) - 1)
    table = {name: paired_gain(c, mono, seed=seed, groups=groups, confidence=conf)
             for name, c in candidates.items() if name != "mono"}
    better = {n: g for n, g in table.items() if g.low is not None and g.low > 0}
    choice = max(better, key=lambda n: better[n].gain or 0.0) if better else "mono"
    return choice, {"tiles": int(len(mono)), "mono_iou": _f(iou(mono.sum(0)))
                    if len(mono) else None,
                    "candidates": {n: g.record() for n, g in table.items()}, "chosen": choice}
