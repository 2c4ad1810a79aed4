#!/usr/bin/env python3
"""Mixed resolution: the same synthetic ground at 0.25 m and at 1.0 m, trained at one and mapped
at the other, with and without ``scenes.gsd_m``.

The fine archive is rendered at 0.25 m; the coarse archive is the same scenes averaged 4 x 4 by
GDAL (a coarser sensor sees the mean of the ground it covers), labels by majority. Three
galleries, trained by ``resflow init`` (2 MPI ranks, the same small recipe and seed):
  fine      on the 0.25 m training scenes, each at its own pixel size
  coarse    on the 1.0 m training scenes, each at its own pixel size
  gsd       on the 0.25 m training scenes with ``scenes.gsd_m: 1.0`` (read averaged to 1.0 m)
Each maps the test scenes of both archives with ``resflow run`` (the gsd gallery's runs inherit
its gsd_m); IoU is computed from the exported masks on each test scene's own grid against its
own labels, per 64 px block, and compared pairwise with a two-stage bootstrap (scenes, then
blocks; 95 %). The coarse scenes are GDAL's 4 x 4 average of the fine ones, and the gsd gallery
reads the fine training scenes averaged the same way on the fly, so it should learn exactly what
the coarse gallery learns (same pixels, same seed): a check that resampled reads equal an offline
resample. A perfect 1.0 m map brought back onto the 0.25 m grid (the 1.0 m labels, nearest
neighbour) bounds what any 1.0 m map can score there. Every run maps with Mono (``inference.model: mono``): the question is resolution,
not specialisation.

  python perf/mixed_gsd.py [--out DIR] [--quick]

Writes mixed_gsd.json into --out (default perf/results/mixed_gsd/).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

import benchkit as bk

FINE_M, COARSE_M = 0.25, 1.0
FACTOR = int(COARSE_M / FINE_M)
BLOCK_PX = 64  # IoU counting block on the evaluation grid
RECIPE = {"tile_px": 64, "tiles_per_scene": 32, "cem_epochs": 8, "hash_epochs": 30,
          "seg_epochs": 40, "k_min": 1, "k_max": 1, "batch_size": 16, "k_candidates": 1,
          "mono_budget": "bucket", "seed": 0}


def render_archives(out: Path, train_px: int, test_px: int, regimes: int) -> dict[str, Path]:
    """The fine archive (0.25 m) and its 4 x 4 averaged twin (1.0 m); one manifest per archive."""
    from osgeo import gdal
    from resflow_mpi.scenegen import REGIME_ORDER, REGIMES, SceneSpec
    from resflow_mpi.io.scenewriter import scene_is_complete, scene_paths, write_scene
    gdal.UseExceptions()
    manifests = {}
    entries: dict[str, dict[str, list]] = {"fine": {"train": [], "predict": []},
                                           "coarse": {"train": [], "predict": []}}
    for r, name in enumerate(REGIME_ORDER[:regimes]):
        regime = REGIMES[name]
        for split, count, side in (("train", 3, train_px), ("test", 2, test_px)):
            for i in range(count):
                spec = SceneSpec(name=f"{split}-{i}-{name}", width=side, height=side,
                                 regime=name, region=regime.region, split=split,
                                 seed=1000 * r + 10 * i + (split == "test"), epsg=regime.epsg,
                                 origin_xy=(400000.0 + 5000 * r + 1000 * i, 1000000.0),
                                 pixel_m=FINE_M)
                fine_dir, coarse_dir = out / "fine", out / "coarse"
                image, mask = (scene_paths(spec, fine_dir) if scene_is_complete(spec, fine_dir)
                               else write_scene(spec, fine_dir))
                coarse_dir.mkdir(parents=True, exist_ok=True)
                c_image, c_mask = coarse_dir / image.name, coarse_dir / mask.name
                if not c_mask.exists():
                    size = side // FACTOR
                    gdal.Translate(str(c_image), str(image), width=size, height=size,
                                   resampleAlg="average", creationOptions=["TILED=YES"])
                    gdal.Translate(str(c_mask), str(mask), width=size, height=size,
                                   resampleAlg="mode", creationOptions=["TILED=YES"])
                key = "train" if split == "train" else "predict"
                for arch, img, msk in (("fine", image, mask), ("coarse", c_image, c_mask)):
                    entries[arch][key].append({"image": str(img), "label": str(msk),
                                               "region": regime.region})
    for arch, e in entries.items():
        manifests[arch] = bk.write_yaml(out / f"{arch}.yaml", e)
    return manifests


def init_gallery(out: Path, name: str, manifest: Path, gsd_m: float | None, recipe: dict
                 ) -> tuple[Path, float]:
    gallery = out / "galleries" / name
    if (gallery / "manifest.json").exists():
        return gallery, float("nan")
    if gallery.exists():
        shutil.rmtree(gallery)
    scenes: dict[str, Any] = {"manifest": str(manifest)}
    if gsd_m is not None:
        scenes["gsd_m"] = gsd_m
    cfg = bk.write_yaml(out / "configs" / f"init-{name}.yaml", {
        "scenes": scenes, "tiling": {"tile_px": 64, "halo_px": 8},
        "models": {"gallery": str(gallery), "arch": "unet", "preset": "tiny", "hash_bits": 16},
        "inference": {"batch_size": 8, "threads_per_rank": 1},
        "output": {"dir": str(out / "init-out" / name), "quicklooks": False},
        "training": recipe})
    proc, wall = bk.run_command([*bk.mpirun(2), bk.resflow_exe(), "init", str(cfg)],
                                timeout_s=3600)
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / f"init-{name}.log").write_text(proc.stdout + proc.stderr)
    return gallery, wall


def map_archive(out: Path, gallery: Path, gallery_name: str, manifest: Path) -> bk.EngineRun:
    arch = manifest.stem
    run_dir = out / "runs" / f"{gallery_name}-on-{arch}"
    cfg = bk.write_yaml(out / "configs" / f"run-{gallery_name}-{arch}.yaml", {
        "scenes": {"manifest": str(manifest)}, "tiling": {"tile_px": 64, "halo_px": 8},
        "models": {"gallery": str(gallery)},
        "inference": {"batch_size": 8, "threads_per_rank": 1, "model": "mono"},
        "output": {"dir": str(run_dir), "geotiff": True, "cog": False, "bucket_map": False,
                   "quicklooks": False}})
    return bk.run_engine(cfg, run_dir, ranks=2)


def block_counts(mask_tif: str, label_tif: str) -> np.ndarray:
    """(blocks, 4) TP/FP/FN/TN per BLOCK_PX block of the scene's own grid (labelled pixels with
    a mapped value only)."""
    from osgeo import gdal
    pred = gdal.Open(mask_tif).ReadAsArray()
    truth = gdal.Open(label_tif).ReadAsArray()
    if pred.shape != truth.shape:
        raise bk.BenchError(f"{mask_tif}: {pred.shape} px, its label {truth.shape}")
    rows = []
    for r in range(0, pred.shape[0], BLOCK_PX):
        for c in range(0, pred.shape[1], BLOCK_PX):
            p, t = pred[r:r + BLOCK_PX, c:c + BLOCK_PX], truth[r:r + BLOCK_PX, c:c + BLOCK_PX]
            ok = (p != 255) & (t != 255)
            p, t = p[ok] == 1, t[ok] == 1
            rows.append([int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum()),
                         int((~p & ~t).sum())])
    return np.asarray(rows, np.int64)


def run_counts(run: bk.EngineRun, manifest: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-block counts of every test scene of a run, and each block's scene index."""
    import yaml
    labels = {Path(e["image"]).name: e["label"] for e in yaml.safe_load(manifest.read_text())["predict"]}
    counts, groups = [], []
    for i, s in enumerate(sorted(run.report["scenes"], key=lambda s: s["path"])):
        c = block_counts(s["outputs"][0], labels[Path(s["path"]).name])
        counts.append(c)
        groups.append(np.full(len(c), i))
    return np.concatenate(counts), np.concatenate(groups)


