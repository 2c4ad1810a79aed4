#!/usr/bin/env python3
"""IoU effect and cost per tile of ``inference.blend`` and ``inference.tta`` on the demo.

Maps the demo's held-out scenes (configs/demo.yaml: split test, its gallery, its tiling and
out-of-distribution routing) once per variant in this process, through the engine's own tile
processor (the same code as ``resflow run``), and counts each tile's intersection and union with
the scene's label. Reports, per variant: pooled IoU, its paired difference from the plain variant
with a 95 % scene-cluster bootstrap interval (scenes resampled with replacement, the same draws
for every variant), and milliseconds per computed tile (segmentation, and the whole tile) of
that pass. As the machine may be shared, the cost is also measured apart: the segmentation of the
same tiles by every variant in turn, round after round (so a load change hits all variants
alike); the median over rounds, and each variant's per-round ratio to the plain one.

    python perf/blend_tta.py [--root DIR] [--out perf/results/blend_tta] [--threads 1]

``--root``: the folder the demo's relative paths (demo-out/...) start from (default: the
repository; launch/demo.sh writes demo-out there).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = [("none", "none"), ("hann", "none"), ("none", "flips"), ("none", "d4"),
            ("hann", "flips")]
BOOTSTRAP = 2000
COST_TILES = 8
COST_ROUNDS = 5


def demo_config(root: Path, blend: str, tta: str, threads: int) -> Any:
    """configs/demo.yaml with its relative paths under ``root`` and the variant's options."""
    from resflow_mpi.config import load_config
    archive = root / "demo-out" / "archive" / "archive.json"
    gallery = root / "demo-out" / "gallery"
    for path in (archive, gallery):
        if not path.exists():
            sys.exit(f"error: {path}: not found; run launch/demo.sh (or pass --root)")
    return load_config(str(REPO / "configs" / "demo.yaml"),
                       [f"scenes.inputs=[{archive}]", f"models.gallery={gallery}",
                        f"inference.blend={blend}", f"inference.tta={tta}",
                        f"inference.threads_per_rank={threads}", "inference.device=cpu"])


def map_variant(cfg: Any) -> dict[str, Any]:
    """Every held-out tile's (scene, intersection, union) and the variant's times."""
    import torch

    from resflow_mpi.galleries import ModelGallery, resolve_run_config
    from resflow_mpi.init.evaluate import evaluation_scenes
    from resflow_mpi.io.labels import TruthReader
    from resflow_mpi.pipeline import Job, ScenePlan, build_stages, build_tasks
    from resflow_mpi.processor import TileProcessor, list_source
    gallery = ModelGallery(cfg.models.gallery)
    cfg = resolve_run_config(gallery, cfg)
    scenes, labels, regions = evaluation_scenes(cfg)
    truth = TruthReader(scenes, labels, cfg.labels)
    job = Job(cfg, ScenePlan(scenes, [None] * len(scenes)), gallery, Path("."), quiet=True)
    tasks = build_tasks(job.plan, cfg)
    stages = build_stages(cfg, gallery, torch.device("cpu"))
    proc = TileProcessor(scenes, cfg, stages)
    rows = []
    t0 = time.perf_counter()
    for r in proc.process(list_source(tasks, cfg.inference.batch_size)):
        if r.bucket == -1:
            continue
        o = r.tile.owned
        gt = truth.window(r.tile.scene, o.col, o.row, o.width, o.height)
        ok = (gt != 255) & (r.mask != 255)
        pred, true = (r.mask == 1) & ok, (gt == 1) & ok
        rows.append((r.tile.scene, r.tile.index, int((pred & true).sum()),
                     int((pred | true).sum())))
    wall = time.perf_counter() - t0
    n = proc.stats.tiles_computed
    rows.sort()
    return {"tiles": rows, "n_scenes": len(scenes), "regions": regions, "tiles_computed": n,
            "segment_ms_per_tile": 1000 * proc.stats.segment_s / max(1, n),
            "wall_ms_per_tile": 1000 * wall / max(1, n)}


