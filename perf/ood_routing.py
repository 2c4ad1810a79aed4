#!/usr/bin/env python3
"""Out-of-distribution routing: which distance separates an unseen regime from known ones?

On the test fixtures' recipe (archive preset "tiny", `mpirun -n 2 resflow init` with the tests'
tiny training settings) and the "tiny-eval" archive (one perturbed known-regime scene, two scenes
of a regime no preset trains on) plus the tiny archive's own test scenes (known regimes, new
scenes), every test tile is embedded and hashed exactly as `resflow run` does
(``TileStages.embed_and_hash`` on the halo window). Per bucket, a centroid and the split-conformal
threshold (the ceil(q (n + 1))-th smallest of the bucket's n training distances, capped at the
largest; the rule of ``ModelGallery.ood_thresholds``) are fitted on the training tiles (re-derived
with init's own sampler and seed; crops of the gallery's held-out scenes are a calibration check).

Distances compared:
  hamming  code to the bucket's centroid code (what ``inference.ood_routing: quantile`` uses)
  cosine   1 - cos(embedding, mean unit embedding of the bucket)  (scale-free)
  l2raw    L2 to the bucket's mean embedding
  l2z      L2 after standardising each embedding dimension on the training tiles (the space
           init clusters in)
A tile is flagged when its distance to its own (hash) bucket exceeds that bucket's threshold
("own"), or, stricter, when it exceeds every bucket's threshold ("every").

Prints the flag shares per tile set and the distance / threshold ratios, and writes
ood_routing.json into --out (default perf/results/ood_routing/). About 2 minutes on 2 cores when
the gallery is trained, seconds with --gallery (a gallery trained on --train-archive).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

import benchkit as bk

# tests/conftest.py TINY_CONFIG: the tiny gallery of the integration tests.
TINY_TRAINING = {"tile_px": 64, "tiles_per_scene": 16, "cem_epochs": 8, "hash_epochs": 30,
                 "seg_epochs": 24, "k_min": 2, "k_max": 6, "batch_size": 16,
                 "mono_budget": "bucket"}
MEASURES = ("hamming", "cosine", "l2raw", "l2z")
QUANTILES = (0.95, 0.99)


def base_config(archive: Path, gallery: Path, out: Path) -> dict[str, Any]:
    return {"scenes": {"inputs": [str(archive)], "split": "train"},
            "tiling": {"tile_px": 64, "halo_px": 8},
            "models": {"gallery": str(gallery), "arch": "unet", "preset": "tiny", "hash_bits": 16},
            "inference": {"batch_size": 4, "threads_per_rank": 1},
            "output": {"dir": str(out / "init-out"), "quicklooks": False},
            "training": dict(TINY_TRAINING)}


def conformal(d: np.ndarray, q: float) -> float:
    """The ceil(q (n + 1))-th smallest of ``d`` (capped at the largest); inf when empty."""
    if len(d) == 0:
        return float("inf")
    d = np.sort(d)
    return float(d[min(len(d), int(np.ceil(q * (len(d) + 1)))) - 1])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(bk.default_out("ood_routing")))
    p.add_argument("--gallery", default=None, help="a gallery trained on --train-archive")
    p.add_argument("--train-archive", default=None, help="archive.json the gallery was trained on")
    p.add_argument("--quick", action="store_true",
                   help="accepted like every study's; the workload is tiny already")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from resflow_mpi.config import config_from_dict
    from resflow_mpi.galleries import ModelGallery
    from resflow_mpi.init.data import open_scenes, sample_tiles
    from resflow_mpi.init.holdout import HoldoutPlan
    from resflow_mpi.init.workflow import held_out_crops
    from resflow_mpi.init.evaluate import evaluation_scenes
    from resflow_mpi.io.manifest import scenes_for
    from resflow_mpi.io.raster import WindowReader
    from resflow_mpi.models.hashing import hamming_distance
    from resflow_mpi.pipeline import scene_tasks
    from resflow_mpi.processor import normalize_scene
    from resflow_mpi.stages import TileStages
    from resflow_mpi.synth import synth_archive

    torch.set_num_threads(1)
    eval_archive = Path(synth_archive(out / "eval", preset="tiny-eval", seed=0))
    if args.gallery:
        if not args.train_archive:
            p.error("--gallery needs --train-archive")
        train_archive, gallery_dir = Path(args.train_archive), Path(args.gallery)
    else:
        train_archive = Path(synth_archive(out / "archive", preset="tiny", seed=0))
        gallery_dir = out / "gallery"
    raw = base_config(train_archive, gallery_dir, out)
    if not (gallery_dir / "manifest.json").is_file():
        cfg_path = bk.write_yaml(out / "init.yaml", raw)
        bk.run_command([*bk.mpirun(2), bk.resflow_exe(), "init", str(cfg_path)],
                       env=bk.bench_env(1), timeout_s=1800)
    cfg = config_from_dict(raw)
    g = ModelGallery(gallery_dir)
    stages = TileStages.from_config(g.stage_models(torch.device("cpu")), torch.device("cpu"),
                                    cfg.inference)

    def embed(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [stages.embed_and_hash(x[i:i + stages.batch_size])
                 for i in range(0, len(x), stages.batch_size)]
        return tuple(np.concatenate([q[j] for q in parts]) for j in range(3))  # type: ignore

    # -- training tiles, as init sampled them (per-scene seeded crops, same validation split)
    tr = cfg.training
    entries = scenes_for(cfg, "train")
    scenes = open_scenes([e.path for e in entries], cfg)
    tiles, _ = sample_tiles(scenes, [e.label for e in entries], list(range(len(scenes))),
                            tr.tile_px, tr.tiles_per_scene, cfg.scenes.bands, cfg.normalization,
                            cfg.labels, tr.seed, tr.building_crop_fraction)
    # Held out: crops of the scenes (or row bands) the gallery held out for model selection.
    val = g.manifest.get("validation", {})
    paths = [s.path for s in scenes]
    held = HoldoutPlan([paths.index(p) for p in val.get("held_out_scenes", []) if p in paths],
                       {paths.index(p): int(v["held_out_rows_from"])
                        for p, v in val.get("row_split_scenes", {}).items() if p in paths})
    is_val = held_out_crops(tiles, held)
    emb_tr, code_tr, b_tr = embed(tiles.x)
    fit = ~is_val
    k = len(g.buckets)

    # -- test tiles, read as a run reads them (halo window)
    def run_tiles(archive: Path, prefix: str) -> dict[str, tuple[np.ndarray, ...]]:
        c = dataclasses.replace(cfg, scenes=dataclasses.replace(cfg.scenes, inputs=[str(archive)],
                                                                split="test"))
        sc, _, regions = evaluation_scenes(c)
        xs: dict[str, list[np.ndarray]] = {}
        for i, s in enumerate(sc):
            reader = WindowReader(s, c.scenes.bands)
            for t in scene_tasks(i, s, c.tiling.tile_px, c.tiling.halo_px):
                xs.setdefault(prefix + regions[i], []).append(
                    normalize_scene(reader.read_tile(t.tile)[0], s, c.normalization))
            reader.close()
        return {name: embed(np.stack(v)) for name, v in xs.items()}
    sets = {**run_tiles(eval_archive, "eval:"), **run_tiles(train_archive, "tiny:")}

    mu, sd = emb_tr[fit].mean(0), emb_tr[fit].std(0) + 1e-6
    unit = emb_tr / np.linalg.norm(emb_tr, axis=1, keepdims=True)
    members = [fit & (b_tr == j) for j in range(k)]
    cdir = np.stack([unit[m].mean(0) for m in members])
    cdir /= np.linalg.norm(cdir, axis=1, keepdims=True)
    craw = np.stack([emb_tr[m].mean(0) for m in members])
    cz = np.stack([((emb_tr - mu) / sd)[m].mean(0) for m in members])

    def distances(emb: np.ndarray, code: np.ndarray) -> dict[str, np.ndarray]:
        """measure -> (N, k) distances to every bucket."""
        u = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        return {"hamming": hamming_distance(torch.from_numpy(code),
                                            torch.from_numpy(g.centroids)).numpy().astype(float),
                "cosine": 1.0 - u @ cdir.T,
                "l2raw": np.linalg.norm(emb[:, None] - craw[None], axis=2),
                "l2z": np.linalg.norm(((emb - mu) / sd)[:, None] - cz[None], axis=2)}

    d_tr = distances(emb_tr, code_tr)
    sets["train:validation"] = (emb_tr[is_val], code_tr[is_val], b_tr[is_val])
    result: dict[str, Any] = {**bk.header("ood_routing", args), "gallery": str(gallery_dir),
                              "train_tiles": int(fit.sum()), "validation_tiles": int(is_val.sum()),
                              "tiles": {s: len(v[2]) for s, v in sets.items()},
                              "buckets": {s: np.bincount(v[2], minlength=k).tolist()
                                          for s, v in sets.items()},
                              "flagged": {}, "ratio_quartiles": {}}
    for q in QUANTILES:
        for m in MEASURES:
            th = np.array([conformal(d_tr[m][members[j], j], q) for j in range(k)])
            row = {}
            for s, (e, c, b) in sets.items():
                d = distances(e, c)[m]
                own = d[np.arange(len(b)), b]
                row[s] = {"own": float((own > th[b]).mean()),
                          "every": float((d > th[None]).all(1).mean())}
                if q == 0.99:
                    result["ratio_quartiles"].setdefault(m, {})[s] = np.quantile(
                        own / np.maximum(th[b], 1e-9), [0.25, 0.5, 0.75]).round(3).tolist()
            result["flagged"].setdefault(str(q), {})[m] = row

    names = list(sets)
    print(f"training tiles per bucket {np.bincount(b_tr[fit], minlength=k).tolist()}, "
          f"tiles per set {result['tiles']}")
    print("share flagged (own bucket / every bucket)")
    print(f"{'q':>5} {'measure':8} " + " ".join(f"{s:>22}" for s in names))
    for q in QUANTILES:
        for m in MEASURES:
            row = result["flagged"][str(q)][m]
            print(f"{q:5} {m:8} " + " ".join(
                f"{row[s]['own']:>10.0%} / {row[s]['every']:<9.0%}" for s in names))
    print("distance / own-bucket threshold at q = 0.99, quartiles")
    for m in MEASURES:
        print(f"{m:8} " + "  ".join(f"{s}: " + "/".join(f"{v:.2f}" for v in
                                                           result["ratio_quartiles"][m][s])
                                    for s in names))
    bk.print_done("ood_routing", bk.write_json(out / "ood_routing.json", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