def resolution_ceiling(manifests: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block counts of a perfect 1.0 m map on the 0.25 m grid: each test scene's 1.0 m
    label brought back by nearest neighbour, against its 0.25 m label (the most any map made
    at 1.0 m can score there)."""
    import yaml
    from osgeo import gdal
    fine = yaml.safe_load(manifests["fine"].read_text())["predict"]
    coarse = {Path(e["image"]).name: e["label"]
              for e in yaml.safe_load(manifests["coarse"].read_text())["predict"]}
    counts, groups = [], []
    tmp = manifests["fine"].parent / "ceiling"
    tmp.mkdir(exist_ok=True)
    for i, e in enumerate(sorted(fine, key=lambda e: e["image"])):
        src = gdal.Open(e["label"])
        up = tmp / Path(e["label"]).name
        gdal.Translate(str(up), coarse[Path(e["image"]).name], width=src.RasterXSize,
                       height=src.RasterYSize, resampleAlg="nearest")
        c = block_counts(str(up), e["label"])
        counts.append(c)
        groups.append(np.full(len(c), i))
    return np.concatenate(counts), np.concatenate(groups)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="small scenes, few epochs: minutes, numbers meaningless")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else bk.default_out("mixed_gsd")
    out.mkdir(parents=True, exist_ok=True)
    from resflow_mpi.init.metrics import iou
    from resflow_mpi.init.selection import paired_gain

    recipe = dict(RECIPE)
    train_px, test_px, regimes = 768, 1024, 2
    if args.quick:
        recipe.update(seg_epochs=4, cem_epochs=2, hash_epochs=4, tiles_per_scene=8)
        train_px, test_px, regimes = 512, 512, 1
    manifests = render_archives(out / "archives", train_px, test_px, regimes)
    galleries = {}
    init_s = {}
    for name, arch, gsd in (("fine", "fine", None), ("coarse", "coarse", None),
                            ("gsd", "fine", COARSE_M)):
        galleries[name], init_s[name] = init_gallery(out, name, manifests[arch], gsd, recipe)
        print(f"[mixed_gsd] gallery {name}: trained on the {arch} scenes"
              + (f" at scenes.gsd_m {gsd:g}" if gsd else ""), flush=True)
    runs: dict[str, dict[str, Any]] = {}
    counts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for g in galleries:
        for arch in ("fine", "coarse"):
            run = map_archive(out, galleries[g], g, manifests[arch])
            key = f"{g}->{arch}"
            counts[key] = run_counts(run, manifests[arch])
            runs[key] = {"iou": iou(counts[key][0].sum(0)), "blocks": len(counts[key][0]),
                         "wall_s": run.wall_s,
                         "ground_resolution": run.report.get("ground_resolution")}
            print(f"[mixed_gsd] {key}: IoU {runs[key]['iou']:.4f} over "
                  f"{runs[key]['blocks']} blocks", flush=True)
    counts["ceiling->fine"] = resolution_ceiling(manifests)
    runs["ceiling->fine"] = {"iou": iou(counts["ceiling->fine"][0].sum(0)),
                             "blocks": len(counts["ceiling->fine"][0])}
    print(f"[mixed_gsd] a perfect 1.0 m map on the 0.25 m grid: IoU "
          f"{runs['ceiling->fine']['iou']:.4f}", flush=True)
    comparisons = {
        # train fine, map coarse: without / with gsd_m, against the native coarse case
        "fine->coarse (no gsd_m) vs coarse->coarse": ("fine->coarse", "coarse->coarse"),
        "gsd->coarse (gsd_m 1.0) vs coarse->coarse": ("gsd->coarse", "coarse->coarse"),
        # train coarse, map fine: without gsd_m, and the 1.0 m gallery with gsd_m, against the
        # native fine case (the 1.0 m mask brought back onto the 0.25 m grid loses edges)
        "coarse->fine (no gsd_m) vs fine->fine": ("coarse->fine", "fine->fine"),
        "gsd->fine (gsd_m 1.0) vs fine->fine": ("gsd->fine", "fine->fine"),
        "gsd->fine (gsd_m 1.0) vs coarse->fine (no gsd_m)": ("gsd->fine", "coarse->fine"),
        "gsd->fine (gsd_m 1.0) vs a perfect 1.0 m map": ("gsd->fine", "ceiling->fine"),
    }
    table = {}
    for label, (a, b) in comparisons.items():
        (ca, groups), (cb, _) = counts[a], counts[b]
        gain = paired_gain(ca, cb, seed=0, groups=groups)
        table[label] = gain.record()
        print(f"[mixed_gsd] {label}: {gain.iou_a:.4f} vs {gain.iou_b:.4f}, "
              f"difference {gain.text()}", flush=True)
    result = {**bk.header("mixed_gsd", args), "recipe": recipe,
              "scenes_px": {"train_fine": train_px, "test_fine": test_px, "regimes": regimes},
              "init_s": init_s, "runs": runs, "comparisons": table}
    path = bk.write_json(out / "mixed_gsd.json", result)
    bk.print_done("mixed_gsd", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
