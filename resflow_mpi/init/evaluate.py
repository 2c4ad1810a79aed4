"""`resflow evaluate`: IoU / F1 per held-out region for RESFlow (bucket models), RESFlow with
out-of-distribution routing, Mono (and a wide Mono where the gallery has one), beside the trivial
baselines (all-building, all-background), with a bootstrap confidence interval over tiles and,
with ``--seeds N``, the mean and spread over N galleries trained with N seeds.

Runs the one pipeline (``pipeline.drive`` through any runner: tiles, halo, three stages) on the
labelled test scenes, once per model, into a counting sink that keeps each tile's confusion counts
(owned mask vs the ground-truth window), its bucket and its code's distance to the bucket centroid.
RESFlow with routing needs no pass of its own: a tile beyond its bucket's threshold
(``ModelGallery.ood_thresholds``) takes Mono's counts, every other tile RESFlow's, which is what
``inference.ood_routing: quantile`` computes (every tile's result is independent of its
batch-mates). The protocol is written up in evaluation.md at the repository root.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import RunConfig, explicit_keys, mark_explicit
from ..errors import InputError, OutputError, os_error_cause
from ..galleries import MANIFEST, ImageGallery, ModelGallery, resolve_run_config
from ..io.labels import TruthReader
from ..io.manifest import require_labels, scenes_for
from ..io.maskstore import TileResult
from ..io.outlock import OutputLock
from ..io.raster import prepare_scene
from ..pipeline import (Job, Runner, ScenePlan, build_tasks, check_output_dir,
                        discard_stale_outputs, finish_store)
from .metrics import baseline_counts, confusion_counts, f1, iou

# Model passes: (column name, bucket_override for pipeline.build_stages).
PASSES = (("resflow", "buckets"), ("mono", "mono"))
WIDE_PASS = ("mono_wide", "mono-wide")
# Every tile by the model of flagged tiles, when init chose one other than Mono.
FLAGGED_PASS = ("flagged", "flagged")
# Columns of every table, in order (baselines first).
COLUMNS = ("all_building", "all_background", "mono", "mono_wide", "resflow", "resflow_routed")
LABELS = {"all_building": "All-building", "all_background": "All-background", "mono": "Mono",
          "mono_wide": "Mono (wide)", "resflow": "RESFlow", "resflow_routed": "RESFlow+routing"}
BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
SEED_GALLERIES = "seed-galleries"  # under --out: galleries evaluate trains for --seeds


class CountingSink:
    """Per-tile confusion counts of the tiles this process computed (a local sink).

    ``tiles`` holds ``(scene, tile index, bucket, distance, tp, fp, fn, tn, score)`` per tile;
    ``distance`` is the tile code's Hamming distance to its bucket's centroid (-1 where not
    computed), ``score`` its embedding out-of-distribution score (NaN where not scored)."""

    kind = "local"

    def __init__(self, truth: TruthReader, centroids: Optional[np.ndarray] = None):
        self.truth = truth
        self.centroids = centroids
        self.tiles: list[tuple[int, ...]] = []

    def write_results(self, results: Sequence[TileResult], collective: bool = False,
                      n_calls: Optional[int] = None) -> None:
        for r in results:
            s, o = r.tile.scene, r.tile.owned
            c = confusion_counts(r.mask, self.truth.window(s, o.col, o.row, o.width, o.height))
            dist = -1
            if self.centroids is not None and 0 <= r.bucket < len(self.centroids):
                xor = np.bitwise_xor(np.asarray(r.code, np.uint8), self.centroids[r.bucket])
                dist = int(np.unpackbits(xor).sum())
            self.tiles.append((s, r.tile.index, int(r.bucket), dist,
                               c["tp"], c["fp"], c["fn"], c["tn"], float(r.ood_score)))

    def close(self) -> None:
        self.truth.close()


class MaskCountingSink:
    """Counts like :class:`CountingSink` and writes the same results into a mask store (a
    ``store`` sink: the runner applies its writer policy, collective rounds included)."""

    kind = "store"

    def __init__(self, store: Any, counter: CountingSink):
        self.store, self.counter = store, counter

    @property
    def tiles_written(self) -> int:
        return getattr(self.store, "tiles_written", 0)

    @property
    def bytes_written(self) -> int:
        return getattr(self.store, "bytes_written", 0)

    def write_results(self, results: Sequence[TileResult], collective: bool = False,
                      n_calls: Optional[int] = None) -> None:
        if self.store is not None:
            self.store.write_results(results, collective=collective, n_calls=n_calls)
        self.counter.write_results(results)


__all__ = ["CountingSink", "MaskCountingSink", "run_evaluate", "write_evaluation",
           "summarize_region"]


# -- per-tile counts -> tables ------------------------------------------------------------------
@dataclass
class RegionTiles:
    """One region's tiles (same order in every column): confusion counts (n, 4) per column, the
    tile keys and whether each tile was flagged out of distribution."""

    keys: list[tuple[int, int]]
    counts: dict[str, np.ndarray]
    flagged: np.ndarray
    buckets: np.ndarray


def region_tiles(per_pass: dict[str, list[tuple[Any, ...]]], regions: Sequence[str],
                 thresholds: Optional[np.ndarray] = None,
                 score_threshold: Optional[float] = None) -> dict[str, RegionTiles]:
    """Join the passes' per-tile records by tile; add the baselines and RESFlow+routing columns.

    Routing flags a computed tile whose embedding score exceeds ``score_threshold`` (when
    given: ``ood_routing: embedding``), else whose Hamming distance exceeds its bucket's entry of
    ``thresholds``; neither given: no tile is flagged. A flagged tile takes the counts of the
    model of flagged tiles (the "flagged" pass where the gallery has one other than Mono), as
    ``resflow run`` maps it."""
    rows = {name: {(t[0], t[1]): t for t in tiles} for name, tiles in per_pass.items()}
    keys = sorted(rows["resflow"])
    by_region: dict[str, list[tuple[int, int]]] = {}
    for key in keys:
        by_region.setdefault(regions[key[0]], []).append(key)
    out = {}
    for region, ks in by_region.items():
        counts = {name: np.array([rows[name][k][4:8] for k in ks], np.int64).reshape(-1, 4)
                  for name in rows}
        res = np.array([rows["resflow"][k][:8] for k in ks], np.int64).reshape(-1, 8)
        buckets, dist = res[:, 2], res[:, 3]
        if score_threshold is not None:
            scores = np.array([rows["resflow"][k][8] for k in ks], np.float64)
            flagged = (buckets >= 0) & (scores > score_threshold)
        elif thresholds is not None:
            flagged = (buckets >= 0) & (dist > thresholds[np.clip(buckets, 0, None)])
        else:
            flagged = np.zeros(len(ks), bool)
        counts["resflow_routed"] = np.where(flagged[:, None], counts.get("flagged", counts["mono"]),
                                            counts["resflow"])
        counts.update(baseline_counts(counts["mono"]))  # the same valid pixels as every column
        out[region] = RegionTiles(ks, counts, flagged, buckets)
    return out


def bootstrap_indices(n: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, n) tile indices drawn with replacement (seeded: the same draws for every column
    and seed, so differences between columns are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def summarize_region(seed_tiles: Sequence[RegionTiles], samples: int = BOOTSTRAP_SAMPLES,
                     confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Per column: IoU and F1 per seed, their mean and spread over seeds, and the bootstrap
    interval (over tiles) of the seed-mean IoU; the same for RESFlow(+routing) - Mono gaps."""
    n = len(seed_tiles[0].keys)
    if any(t.keys != seed_tiles[0].keys for t in seed_tiles):
        raise ValueError("seeds were evaluated on different tiles")
    idx = bootstrap_indices(n, samples)
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    cols = [c for c in COLUMNS if c in seed_tiles[0].counts]
    boot: dict[str, np.ndarray] = {}
    result: dict[str, Any] = {"tiles": n, "columns": {}}
    for col in cols:
        per_seed = np.stack([t.counts[col].sum(0) for t in seed_tiles])        # (S, 4)
        iou_s, f1_s = iou(per_seed), f1(per_seed)
        # (S, B, 4) -> (B,) seed-mean IoU of each resample
        resampled = np.stack([t.counts[col][idx].sum(1) for t in seed_tiles])
        boot[col] = np.nanmean(iou(resampled), axis=0) if n else np.zeros(0)
        result["columns"][col] = {
            "iou_per_seed": _clean(iou_s), "f1_per_seed": _clean(f1_s),
            "iou_mean": _nanstat(np.nanmean, iou_s), "f1_mean": _nanstat(np.nanmean, f1_s),
            "iou_sd": (_nanstat(lambda a: np.nanstd(a, ddof=1), iou_s)
                       if len(iou_s) > 1 else None),
            "iou_ci": _interval(boot[col], lo_q, hi_q)}
    for col in ("resflow", "resflow_routed", "mono_wide"):
        if col in boot:
            gap = boot[col] - boot["mono"]
            per_seed = np.array(result["columns"][col]["iou_per_seed"], float) - \
                np.array(result["columns"]["mono"]["iou_per_seed"], float)
            result.setdefault("gaps", {})[f"{col}-mono"] = {
                "iou_mean": _nanstat(np.nanmean, per_seed), "iou_ci": _interval(gap, lo_q, hi_q)}
    result["flagged_share_per_seed"] = [float(t.flagged.mean()) if n else 0.0 for t in seed_tiles]
    result["buckets_used_per_seed"] = [
        {str(b): int(c) for b, c in zip(*np.unique(t.buckets, return_counts=True))}
        for t in seed_tiles]
    return result


