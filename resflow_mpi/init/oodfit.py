"""Fits the embedding reference of out-of-distribution routing (``ood.EmbeddingReference``) at init.

Windows are cut from the training scenes exactly as a run cuts them (``tiling.tile_px`` plus the
halo on each side, edge windows padded the same way), up to ``WINDOWS_PER_SCENE`` per scene
(seeded, windows without a valid pixel skipped) and embedded by the trained CEM. The reference
holds windows of the scenes the models were trained on; the calibration holds windows of the
held-out scenes (``init.holdout``), which neither the CEM nor the reference saw, so the
split-conformal threshold holds for new scenes.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..io.raster import SceneInfo, WindowReader
from ..ood import EmbeddingReference
from ..pipeline import scene_tasks
from ..processor import normalize_scene

WINDOWS_PER_SCENE = 32
NEIGHBOURS = 5


def fit_embedding_reference(embed: Callable[[np.ndarray], np.ndarray],
                            scenes: Sequence[SceneInfo],
                            held_out: Callable[[int, int, int], Optional[bool]], cfg: Any
                            ) -> tuple[Optional[EmbeddingReference], dict[str, Any]]:
    """The reference and a manifest record; (None, record with the reason) when the training
    scenes give fewer than two windows for either half. ``embed``: (n, C, S, S) windows ->
    (n, D) embeddings (the trained CEM, as init embeds its crops); ``held_out(scene, first_row,
    end_row)``: whether a tile's rows are held out (None: it straddles a held-out band, unused)."""
    t, seed = cfg.tiling, cfg.training.seed
    rng = np.random.default_rng(seed)
    embs: list[np.ndarray] = []
    scene_of: list[int] = []
    cal_of: list[bool] = []
    for i, s in enumerate(scenes):
        tasks = scene_tasks(i, s, t.tile_px, t.halo_px)
        # A seeded random order, read until WINDOWS_PER_SCENE windows with valid pixels (at most
        # four times as many reads): no whole-scene prescan, all-nodata windows skipped, windows
        # straddling a held-out band left out.
        order = [j for j in rng.permutation(len(tasks))[:4 * WINDOWS_PER_SCENE]
                 if held_out(i, tasks[j].tile.owned.row,
                             tasks[j].tile.owned.row + tasks[j].tile.owned.height) is not None]
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
            for j, _ in picked:
                o = tasks[j].tile.owned
                cal_of.append(bool(held_out(i, o.row, o.row + o.height)))
    cal = np.asarray(cal_of, bool)
    window_px = t.tile_px + 2 * t.halo_px
    record: dict[str, Any] = {"score": f"mean L2 distance to the {NEIGHBOURS} nearest reference "
                                       "embeddings, standardised", "k": NEIGHBOURS,
                              "window_px": window_px, "tile_px": t.tile_px, "halo_px": t.halo_px,
                              "reference_windows": int((~cal).sum()),
                              "calibration_windows": int(cal.sum()),
                              "calibration_scenes": len({scene_of[j] for j in np.flatnonzero(cal)})}
    if (~cal).sum() < 2 or cal.sum() < 2:
        record["skipped"] = (f"{int((~cal).sum())} reference and {int(cal.sum())} held-out "
                             f"window(s) of {window_px} px in the training scenes: no embedding "
                             "reference (inference.ood_routing: embedding unavailable)")
        return None, record
    e_all = np.concatenate(embs)
    ref = EmbeddingReference.fit(e_all[~cal], e_all[cal], NEIGHBOURS, window_px)
    record["calibration_score_quantiles"] = {
        str(q): round(ref.threshold(q), 4) for q in (0.9, 0.95, 0.99)}
    return ref, record
