"""Synthetic satellite archive (``resflow synth``): real tiled GeoTIFF scenes plus ground-truth
building masks and an ``archive.json`` manifest.

Rendering is pure (``resflow_mpi.scenegen``: regimes, scene specs, ``render_window``, preset
archives); writing is I/O (``resflow_mpi.io.scenewriter``: GeoTIFFs block by block). This module
assembles an archive from both and re-exports their public names for callers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from resflow_mpi.errors import OutputError
from resflow_mpi.io.scenewriter import (scene_is_complete, scene_paths, write_raster_from_array,
                                        write_scene)
from resflow_mpi.scenegen import (ALL_REGIMES, ARCHIVE_EPSG, BAND_NAMES, EVAL_REGIONS,
                                  EVAL_SCENE_PX, HELDOUT_PERTURB, HELDOUT_REGIONS, IMAGE_NODATA,
                                  MASK_BACKGROUND, MASK_BUILDING, MASK_NODATA, PRESETS, REGIME_ORDER,
                                  REGIMES, SINGLE_REGIME, SPLITS, TIFF_BLOCK_PX, UINT16_MAX_DN,
                                  UNSEEN_REGIME, UNSEEN_REGIMES, Colour, Regime, SceneSpec,
                                  archive_specs, perturb_regime, render_window, scene_metadata)

__all__ = ["ALL_REGIMES", "ARCHIVE_EPSG", "BAND_NAMES", "EVAL_REGIONS", "EVAL_SCENE_PX",
           "HELDOUT_PERTURB", "HELDOUT_REGIONS", "IMAGE_NODATA", "MASK_BACKGROUND",
           "MASK_BUILDING", "MASK_NODATA", "PRESETS", "REGIME_ORDER", "REGIMES", "SINGLE_REGIME",
           "SPLITS", "TIFF_BLOCK_PX", "UINT16_MAX_DN", "UNSEEN_REGIME", "UNSEEN_REGIMES", "Colour",
           "Regime", "SceneSpec", "archive_specs", "perturb_regime", "render_window",
           "scene_metadata", "scene_is_complete", "scene_paths", "write_raster_from_array",
           "write_scene", "synth_archive"]


def synth_archive(out_dir: str | Path, preset: str = "demo", seed: int = 0, dtype: str = "uint8",
                  size_px: int | None = None, bands: int = 3, mixed_crs: bool = False) -> Path:
    """Write all scenes and out_dir/archive.json (list of {name, image, mask, regime, region,
    split, width, height, dtype, bands, epsg}; image/mask relative to out_dir); returns the
    archive.json path. Scenes already written from the same spec are kept. ``mixed_crs``: each
    regime's scenes in that regime's own UTM zone (an archive spanning several CRSs)."""
    specs = [dataclasses.replace(s, bands=bands)
             for s in archive_specs(preset, seed, dtype, size_px,
                                    epsg=None if mixed_crs else ARCHIVE_EPSG)]
    out_dir = Path(out_dir).resolve()
    entries = []
    for spec in specs:
        if scene_is_complete(spec, out_dir):
            image_path, mask_path = scene_paths(spec, out_dir)
        else:
            image_path, mask_path = write_scene(spec, out_dir)
        # File names relative to archive.json keep the archive movable as one directory.
        entries.append({"name": spec.name, "image": image_path.name, "mask": mask_path.name,
                        "regime": spec.regime, "region": spec.region, "split": spec.split,
                        "width": spec.width, "height": spec.height, "dtype": spec.dtype,
                        "bands": spec.bands, "epsg": spec.epsg})
    archive_path = out_dir / "archive.json"
    tmp = archive_path.with_name(".archive.json.partial")
    try:
        tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, archive_path)
    except OSError as exc:
        raise OutputError(f"{archive_path}: cannot write ({exc.strerror})") from exc
    return archive_path