def _clean(a: np.ndarray) -> list[Optional[float]]:
    return [None if np.isnan(v) else float(v) for v in np.asarray(a, float)]


def _nanstat(fn: Any, a: np.ndarray) -> Optional[float]:
    a = np.asarray(a, float)
    if np.isnan(a).all():
        return None
    with np.errstate(invalid="ignore"):
        v = float(fn(a))
    return None if np.isnan(v) else v


def _interval(samples: np.ndarray, lo: float, hi: float) -> Optional[list[float]]:
    s = samples[~np.isnan(samples)]
    if len(s) == 0:
        return None
    return [float(np.quantile(s, lo)), float(np.quantile(s, hi))]


# -- running -----------------------------------------------------------------------------------
def evaluation_scenes(cfg: RunConfig) -> tuple[list[Any], list[Any], list[str]]:
    """The labelled scenes to evaluate, their labels and regions; an unlabelled archive or a bad
    label is a one-line error before any inference."""
    entries = require_labels(scenes_for(cfg, "evaluate"), cfg)
    scenes = [prepare_scene(e.path, cfg) for e in entries]
    labels = [e.label for e in entries]
    for warning in TruthReader(scenes, labels, cfg.labels).check_all():
        print(f"[evaluate] warning: {warning}", file=sys.stderr, flush=True)
    return scenes, labels, [e.region or Path(e.path).stem for e in entries]


