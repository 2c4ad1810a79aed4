"""`resflow sample`: stratified tiles for annotation, N per bucket, spread over scenes and space.

Labelling is the expensive part of building a model gallery; the image gallery already knows
which bucket every tile falls in, so a labelling campaign can ask for the same number of tiles
from every bucket instead of whatever the archive happens to hold most of. Selection
(:func:`select_stratified`) is pure numpy; the chips and their index are written by
:mod:`resflow_mpi.io.chips`.

``--from-run OUT`` draws from a mapped archive instead ("what to label next"): every computed
tile of the run's mask store, stratified by bucket, the tiles flagged out of distribution
(bucket -2) and the tiles the models were least sure of (:func:`tile_confidence` over the stored
probabilities; a run needs ``inference.save_probabilities`` for it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError, OutputError
from ..tiling import Window, window_on_grid

SUMMARY_NAME = "sample.json"
INDEX_NAME = "chips.gpkg"
# The only files of an earlier sample that a new one removes: chips in their stratum folders.
CHIP_PATH = re.compile(r"(bucket-[0-9]+|flagged|low-confidence)/[^/]+\.tif")
FLAGGED_BUCKET = -2       # the store's bucket of tiles flagged out of distribution
# Pixels at or above this probability are building-ish: confidence is measured where the models
# see some building, since confident background dominates any tile otherwise.
BUILDINGISH_P = 0.25


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


def _write_sample(out: Path, records: Sequence[Any], summary: dict[str, Any]) -> Path:
    """Write each record's chip under ``out``, the GeoPackage index and ``sample.json`` (the
    summary's chip list goes first, so a later call can remove the chips of a call that stopped
    half-way); the index path."""
    from ..io.chips import write_chip, write_chip_index

    prepare_out_dir(out)
    _write_summary(out, {"complete": False, "chip_files": [r.chip for r in records]})
    for r in records:
        write_chip(r.scene_path, r.window, out / r.chip)
    index = write_chip_index(out / INDEX_NAME, records)
    _write_summary(out, {**summary, "index": str(index), "chips": len(records),
                         "scenes": sorted({r.scene for r in records}), "complete": True,
                         "chip_files": [r.chip for r in records]})
    return index


def sample_command(args: argparse.Namespace) -> int:
    """`resflow sample GALLERY/images.h5 --per-bucket N [--scenes ...] --seed S --out DIR`, or
    `resflow sample --from-run OUT --per-bucket N [--lowest M] --out DIR`."""
    from ..galleries import ImageGallery, bits_to_str
    from ..io.chips import ChipRecord

    if args.per_bucket < 1:
        raise InputError(f"--per-bucket {args.per_bucket}: ask for at least 1 tile per bucket")
    from_run = getattr(args, "from_run", None)
    if (args.gallery is None) == (from_run is None):
        raise InputError("resflow sample: give an image gallery (GALLERY/images.h5) or "
                         "--from-run OUT (a run's output folder), not both")
    if from_run is not None:
        return sample_from_run(args)
    gallery = ImageGallery(args.gallery)
    allowed_scenes = (_scene_filter(gallery.scenes, args.scenes) if args.scenes
                      else np.ones(len(gallery.scenes), bool))
    picked = select_stratified(gallery.bucket, gallery.scene, gallery.window, args.per_bucket,
                               args.seed, allowed=allowed_scenes[gallery.scene])
    centroid = _bucket_codes(Path(args.gallery))
    records: list[ChipRecord] = []
    for b, tiles in picked.items():
        for tile in tiles:
            meta = gallery.scenes[int(gallery.scene[tile])]
            if "path" not in meta:
                raise InputError(f"{args.gallery}: the image gallery does not record scene paths; "
                                 "rebuild it with `resflow init`")
            col, row, width, height = (int(v) for v in gallery.window[tile])
            records.append(ChipRecord(
                tile=int(tile), bucket=b, code=bits_to_str(gallery.codes[tile], gallery.n_bits),
                bucket_code=centroid.get(b, ""), scene=meta["name"], scene_path=meta["path"],
                window=(col, row, width, height),
                chip=f"bucket-{b:02d}/{meta['name']}_c{col}_r{row}.tif"))
    out = Path(args.out)
    counts = {b: len(t) for b, t in picked.items()}
    short = {b: n for b, n in counts.items() if n < args.per_bucket}
    index = _write_sample(out, records, {
        "gallery": str(args.gallery), "per_bucket": args.per_bucket, "seed": args.seed,
        "per_bucket_written": counts, "buckets_short": short})
    for b, n in counts.items():
        note = f" (the bucket has only {n} tile(s) in these scenes)" if b in short else ""
        print(f"bucket {b}: {n} chip(s){note}")
    print(f"{len(records)} chip(s) from {len({r.scene for r in records})} scene(s) in {out}; "
          f"index {index} (open it in QGIS)")
    if short:
        print(f"[sample] {len(short)} bucket(s) gave fewer than {args.per_bucket} tiles",
              file=sys.stderr)
    return 0


# -- what to label next: a mapped archive ---------------------------------------------------------
def tile_confidence(prob: np.ndarray, valid: np.ndarray) -> float:
    """How sure the models were of a tile: mean |p - 0.5| * 2 over its valid building-ish pixels
    (p >= BUILDINGISH_P), or over all its valid pixels when none is building-ish; NaN when no
    pixel is valid. 1: every pixel decided outright; 0: every pixel at p = 0.5."""
    p = prob.astype(np.float32)[valid]
    if p.size == 0:
        return float("nan")
    building = p[p >= BUILDINGISH_P]
    return float(np.mean(np.abs((building if building.size else p) - 0.5)) * 2.0)


@dataclass
class MappedTiles:
    """Every computed tile of a run: scene index, tile index, bucket, packed code, owned window
    (col, row, width, height) and confidence, one row per tile; and each scene's path."""

    scene: np.ndarray
    tile: np.ndarray
    bucket: np.ndarray
    code: np.ndarray
    window: np.ndarray
    confidence: np.ndarray
    scene_paths: list[str]


