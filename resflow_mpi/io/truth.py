"""Ground truth for evaluation: the label raster of a scene, read by window (0/1, 255 ignore)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from osgeo import gdal

from ..errors import InputError
from .gdalenv import ensure_configured


def mask_path_for(scene_path: str) -> str:
    """Ground truth beside a scene: <name>_mask.tif."""
    p = Path(scene_path)
    return str(p.with_name(p.stem + "_mask.tif"))


def require_truth(scenes: Sequence[Any]) -> None:
    """One line before any work when a scene to evaluate has no ground truth."""
    missing = [s.path for s in scenes if not Path(mask_path_for(s.path)).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"{missing[0]}{more}: no ground truth to evaluate against (expected "
                         f"{Path(mask_path_for(missing[0])).name} beside the scene); evaluate "
                         "needs labelled scenes")


class TruthReader:
    """Windows of one scene's ground-truth raster on the scene's pixel grid."""

    def __init__(self, scene: Any):
        self.path = mask_path_for(scene.path)
        ensure_configured()
        try:
            self._ds = gdal.OpenEx(self.path, gdal.OF_RASTER | gdal.OF_READONLY)
        except RuntimeError as exc:
            raise InputError(f"{self.path}: ground truth unreadable "
                             f"({str(exc).strip().splitlines()[0]})") from None
        if (self._ds.RasterXSize, self._ds.RasterYSize) != (scene.width, scene.height):
            raise InputError(f"{self.path}: ground-truth size {self._ds.RasterXSize}x"
                             f"{self._ds.RasterYSize} differs from its scene's "
                             f"{scene.width}x{scene.height}")

    def read(self, col: int, row: int, width: int, height: int) -> np.ndarray:
        return np.asarray(self._ds.ReadAsArray(col, row, width, height), np.uint8)

    def close(self) -> None:
        self._ds = None