def seed_configs(cfg: RunConfig, seeds: int) -> list[RunConfig]:
    """Seed i's configuration: training.seed + i, everything else as ``cfg`` (see
    ``seed_gallery`` for where its gallery is)."""
    keys = explicit_keys(cfg)
    out = []
    for i in range(seeds):
        scfg = dataclasses.replace(
            cfg, training=dataclasses.replace(cfg.training, seed=cfg.training.seed + i))
        out.append(mark_explicit(scfg, keys) if keys is not None else scfg)
    return out


def _with_gallery(cfg: RunConfig, gallery: Path) -> RunConfig:
    keys = explicit_keys(cfg)
    out = dataclasses.replace(cfg, models=dataclasses.replace(cfg.models, gallery=str(gallery)))
    return mark_explicit(out, keys) if keys is not None else out


def _gallery_matches(cfg: RunConfig) -> bool:
    """The gallery exists and was trained with this config's training section."""
    path = Path(cfg.models.gallery) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (m.get("training") == cfg.to_dict()["training"] and m.get("arch") == cfg.models.arch
            and m.get("preset") == cfg.models.preset)


def seed_gallery(scfg: RunConfig, out_dir: Path) -> tuple[RunConfig, bool]:
    """Where the gallery of seed ``scfg.training.seed`` is, and whether evaluate must train it.

    models.gallery when it was trained with exactly this training section (seed included); it
    is only read. Otherwise evaluate's own ``<out>/seed-galleries/seed<S>/``: reused when it
    matches, else trained afresh there. models.gallery is never written."""
    if _gallery_matches(scfg):
        return scfg, False
    own = out_dir / SEED_GALLERIES / f"seed{scfg.training.seed}"
    ocfg = _with_gallery(scfg, own)
    if _gallery_matches(ocfg):
        return ocfg, False
    if own.exists():
        if not (own / MANIFEST).is_file() and any(own.iterdir()):
            raise OutputError(f"{own}: holds files that are not a gallery evaluate trained; "
                              "move them away or use another --out")
        try:
            shutil.rmtree(own)  # evaluate's own gallery of another training section
        except OSError as exc:
            raise OutputError(f"{own}: cannot replace this seed gallery "
                              f"({os_error_cause(exc)})") from None
    return ocfg, True


