"""`resflow evaluate`: IoU / F1 per held-out region, RESFlow (bucketed models) vs Mono, beside the
trivial baselines (all-building, all-background).

Runs the one pipeline (``pipeline.drive`` through any runner: tiles, halo, three stages) on the
labelled test scenes, once per model variant, into a counting sink that compares each tile's owned
mask with the ground truth window; the runner spreads tiles exactly as ``resflow run`` does.

Both variants' masks are also written for the user to look at, exactly as ``resflow run`` writes
them (mask store, then export): ``<out>/masks/resflow/<scene>.resflow-mask.tif`` (per-bucket
models) and ``<out>/masks/mono/<scene>.resflow-mask.tif`` (every tile by Mono, the same pixels as
``resflow run --model mono``).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import RunConfig
from ..errors import OutputError, os_error_cause
from ..galleries import ModelGallery
from ..io.labels import TruthReader
from ..io.manifest import require_labels, scenes_for
from ..io.maskstore import TileResult
from ..io.raster import prepare_scene
from ..pipeline import Job, Runner, ScenePlan, build_tasks, check_output_dir, finish_store
from .metrics import add_counts, baselines, confusion_counts, iou_f1

VARIANTS = (("resflow", None), ("mono", "mono"))


def _zero() -> dict[str, int]:
    return {"tp": 0, "fp": 0, "fn": 0, "tn": 0}


class CountingSink:
    """Confusion counts per region of the tiles this process computed (a local sink)."""

    kind = "local"

    def __init__(self, truth: TruthReader, regions: Sequence[str]):
        self.truth = truth
        self.regions = list(regions)
        self.counts: dict[str, dict[str, int]] = {}
        self.buckets: dict[str, dict[int, int]] = {}

    def write_results(self, results: Sequence[TileResult], collective: bool = False,
                      n_calls: Optional[int] = None) -> None:
        for r in results:
            s, o = r.tile.scene, r.tile.owned
            gt = self.truth.window(s, o.col, o.row, o.width, o.height)
            region = self.regions[s]
            self.counts[region] = add_counts(self.counts.get(region, _zero()),
                                             confusion_counts(r.mask, gt))
            hist = self.buckets.setdefault(region, {})
            hist[r.bucket] = hist.get(r.bucket, 0) + 1


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


def evaluation_scenes(cfg: RunConfig) -> tuple[list[Any], list[Any], list[str]]:
    """The labelled scenes to evaluate, their labels and regions; an unlabelled archive or a bad
    label is a one-line error before any inference."""
    entries = require_labels(scenes_for(cfg, "evaluate"), cfg)
    scenes = [prepare_scene(e.path, cfg) for e in entries]
    labels = [e.label for e in entries]
    for warning in TruthReader(scenes, labels, cfg.labels).check_all():
        print(f"[evaluate] warning: {warning}", file=sys.stderr, flush=True)
    return scenes, labels, [e.region or Path(e.path).stem for e in entries]


def run_evaluate(cfg: RunConfig, runner: Runner, out: Optional[str] = None,
                 write_masks: bool = True) -> Optional[dict[str, Any]]:
    """Confusion counts per region and model variant; rank 0 writes evaluation.{json,md} and,
    with ``write_masks``, each variant's masks under ``<out>/masks/<variant>/``."""
    comm = runner.comm
    runner.bind(cfg)
    out_dir = Path(out or cfg.output.dir)

    def setup() -> tuple[list[Any], list[Any], list[str]]:
        ModelGallery(cfg.models.gallery).verify()
        return evaluation_scenes(cfg)
    scenes, labels, regions = comm.root_call(setup)
    job = Job(cfg, ScenePlan(scenes, [None] * len(scenes)), ModelGallery(cfg.models.gallery),
              out_dir, quiet=True)
    tasks = build_tasks(job.plan, cfg) if comm.is_root else []
    total: dict[str, dict[str, dict[str, int]]] = {}
    used: dict[str, dict[int, int]] = {}
    mask_files: dict[str, dict[int, list[str]]] = {}
    for variant, override in VARIANTS:
        truth = TruthReader(scenes, labels, cfg.labels)
        counter = CountingSink(truth, regions)
        if write_masks:
            mask_files[variant] = _map_with_masks(runner, job, tasks, counter, variant, override)
        else:
            runner.map_tiles(job, tasks, counter, override)
        parts = comm.gather((counter.counts, counter.buckets))
        for counts, hists in parts or []:
            for region, c in counts.items():
                acc = total.setdefault(region, {}).setdefault(variant, _zero())
                for key in acc:
                    acc[key] += c[key]
            if variant == "resflow":
                for region, hist in hists.items():
                    u = used.setdefault(region, {})
                    for b, n in hist.items():
                        u[b] = u.get(b, 0) + n
    if not comm.is_root:
        return None
    masks = {v: [p for i in sorted(files) for p in files[i]] for v, files in mask_files.items()}
    return write_evaluation(out_dir, total, used, job.gallery, masks)


