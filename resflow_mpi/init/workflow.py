"""`resflow init`: scenes + labels -> image gallery + model gallery, MPI-parallel where it pays.

1. Ranks check the labels of their share of the training scenes (io.labels) and take random,
   building-stratified crops (GDAL windows); allgather.
2. Rank 0 trains the CEM (conv autoencoder whose embedding also predicts a 4x4 thumbnail, so the
   embedding itself is learned), embeds all tiles, clusters them (agglomerative, k by the elbow of
   the intra-cluster variance curve), trains the hash head on soft cluster labels, derives bucket
   centroid codes and reports the validation mAP. With ``k_min: 1`` and no bucket structure
   (see ``clustering.choose_k``) k = 1: one bucket whose model is Mono.
3. A shared base segmenter is trained on all tiles; then bucket b is fine-tuned on its own tiles
   on rank b % size, and "Mono" continues on all tiles for the same number of steps (same
   architecture and budget as every bucket model).
4. Rank 0 writes weights, the manifest (last: a gallery without a manifest is not a gallery), the
   image gallery, and the k-selection curve (JSON + PNG).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..errors import InputError, OutputError, ResflowError, os_error_cause
from ..galleries import FORMAT_VERSION, MANIFEST, ImageGallery, bits_to_str, save_module
from ..io.manifest import scenes_for
from ..models import build_feature_extractor, build_hash_head, build_segmentation
from ..models.embedding import ConvAutoencoder
from ..runtime.comm import resolve_comm
from ..runtime.device import usable_cores
from ..tiling import split_block
from .clustering import choose_k, soft_labels
from .data import TileSet, crop_warnings, open_scenes, sample_tiles
from .hashing import (bucket_of, centroid_codes, mean_average_precision, packed_codes,
                      train_hash_head)
from .segtrain import metrics, train_segmenter


def _log(msg: str) -> None:
    print(f"[init] {msg}", file=sys.stderr, flush=True)


def train_cem(x: np.ndarray, in_ch: int, embed_dim: int, epochs: int, batch_size: int, lr: float,
              seed: int) -> Any:
    """Train the feature extractor as an autoencoder (+ thumbnail head on the embedding)."""
    torch.manual_seed(seed)
    extractor = build_feature_extractor(in_ch, embed_dim=embed_dim)
    ae = ConvAutoencoder(extractor)
    thumb = torch.nn.Linear(embed_dim, in_ch * 16)
    opt = torch.optim.Adam(list(ae.parameters()) + list(thumb.parameters()), lr=lr)
    xt = torch.from_numpy(x)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            xb = xt[perm[i:i + batch_size]]
            recon, target = ae(xb)
            _, emb = extractor.encode_pooled(target)
            small = F.adaptive_avg_pool2d(target, 4).flatten(1)
            loss = F.mse_loss(recon, target) + F.mse_loss(thumb(emb), small)
            opt.zero_grad()
            loss.backward()
            opt.step()
    extractor.eval()
    return extractor


@torch.inference_mode()
def embed_all(extractor: Any, x: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    fm, em = [], []
    for i in range(0, len(x), batch):
        f, e = extractor(torch.from_numpy(x[i:i + batch]))
        fm.append(f)
        em.append(e)
    return torch.cat(fm), torch.cat(em).numpy()


def save_curve_plot(path: Path, ks: list[int], var: list[float], k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, var, "o-")
    ax.axvline(k, color="r", ls="--", label=f"chosen k = {k}")
    ax.set_xlabel("number of clusters k")
    ax.set_ylabel("mean intra-cluster variance")
    ax.set_title("Bucket count selection (elbow)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_init(cfg: RunConfig, comm: Any) -> dict[str, Any] | None:
    """The whole initialisation; rank 0 returns the summary."""
    comm = resolve_comm(comm)
    rank, size = comm.rank, comm.size
    t0 = time.perf_counter()
    tr = cfg.training
    torch.set_num_threads(cfg.inference.threads_per_rank or max(1, (os.cpu_count() or 1) // size))
    gallery = Path(cfg.models.gallery)

    def training_scenes() -> list[Any]:
        try:
            gallery.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{gallery}: cannot create the gallery directory "
                              f"({os_error_cause(exc)})") from None
        entries = scenes_for(cfg, "train")  # init learns from the train scenes
        if not entries:
            raise InputError(f"{cfg.scenes.manifest or 'scenes.inputs'}: no training scenes "
                             "found (the manifest's train: list, or an archive's train split)")
        scenes = open_scenes([e.path for e in entries], cfg)
        return scenes, [e.label for e in entries]
    scenes, label_specs = comm.root_call(training_scenes)
    mine = list(split_block(len(scenes), rank, size))
    # Every rank checks the labels of its own scenes before any training; the first error
    # (in scene order) is raised on every rank.
    part, reports, err = None, [], None
    try:
        part, reports = sample_tiles(scenes, label_specs, mine, tr.tile_px, tr.tiles_per_scene,
                                     cfg.scenes.bands, cfg.normalization, cfg.labels, tr.seed,
                                     tr.building_crop_fraction)
    except ResflowError as exc:
        err = exc
    comm.raise_first(err)
    gathered = comm.allgather((part, reports))
    tiles = TileSet.concat([p for p, _ in gathered])
    crop_reports = [r for _, rs in gathered for r in rs]
    n, in_ch = len(tiles.x), tiles.x.shape[1]
    if rank == 0:
        for line in crop_warnings(crop_reports, tr.tiles_per_scene, tr.tile_px):
            _log(f"warning: {line}")
    if n < 2:
        raise InputError(f"{cfg.scenes.manifest or 'scenes.inputs'}: only {n} training crop(s) "
                         f"of {tr.tile_px} px could be taken from {len(scenes)} scene(s); give "
                         "larger or more training scenes, or a smaller training.tile_px")
    if not (tiles.y == 1).any():
        raise InputError(f"{cfg.scenes.manifest or 'scenes.inputs'}: none of the {n} training "
                         f"crops holds a building pixel (labels such as {crop_reports[0].label}); "
                         "check labels.values, labels.where and labels.class_field")
    if rank == 0:
        centred = sum(r.building_centred for r in crop_reports)
        _log(f"{n} training crops of {tr.tile_px}px ({centred} centred on buildings) from "
             f"{len(scenes)} scene(s) on {size} rank(s)")
    rng = np.random.default_rng(tr.seed)
    is_val = np.zeros(n, bool)
    is_val[rng.permutation(n)[:max(1, int(round(n * tr.val_fraction)))]] = True
    # -- stage A (rank 0): CEM, clustering, hashing ----------------------------------------------
    summary: dict[str, Any] = {}
    per_rank_threads = torch.get_num_threads()
    if rank == 0:
        # The other ranks sleep (quiet_barrier) during this serial stage: use the node's cores.
        torch.set_num_threads(max(per_rank_threads, usable_cores()))
        extractor = train_cem(tiles.x, in_ch, cfg.models.embed_dim, tr.cem_epochs, tr.batch_size,
                              tr.lr, tr.seed)
        fmaps, emb = embed_all(extractor, tiles.x)
        z = (emb - emb[~is_val].mean(0)) / (emb[~is_val].std(0) + 1e-6)
        choice = choose_k(z[~is_val], tr.k_min, tr.k_max, min_drop=tr.k_min_drop, seed=tr.seed)
        k = choice.k
        labels = np.empty(n, int)
        labels[~is_val] = choice.labels
        cents = np.stack([z[~is_val][choice.labels == c].mean(0) for c in range(k)])
        labels[is_val] = ((z[is_val][:, None] - cents[None]) ** 2).sum(-1).argmin(1)
        _log(f"CEM trained; k chosen = {k} from {choice.ks[0]}..{choice.ks[-1]}: {choice.reason}")
        _log("variance curve: " + ", ".join(f"V({kk})={v:.3g}" for kk, v in
                                            zip(choice.ks, choice.mean_intra_variance)))
        if choice.reference_knee_score is not None:
            _log("drop ratio V(k-1)/V(k), data vs structureless reference: " + ", ".join(
                f"k={kk}: {d:.2f}/{r:.2f}" for kk, d, r in
                zip(choice.ks[1:], choice.knee_score[1:], choice.reference_knee_score[1:])))
        soft = soft_labels(z, labels)
        head = build_hash_head(extractor.feat_ch, cfg.models.hash_bits, k)
        torch.manual_seed(tr.seed)
        train_hash_head(head, fmaps[~is_val], soft[~is_val], tr.hash_epochs, tr.batch_size,
                        tr.lr, tr.seed)
        codes = packed_codes(head, fmaps)
        centroids = centroid_codes(codes[~is_val], labels[~is_val], k, cfg.models.hash_bits)
        buckets = bucket_of(codes, centroids)
        hash_map = mean_average_precision(codes[is_val], labels[is_val], codes[~is_val],
                                          labels[~is_val])
        bucket_acc = float((buckets[is_val] == labels[is_val]).mean())
        _log(f"hash head: validation mAP {hash_map:.4f}, bucket = cluster on "
             f"{bucket_acc:.1%} of validation tiles")
        curve = {"ks": choice.ks, "mean_intra_variance": choice.mean_intra_variance,
                 "knee_score": choice.knee_score,
                 "reference_knee_score": choice.reference_knee_score, "chosen_k": k,
                 "reason": choice.reason,
                 "min_drop": tr.k_min_drop, "k_min": tr.k_min, "k_max": tr.k_max}
        (gallery / "k_selection.json").write_text(json.dumps(curve, indent=1))
        save_curve_plot(gallery / "k_selection.png", choice.ks, choice.mean_intra_variance, k)
        ext_entry = save_module(extractor, gallery / "cem.pt")
        head_entry = {**save_module(head, gallery / "hash.pt"), "n_bits": cfg.models.hash_bits}
        summary.update({"k": k, "hash_map": hash_map, "bucket_equals_cluster": bucket_acc,
                        "n_tiles": n, "n_val": int(is_val.sum())})
        state = (buckets, centroids, codes)
        torch.set_num_threads(per_rank_threads)
    else:
        state = None
    comm.quiet_barrier()
    buckets, centroids, codes = comm.bcast(state, root=0)
    k = len(centroids)
    # -- stage B: base segmenter (rank 0), then buckets + Mono in parallel ---------------------
    steps_per_epoch = max(1, -(-int((~is_val).sum()) // tr.batch_size))
    base_steps = max(1, tr.seg_epochs * steps_per_epoch // 2)
    ft_steps = max(1, tr.seg_epochs * steps_per_epoch - base_steps)
    xtr, ytr = tiles.x[~is_val], tiles.y[~is_val]
    base_state = None
    if rank == 0:
        torch.set_num_threads(max(per_rank_threads, usable_cores()))
        torch.manual_seed(tr.seed)
        base = build_segmentation(cfg.models.arch, cfg.models.preset, in_ch)
        train_segmenter(base, xtr, ytr, base_steps, tr.batch_size, tr.lr, tr.seed)
        base_state = base.state_dict()
        torch.set_num_threads(per_rank_threads)
        _log(f"base {cfg.models.arch}/{cfg.models.preset} trained for {base_steps} steps; "
             + (f"fine-tuning {k} bucket model(s) + Mono" if k > 1 else
                "k = 1: fine-tuning Mono only (the one bucket maps to it)")
             + f" for {ft_steps} steps each on {size} rank(s)")
    comm.quiet_barrier()
    base_state = comm.bcast(base_state, root=0)
    entries: dict[str, dict[str, Any]] = {}
    # With one bucket its model would be Mono again (same tiles, same budget): train Mono only.
    jobs = [k] if k == 1 else list(range(k + 1))
    for index, job in enumerate(jobs):
        if index % size != rank:
            continue
        name = "mono" if job == k else f"bucket-{bits_to_str(centroids[job], cfg.models.hash_bits)}"
        sel_tr = np.ones(len(xtr), bool) if job == k else (buckets[~is_val] == job)
        sel_val = np.ones(int(is_val.sum()), bool) if job == k else (buckets[is_val] == job)
        model = build_segmentation(cfg.models.arch, cfg.models.preset, in_ch)
        model.load_state_dict(base_state)
        lr = tr.lr * 0.5
        train_segmenter(model, xtr[sel_tr] if sel_tr.any() else xtr, ytr[sel_tr] if sel_tr.any() else ytr,
                        ft_steps, tr.batch_size, lr, tr.seed + 1 + job)
        xv, yv = tiles.x[is_val][sel_val], tiles.y[is_val][sel_val]
        m = metrics(model, xv, yv) if len(xv) else {}
        entry = save_module(model, gallery / f"{name}.pt")
        entry.update({"train_tiles": int(sel_tr.sum()), "val_tiles": int(sel_val.sum()),
                      "steps": base_steps + ft_steps, "val_metrics": m})
        if job < k:
            entry.update({"index": job, "code": bits_to_str(centroids[job], cfg.models.hash_bits)})
        entries[name] = entry
    comm.quiet_barrier()
    all_entries = comm.gather(entries, root=0)
    if rank != 0:
        comm.barrier()
        return None
    merged = {key: v for part in all_entries for key, v in part.items()}  # type: ignore[union-attr]
    bucket_entries = sorted((v for key, v in merged.items() if key != "mono"),
                            key=lambda e: e["index"])
    if k == 1:  # the single bucket is Mono: same weights file, the bucket's code for routing
        bucket_entries = [{**merged["mono"], "index": 0, "same_as": "mono",
                           "code": bits_to_str(centroids[0], cfg.models.hash_bits)}]
    manifest = {"format_version": FORMAT_VERSION, "in_channels": in_ch,
                "bands": list(cfg.scenes.bands), "normalization": cfg.to_dict()["normalization"],
                "training": cfg.to_dict()["training"], "arch": cfg.models.arch,
                "preset": cfg.models.preset, "extractor": ext_entry, "hash_head": head_entry,
                "buckets": bucket_entries, "mono": merged["mono"], "summary": summary,
                "training_crops": {
                    "requested_per_scene": tr.tiles_per_scene, "used": int(n),
                    "building_centred": sum(r.building_centred for r in crop_reports),
                    "per_scene": [dataclasses.asdict(r) for r in crop_reports],
                    "warnings": crop_warnings(crop_reports, tr.tiles_per_scene, tr.tile_px)},
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    scene_meta = [{"name": Path(s.path).stem, "path": s.path, "epsg": s.epsg,
                   "label": label_specs[i].path if label_specs[i] else None,
                   "acquisition": dict(s.metadata)} for i, s in enumerate(scenes)]
    ImageGallery.write(gallery / "images.h5", codes, tiles.scene, tiles.window, tiles.extent,
                       buckets, cfg.models.hash_bits, scene_meta)
    tmp = gallery / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, gallery / MANIFEST)
    summary["seconds"] = time.perf_counter() - t0
    _log(f"gallery written to {gallery}: "
         + (f"{k} bucket model(s) + Mono" if k > 1 else "Mono only (k = 1)") + ", hash mAP "
         f"{summary['hash_map']:.4f}, {summary['seconds']:.0f} s")
    comm.barrier()
    return summary