def training_scenes_among(gallery_root: str | Path, scenes: Sequence[Any]) -> Optional[list[int]]:
    """Indices of ``scenes`` the gallery was trained on (its images.h5 lists its training
    scenes; compared by real path); None when the gallery has no images.h5 to tell."""
    path = Path(gallery_root) / "images.h5"
    if not path.is_file():
        return None
    trained = {os.path.realpath(s["path"]) for s in ImageGallery(path).scenes if s.get("path")}
    return [i for i, s in enumerate(scenes) if os.path.realpath(s.path) in trained]


def evaluate_gallery(cfg: RunConfig, runner: Runner, scenes: list[Any], labels: list[Any],
                     regions: list[str], out_dir: Path, write_masks: bool = False
                     ) -> Optional[tuple[dict[str, RegionTiles], dict[str, Any]]]:
    """Every pass over the test scenes with cfg's gallery; rank 0 gets the joined tiles. With
    ``write_masks`` the RESFlow and Mono passes also write their masks, exactly as ``resflow run``
    does, under ``<out>/masks/<pass>/<scene>.resflow-mask.tif``."""
    comm = runner.comm

    def check() -> RunConfig:
        g = ModelGallery(cfg.models.gallery)
        g.verify()
        return resolve_run_config(g, cfg)  # the gallery contract, as for `run`
    cfg = comm.root_call(check)
    if cfg.scenes.gsd_m is not None:  # the gallery's ground resolution (scenes.gsd_m)
        scenes = [s if s.native_grid is not None else prepare_scene(s.path, cfg) for s in scenes]
    gallery = ModelGallery(cfg.models.gallery)
    job = Job(cfg, ScenePlan(scenes, [None] * len(scenes)), gallery, out_dir, quiet=True)
    tasks = build_tasks(job.plan, cfg) if comm.is_root else []
    passes = (list(PASSES) + ([WIDE_PASS] if gallery.manifest.get("mono_wide") else [])
              + ([FLAGGED_PASS] if gallery.flagged_model() != "mono" else []))
    per_pass: dict[str, list[tuple[int, ...]]] = {}
    mask_files: dict[str, list[str]] = {}
    for name, override in passes:
        sink = CountingSink(TruthReader(scenes, labels, cfg.labels), gallery.centroids)
        if write_masks and name in ("resflow", "mono"):
            files = _map_with_masks(runner, job, tasks, sink, name, override)
            mask_files[name] = [p for i in sorted(files) for p in files[i]]
        else:
            runner.map_tiles(job, tasks, sink, override)
        sink.close()
        parts = comm.gather(sink.tiles)
        per_pass[name] = [t for part in parts or [] for t in part]
    if not comm.is_root:
        return None
    thresholds, score_threshold = None, None
    if cfg.inference.ood_routing == "embedding":
        score_threshold = gallery.embedding_threshold(
            cfg.inference.ood_quantile, cfg.tiling.tile_px + 2 * cfg.tiling.halo_px)[1]
    elif all("distance_histogram" in b for b in gallery.buckets):
        thresholds = gallery.ood_thresholds(cfg.inference.ood_quantile)
    m = gallery.manifest
    trained = training_scenes_among(gallery.root, scenes)
    info = {"gallery": str(gallery.root), "gallery_checksum": gallery.checksum,
            "seed": m.get("training", {}).get("seed"), "k": m.get("summary", {}).get("k"),
            "hash_map": m.get("summary", {}).get("hash_map"),
            "bucket_mode": m.get("bucket_mode"), "mono_budget": m.get("mono_budget"),
            "budget": m.get("budget"),
            "ood_thresholds": None if thresholds is None else [int(t) for t in thresholds],
            "ood_routing": "embedding" if score_threshold is not None else "quantile",
            "ood_score_threshold": score_threshold,
            "mono_val_iou": m.get("mono", {}).get("val_metrics", {}).get("iou"),
            "flagged_model": gallery.flagged_model(),
            "evaluated_training_scenes": None if trained is None else
            [{"path": scenes[i].path, "region": regions[i]} for i in trained],
            "masks": mask_files}
    return region_tiles(per_pass, regions, thresholds, score_threshold), info