def mapped_tiles(out_dir: Path) -> tuple[MappedTiles, dict[str, Any]]:
    """The computed tiles of the run in ``out_dir`` (its mask store) and its run report.

    InputError (one line) when the folder holds no finished run, or its store kept no
    probabilities: a mask alone says nothing of how sure the models were."""
    from ..io.maskstore import MaskReader
    from ..report import load_run_report

    report = load_run_report(out_dir)
    h5 = Path(str(report.get("h5_path", out_dir / "masks.h5")))
    if not h5.is_file():
        h5 = out_dir / h5.name  # the output folder was moved
    cols_out: dict[str, list[np.ndarray]] = {k: [] for k in
                                            ("scene", "tile", "bucket", "code", "window", "conf")}
    paths: list[str] = []
    with MaskReader(str(h5)) as reader:
        for s in range(reader.n_scenes()):
            meta = reader.scene_meta(s)
            paths.append(meta.source_path)
            if not reader.has_probabilities(s):
                raise InputError(f"{h5}: the run kept no probabilities, and a mask alone does not "
                                 "say how sure the models were; rerun it with --restart "
                                 "--set inference.save_probabilities=true to sample by "
                                 "confidence")
            rec = reader.tile_records(s)
            tp, cols = meta.tile_px, meta.grid_cols
            conf = np.full(meta.grid_rows * cols, np.nan)
            windows = np.zeros((meta.grid_rows * cols, 4), np.int64)
            for r0, prob, mask in reader.iter_probability_rows(s, tp):
                row = r0 // tp
                for c in range(cols):
                    block = np.s_[:, c * tp:(c + 1) * tp]
                    conf[row * cols + c] = tile_confidence(prob[block], mask[block] != 255)
                    windows[row * cols + c] = (c * tp, r0, prob[block].shape[1], prob.shape[0])
            if meta.native is not None:  # mapped at scenes.gsd_m: chips come from the file
                grids = ((meta.width, meta.height), (meta.native.width, meta.native.height))
                windows = np.array([window_on_grid(Window(*map(int, w)), *grids)
                                    for w in windows], np.int64).reshape(-1, 4)
            keep = rec["done"].astype(bool) & (rec["bucket"] != -1)
            idx = np.flatnonzero(keep)
            for name, values in (("scene", np.full(len(idx), s)), ("tile", idx),
                                 ("bucket", rec["bucket"][idx].astype(np.int64)),
                                 ("code", rec["code"][idx]), ("window", windows[idx]),
                                 ("conf", conf[idx])):
                cols_out[name].append(values)
    if not paths or not sum(len(t) for t in cols_out["tile"]):
        raise InputError(f"{out_dir}: the run computed no tile yet; finish `resflow run` first")
    cat = {k: np.concatenate(v) for k, v in cols_out.items()}
    return MappedTiles(cat["scene"], cat["tile"], cat["bucket"], cat["code"], cat["window"],
                       cat["conf"], paths), report


