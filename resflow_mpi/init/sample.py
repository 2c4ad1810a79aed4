"""`resflow sample`: stratified tiles for annotation, N per bucket, spread over scenes and space.

Labelling is the expensive part of building a model gallery; the image gallery already knows
which bucket every tile falls in, so a labelling campaign can ask for the same number of tiles
from every bucket instead of whatever the archive happens to hold most of. Selection
(:func:`select_stratified`) is pure numpy; the chips and their index are written by
:mod:`resflow_mpi.io.chips`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError, OutputError

SUMMARY_NAME = "sample.json"
INDEX_NAME = "chips.gpkg"
# The only files of an earlier sample that a new one removes: chips in their bucket folders.
CHIP_PATH = re.compile(r"bucket-[0-9]+/[^/]+\.tif")


def _spread_order(centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Farthest-point order of points (M, 2): a random first, then each next is the farthest from
    all chosen so far (ties: lowest index), so any prefix is spread over the scene."""
    m = len(centres)
    order = [int(rng.integers(m))]
    nearest = np.linalg.norm(centres - centres[order[0]], axis=1)
    for _ in range(m - 1):
        nxt = int(np.argmax(nearest))
        order.append(nxt)
        nearest = np.minimum(nearest, np.linalg.norm(centres - centres[nxt], axis=1))
    return np.array(order, dtype=np.int64)


