"""Fits the embedding reference of out-of-distribution routing (``ood.EmbeddingReference``) at init.

Windows are cut from the training scenes exactly as a run cuts them (``tiling.tile_px`` plus the
halo on each side, edge windows padded the same way), up to ``WINDOWS_PER_SCENE`` per scene
(seeded, windows without a valid pixel skipped), embedded by the trained CEM, and split by scene
into the reference and calibration halves (``ood.split_by_scene``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..io.raster import SceneInfo, WindowReader
from ..ood import EmbeddingReference, split_by_scene
from ..pipeline import scene_tasks
from ..processor import normalize_scene

WINDOWS_PER_SCENE = 32
NEIGHBOURS = 5


def fit_embedding_reference(embed: Callable[[np.ndarray], np.ndarray],
                            scenes: Sequence[SceneInfo], groups: Sequence[Optional[str]], cfg: Any
                            ) -> tuple[Optional[EmbeddingReference], dict[str, Any]]:
    """The reference and a manifest record; (None, record with the reason) when the training
    scenes give fewer than two windows for either half. ``embed``: (n, C, S, S) windows ->
    (n, D) embeddings (the trained CEM, as init embeds its crops)."""
    t, seed = cfg.tiling, cfg.training.seed
    rng = np.random.default_rng(seed)
    embs: list[np.ndarray] = []
    scene_of: list[int] = []
    for i, s in enumerate(scenes):
        tasks = scene_tasks(i, s, t.tile_px, t.halo_px)
        # A seeded random order, read until WINDOWS_PER_SCENE windows with valid pixels (at most
        # four times as many reads): no whole-scene prescan, all-nodata windows skipped; kept in
        # row order, which the split of a lone scene relies on.
        order = rng.permutation(len(tasks))[:4 * WINDOWS_PER_SCENE]
        picked: list[tuple[int, np.ndarray]] = []
        reader = WindowReader(s, cfg.scenes.bands)
        try:
            for j in order:
                raw, valid = reader.read_tile(tasks[j].tile)
                if valid.any():
                    picked.append((int(j), normalize_scene(raw, s, cfg.normalization)))
                if len(picked) == WINDOWS_PER_SCENE:
                    break
        finally:
            reader.close()
        if picked:  # embedded per scene: memory holds one scene's windows, never the archive's
            picked.sort(key=lambda p: p[0])
            embs.append(np.asarray(embed(np.stack([x for _, x in picked])), np.float32))
            scene_of += [i] * len(picked)
    # One group per region where the training scenes name regions, else one group for all.
    named = any(g for g in groups)
    group_of = [str(groups[i]) if named else "all" for i in scene_of]
    cal = split_by_scene(scene_of, group_of)
    window_px = t.tile_px + 2 * t.halo_px
    record: dict[str, Any] = {"score": f"mean L2 distance to the {NEIGHBOURS} nearest reference "
                                       "embeddings, standardised", "k": NEIGHBOURS,
                              "window_px": window_px, "tile_px": t.tile_px, "halo_px": t.halo_px,
                              "reference_windows": int((~cal).sum()),
                              "calibration_windows": int(cal.sum()),
                              "calibration_scenes": len({scene_of[j] for j in np.flatnonzero(cal)})}
    if (~cal).sum() < 2 or cal.sum() < 2:
        record["skipped"] = (f"only {len(scene_of)} window(s) of {window_px} px in the training "
                             "scenes: no embedding reference (inference.ood_routing: embedding "
                             "unavailable)")
        return None, record
    e_all = np.concatenate(embs)
    ref = EmbeddingReference.fit(e_all[~cal], e_all[cal], NEIGHBOURS, window_px)
    record["calibration_score_quantiles"] = {
        str(q): round(ref.threshold(q), 4) for q in (0.9, 0.95, 0.99)}
    return ref, record