def run_evaluate(cfg: RunConfig, runner: Runner, out: Optional[str] = None,
                 seeds: int = 1) -> Optional[dict[str, Any]]:
    """Evaluate ``seeds`` galleries (training any that is missing, see ``seed_gallery``); rank 0
    holds ``--out``'s lock throughout and writes evaluation.{json,md}, returning the result."""
    if seeds < 1:
        raise InputError(f"--seeds {seeds}: give at least 1")
    comm = runner.comm
    runner.bind(cfg)
    scenes, labels, regions = comm.root_call(lambda: evaluation_scenes(cfg))
    lock = OutputLock(out or cfg.output.dir, " ".join(sys.argv))

    def take() -> Path:
        path = check_output_dir(str(out or cfg.output.dir))
        lock.acquire()  # a second evaluate (or run) on this folder is refused here
        return path
    out_dir = comm.root_call(take)
    try:
        return _evaluate_seeds(cfg, runner, scenes, labels, regions, out_dir, seeds, lock)
    finally:
        lock.release()


def _evaluate_seeds(cfg: RunConfig, runner: Runner, scenes: list[Any], labels: list[Any],
                    regions: list[str], out_dir: Path, seeds: int, lock: OutputLock
                    ) -> Optional[dict[str, Any]]:
    from .workflow import run_init
    comm = runner.comm
    per_seed: list[dict[str, RegionTiles]] = []
    infos: list[dict[str, Any]] = []
    for index, scfg in enumerate(seed_configs(cfg, seeds)):
        if seeds > 1:
            scfg, train = comm.root_call(lambda s=scfg: seed_gallery(s, out_dir))
            if train:
                if comm.is_root:
                    print(f"[evaluate] training seed {scfg.training.seed} into "
                          f"{scfg.models.gallery}", file=sys.stderr, flush=True)
                run_init(scfg, comm)
        got = evaluate_gallery(scfg, runner, scenes, labels, regions, out_dir,
                               write_masks=index == 0)  # the same on every rank
        if got is not None:
            per_seed.append(got[0])
            infos.append(got[1])
    if not comm.is_root:
        return None
    lock.check()  # an evaluate that lost its lock must not claim the folder's results
    trained_regions: dict[str, list[str]] = {}
    for info in infos:
        if info["evaluated_training_scenes"] is None:
            print(f"[evaluate] warning: {info['gallery']} has no images.h5: cannot tell whether "
                  "an evaluated scene is one of its training scenes", file=sys.stderr, flush=True)
            continue
        for hit in info["evaluated_training_scenes"]:
            paths = trained_regions.setdefault(hit["region"], [])
            if hit["path"] not in paths:
                paths.append(hit["path"])
                print(f"[evaluate] warning: {hit['path']} (region {hit['region']}) is one of the "
                      f"training scenes of {info['gallery']}: its scores are not held-out "
                      "(evaluation.md marks the region); list only unseen scenes under predict: "
                      "for held-out scores", file=sys.stderr, flush=True)
    return write_evaluation(out_dir, per_seed, infos, cfg.inference.ood_quantile,
                            trained_regions=trained_regions)


def _map_with_masks(runner: Runner, job: Job, tasks: Sequence[Any], counter: CountingSink,
                    variant: str, override: Optional[str]) -> dict[int, list[str]]:
    """Map the tasks into ``counter`` and a mask store of their own under
    ``<out>/masks/<variant>/``, then export the masks as ``resflow run`` does (outputs of an
    earlier evaluate are replaced); rank 0 gets scene -> exported files (the store itself is
    removed: the GeoTIFFs are what one looks at)."""
    comm = runner.comm
    vdir = job.out_dir / "masks" / variant
    vdir = comm.root_call(lambda: check_output_dir(str(vdir)))
    cfg = job.cfg
    if override == "mono":  # the outputs record (and the bucket map shows) what mapped the tiles
        cfg = dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, model="mono"))
    vjob = Job(cfg, job.plan, job.gallery, vdir, quiet=True)
    store = runner.open_store(vjob, restart=True)
    if comm.is_root:
        assert store is not None
        discard_stale_outputs(vdir, vjob.scenes, store.store_id)
    runner.map_tiles(vjob, tasks, MaskCountingSink(store, counter), override)
    complete = finish_store(store, comm)
    exported = runner.export(vjob, complete)
    if comm.is_root:
        try:
            os.remove(vjob.h5_path)
        except OSError:
            pass
    return exported