def select_stratified(bucket: np.ndarray, scene: np.ndarray, window: np.ndarray, per_bucket: int,
                      seed: int, allowed: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
    """Up to ``per_bucket`` tile indices per bucket, spread over scenes, then over space.

    bucket, scene: (N,) ints; window: (N, 4) col, row, width, height in pixels; allowed: (N,)
    bool (tiles of the scenes asked for). Within a bucket the scenes take turns in a seeded random
    order, and each scene gives its tiles in farthest-point order of their window centres, so N
    tiles cover as many scenes and as much of each scene as the bucket has. Buckets with fewer
    tiles give all of them. Returns {bucket: indices} for every bucket present (sorted).
    """
    if per_bucket < 1:
        raise ValueError(f"per_bucket must be >= 1, got {per_bucket}")
    rng = np.random.default_rng(seed)
    ok = np.ones(len(bucket), bool) if allowed is None else np.asarray(allowed, bool)
    centres = window[:, :2] + window[:, 2:4] / 2.0
    picked: dict[int, np.ndarray] = {}
    for b in np.unique(bucket):
        members = np.flatnonzero((bucket == b) & ok)
        queues = []
        for s in rng.permutation(np.unique(scene[members])):
            tiles = members[scene[members] == s]
            queues.append(list(tiles[_spread_order(centres[tiles], rng)]))
        chosen: list[int] = []
        while len(chosen) < per_bucket and any(queues):
            for q in queues:
                if q and len(chosen) < per_bucket:
                    chosen.append(int(q.pop(0)))
        picked[int(b)] = np.array(chosen, dtype=np.int64)
    return picked


def _scene_filter(scenes: list[dict[str, Any]], wanted: Sequence[str]) -> np.ndarray:
    """(S,) bool: scenes named in ``wanted`` (name, file name or path); InputError names others."""
    keep = np.zeros(len(scenes), bool)
    for item in wanted:
        hits = [i for i, s in enumerate(scenes)
                if item in (s.get("name"), s.get("path"), Path(str(s.get("path", ""))).name)]
        if not hits:
            names = ", ".join(s.get("name", "?") for s in scenes[:10])
            raise InputError(f"--scenes {item}: not a scene of the image gallery; known scenes: "
                             f"{names}{' ...' if len(scenes) > 10 else ''}")
        keep[hits] = True
    return keep


def _bucket_codes(gallery_path: Path) -> dict[int, str]:
    """Bucket index -> centroid bitstring from the model gallery beside images.h5 (if any)."""
    manifest = gallery_path.parent / "manifest.json"
    try:
        buckets = json.loads(manifest.read_text())["buckets"]
        return {int(b["index"]): str(b["code"]) for b in buckets}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _previous_chips(out: Path) -> Optional[list[str]]:
    """Chip paths (relative to ``out``) an earlier `resflow sample` wrote into ``out``, from its
    summary and its index; None when ``out`` holds neither (the folder is not the tool's)."""
    from ..io.chips import read_chip_paths

    summary, index = out / SUMMARY_NAME, out / INDEX_NAME
    if not summary.is_file() and not index.is_file():
        return None
    chips: list[str] = []
    try:
        listed = json.loads(summary.read_text()).get("chip_files", []) if summary.is_file() else []
        chips.extend(str(c) for c in listed if isinstance(c, str))
    except (OSError, ValueError, AttributeError):
        pass
    if index.is_file():
        chips.extend(read_chip_paths(index))
    return chips


def prepare_out_dir(out: Path) -> None:
    """Make ``--out`` ready for a new sample: created when missing; in a folder an earlier
    `resflow sample` wrote, that call's chips, index and summary are removed (nothing else); a
    file, or a non-empty folder the tool did not write, is refused (InputError)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder; give a folder for the chips "
                         "(it is created when missing)")
    if out.is_dir() and any(out.iterdir()):
        previous = _previous_chips(out)
        if previous is None:
            raise InputError(f"--out {out}: folder is not empty and holds no {SUMMARY_NAME} of an "
                             "earlier `resflow sample`; give a new or empty folder")
        root = out.resolve()
        try:
            for rel in dict.fromkeys(previous):
                chip = (out / rel).resolve()
                if CHIP_PATH.fullmatch(rel) and chip.parent.parent == root and chip.is_file():
                    chip.unlink()
                    if not any(chip.parent.iterdir()):
                        chip.parent.rmdir()
            for name in (INDEX_NAME, SUMMARY_NAME):
                (out / name).unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"--out {out}: cannot remove the chips of the earlier sample "
                              f"({exc.strerror}: {exc.filename}); remove them or give another "
                              "folder") from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create the folder ({exc.strerror})") from None


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    try:
        (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
    except OSError as exc:
        raise OutputError(f"{out / SUMMARY_NAME}: cannot write ({exc.strerror}); check --out is "
                          "writable and has space") from None


def sample_command(args: argparse.Namespace) -> int:
    """`resflow sample GALLERY/images.h5 --per-bucket N [--scenes ...] --seed S --out DIR`."""
    from ..galleries import ImageGallery, bits_to_str
    from ..io.chips import ChipRecord, write_chip, write_chip_index

    if args.per_bucket < 1:
        raise InputError(f"--per-bucket {args.per_bucket}: ask for at least 1 tile per bucket")
    gallery = ImageGallery(args.gallery)
    allowed_scenes = (_scene_filter(gallery.scenes, args.scenes) if args.scenes
                      else np.ones(len(gallery.scenes), bool))
    picked = select_stratified(gallery.bucket, gallery.scene, gallery.window, args.per_bucket,
                               args.seed, allowed=allowed_scenes[gallery.scene])
    centroid = _bucket_codes(Path(args.gallery))
    planned: list[tuple[int, int, dict[str, Any], tuple[int, int, int, int], str]] = []
    for b, tiles in picked.items():
        for tile in tiles:
            meta = gallery.scenes[int(gallery.scene[tile])]
            if "path" not in meta:
                raise InputError(f"{args.gallery}: the image gallery does not record scene paths; "
                                 "rebuild it with `resflow init`")
            col, row, width, height = (int(v) for v in gallery.window[tile])
            chip = f"bucket-{b:02d}/{meta['name']}_c{col}_r{row}.tif"
            planned.append((int(tile), b, meta, (col, row, width, height), chip))
    out = Path(args.out)
    prepare_out_dir(out)
    # Written first, so a later call can remove these chips even if this one stops half-way.
    _write_summary(out, {"complete": False, "chip_files": [p[-1] for p in planned]})
    records: list[ChipRecord] = []
    for tile, b, meta, window, chip in planned:
        write_chip(meta["path"], window, out / chip)
        records.append(ChipRecord(tile=tile, bucket=b,
                                  code=bits_to_str(gallery.codes[tile], gallery.n_bits),
                                  bucket_code=centroid.get(b, ""), scene=meta["name"],
                                  scene_path=meta["path"], window=window, chip=chip))
    index = write_chip_index(out / INDEX_NAME, records)
    counts = {b: len(t) for b, t in picked.items()}
    short = {b: n for b, n in counts.items() if n < args.per_bucket}
    summary = {"gallery": str(args.gallery), "per_bucket": args.per_bucket, "seed": args.seed,
               "index": str(index), "chips": len(records), "per_bucket_written": counts,
               "buckets_short": short,
               "scenes": sorted({r.scene for r in records}), "complete": True,
               "chip_files": [r.chip for r in records]}
    _write_summary(out, summary)
    for b, n in counts.items():
        note = f" (the bucket has only {n} tile(s) in these scenes)" if b in short else ""
        print(f"bucket {b}: {n} chip(s){note}")
    print(f"{len(records)} chip(s) from {len(summary['scenes'])} scene(s) in {out}; "
          f"index {index} (open it in QGIS)")
    if short:
        print(f"[sample] {len(short)} bucket(s) gave fewer than {args.per_bucket} tiles",
              file=sys.stderr)
    return 0