def _map_with_masks(runner: Runner, job: Job, tasks: Sequence[Any], counter: CountingSink,
                    variant: str, override: Optional[str]) -> dict[int, list[str]]:
    """Map the tasks into ``counter`` and a mask store of their own under
    ``<out>/masks/<variant>/``, then export the masks as ``resflow run`` does; rank 0 gets
    scene -> exported files (the store itself is removed: the GeoTIFFs are what one looks at)."""
    comm = runner.comm
    vdir = job.out_dir / "masks" / variant
    vdir = comm.root_call(lambda: check_output_dir(str(vdir)))
    vjob = Job(job.cfg, job.plan, job.gallery, vdir, quiet=True)
    store = runner.open_store(vjob, restart=True)
    runner.map_tiles(vjob, tasks, MaskCountingSink(store, counter), override)
    complete = finish_store(store, len(vjob.scenes), comm)
    exported = runner.export(vjob, complete)
    if comm.is_root:
        try:
            os.remove(vjob.h5_path)
        except OSError:
            pass
    return exported


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def write_evaluation(out_dir: Path, total: dict[str, dict[str, dict[str, int]]],
                     used: dict[str, dict[int, int]], gallery: ModelGallery,
                     masks: Optional[dict[str, list[str]]] = None) -> dict[str, Any]:
    """evaluation.json and evaluation.md (atomically) from the summed counts."""
    rows = []
    for region in sorted(total):
        m, r_ = iou_f1(total[region]["mono"]), iou_f1(total[region]["resflow"])
        base = baselines(total[region]["mono"])  # the truth's counts, same for every variant
        rows.append({"region": region, "mono_iou": m["iou"], "mono_f1": m["f1"],
                     "resflow_iou": r_["iou"], "resflow_f1": r_["f1"],
                     "iou_gap": (r_["iou"] - m["iou"])
                     if m["iou"] is not None and r_["iou"] is not None else None,
                     "all_building_iou": base["all_building"]["iou"],
                     "all_building_f1": base["all_building"]["f1"],
                     "all_background_iou": base["all_background"]["iou"],
                     "all_background_f1": base["all_background"]["f1"],
                     "buckets_used": {str(k): v for k, v in sorted(used.get(region, {}).items())},
                     "counts": total[region]})
    summary = gallery.manifest.get("summary", {})
    result = {"regions": rows, "hash_map": summary.get("hash_map"), "k": summary.get("k"),
              "gallery": str(gallery.root), "gallery_checksum": gallery.checksum,
              "masks": masks or {}}
    md = ["| Region | All-building IoU / F1 | All-background IoU / F1 | Mono IoU | Mono F1 | "
          "RESFlow IoU | RESFlow F1 | IoU gap |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['region']} | {_fmt(r['all_building_iou'])} / {_fmt(r['all_building_f1'])}"
                  f" | {_fmt(r['all_background_iou'])} / {_fmt(r['all_background_f1'])}"
                  f" | {_fmt(r['mono_iou'])} | {_fmt(r['mono_f1'])} | "
                  f"{_fmt(r['resflow_iou'])} | {_fmt(r['resflow_f1'])} | {_fmt(r['iou_gap'])} |")
    md.append("")
    if result["hash_map"] is not None:
        md.append(f"Buckets chosen: k = {result['k']}; hash validation mAP = "
                  f"{result['hash_map']:.4f}")
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
    for variant, paths in (masks or {}).items():
        if paths:
            print(f"[evaluate] {variant} masks: {out_dir / 'masks' / variant}/ "
                  f"({len(paths)} file(s))", file=sys.stderr, flush=True)
    return result
