"""How resflow names what it writes, so that input discovery can never take an output as a scene.

Every output raster of a run carries ``.resflow-`` in its name (``<scene>.resflow-mask.tif``,
``<scene>.resflow-buckets.tif``) and every output directory holds a marker file
``.resflow-output``. Scene discovery (globs, directories) skips both, and the names older releases
wrote (``*_mask_cog.tif``, ``*_buckets.tif``), and label rasters (``*_mask.tif``).
"""
from __future__ import annotations

import os
from pathlib import Path

OUTPUT_TAG = ".resflow-"
OUTPUT_MARKER = ".resflow-output"
# Names that are never scenes when found by a glob or a directory scan.
LABEL_SUFFIXES = ("_mask.tif", "_mask.tiff")
LEGACY_OUTPUT_SUFFIXES = ("_mask_cog.tif", "_buckets.tif")


# Output kinds of a scene: <scene>.resflow-mask.tif, .resflow-mask-cog.tif, .resflow-buckets.tif,
# .resflow-probability.tif (a COG)
MASK, COG, BUCKETS, PROBABILITY = "mask", "mask-cog", "buckets", "probability"


def output_file_name(stem: str, kind: str, ext: str = ".tif") -> str:
    """The name of one output of a scene, e.g. ``output_file_name("x", "mask")`` -> x.resflow-mask.tif."""
    return f"{stem}{OUTPUT_TAG}{kind}{ext}"


def is_output_name(name: str) -> bool:
    """True for file names resflow writes (current and older conventions)."""
    return OUTPUT_TAG in name or name.endswith(LEGACY_OUTPUT_SUFFIXES) or name.endswith(".partial")


def is_label_name(name: str) -> bool:
    """True for the conventional label raster names (``<scene>_mask.tif``)."""
    return name.lower().endswith(LABEL_SUFFIXES)


def mark_output_dir(out_dir: str | Path) -> Path:
    """Write the marker that tells scene discovery to skip ``out_dir`` (idempotent)."""
    marker = Path(out_dir) / OUTPUT_MARKER
    if not marker.exists():
        marker.write_text("resflow output directory: scene discovery skips everything below it\n")
    return marker


def inside_output_dir(path: str, top: str) -> bool:
    """True when a directory strictly below ``top`` on the way to ``path`` holds the output marker.

    ``top`` itself is not checked: a user may write outputs into the input folder itself, where the
    file names (not the marker) tell outputs from scenes.
    """
    top = os.path.realpath(top)
    d = os.path.dirname(os.path.realpath(path))
    while d.startswith(top + os.sep):
        if os.path.exists(os.path.join(d, OUTPUT_MARKER)):
            return True
        d = os.path.dirname(d)
    return False