def interleaved_costs(configs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Median ms per tile of each variant's segmentation of the same COST_TILES tiles, the
    variants run in turn for COST_ROUNDS rounds, and the median per-round ratio to the first."""
    import torch

    from resflow_mpi.galleries import ModelGallery, resolve_run_config
    from resflow_mpi.init.evaluate import evaluation_scenes
    from resflow_mpi.io.raster import WindowReader
    from resflow_mpi.pipeline import Job, ScenePlan, build_stages, build_tasks
    from resflow_mpi.processor import normalize_scene
    first = next(iter(configs.values()))
    gallery = ModelGallery(first.models.gallery)
    cfg = resolve_run_config(gallery, first)
    scenes, _, _ = evaluation_scenes(cfg)
    tasks = [t for t in build_tasks(Job(cfg, ScenePlan(scenes, [None] * len(scenes)), gallery,
                                        Path("."), quiet=True).plan, cfg) if not t.empty]
    step = max(1, len(tasks) // COST_TILES)
    xs = []
    for task in tasks[::step][:COST_TILES]:
        info = scenes[task.tile.scene]
        reader = WindowReader(info, cfg.scenes.bands)
        xs.append(normalize_scene(reader.read_tile(task.tile)[0], info, cfg.normalization))
        reader.close()
    x = np.stack(xs)
    stages = {name: build_stages(resolve_run_config(gallery, c), gallery, torch.device("cpu"))
              for name, c in configs.items()}
    for st in stages.values():
        st.segment(0, x[:1])  # load the bucket model once, outside the timing
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(COST_ROUNDS):
        for name, st in stages.items():
            t0 = time.perf_counter()
            for i in range(len(x)):
                st.segment(0, x[i:i + 1])
            times[name].append(1000 * (time.perf_counter() - t0) / len(x))
    base = np.asarray(times[next(iter(times))])
    return {name: {"ms_per_tile": float(np.median(t)),
                   "ratio": float(np.median(np.asarray(t) / base))} for name, t in times.items()}


def scene_sums(rows: list[tuple[int, int, int, int]], n_scenes: int) -> np.ndarray:
    """(n_scenes, 2) intersection and union per scene."""
    out = np.zeros((n_scenes, 2), np.int64)
    for s, _, inter, union in rows:
        out[s] += (inter, union)
    return out


def pooled(s: np.ndarray) -> np.ndarray:
    """Pooled IoU (sum of intersections / sum of unions) over the second-to-last axis."""
    return s[..., 0].sum(-1) / np.maximum(1, s[..., 1].sum(-1))


def region_lines(tiles: dict[str, list[tuple[int, int, int, int]]], regions: list[str],
                 rng: np.random.Generator) -> tuple[list[str], dict[str, Any]]:
    """Per held-out region: pooled IoU of each variant and its paired difference from the plain
    variant with a 95 % tile bootstrap interval (the same tiles resampled for every variant)."""
    names = list(tiles)
    lines = ["| region | tiles | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    out: dict[str, Any] = {}
    for region in sorted(set(regions)):
        per = {n: np.array([(i, u) for s, _, i, u in tiles[n] if regions[s] == region])
               for n in names}
        base = per[names[0]]
        draws = rng.integers(0, len(base), (BOOTSTRAP, len(base)))
        cells, out[region] = [], {}
        for n in names:
            iou = float(pooled(per[n]))
            delta = pooled(per[n][draws]) - pooled(base[draws])
            lo, hi = np.percentile(delta, [2.5, 97.5])
            out[region][n] = {"iou": iou, "delta_ci95": [float(lo), float(hi)]}
            cells.append(f"{iou:.3f}" if n == names[0] else
                         f"{iou:.3f} ({100 * (iou - float(pooled(base))):+.2f} pt "
                         f"[{100 * lo:+.2f}, {100 * hi:+.2f}])")
        lines.append(f"| {region} | {len(base)} | " + " | ".join(cells) + " |")
    return lines, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(REPO))
    ap.add_argument("--out", default=str(REPO / "perf" / "results" / "blend_tta"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as a rank)")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"load_avg_start": os.getloadavg(), "variants": {}}
    sums, tiles = {}, {}
    configs = {f"blend={blend} tta={tta}": demo_config(Path(args.root), blend, tta, args.threads)
               for blend, tta in VARIANTS}
    costs = interleaved_costs(configs)
    for name, cost in costs.items():
        print(f"{name}: {cost['ms_per_tile']:.1f} ms/tile segmentation (interleaved), "
              f"{cost['ratio']:.2f}x plain", flush=True)
    for name, cfg in configs.items():
        r = map_variant(cfg)
        tiles[name] = r.pop("tiles")
        regions = r.pop("regions")
        sums[name] = scene_sums(tiles[name], r["n_scenes"])
        results["variants"][name] = r
        print(f"{name}: {r['segment_ms_per_tile']:.1f} ms/tile segmentation, "
              f"{r['wall_ms_per_tile']:.1f} ms/tile in all", flush=True)
    base_name = next(iter(sums))
    base = sums[base_name]
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(base), (BOOTSTRAP, len(base)))
    lines = ["| variant | pooled IoU | ΔIoU vs plain (95 % CI, scene bootstrap) | segmentation "
             "ms/tile (interleaved) | x plain | whole tile ms/tile (its pass) |",
             "|---|---|---|---|---|---|"]
    for name, s in sums.items():
        iou = float(pooled(s))
        delta = pooled(s[draws]) - pooled(base[draws])
        lo, hi = np.percentile(delta, [2.5, 97.5])
        v = results["variants"][name]
        v.update({"iou": iou, "delta_iou": iou - float(pooled(base)),
                  "delta_ci95": [float(lo), float(hi)], "interleaved": costs[name]})
        d = "—" if name == base_name else (f"{100 * v['delta_iou']:+.2f} pt "
                                            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]")
        lines.append(f"| {name} | {iou:.4f} | {d} | {costs[name]['ms_per_tile']:.1f} | "
                     f"{costs[name]['ratio']:.2f} | {v['wall_ms_per_tile']:.1f} |")
    by_region, results["regions"] = region_lines(tiles, regions, rng)
    results["load_avg_end"] = os.getloadavg()
    results["table"] = lines
    results["region_table"] = by_region
    (out / "blend_tta.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines + [""] + by_region))
    return 0


if __name__ == "__main__":
    sys.exit(main())
