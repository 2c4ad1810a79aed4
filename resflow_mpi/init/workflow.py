"""`resflow init`: scenes + labels -> image gallery + model gallery, MPI-parallel where it pays.

1. Ranks check the labels of their share of the training scenes (io.labels) and take random,
   building-stratified crops (GDAL windows); allgather.
2. Rank 0 trains the CEM (conv autoencoder whose embedding also predicts a 4x4 thumbnail, so the
   embedding itself is learned), embeds all tiles, clusters them (agglomerative, k by the elbow of
   the intra-cluster variance curve), trains the hash head on soft cluster labels, derives bucket
   centroid codes and reports the validation mAP. With ``k_min: 1`` and no bucket structure
   (see ``clustering.choose_k``) k = 1: one bucket whose model is Mono.
3. Segmentation models (``TrainingPlan``): per bucket, fine-tuned from a base trained on all
   tiles (``bucket_mode: finetune``) or trained on the bucket's tiles only (``paper``); Mono on
   all tiles with the total budget of the bucket models (fair), optionally a wider Mono too;
   every model keeps its best checkpoint on validation. Jobs spread over ranks by their steps.
   Each bucket's in-bucket Hamming distances (training tiles to centroid) are kept for routing.
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
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..budget import memory_profile
from ..config import RunConfig
from ..errors import InputError, OutputError, ResflowError, os_error_cause
from ..galleries import FORMAT_VERSION, MANIFEST, ImageGallery, bits_to_str, save_module, sha256_file
from ..io.manifest import scenes_for
from ..models import build_feature_extractor, build_hash_head, build_segmentation
from ..models.embedding import ConvAutoencoder
from ..runtime.comm import resolve_comm
from ..runtime.device import usable_cores
from ..tiling import Window, split_block
from .clustering import choose_k, soft_labels
from .data import TileSet, crop_warnings, open_scenes, sample_tiles
from .dataparallel import DataParallel
from .oodfit import fit_embedding_reference
from .hashing import (bucket_of, centroid_codes, hamming_to_own_centroid,
                      mean_average_precision, packed_codes, train_hash_head)
from .segtrain import metrics, train_segmenter, train_selected


def _log(msg: str) -> None:
    print(f"[init] {msg}", file=sys.stderr, flush=True)


def train_cem(x: np.ndarray, in_ch: int, embed_dim: int, epochs: int, batch_size: int, lr: float,
              seed: int, dp: Optional[DataParallel] = None) -> Any:
    """Train the feature extractor as an autoencoder (+ thumbnail head on the embedding);
    ``dp``: data-parallel over its ranks (each computes its share of every batch)."""
    torch.manual_seed(seed)
    extractor = build_feature_extractor(in_ch, embed_dim=embed_dim)
    ae = ConvAutoencoder(extractor)
    thumb = torch.nn.Linear(embed_dim, in_ch * 16)
    trained = torch.nn.ModuleList([ae, thumb])
    opt = torch.optim.Adam(trained.parameters(), lr=lr)
    xt = torch.from_numpy(x)
    g = torch.Generator().manual_seed(seed)
    ae.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            xb = xt[perm[i:i + batch_size]]
            n_batch = len(xb)
            if dp is not None:
                xb = xb[dp.share(n_batch)]
            opt.zero_grad()
            loss_value = 0.0
            if len(xb):
                recon, target = ae(xb)
                _, emb = extractor.encode_pooled(target)
                small = F.adaptive_avg_pool2d(target, 4).flatten(1)
                loss = F.mse_loss(recon, target) + F.mse_loss(thumb(emb), small)
                loss.backward()
                loss_value = float(loss.detach())
            if dp is not None:
                dp.sum_gradients(trained, len(xb), n_batch, loss_value)
            opt.step()
    extractor.eval()
    if dp is not None:
        dp.check_identical(trained, "feature extractor")
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


@dataclass(frozen=True)
class TrainJob:
    """One segmentation model to train: a bucket's (``bucket`` set) or a Mono."""

    name: str             # gallery file stem: bucket-<code>, mono, mono-wide
    index: int            # seed offset: bucket index, k for Mono, k + 1 for the wide Mono
    bucket: Optional[int]  # None: trained on all tiles
    preset: str
    steps: int            # steps of this job (after the shared base, when from_base)
    from_base: bool


