"""`resflow evaluate`: IoU / F1 per held-out region, RESFlow (bucketed models) vs Mono.

Runs the same inference pipeline as `resflow run` (tiles, halo, three stages) on the test scenes,
tiles spread over ranks, and compares each tile's owned mask with the ground truth window.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from osgeo import gdal

from ..config import RunConfig
from ..galleries import ModelGallery
from ..io.raster import open_scene, resolve_scene_inputs, with_statistics
from ..pipeline import TileProcessor, TileTask, list_source
from ..runtime.device import apply_binding
from ..runtime.mpi import bind_device
from ..stages import TileStages
from ..tiling import split_cyclic, tile_grid
from .data import mask_path_for
from .segtrain import iou_f1

gdal.UseExceptions()


def _region_of(info: Any) -> str:
    return info.metadata.get("RESFLOW_REGION") or Path(info.path).stem


def run_evaluate(cfg: RunConfig, comm: Any, out: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Confusion counts per region and model variant; rank 0 writes evaluation.{json,md}."""
    rank, size = comm.Get_rank(), comm.Get_size()
    binding = bind_device(comm, cfg.inference.device, cfg.inference.threads_per_rank)
    device = apply_binding(binding)
    split = "test" if cfg.scenes.split == "all" else cfg.scenes.split
    paths = resolve_scene_inputs(cfg.scenes.inputs, split)
    scenes = [with_statistics(open_scene(p, cfg.scenes.bands), cfg.scenes.bands,
                              cfg.normalization.mode) for p in paths]
    gallery = ModelGallery(cfg.models.gallery)
    gallery.verify()
    tasks = [TileTask(t) for i, s in enumerate(scenes)
             for t in tile_grid(i, s.width, s.height, cfg.tiling.tile_px, cfg.tiling.halo_px)]
    mine = [tasks[j] for j in split_cyclic(len(tasks), rank, size)]
    counts: dict[str, dict[str, dict[str, int]]] = {}
    buckets_used: dict[str, dict[int, int]] = {}
    for variant in ("resflow", "mono"):
        models = gallery.stage_models(device, bucket_override="mono" if variant == "mono" else None)
        stages = TileStages(models, device, cfg.inference.batch_size, cfg.inference.threshold,
                            cfg.inference.channels_last, cfg.inference.mixed_precision,
                            cfg.inference.compile, cfg.inference.segment_batch_size)
        proc = TileProcessor(scenes, cfg, stages)
        gt_ds: dict[int, Any] = {}
        for r in proc.process(list_source(mine, cfg.inference.batch_size)):
            s = r.tile.scene
            if s not in gt_ds:
                gt_ds[s] = gdal.Open(mask_path_for(scenes[s].path))
            o = r.tile.owned
            gt = gt_ds[s].ReadAsArray(o.col, o.row, o.width, o.height)
            v = (gt != 255) & (r.mask != 255)
            p, t = r.mask == 1, gt == 1
            region = _region_of(scenes[s])
            c = counts.setdefault(region, {}).setdefault(variant, {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
            c["tp"] += int((p & t & v).sum())
            c["fp"] += int((p & ~t & v).sum())
            c["fn"] += int((~p & t & v).sum())
            c["tn"] += int((~p & ~t & v).sum())
            if variant == "resflow":
                bu = buckets_used.setdefault(region, {})
                bu[r.bucket] = bu.get(r.bucket, 0) + 1
    parts = comm.gather((counts, buckets_used), root=0)
    if rank != 0:
        return None
    total: dict[str, dict[str, dict[str, int]]] = {}
    used: dict[str, dict[int, int]] = {}
    for c_part, b_part in parts:  # type: ignore[union-attr]
        for region, variants in c_part.items():
            for variant, c in variants.items():
                acc = total.setdefault(region, {}).setdefault(variant, {"tp": 0, "fp": 0, "fn": 0, "tn": 0})
                for key in acc:
                    acc[key] += c[key]
        for region, hist in b_part.items():
            for b, nb in hist.items():
                used.setdefault(region, {})[b] = used.setdefault(region, {}).get(b, 0) + nb
    rows = []
    for region in sorted(total):
        m, r_ = iou_f1(total[region]["mono"]), iou_f1(total[region]["resflow"])
        rows.append({"region": region, "mono_iou": m["iou"], "mono_f1": m["f1"],
                     "resflow_iou": r_["iou"], "resflow_f1": r_["f1"],
                     "iou_gap": (r_["iou"] - m["iou"]) if m["iou"] is not None and r_["iou"] is not None else None,
                     "buckets_used": {str(k): v for k, v in sorted(used.get(region, {}).items())},
                     "counts": total[region]})
    summary = gallery.manifest.get("summary", {})
    result = {"regions": rows, "hash_map": summary.get("hash_map"), "k": summary.get("k"),
              "gallery": str(gallery.root), "gallery_checksum": gallery.checksum}
    out_dir = Path(out or cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = ["| Region | Mono IoU | Mono F1 | RESFlow IoU | RESFlow F1 | IoU gap |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        md.append(f"| {r['region']} | {f(r['mono_iou'])} | {f(r['mono_f1'])} | "
                  f"{f(r['resflow_iou'])} | {f(r['resflow_f1'])} | {f(r['iou_gap'])} |")
    md.append("")
    md.append(f"Buckets chosen: k = {result['k']}; hash validation mAP = "
              f"{result['hash_map']:.4f}" if result["hash_map"] is not None else "")
    for name, text in (("evaluation.json", json.dumps(result, indent=1)),
                       ("evaluation.md", "\n".join(md) + "\n")):
        tmp = out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out_dir / name)
    print("\n".join(md), flush=True)
    print(f"[evaluate] wrote {out_dir / 'evaluation.md'}", file=sys.stderr, flush=True)
    return result
