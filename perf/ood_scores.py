#!/usr/bin/env python3
"""Out-of-distribution scores calibrated on run-shaped windows: which one separates a regime the
gallery never saw from new scenes of the regimes it was trained on?

A run embeds halo windows of ``tiling.tile_px + 2 halo_px`` pixels; init trains on
``training.tile_px`` crops. Every window here is cut and embedded exactly as `resflow run` does
(``scene_tasks`` + ``WindowReader.read_tile`` + ``TileStages.embed_and_hash``). The training
scenes' run windows are split by scene into a reference half (centroids, covariance, neighbours)
and a calibration half (split-conformal thresholds at quantile q); the test sets are the config's
test split by region, plus "new-known": new scenes of the training regimes (same generator, seed
``--new-seed``), which a good rule must keep on their bucket models.

Scores (higher = farther from the training data):
  hamming   code to its bucket's centroid code (``inference.ood_routing: quantile`` today)
  knn       mean L2 distance to the k nearest reference embeddings, after standardising each
            embedding dimension on the reference set
  maha      Mahalanobis distance to the nearest bucket mean, covariance shared by the buckets
Prints the share flagged per set and writes ood_scores.json in --out.

    python perf/ood_scores.py --config configs/demo.yaml   # the demo's gallery and archive
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

import benchkit as bk

QUANTILES = (0.95, 0.99)


def conformal(d: np.ndarray, q: float) -> float:
    """The ceil(q (n + 1))-th smallest of ``d`` (capped at the largest)."""
    d = np.sort(d)
    return float(d[min(len(d), int(np.ceil(q * (len(d) + 1)))) - 1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=str(bk.default_out("ood_scores")))
    p.add_argument("--new-seed", type=int, default=7)
    p.add_argument("--knn", type=int, default=5)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from resflow_mpi.config import load_config
    from resflow_mpi.galleries import ModelGallery
    from resflow_mpi.io.manifest import scenes_for
    from resflow_mpi.io.raster import WindowReader, prepare_scene
    from resflow_mpi.models.hashing import hamming_distance
    from resflow_mpi.ood import EmbeddingReference
    from resflow_mpi.pipeline import scene_tasks
    from resflow_mpi.processor import normalize_scene
    from resflow_mpi.stages import TileStages
    from resflow_mpi.synth import synth_archive

    torch.set_num_threads(2)
    cfg = load_config(args.config)
    g = ModelGallery(cfg.models.gallery)
    stages = TileStages.from_config(g.stage_models(torch.device("cpu")), torch.device("cpu"),
                                    cfg.inference)
    t = cfg.tiling

    def windows(c: Any, split: str) -> list[tuple[str, str, np.ndarray, np.ndarray, np.ndarray]]:
        """(scene, region, embeddings, codes, buckets) per scene of ``split``."""
        c = dataclasses.replace(c, scenes=dataclasses.replace(c.scenes, split=split))
        rows = []
        for e in scenes_for(c, "evaluate" if split == "test" else "train"):
            s = prepare_scene(e.path, c)
            reader = WindowReader(s, c.scenes.bands)
            xs = [normalize_scene(reader.read_tile(task.tile)[0], s, c.normalization)
                  for task in scene_tasks(0, s, t.tile_px, t.halo_px)]
            reader.close()
            parts = [stages.embed_and_hash(np.stack(xs[i:i + 8])) for i in range(0, len(xs), 8)]
            emb, code, b = (np.concatenate([q[j] for q in parts]) for j in range(3))
            rows.append((Path(e.path).stem, e.region or Path(e.path).stem, emb, code, b))
        return rows

    train = windows(cfg, "train")
    # By scene, alternating within each region: every trained regime is in both halves and
    # the calibration scenes are unseen by the reference statistics.
    seen: dict[str, int] = {}
    ref_rows, cal_rows = [], []
    for row in train:
        seen[row[1]] = seen.get(row[1], -1) + 1
        (ref_rows if seen[row[1]] % 2 == 0 else cal_rows).append(row)
    sets: dict[str, list] = {"calibration (train scenes)": cal_rows}
    for row in windows(cfg, "test"):
        sets.setdefault(row[1], []).append(row)
    new_archive = synth_archive(out / f"new-known-seed{args.new_seed}", preset="demo",
                                seed=args.new_seed)
    new_cfg = dataclasses.replace(cfg, scenes=dataclasses.replace(cfg.scenes,
                                                                  inputs=[str(new_archive)]))
    sets["new-known (train regimes, new scenes)"] = windows(new_cfg, "train")

    def stack(rows: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(np.concatenate([r[j] for r in rows]) for j in (2, 3, 4))  # type: ignore

    e_ref, c_ref, b_ref = stack(ref_rows)
    mu, sd = e_ref.mean(0), e_ref.std(0) + 1e-6
    z_ref = (e_ref - mu) / sd
    k = len(g.buckets)
    means = np.stack([z_ref[b_ref == j].mean(0) if (b_ref == j).any() else
                      np.full(z_ref.shape[1], np.inf) for j in range(k)])
    resid = np.concatenate([z_ref[b_ref == j] - means[j] for j in range(k) if (b_ref == j).any()])
    prec = np.linalg.pinv(np.cov(resid.T) + 1e-3 * np.eye(resid.shape[1]))

    knn_ref = EmbeddingReference.fit(e_ref, stack(cal_rows)[0], args.knn,
                                     t.tile_px + 2 * t.halo_px)

    def scores(emb: np.ndarray, code: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        z = (emb - mu) / sd
        knn = knn_ref.scores(emb)
        diff = z[:, None] - means[None]
        maha = np.sqrt(np.nanmin(np.einsum("nkd,de,nke->nk", diff, prec, diff), axis=1))
        ham = hamming_distance(torch.from_numpy(code), torch.from_numpy(g.centroids)).numpy()
        own = ham[np.arange(len(b)), np.clip(b, 0, k - 1)].astype(float)
        return {"hamming": own, "knn": knn, "maha": maha}

    cal = scores(*stack(cal_rows))
    result: dict[str, Any] = {**bk.header("ood_scores", args), "config": args.config,
                              "reference_windows": len(b_ref),
                              "calibration_windows": len(cal["knn"]), "flagged": {},
                              "median_score": {}}
    names = list(sets)
    print(f"reference windows {len(b_ref)} ({len(ref_rows)} scenes), calibration windows "
          f"{len(cal['knn'])} ({len(cal_rows)} scenes), window {t.tile_px}+2x{t.halo_px} px")
    print(f"{'q':>5} {'score':8} " + " ".join(f"{s[:24]:>24}" for s in names))
    per_set = {s: scores(*stack(rows)) for s, rows in sets.items()}
    for q in QUANTILES:
        for m in ("hamming", "knn", "maha"):
            th = conformal(cal[m], q)
            row = {s: float((per_set[s][m] > th).mean()) for s in names}
            result["flagged"].setdefault(str(q), {})[m] = {"threshold": th, **row}
            print(f"{q:5} {m:8} " + " ".join(f"{row[s]:>24.0%}" for s in names))
    for m in ("hamming", "knn", "maha"):
        result["median_score"][m] = {s: float(np.median(per_set[s][m])) for s in names}
    result["windows"] = {s: int(len(per_set[s]["knn"])) for s in names}
    bk.print_done("ood_scores", bk.write_json(out / "ood_scores.json", result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