def _routing_text(result: dict[str, Any]) -> str:
    """How the routing column flagged tiles (the galleries' method and quantile)."""
    q = result["ood_quantile"]
    models = sorted({str(i.get("flagged_model", "mono")) for i in result["galleries"]})
    mapped = f" Flagged tiles are mapped by: {', '.join(models)} (chosen by init on its held-out scenes)."
    if any(i.get("ood_routing") == "embedding" for i in result["galleries"]):
        return (f"embedding scores, ood_quantile {q}; 'flagged' is the share of tiles "
                "whose embedding is farther from the trained scenes' windows than that quantile "
                "of the held-out scenes' windows." + mapped)
    return (f"Hamming distances, ood_quantile {q}; 'flagged' is the share of tiles beyond "
            "their bucket's threshold." + mapped)


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _cell(col: dict[str, Any], seeds: int) -> str:
    text = _fmt(col["iou_mean"])
    if seeds > 1:
        text += f" ± {_fmt(col['iou_sd'])}"
    ci = col["iou_ci"]
    return text + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def evaluation_tables(result: dict[str, Any]) -> list[str]:
    """The Markdown table: one row per region, one column per model and baseline."""
    seeds = result["seeds"]
    cols = [c for c in COLUMNS if any(c in r["columns"] for r in result["regions"].values())]
    head = ["Region", "tiles", *(LABELS[c] + " IoU" for c in cols), "RESFlow − Mono",
            "RESFlow+routing − Mono", "flagged"]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for region, r in result["regions"].items():
        gaps = r.get("gaps", {})
        name = " ".join(region.replace("|", "\\|").splitlines()) + (  # one Markdown cell
            "" if r.get("held_out", True) else " (NOT held out: training scene)")

        def gap(name: str) -> str:
            g = gaps.get(name)
            if not g:
                return "n/a"
            ci = g["iou_ci"]
            return f"{g['iou_mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") \
                if g["iou_mean"] is not None else "n/a"
        flagged = np.mean(r["flagged_share_per_seed"]) if r["flagged_share_per_seed"] else 0.0
        md.append("| " + " | ".join([name, str(r["tiles"]),
                                     *(_cell(r["columns"][c], seeds) if c in r["columns"] else "n/a"
                                       for c in cols),
                                     gap("resflow-mono"), gap("resflow_routed-mono"),
                                     f"{100 * flagged:.0f} %"]) + " |")
    md.append("")
    spread = "mean ± sd over seeds, " if seeds > 1 else ""
    md.append(f"IoU ({spread}[{100 * CONFIDENCE:.0f} % bootstrap interval over tiles, "
              f"{BOOTSTRAP_SAMPLES} resamples]) per held-out region, {seeds} seed(s). Gaps are "
              "paired (same resampled tiles). Routing: " + _routing_text(result))
    for region, r in result["regions"].items():
        if not r.get("held_out", True):
            md.append(f"- warning: region {region} is NOT held out: the gallery was trained on "
                      f"{', '.join(r['training_scenes'])}; its scores are training scores.")
    for info in result["galleries"]:
        md.append(f"- seed {info['seed']}: k = {info['k']}, hash mAP "
                  f"{_fmt(info['hash_map'])}, bucket mode {info['bucket_mode']}, Mono budget "
                  f"{info['mono_budget']}, Mono validation IoU {_fmt(info['mono_val_iou'])} "
                  f"({info['gallery']})")
    return md


def write_evaluation(out_dir: Path, per_seed: Sequence[dict[str, RegionTiles]],
                     galleries: Sequence[dict[str, Any]], ood_quantile: float,
                     samples: int = BOOTSTRAP_SAMPLES,
                     trained_regions: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """evaluation.json and evaluation.md (atomically) from the per-seed, per-region tiles.

    ``trained_regions``: region -> its scenes a gallery was trained on; such a region is marked
    ``held_out: false`` (JSON) and "NOT held out" (Markdown)."""
    trained = trained_regions or {}
    regions = {region: {**summarize_region([s[region] for s in per_seed], samples),
                        "held_out": region not in trained,
                        "training_scenes": list(trained.get(region, []))}
               for region in sorted(per_seed[0])}
    result = {"seeds": len(per_seed), "ood_quantile": ood_quantile,
              "bootstrap": {"samples": samples, "confidence": CONFIDENCE, "unit": "tile"},
              "regions": regions, "galleries": list(galleries)}
    md = evaluation_tables(result)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (("evaluation.json", json.dumps(result, indent=1)),
                           ("evaluation.md", "\n".join(md) + "\n")):
            tmp = out_dir / (name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, out_dir / name)
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write the evaluation ({os_error_cause(exc)})") from None
    print("\n".join(md), flush=True)
    print(f"[evaluate] wrote {out_dir / 'evaluation.md'}", file=sys.stderr, flush=True)
    return result
