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
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError


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
    out = Path(args.out)
    records: list[ChipRecord] = []
    for b, tiles in picked.items():
        for tile in tiles:
            meta = gallery.scenes[int(gallery.scene[tile])]
            if "path" not in meta:
                raise InputError(f"{args.gallery}: the image gallery does not record scene paths; "
                                 "rebuild it with `resflow init`")
            col, row, width, height = (int(v) for v in gallery.window[tile])
            name = f"{meta['name']}_c{col}_r{row}.tif"
            chip = Path(f"bucket-{b:02d}") / name
            write_chip(meta["path"], (col, row, width, height), out / chip)
            records.append(ChipRecord(tile=int(tile), bucket=b,
                                      code=bits_to_str(gallery.codes[tile], gallery.n_bits),
                                      bucket_code=centroid.get(b, ""), scene=meta["name"],
                                      scene_path=meta["path"], window=(col, row, width, height),
                                      chip=str(chip)))
    index = write_chip_index(out / "chips.gpkg", records)
    counts = {b: len(t) for b, t in picked.items()}
    short = {b: n for b, n in counts.items() if n < args.per_bucket}
    summary = {"gallery": str(args.gallery), "per_bucket": args.per_bucket, "seed": args.seed,
               "index": str(index), "chips": len(records), "per_bucket_written": counts,
               "buckets_short": short,
               "scenes": sorted({r.scene for r in records})}
    (out / "sample.json").write_text(json.dumps(summary, indent=1))
    for b, n in counts.items():
        note = f" (the bucket has only {n} tile(s) in these scenes)" if b in short else ""
        print(f"bucket {b}: {n} chip(s){note}")
    print(f"{len(records)} chip(s) from {len(summary['scenes'])} scene(s) in {out}; "
          f"index {index} (open it in QGIS)")
    if short:
        print(f"[sample] {len(short)} bucket(s) gave fewer than {args.per_bucket} tiles",
              file=sys.stderr)
    return 0