def select_to_label(tiles: MappedTiles, per_bucket: int, lowest: int, seed: int
                    ) -> list[tuple[str, np.ndarray]]:
    """(stratum, row indices of ``tiles``): ``per_bucket`` tiles of each bucket and of the tiles
    flagged out of distribution, spread over scenes and space (:func:`select_stratified`), then
    the ``lowest`` least confident tiles not drawn yet."""
    picked = select_stratified(tiles.bucket, tiles.scene, tiles.window, per_bucket, seed)
    strata = [("flagged" if b == FLAGGED_BUCKET else f"bucket-{b:02d}", rows)
              for b, rows in sorted(picked.items(), key=lambda kv: (kv[0] < 0, kv[0]))]
    taken = np.zeros(len(tiles.bucket), bool)
    for _, rows in strata:
        taken[rows] = True
    candidates = np.flatnonzero(~taken & np.isfinite(tiles.confidence))
    order = candidates[np.argsort(tiles.confidence[candidates], kind="stable")]
    if lowest > 0 and len(order):
        strata.append(("low-confidence", order[:lowest]))
    return strata


def sample_from_run(args: argparse.Namespace) -> int:
    """`resflow sample --from-run OUT --per-bucket N [--lowest M] [--seed S] --out DIR`."""
    from ..galleries import bits_to_str
    from ..io.chips import ChipRecord

    lowest = args.per_bucket if args.lowest is None else args.lowest
    if lowest < 0:
        raise InputError(f"--lowest {lowest}: give 0 or more tiles of lowest confidence")
    out_run = Path(args.from_run)
    tiles, report = mapped_tiles(out_run)
    gallery = report.get("config", {}).get("models", {}).get("gallery") or ""
    centroid = _bucket_codes(Path(gallery) / "images.h5") if gallery else {}
    n_bits = int(report.get("config", {}).get("models", {}).get("hash_bits") or
                 tiles.code.shape[1] * 8)
    records = []
    for stratum, rows in select_to_label(tiles, args.per_bucket, lowest, args.seed):
        for i in rows:
            path = tiles.scene_paths[int(tiles.scene[i])]
            name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem) or "scene"
            col, row, width, height = (int(v) for v in tiles.window[i])
            b = int(tiles.bucket[i])
            records.append(ChipRecord(
                tile=int(tiles.tile[i]), bucket=b, code=bits_to_str(tiles.code[i], n_bits),
                bucket_code=centroid.get(b, ""), scene=name, scene_path=path,
                window=(col, row, width, height), chip=f"{stratum}/{name}_c{col}_r{row}.tif",
                stratum="bucket" if stratum.startswith("bucket-") else stratum,
                confidence=float(tiles.confidence[i])))
    out = Path(args.out)
    counts: dict[str, int] = {}
    for r in records:
        key = r.chip.split("/")[0]
        counts[key] = counts.get(key, 0) + 1
    index = _write_sample(out, records, {
        "from_run": str(out_run), "per_bucket": args.per_bucket, "lowest": lowest,
        "seed": args.seed, "per_stratum_written": counts,
        "tiles_mapped": int(len(tiles.tile)),
        "flagged_mapped": int((tiles.bucket == FLAGGED_BUCKET).sum())})
    for key, n in counts.items():
        print(f"{key}: {n} chip(s)")
    print(f"{len(records)} chip(s) to label from {len(tiles.tile)} mapped tile(s) of {out_run} "
          f"in {out}; index {index} (open it in QGIS)")
    return 0