@dataclass
class TrainingPlan:
    """Who trains what, for how many steps.

    A bucket model's budget is S = seg_epochs x (training tiles / batch size) steps. ``finetune``:
    a base model on all tiles for S/2 steps, then each bucket model S - S/2 steps on its tiles
    from the base. ``paper``: each bucket model S steps from scratch on its tiles only. Mono is
    trained on all tiles with the total budget of the n bucket models that have a model
    (``mono_budget: total``: base + n (S - S/2), or n S) or one bucket model's (``bucket``);
    the wide Mono gets the total budget from scratch. A bucket with fewer than
    ``min_bucket_tiles`` training tiles gets no model (``too_small``): it maps with Mono."""

    base_steps: int
    jobs: list[TrainJob]
    too_small: list[int]
    bucket_steps: int

    def jobs_of(self, rank: int, size: int) -> list[TrainJob]:
        """This rank's jobs: longest first, each to the least-loaded rank (deterministic)."""
        load = [0] * size
        mine = []
        for job in sorted(self.jobs, key=lambda j: (-j.steps, j.index)):
            r = min(range(size), key=lambda i: (load[i], i))
            load[r] += job.steps
            if r == rank:
                mine.append(job)
        return mine

    def describe(self, cfg: RunConfig, size: int) -> str:
        t = cfg.training
        base = (f"base {cfg.models.arch}/{cfg.models.preset} {self.base_steps} steps on all tiles, "
                if self.base_steps else "no base model (paper mode), ")
        parts = [f"{j.name}: {j.steps} steps" + (" from base" if j.from_base else " from scratch")
                 for j in self.jobs]
        return (f"segmentation ({t.bucket_mode} mode, Mono budget {t.mono_budget}): {base}"
                + ", ".join(parts) + f" on {size} rank(s)")

    def record(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "bucket_steps": self.bucket_steps,
                "jobs": {j.name: {"steps": j.steps, "from_base": j.from_base, "preset": j.preset}
                         for j in self.jobs},
                "buckets_without_model": list(self.too_small)}


