"""Scene-level validation: which training scenes (or scene areas) are held out for model selection.

Every choice init makes from data (checkpoints, early stopping, k, which bucket keeps its own
model, which model maps flagged tiles, the routing calibration) is made on held-out *scenes*:
crops of a scene the networks were trained on are not evidence of how they map a new scene.

Strata are regions (a manifest's ``region:``; scenes without one form one stratum). A stratum of
two or more scenes holds out ``share`` of its scenes (at least one, never all), chosen to spread
over appearance groups (per-scene band statistics of its crops, clustered) so that held-out scenes
cover the stratum's looks. A stratum of one scene cannot lose a whole scene: a band of rows at the
bottom of the scene is held out instead (crops never straddle it), and init says so.

Pure numpy: ``workflow`` calls it, ``data`` honours the row bands.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

# A row band holds out this share of a lone scene's rows (at least one crop height).
ROW_BAND_SHARE = 0.3


@dataclass(frozen=True)
class CropUnit:
    """Crops of one scene, or of a band of its rows, and whether they are held out."""

    scene: int
    rows: Optional[tuple[int, int]]   # [first, end) rows the crops must lie in; None: whole scene
    held_out: bool


@dataclass
class HoldoutPlan:
    """The held-out part of the training scenes."""

    held_out_scenes: list[int] = field(default_factory=list)   # whole scenes
    row_split_scenes: dict[int, int] = field(default_factory=dict)  # scene -> first held-out row
    notes: list[str] = field(default_factory=list)

    def units(self, n_scenes: int, heights: Sequence[int]) -> list[CropUnit]:
        """Crop units in scene order: whole scenes, or the training and held-out bands."""
        out = []
        for s in range(n_scenes):
            if s in self.row_split_scenes:
                cut = self.row_split_scenes[s]
                out += [CropUnit(s, (0, cut), False), CropUnit(s, (cut, int(heights[s])), True)]
            else:
                out.append(CropUnit(s, None, s in self.held_out_scenes))
        return out

    def record(self, paths: Sequence[str]) -> dict[str, Any]:
        """The gallery manifest's ``validation`` entry."""
        return {"held_out_scenes": [paths[s] for s in self.held_out_scenes],
                "row_split_scenes": {paths[s]: {"held_out_rows_from": r}
                                     for s, r in self.row_split_scenes.items()},
                "notes": list(self.notes)}


def stratum_of(region: Optional[str], path: str) -> str:
    """A scene's stratum: its region name, or one stratum for every scene without a name (a
    manifest's region defaults to the file stem, which names no region)."""
    from pathlib import PurePath
    if not region or region == PurePath(path).stem:
        return ""
    return str(region)


def appearance_groups(descriptors: np.ndarray, n_groups: int) -> np.ndarray:
    """(n,) group index of each scene by its descriptor (Ward clustering; all 0 for one group)."""
    n = len(descriptors)
    if n_groups <= 1 or n <= n_groups:
        return np.arange(n) if n <= n_groups else np.zeros(n, int)
    from sklearn.cluster import AgglomerativeClustering
    d = np.asarray(descriptors, np.float64)
    d = (d - d.mean(0)) / (d.std(0) + 1e-9)
    return AgglomerativeClustering(n_clusters=n_groups, linkage="ward").fit_predict(d)


def plan_holdout(strata: Sequence[str], heights: Sequence[int], share: float, tile_px: int,
                 seed: int, descriptors: Optional[np.ndarray] = None) -> HoldoutPlan:
    """Held-out scenes per stratum (see the module docstring).

    ``descriptors`` (n, d): per-scene appearance (e.g. band means and spreads); None: the
    lone-scene row bands only (the caller plans those before any crop is read)."""
    plan = HoldoutPlan()
    rng = np.random.default_rng([seed, 7])
    members: dict[str, list[int]] = {}
    for s, g in enumerate(strata):
        members.setdefault(g, []).append(s)
    for g, ss in members.items():
        name = f"region {g}" if g else "the archive"
        if len(ss) == 1:
            s = ss[0]
            band = max(tile_px, int(round(heights[s] * ROW_BAND_SHARE)))
            if heights[s] - band < tile_px:
                plan.notes.append(f"{name}: its one scene ({heights[s]} rows) is too small to hold "
                                  f"out {tile_px}-px crops; nothing of it is held out")
                continue
            plan.row_split_scenes[s] = int(heights[s] - band)
            plan.notes.append(f"{name}: one training scene, so its bottom {band} rows are held out "
                              "instead of a whole scene (weaker evidence: same scene, other area)")
            continue
        if descriptors is None:
            continue
        n_val = int(min(len(ss) - 1, max(1, round(share * len(ss)))))
        groups = appearance_groups(descriptors[ss], n_val)
        picked = [int(rng.choice([s for s, gg in zip(ss, groups) if gg == c]))
                  for c in range(n_val)]
        plan.held_out_scenes += sorted(picked)
    plan.held_out_scenes.sort()
    return plan


def scene_descriptors(x: np.ndarray, scene_of: np.ndarray, n_scenes: int) -> np.ndarray:
    """(n_scenes, 2 C) band means and standard deviations of each scene's crops (zeros where a
    scene gave none)."""
    c = x.shape[1]
    out = np.zeros((n_scenes, 2 * c))
    for s in range(n_scenes):
        m = x[scene_of == s]
        if len(m):
            out[s, :c] = m.mean((0, 2, 3))
            out[s, c:] = m.std((0, 2, 3))
    return out
