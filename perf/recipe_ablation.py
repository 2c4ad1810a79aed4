#!/usr/bin/env python3
"""The segmentation training recipe, part by part: held-out IoU of Mono with each part removed.

Crops are taken as ``resflow init`` takes them (its sampler, its held-out plan: whole scenes per
region, row bands of lone scenes); one Mono (the configured preset, from scratch, the same steps)
is trained per variant and seed on the training crops and scored on the held-out crops. Each
variant is compared with the first one given (the defaults unless --variants says otherwise) on the same held-out
crops: IoU gain with a 95 % paired bootstrap interval over crops, per seed, and the mean over
seeds. ``--test-regions`` also scores every model on crops of the labelled test scenes, per
region (new acquisitions and unseen regimes, which held-out training scenes do not show).

Variants: the defaults (no augmentation, BCE + Dice, cosine schedule, early stopping), full
augmentation (flips, rotations, brightness/contrast/gamma, scale), geometric augmentation only
(flips, rotations), BCE instead of BCE + Dice, constant learning rate, no early stopping.

  python perf/recipe_ablation.py [--preset demo|tiny] [--seeds 2] [--steps 400]
                                 [--variants full,no_aug] [--test-regions] [--out DIR]

Writes recipe_ablation.json into --out (default perf/results/recipe_ablation/).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchkit as bk

VARIANTS = {"defaults": {}, "full_aug": {"augment": "full"},
            "geometric_aug": {"augment": "geometric"}, "bce_only": {"loss": "bce"},
            "constant_lr": {"schedule": "constant"}, "no_early_stop": {"patience": 0}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="synthetic archive preset (tiny, demo)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--per-scene", type=int, default=24)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("--test-regions", action="store_true",
                    help="also score each model on crops of the archive's labelled test scenes, "
                         "per region (new acquisitions, unseen regimes)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny archive, 10 steps, one seed: seconds, numbers meaningless")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.seeds = "tiny", 10, 1
    out = Path(args.out) if args.out else bk.default_out("recipe_ablation")
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from resflow_mpi.config import config_from_dict
    from resflow_mpi.init.data import open_scenes, sample_tiles
    from resflow_mpi.init.holdout import plan_holdout, scene_descriptors, stratum_of
    from resflow_mpi.init.segtrain import TrainingRecipe, tile_counts, train_selected
    from resflow_mpi.init.selection import paired_gain
    from resflow_mpi.init.workflow import held_out_crops
    from resflow_mpi.io.manifest import scenes_for
    from resflow_mpi.models import build_segmentation
    from resflow_mpi.synth import synth_archive

    torch.set_num_threads(2)
    archive = Path(synth_archive(out / "archive", preset=args.preset, seed=0))
    cfg = config_from_dict({"scenes": {"inputs": [str(archive)], "split": "train"},
                            "models": {"gallery": str(out / "unused")},
                            "training": {"tile_px": args.tile_px,
                                         "tiles_per_scene": args.per_scene}})
    tr = cfg.training
    entries = scenes_for(cfg, "train")
    scenes = open_scenes([e.path for e in entries], cfg)
    strata = [stratum_of(e.region, e.path) for e in entries]
    heights = [s.height for s in scenes]
    units = plan_holdout(strata, heights, tr.val_scene_share, tr.tile_px, tr.seed).units(
        len(scenes), heights)
    tiles, _ = sample_tiles(scenes, [e.label for e in entries], [u.scene for u in units],
                            tr.tile_px, tr.tiles_per_scene, cfg.scenes.bands, cfg.normalization,
                            cfg.labels, tr.seed, tr.building_crop_fraction,
                            row_bands=[u.rows for u in units])
    plan = plan_holdout(strata, heights, tr.val_scene_share, tr.tile_px, tr.seed,
                        scene_descriptors(tiles.x, tiles.scene, len(scenes)))
    is_val = held_out_crops(tiles, plan)
    xtr, ytr, xva, yva = tiles.x[~is_val], tiles.y[~is_val], tiles.x[is_val], tiles.y[is_val]
    print(f"{len(xtr)} training and {len(xva)} held-out crops of {tr.tile_px} px "
          f"({len(plan.held_out_scenes)} held-out scenes, {len(plan.row_split_scenes)} row bands)")
    variants = {v: VARIANTS[v] for v in args.variants.split(",")}
    test_sets: dict[str, tuple[Any, Any]] = {}
    if args.test_regions:
        tests = scenes_for(cfg, "test")
        tscenes = open_scenes([e.path for e in tests], cfg)
        ttiles, _ = sample_tiles(tscenes, [e.label for e in tests], list(range(len(tests))),
                                 tr.tile_px, tr.tiles_per_scene // 2, cfg.scenes.bands,
                                 cfg.normalization, cfg.labels, tr.seed, 0.0)
        for region in sorted({e.region for e in tests}):
            sel = np.isin(ttiles.scene, [i for i, e in enumerate(tests) if e.region == region])
            test_sets[region] = (ttiles.x[sel], ttiles.y[sel])
    rows: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for seed in range(args.seeds):
        counts = {}
        test_counts: dict[str, dict[str, Any]] = {}
        for name, change in variants.items():
            recipe = dataclasses.replace(TrainingRecipe(), **change)
            torch.manual_seed(seed)
            model = build_segmentation(cfg.models.arch, cfg.models.preset, xtr.shape[1])
            t0 = time.perf_counter()
            fit = train_selected(model, xtr, ytr, args.steps, tr.batch_size, tr.lr, seed,
                                 xva, yva, tr.val_every, recipe)
            counts[name] = tile_counts(model, xva, yva)
            ref = next(iter(variants))
            g = paired_gain(counts[name], counts[ref], seed=seed)
            regions = {}
            for region, (xt, yt) in test_sets.items():
                test_counts.setdefault(region, {})[name] = tile_counts(model, xt, yt)
                rg = paired_gain(test_counts[region][name], test_counts[region][ref], seed=seed)
                regions[region] = {"iou": rg.iou_a, "minus_first": rg.record()}
                print(f"    {region}: IoU {rg.iou_a:.4f}, minus {ref} {rg.text()}", flush=True)
            rows[name].append({"seed": seed, "iou": g.iou_a, "minus_first": g.record(),
                               "test_regions": regions,
                               "steps_run": fit["steps_run"], "best_step": fit["best_step"],
                               "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {name:>14}: held-out IoU {g.iou_a:.4f}  minus {ref} "
                  f"{g.text():>26}  steps {fit['steps_run']:>4} (best {fit['best_step']})  "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    summary = {name: {"iou_mean": float(np.mean([r["iou"] for r in rs])),
                      "minus_first_mean": float(np.mean([r["minus_first"]["gain"] or 0.0
                                                         for r in rs])),
                      "seconds_mean": float(np.mean([r["seconds"] for r in rs]))}
               for name, rs in rows.items()}
    print(f"\nvariant          IoU (mean over seeds)  minus {next(iter(variants))}  s/model")
    for name, s in summary.items():
        print(f"{name:>14}   {s['iou_mean']:.4f}               {s['minus_first_mean']:+.4f}"
              f"     {s['seconds_mean']:.0f}")
    path = bk.write_json(out / "recipe_ablation.json",
                         {**bk.header("recipe_ablation", args), "train_crops": int(len(xtr)),
                          "held_out_crops": int(len(xva)), "per_seed": rows,
                          "summary": summary})
    bk.print_done("recipe_ablation", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