def plan_training(cfg: RunConfig, train_buckets: np.ndarray, codes: list[str]) -> TrainingPlan:
    """The segmentation training plan for the buckets of ``codes`` (see TrainingPlan)."""
    k = len(codes)
    tr = cfg.training
    steps_per_epoch = max(1, -(-len(train_buckets) // tr.batch_size))
    total = max(2, tr.seg_epochs * steps_per_epoch)
    finetune = tr.bucket_mode == "finetune"
    base_steps = total // 2 if finetune else 0
    own = total - base_steps
    counts = np.bincount(train_buckets, minlength=k)
    too_small = [b for b in range(k) if k > 1 and counts[b] < tr.min_bucket_tiles]
    with_model = [b for b in range(k) if k > 1 and b not in too_small]
    jobs = []
    for b in with_model:
        jobs.append(TrainJob(f"bucket-{codes[b]}", b, b, cfg.models.preset, own, finetune))
    n = max(1, len(with_model))
    mono_steps = own * n if tr.mono_budget == "total" else own
    jobs.append(TrainJob("mono", k, None, cfg.models.preset, mono_steps, finetune))
    if tr.mono_wide_preset:
        jobs.append(TrainJob("mono-wide", k + 1, None, tr.mono_wide_preset,
                             base_steps + mono_steps, False))
    return TrainingPlan(base_steps, jobs, too_small, total)


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
        return scenes, [e.label for e in entries], [e.region for e in entries]
    scenes, label_specs, regions = comm.root_call(training_scenes)
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
    stage_s: dict[str, float] = {"crops": time.perf_counter() - t0}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stage_s[name] = now - mark
        mark = now
    rng = np.random.default_rng(tr.seed)
    is_val = np.zeros(n, bool)
    is_val[rng.permutation(n)[:max(1, int(round(n * tr.val_fraction)))]] = True
    # -- stage A: CEM, clustering (rank 0), hashing --------------------------------------------
    # The shared models (CEM, hash head, base segmenter) are trained by rank 0 with all of the
    # node's cores while the other ranks sleep, or data-parallel over every rank.
    summary: dict[str, Any] = {}
    per_rank_threads = torch.get_num_threads()
    dp = DataParallel(comm, tr.data_parallel_backend) if tr.data_parallel and size > 1 else None
    trains_shared = rank == 0 or dp is not None
    if rank == 0 and dp is None:
        # The other ranks sleep (quiet_barrier) during this serial stage: use the node's cores.
        torch.set_num_threads(max(per_rank_threads, usable_cores()))
    if trains_shared:
        extractor = train_cem(tiles.x, in_ch, cfg.models.embed_dim, tr.cem_epochs, tr.batch_size,
                              tr.lr, tr.seed, dp=dp)
        fmaps, emb = embed_all(extractor, tiles.x)
    lap("cem")
    if rank == 0:
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
    lap("clustering")
    if dp is not None:
        comm.quiet_barrier()
        k, labels, soft = comm.bcast((k, labels, soft) if rank == 0 else None, root=0)
    if trains_shared:
        head = build_hash_head(extractor.feat_ch, cfg.models.hash_bits, k)
        torch.manual_seed(tr.seed)
        train_hash_head(head, fmaps[~is_val], soft[~is_val], tr.hash_epochs, tr.batch_size,
                        tr.lr, tr.seed, dp=dp)
    lap("hash")
    if rank == 0:
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
        dist = hamming_to_own_centroid(codes, centroids, buckets)
        hist = [np.bincount(dist[~is_val & (buckets == b)], minlength=cfg.models.hash_bits + 1)
                .tolist() for b in range(k)]
        summary["in_bucket_distance_max"] = [int(dist[~is_val & (buckets == b)].max(initial=0))
                                             for b in range(k)]
        ood_ref, ood_record = fit_embedding_reference(lambda x: embed_all(extractor, x)[1],
                                                      scenes, regions, cfg)
        if ood_ref is not None:
            tmp_ref = gallery / "ood_reference.npz.tmp"
            with open(tmp_ref, "wb") as fh:
                np.savez(fh, **ood_ref.arrays())
            os.replace(tmp_ref, gallery / "ood_reference.npz")
            ood_record.update({"file": "ood_reference.npz",
                               "sha256": sha256_file(gallery / "ood_reference.npz")})
            _log(f"embedding reference for out-of-distribution routing: "
                 f"{ood_record['reference_windows']} reference, "
                 f"{ood_record['calibration_windows']} calibration windows of "
                 f"{ood_record['window_px']} px")
        else:
            _log(f"warning: {ood_record['skipped']}")
        state = (buckets, centroids, codes, hist)
        torch.set_num_threads(per_rank_threads)
    else:
        state = None
    comm.quiet_barrier()
    buckets, centroids, codes, dist_hist = comm.bcast(state, root=0)
    k = len(centroids)
    # -- stage B: segmentation models (see plan_training) ----------------------------------------
    xtr, ytr = tiles.x[~is_val], tiles.y[~is_val]
    xva, yva = tiles.x[is_val], tiles.y[is_val]
    plan = plan_training(cfg, buckets[~is_val],
                         [bits_to_str(c, cfg.models.hash_bits) for c in centroids])
    base_state = None
    if plan.base_steps and trains_shared:
        if dp is None:
            torch.set_num_threads(max(per_rank_threads, usable_cores()))
        torch.manual_seed(tr.seed)
        base = build_segmentation(cfg.models.arch, cfg.models.preset, in_ch)
        train_segmenter(base, xtr, ytr, plan.base_steps, tr.batch_size, tr.lr, tr.seed, dp=dp)
        base_state = base.state_dict()
        torch.set_num_threads(per_rank_threads)
    if rank == 0:
        for b in plan.too_small:
            _log(f"WARNING: bucket {b} has {int((buckets[~is_val] == b).sum())} training tile(s), "
                 f"fewer than training.min_bucket_tiles = {tr.min_bucket_tiles}: it gets no model "
                 "of its own, its tiles are mapped by Mono")
        _log(plan.describe(cfg, size))
    comm.quiet_barrier()
    if plan.base_steps and dp is None:
        base_state = comm.bcast(base_state, root=0)
    if dp is not None:
        dp.close()  # the shared models are trained
    lap("base_model")
    entries: dict[str, dict[str, Any]] = {}
    for job in plan.jobs_of(rank, size):
        torch.manual_seed(tr.seed + 1 + job.index)
        model = build_segmentation(cfg.models.arch, job.preset, in_ch)
        if job.from_base:
            model.load_state_dict(base_state)
        sel_tr = np.ones(len(xtr), bool) if job.bucket is None else (buckets[~is_val] == job.bucket)
        sel_val = np.ones(len(xva), bool) if job.bucket is None else (buckets[is_val] == job.bucket)
        xv, yv = xva[sel_val], yva[sel_val]
        fit = train_selected(model, xtr[sel_tr], ytr[sel_tr], job.steps, tr.batch_size,
                             tr.lr * 0.5 if job.from_base else tr.lr, tr.seed + 1 + job.index,
                             xv, yv, tr.val_every)
        m = metrics(model, xv, yv) if len(xv) else {}
        entry = save_module(model, gallery / f"{job.name}.pt")
        entry.update({"train_tiles": int(sel_tr.sum()), "val_tiles": int(sel_val.sum()),
                      "steps": job.steps + (plan.base_steps if job.from_base else 0),
                      "from_base": job.from_base, "best_step": fit["best_step"],
                      "val_metrics": m})
        if job.bucket is not None:
            entry.update({"index": job.bucket,
                          "code": bits_to_str(centroids[job.bucket], cfg.models.hash_bits)})
        entries[job.name] = entry
    comm.quiet_barrier()
    lap("segmentation_models")
    all_entries = comm.gather(entries, root=0)
    if rank != 0:
        comm.barrier()
        return None
    merged = {key: v for part in all_entries for key, v in part.items()}  # type: ignore[union-attr]
    bucket_entries = []
    for b in range(k):
        code = bits_to_str(centroids[b], cfg.models.hash_bits)
        if b in plan.too_small or k == 1:
            # No model of its own (k = 1, or too few tiles): the bucket's code maps with Mono.
            entry = {**merged["mono"], "index": b, "code": code, "same_as": "mono",
                     "train_tiles": int((buckets[~is_val] == b).sum()),
                     "val_tiles": int((buckets[is_val] == b).sum())}
            if k > 1:
                entry["fallback"] = (f"fewer than training.min_bucket_tiles = "
                                     f"{tr.min_bucket_tiles} training tiles")
        else:
            entry = merged[f"bucket-{code}"]
        entry["distance_histogram"] = dist_hist[b]
        bucket_entries.append(entry)
    manifest = {"format_version": FORMAT_VERSION, "in_channels": in_ch,
                "bands": list(cfg.scenes.bands), "normalization": cfg.to_dict()["normalization"],
                "train_dtypes": sorted({s.dtype for s in scenes}),
                "training": cfg.to_dict()["training"], "arch": cfg.models.arch,
                "preset": cfg.models.preset, "extractor": ext_entry, "hash_head": head_entry,
                "buckets": bucket_entries, "mono": merged["mono"],
                **({"mono_wide": merged["mono-wide"]} if "mono-wide" in merged else {}),
                "bucket_mode": tr.bucket_mode, "mono_budget": tr.mono_budget,
                "budget": plan.record(), "summary": summary,
                **({"ood_reference": ood_record} if "file" in ood_record else
                   {"ood_reference_skipped": ood_record.get("skipped")}),
                "training_crops": {
                    "requested_per_scene": tr.tiles_per_scene, "used": int(n),
                    "building_centred": sum(r.building_centred for r in crop_reports),
                    "per_scene": [dataclasses.asdict(r) for r in crop_reports],
                    "warnings": crop_warnings(crop_reports, tr.tiles_per_scene, tr.tile_px)},
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    scene_meta = [{"name": Path(s.path).stem, "path": s.path, "epsg": s.epsg,
                   "label": label_specs[i].path if label_specs[i] else None,
                   "acquisition": dict(s.metadata)} for i, s in enumerate(scenes)]
    wgs84 = np.array([scenes[int(sid)].window_extent_wgs84(Window(*(int(v) for v in win)))
                      for sid, win in zip(tiles.scene, tiles.window)], np.float64).reshape(-1, 4)
    ImageGallery.write(gallery / "images.h5", codes, tiles.scene, tiles.window, tiles.extent,
                       buckets, cfg.models.hash_bits, scene_meta, extent_wgs84=wgs84)
    manifest["memory_profile"] = memory_profile(manifest)  # runs' budgets need no tracing
    tmp = gallery / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, gallery / MANIFEST)
    lap("write")
    summary["seconds"] = time.perf_counter() - t0
    summary["stage_s"] = {key: round(v, 3) for key, v in stage_s.items()}
    summary["ranks"], summary["data_parallel"] = size, dp is not None
    if dp is not None:
        summary["data_parallel_backend"] = dp.backend
    _log("seconds on rank 0: " + ", ".join(f"{key} {v:.1f}" for key, v in stage_s.items())
         + f" ({size} rank(s), shared models {f'data-parallel ({dp.backend})' if dp else 'on rank 0'})")
    _log(f"gallery written to {gallery}: "
         + (f"{k} bucket model(s) + Mono" if k > 1 else "Mono only (k = 1)") + ", hash mAP "
         f"{summary['hash_map']:.4f}, {summary['seconds']:.0f} s")
    comm.barrier()
    return summary
