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
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..budget import memory_profile
from ..config import RunConfig
from ..errors import InputError, OutputError, ResflowError, os_error_cause
from ..galleries import FORMAT_VERSION, MANIFEST, ImageGallery, bits_to_str, save_module, sha256_file
from ..io.manifest import scenes_for
from ..io.raster import gsd_note, gsd_summary
from ..models import build_feature_extractor, build_hash_head, build_segmentation
from ..models.embedding import ConvAutoencoder
from ..runtime.comm import resolve_comm
from ..runtime.device import usable_cores
from ..tiling import Window, split_block
from ..ood import EmbeddingReference
from .clustering import choose_k, soft_labels
from .data import TileSet, crop_warnings, open_scenes, per_scene_reports, sample_tiles
from .dataparallel import DataParallel, data_parallel_step
from .hashing import (bucket_of, centroid_codes, hamming_to_own_centroid,
                      mean_average_precision, packed_codes, train_hash_head)
from .holdout import HoldoutPlan, plan_holdout, scene_descriptors, stratum_of
from .metrics import COUNT_KEYS, iou, iou_f1
from .oodfit import fit_embedding_reference
from .segtrain import TrainingRecipe, acquisition_shifts, tile_counts, train_selected
from .selection import (BucketVerdict, Gain, choose_flagged_model, family_confidence,
                        flagged_proxy, gallery_counts, judge_bucket, paired_gain,
                        verdict_table)


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
    def loss_of(xb: torch.Tensor) -> torch.Tensor:
        recon, target = ae(xb)
        _, emb = extractor.encode_pooled(target)
        small = F.adaptive_avg_pool2d(target, 4).flatten(1)
        return F.mse_loss(recon, target) + F.mse_loss(thumb(emb), small)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            data_parallel_step(trained, opt, (xt[perm[i:i + batch_size]],), loss_of, dp)
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
    """One segmentation model to train: a bucket's of candidate ``k`` or a Mono (``k`` None)."""

    name: str             # gallery file stem once chosen: bucket-<code>, mono, mono-wide
    index: int            # seed offset: bucket index; MONO_INDEX (+1 for the wide Mono)
    bucket: Optional[int]  # None: trained on all tiles
    k: Optional[int]      # the candidate bucket count the bucket belongs to
    preset: str
    steps: int            # steps of this job (after the shared base, when from_base)
    from_base: bool

    @property
    def key(self) -> str:
        """Unique over candidates: k<k>-bucket-<code>, or the Mono's name."""
        return self.name if self.k is None else f"k{self.k}-{self.name}"


MONO_INDEX = 10_000
HASH_MAP_WARN = 0.8
SHIFT_COPIES = 2   # shifted copies of each held-out crop in the acceptance check


@dataclass
class TrainingPlan:
    """Who trains what, for how many steps.

    A bucket model's budget is S = seg_epochs x (training tiles / batch size) steps. ``finetune``:
    a base model on all tiles for S/2 steps, then each bucket model S - S/2 steps on its tiles
    from the base. ``paper``: each bucket model S steps from scratch on its tiles only. Every
    candidate bucket count gets its bucket models. Mono is trained on all tiles with the total
    budget of the largest candidate's n bucket models (``mono_budget: total``: base +
    n (S - S/2), or n S) or one bucket model's (``bucket``); the wide Mono gets the total budget
    from scratch. A bucket with fewer than ``min_bucket_tiles`` training tiles gets no model
    (``too_small``): it maps with Mono. Early stopping on the held-out scenes may end any job
    sooner."""

    base_steps: int
    jobs: list[TrainJob]
    too_small: dict[int, list[int]]
    bucket_steps: int

    def jobs_of(self, rank: int, size: int) -> list[TrainJob]:
        """This rank's jobs: longest first, each to the least-loaded rank (deterministic)."""
        load = [0] * size
        mine = []
        for job in sorted(self.jobs, key=lambda j: (-j.steps, j.k or 0, j.index)):
            r = min(range(size), key=lambda i: (load[i], i))
            load[r] += job.steps
            if r == rank:
                mine.append(job)
        return mine

    def describe(self, cfg: RunConfig, size: int) -> str:
        t = cfg.training
        base = (f"base {cfg.models.arch}/{cfg.models.preset} {self.base_steps} steps on all tiles, "
                if self.base_steps else "no base model (paper mode), ")
        parts = [f"{j.key}: {j.steps} steps" + (" from base" if j.from_base else " from scratch")
                 for j in self.jobs]
        return (f"segmentation ({t.bucket_mode} mode, Mono budget {t.mono_budget}): {base}"
                + ", ".join(parts) + f" on {size} rank(s)")

    def record(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "bucket_steps": self.bucket_steps,
                "jobs": {j.key: {"steps": j.steps, "from_base": j.from_base, "preset": j.preset}
                         for j in self.jobs},
                "buckets_without_model": {str(k): v for k, v in self.too_small.items()}}


def plan_training(cfg: RunConfig, candidates: Sequence[tuple[int, np.ndarray, list[str]]]
                  ) -> TrainingPlan:
    """The segmentation training plan for candidate bucket counts, each given as (k, the
    training tiles' buckets, the buckets' codes) (see TrainingPlan)."""
    tr = cfg.training
    n_train = len(candidates[0][1])
    steps_per_epoch = max(1, -(-n_train // tr.batch_size))
    total = max(2, tr.seg_epochs * steps_per_epoch)
    finetune = tr.bucket_mode == "finetune"
    base_steps = total // 2 if finetune else 0
    own = total - base_steps
    jobs: list[TrainJob] = []
    too_small: dict[int, list[int]] = {}
    n_models = 1
    for k, train_buckets, codes in candidates:
        counts = np.bincount(train_buckets, minlength=k)
        too_small[k] = [b for b in range(k) if k > 1 and counts[b] < tr.min_bucket_tiles]
        with_model = [b for b in range(k) if k > 1 and b not in too_small[k]]
        jobs += [TrainJob(f"bucket-{codes[b]}", b, b, k, cfg.models.preset, own, finetune)
                 for b in with_model]
        n_models = max(n_models, len(with_model))
    mono_steps = own * n_models if tr.mono_budget == "total" else own
    jobs.append(TrainJob("mono", MONO_INDEX, None, None, cfg.models.preset, mono_steps, finetune))
    if tr.mono_wide_preset:
        jobs.append(TrainJob("mono-wide", MONO_INDEX + 1, None, None, tr.mono_wide_preset,
                             base_steps + mono_steps, False))
    return TrainingPlan(base_steps, jobs, too_small, total)


@dataclass
class Candidate:
    """One bucket count under comparison: its clusters, hash codes and buckets (every crop)."""

    k: int
    labels: np.ndarray        # (n,) cluster (held-out crops: nearest training centroid)
    codes: np.ndarray         # (n, K) packed hash codes
    centroids: np.ndarray     # (k, K) packed bucket centroid codes
    buckets: np.ndarray       # (n,) nearest centroid
    hash_map: Optional[float]             # held-out mAP
    bucket_equals_cluster: Optional[float]
    hash_map_per_bucket: list[Optional[float]]
    code_names: list[str]


def held_out_crops(tiles: TileSet, plan: HoldoutPlan) -> np.ndarray:
    """(n,) True for crops of held-out scenes or held-out row bands."""
    out = np.isin(tiles.scene, plan.held_out_scenes)
    for s, cut in plan.row_split_scenes.items():
        out |= (tiles.scene == s) & (tiles.window[:, 1] >= cut)
    return out


def hash_candidate(k: int, labels: np.ndarray, head: Any, fmaps: torch.Tensor,
                   is_val: np.ndarray, n_bits: int) -> Candidate:
    """Codes, centroids, buckets and held-out mAP (overall and per bucket) of a trained head."""
    codes = packed_codes(head, fmaps)
    centroids = centroid_codes(codes[~is_val], labels[~is_val], k, n_bits)
    buckets = bucket_of(codes, centroids)
    has_val = bool(is_val.any())
    hash_map = (mean_average_precision(codes[is_val], labels[is_val], codes[~is_val],
                                       labels[~is_val]) if has_val else None)
    per_bucket: list[Optional[float]] = []
    for b in range(k):
        q = is_val & (buckets == b)
        per_bucket.append(mean_average_precision(codes[q], labels[q], codes[~is_val],
                                                 labels[~is_val]) if q.any() else None)
    acc = float((buckets[is_val] == labels[is_val]).mean()) if has_val else None
    return Candidate(k, labels, codes, centroids, buckets, hash_map, acc, per_bucket,
                     [bits_to_str(c, n_bits) for c in centroids])


def hash_map_warning(hash_map: Optional[float], k: int) -> Optional[str]:
    """One line when held-out tiles often hash away from their cluster's bucket."""
    if hash_map is None or hash_map >= HASH_MAP_WARN or k == 1:
        return None
    return (f"hash held-out mAP {hash_map:.3f} is below {HASH_MAP_WARN}: tiles of new scenes "
            "often land in another cluster's bucket, so bucket routing is unreliable; raise "
            "training.hash_epochs or models.hash_bits, or lower training.k_max (buckets not "
            "shown better than Mono map with Mono whatever the hash)")


@dataclass
class CandidateVerdict:
    """A candidate's bucket verdicts and its whole gallery's held-out counts."""

    k: int
    verdicts: list[BucketVerdict]
    counts: np.ndarray        # (n_val, 4) the gallery's map (kept bucket models, else Mono)
    vs_mono: Gain
    scene_of: Optional[np.ndarray] = None   # (n_val,) the held-out crops' scenes

    @property
    def iou(self) -> float:
        v = iou(self.counts.sum(0)) if len(self.counts) else np.nan
        return -1.0 if np.isnan(v) else float(v)


def judge_candidate(cand: Candidate, is_val: np.ndarray, counts: dict[str, np.ndarray],
                    shifted: dict[str, np.ndarray], min_gain: float, seed: int,
                    scene_of: np.ndarray) -> CandidateVerdict:
    """Each bucket of ``cand`` against Mono on its held-out tiles, as acquired and under
    acquisition shift (``counts`` / ``shifted``: job key -> per-tile counts on every held-out
    crop / on its SHIFT_COPIES shifted copies; ``scene_of``: the crops' scenes, resampled
    first), with family-wise intervals over the candidate's bucket models; then the gallery
    that keeps the winners."""
    mono = counts["mono"]
    val_buckets = cand.buckets[is_val]
    keys = [f"k{cand.k}-bucket-{c}" for c in cand.code_names]
    conf = family_confidence(sum(k in counts for k in keys))
    verdicts, kept = [], {}
    for b in range(cand.k):
        own = counts.get(keys[b])
        sel = val_buckets == b
        rep = np.tile(sel, SHIFT_COPIES)
        v = judge_bucket(b, int((cand.buckets[~is_val] == b).sum()),
                         own[sel] if own is not None else None, mono[sel], min_gain, seed,
                         scene_of[sel],
                         (shifted[keys[b]][rep], shifted["mono"][rep],
                          np.tile(scene_of[sel], SHIFT_COPIES)) if own is not None else None,
                         conf)
        verdicts.append(v)
        if v.kept and own is not None:
            kept[b] = own
    gallery = gallery_counts(val_buckets, kept, mono)
    return CandidateVerdict(cand.k, verdicts, gallery,
                            paired_gain(gallery, mono, seed=seed, groups=scene_of), scene_of)


def choose_candidate(judged: Sequence[CandidateVerdict], seed: int
                     ) -> tuple[CandidateVerdict, str]:
    """The candidate whose gallery maps the held-out tiles best (ties: fewer kept bucket models,
    then smaller k), and one line saying whether the choice was close."""
    def n_kept(c: CandidateVerdict) -> int:
        return sum(v.kept for v in c.verdicts)
    ranked = sorted(judged, key=lambda c: (-round(c.iou, 6), n_kept(c), c.k))
    best = ranked[0]
    if len(ranked) == 1:
        return best, f"k = {best.k}: the only candidate"
    runner = ranked[1]
    if np.array_equal(best.counts, runner.counts):
        return best, (f"k = {best.k} and k = {runner.k} map the held-out crops alike (IoU "
                      f"{best.iou:.4f}, {n_kept(best)} and {n_kept(runner)} bucket model(s) "
                      f"kept); the one with fewer kept models, then the smaller k, is kept")
    g = paired_gain(best.counts, runner.counts, seed=seed, groups=best.scene_of)
    close = g.low is None or g.low <= 0
    return best, (f"k = {best.k} (held-out IoU {best.iou:.4f}, {n_kept(best)} bucket model(s) "
                  f"kept) over k = {runner.k} ({runner.iou:.4f}): difference {g.text()}"
                  + ("; a close choice: another seed or machine may pick the other"
                     if close else ""))


def route_flagged(emb: np.ndarray, is_val: np.ndarray, counts: dict[str, np.ndarray],
                  chosen: CandidateVerdict, cand: Candidate, seed: int, scene_of: np.ndarray
                  ) -> tuple[dict[str, Any], np.ndarray]:
    """Which model maps tiles routing flags: scored by a crop-size embedding reference of the
    training crops, the held-out crops most unlike them stand in for flagged tiles; Mono unless
    a kept bucket model (or the wide Mono) beats it there (see ``selection``). Returns the
    manifest record and the stand-in flags."""
    if not is_val.any() or (~is_val).sum() < 2:
        return {"model": "mono", "reason": "no held-out tiles"}, np.zeros(int(is_val.sum()), bool)
    ref = EmbeddingReference.fit(emb[~is_val], emb[~is_val][:0], 5, 0)
    proxy = flagged_proxy(ref.scores(emb[is_val]))
    options = {"mono": counts["mono"][proxy]}
    if "mono-wide" in counts:
        options["mono-wide"] = counts["mono-wide"][proxy]
    for v in chosen.verdicts:
        if v.kept:
            name = f"bucket-{cand.code_names[v.bucket]}"
            options[name] = counts[f"k{cand.k}-{name}"][proxy]
    choice, record = choose_flagged_model(options, seed=seed, groups=scene_of[proxy])
    record["stand_in"] = (f"the {int(proxy.sum())} held-out crops most unlike the training "
                          "crops (embedding score)")
    if choice.startswith("bucket-"):
        record.update(model="bucket", bucket=cand.code_names.index(choice[len("bucket-"):]))
    else:
        record["model"] = choice
    return record, proxy


def _training_scenes(cfg: RunConfig, gallery: Path) -> tuple[list[Any], list[Any], list[Any]]:
    """The training scenes (opened), their label specs and regions; the gallery folder made."""
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


def _cluster_candidates(emb: np.ndarray, is_val: np.ndarray, tr: Any
                        ) -> tuple[Any, list[tuple[int, np.ndarray, np.ndarray]]]:
    """Rank 0: the variance-curve choice and, per candidate k, (k, labels of every crop, soft
    labels); held-out crops take their nearest training centroid."""
    z = (emb - emb[~is_val].mean(0)) / (emb[~is_val].std(0) + 1e-6)
    choice = choose_k(z[~is_val], tr.k_min, tr.k_max, min_drop=tr.k_min_drop, seed=tr.seed)
    out = []
    for k in choice.candidates(tr.k_candidates):
        labels = np.empty(len(z), int)
        labels[~is_val] = choice.labels_by_k[k]
        cents = np.stack([z[~is_val][labels[~is_val] == c].mean(0) for c in range(k)])
        labels[is_val] = ((z[is_val][:, None] - cents[None]) ** 2).sum(-1).argmin(1)
        out.append((k, labels, soft_labels(z, labels)))
    return choice, out


def run_init(cfg: RunConfig, comm: Any) -> dict[str, Any] | None:
    """The whole initialisation; rank 0 returns the summary."""
    comm = resolve_comm(comm)
    rank, size = comm.rank, comm.size
    t0 = time.perf_counter()
    tr = cfg.training
    recipe = TrainingRecipe.of(tr)
    torch.set_num_threads(cfg.inference.threads_per_rank or max(1, (os.cpu_count() or 1) // size))
    gallery = Path(cfg.models.gallery)
    scenes, label_specs, regions = comm.root_call(lambda: _training_scenes(cfg, gallery))
    paths = [s.path for s in scenes]
    strata = [stratum_of(r, p) for r, p in zip(regions, paths)]
    heights = [s.height for s in scenes]
    # Lone scenes of a region hold out a band of rows: decided before any crop is read.
    units = plan_holdout(strata, heights, tr.val_scene_share, tr.tile_px, tr.seed).units(
        len(scenes), heights)
    mine = list(split_block(len(units), rank, size))
    # Every rank checks the labels of its own scenes before any training; the first error
    # (in scene order) is raised on every rank.
    part, reports, err = None, [], None
    try:
        part, reports = sample_tiles(scenes, label_specs, [units[u].scene for u in mine],
                                     tr.tile_px, tr.tiles_per_scene, cfg.scenes.bands,
                                     cfg.normalization, cfg.labels, tr.seed,
                                     tr.building_crop_fraction,
                                     row_bands=[units[u].rows for u in mine])
    except ResflowError as exc:
        err = exc
    comm.raise_first(err)
    gathered = comm.allgather((part, reports))
    tiles = TileSet.concat([p for p, _ in gathered])
    crop_reports = per_scene_reports([r for _, rs in gathered for r in rs])
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
    # Whole held-out scenes, spread over each region's looks (same answer on every rank).
    holdout = plan_holdout(strata, heights, tr.val_scene_share, tr.tile_px, tr.seed,
                           scene_descriptors(tiles.x, tiles.scene, len(scenes)))
    is_val = held_out_crops(tiles, holdout)
    if (~is_val).sum() < 2:
        raise InputError(f"{cfg.scenes.manifest or 'scenes.inputs'}: only {int((~is_val).sum())} "
                         "training crop(s) are left once the held-out scenes are set aside; give "
                         "more training scenes or lower training.val_scene_share")
    if rank == 0:
        centred = sum(r.building_centred for r in crop_reports)
        _log(f"{n} training crops of {tr.tile_px}px ({centred} centred on buildings) from "
             f"{len(scenes)} scene(s) on {size} rank(s)")
        note, warn = gsd_note(gsd_summary(scenes), cfg.scenes.gsd_m)
        _log(("warning: " if warn else "") + note)
        _log(f"held out for every model choice: {len(holdout.held_out_scenes)} whole scene(s)"
             + (f" ({', '.join(Path(paths[s]).stem for s in holdout.held_out_scenes)})"
                if holdout.held_out_scenes else "")
             + (f", row bands of {len(holdout.row_split_scenes)} lone scene(s)"
                if holdout.row_split_scenes else "")
             + f": {int(is_val.sum())} of {n} crops")
        for note in holdout.notes:
            _log(f"note: {note}")
        if not is_val.any():
            _log("warning: no held-out crops: nothing can show a bucket model better than Mono, "
                 "so every bucket maps with Mono; give more or larger training scenes")
    stage_s: dict[str, float] = {"crops": time.perf_counter() - t0}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stage_s[name] = now - mark
        mark = now
    # -- stage A: CEM (training crops only), clustering (rank 0), hashing per candidate k ------
    # The shared models (CEM, hash heads, base segmenter) are trained by rank 0 with all of the
    # node's cores while the other ranks sleep, or data-parallel over every rank.
    summary: dict[str, Any] = {}
    per_rank_threads = torch.get_num_threads()
    dp = DataParallel(comm, tr.data_parallel_backend) if tr.data_parallel and size > 1 else None
    trains_shared = rank == 0 or dp is not None
    if rank == 0 and dp is None:
        # The other ranks sleep (quiet_barrier) during this serial stage: use the node's cores.
        torch.set_num_threads(max(per_rank_threads, usable_cores()))
    if trains_shared:
        extractor = train_cem(tiles.x[~is_val], in_ch, cfg.models.embed_dim, tr.cem_epochs,
                              tr.batch_size, tr.lr, tr.seed, dp=dp)
        fmaps, emb = embed_all(extractor, tiles.x)
    lap("cem")
    clustered = None
    if rank == 0:
        choice, clustered = _cluster_candidates(emb, is_val, tr)
        _log(f"CEM trained; variance-curve choice k = {choice.k} from {choice.ks[0]}.."
             f"{choice.ks[-1]}: {choice.reason}")
        _log("variance curve: " + ", ".join(f"V({kk})={v:.3g}" for kk, v in
                                            zip(choice.ks, choice.mean_intra_variance)))
        if choice.reference_knee_score is not None:
            _log("drop ratio V(k-1)/V(k), data vs structureless reference: " + ", ".join(
                f"k={kk}: {d:.2f}/{r:.2f}" for kk, d, r in
                zip(choice.ks[1:], choice.knee_score[1:], choice.reference_knee_score[1:])))
        _log(f"candidates compared on the held-out scenes: k = "
             f"{', '.join(str(c[0]) for c in clustered)} and Mono alone")
    lap("clustering")
    if dp is not None:
        comm.quiet_barrier()
        clustered = comm.bcast(clustered if rank == 0 else None, root=0)
    heads: dict[int, Any] = {}
    if trains_shared:
        for k, labels, soft in clustered:
            head = build_hash_head(extractor.feat_ch, cfg.models.hash_bits, k)
            torch.manual_seed(tr.seed)
            train_hash_head(head, fmaps[~is_val], soft[~is_val], tr.hash_epochs, tr.batch_size,
                            tr.lr, tr.seed, dp=dp)
            heads[k] = head
    lap("hash")
    if rank == 0:
        candidates = [hash_candidate(k, labels, heads[k], fmaps, is_val, cfg.models.hash_bits)
                      for k, labels, _ in clustered]
        for c in candidates:
            _log(f"hash head (k = {c.k}): held-out mAP "
                 + ("n/a" if c.hash_map is None else f"{c.hash_map:.4f}, bucket = cluster on "
                    f"{c.bucket_equals_cluster:.1%} of held-out crops"))
        state: Any = candidates
        torch.set_num_threads(per_rank_threads)
    else:
        state = None
    comm.quiet_barrier()
    candidates = comm.bcast(state, root=0)
    # -- stage B: segmentation models of every candidate + Mono (see plan_training) -------------
    xtr, ytr = tiles.x[~is_val], tiles.y[~is_val]
    xva, yva = tiles.x[is_val], tiles.y[is_val]
    plan = plan_training(cfg, [(c.k, c.buckets[~is_val], c.code_names) for c in candidates])
    base_state = None
    if plan.base_steps and trains_shared:
        if dp is None:
            torch.set_num_threads(max(per_rank_threads, usable_cores()))
        torch.manual_seed(tr.seed)
        base = build_segmentation(cfg.models.arch, cfg.models.preset, in_ch)
        base_fit = train_selected(base, xtr, ytr, plan.base_steps, tr.batch_size, tr.lr, tr.seed,
                                  xva, yva, tr.val_every, recipe, dp=dp)
        base_state = base.state_dict()
        summary["base_model"] = base_fit
        torch.set_num_threads(per_rank_threads)
    if rank == 0:
        for c in candidates:
            for b in plan.too_small[c.k]:
                _log(f"warning: k = {c.k}: bucket {b} has "
                     f"{int((c.buckets[~is_val] == b).sum())} training tile(s), fewer than "
                     f"training.min_bucket_tiles = {tr.min_bucket_tiles}: no model of its own, "
                     "its tiles map with Mono")
        _log(plan.describe(cfg, size))
    comm.quiet_barrier()
    if plan.base_steps and dp is None:
        base_state = comm.bcast(base_state, root=0)
    if dp is not None:
        dp.close()  # the shared models are trained
    lap("base_model")
    by_k = {c.k: c for c in candidates}
    xsh = acquisition_shifts(xva, SHIFT_COPIES, tr.seed)
    ysh = np.concatenate([yva] * SHIFT_COPIES)
    done: dict[str, tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}
    for job in plan.jobs_of(rank, size):
        torch.manual_seed(tr.seed + 1 + job.index)
        model = build_segmentation(cfg.models.arch, job.preset, in_ch)
        if job.from_base:
            model.load_state_dict(base_state)
        if job.bucket is None:
            sel_tr, sel_val = np.ones(len(xtr), bool), np.ones(len(xva), bool)
        else:
            cb = by_k[job.k].buckets
            sel_tr, sel_val = cb[~is_val] == job.bucket, cb[is_val] == job.bucket
        fit = train_selected(model, xtr[sel_tr], ytr[sel_tr], job.steps, tr.batch_size,
                             tr.lr * 0.5 if job.from_base else tr.lr, tr.seed + 1 + job.index,
                             xva[sel_val], yva[sel_val], tr.val_every, recipe)
        counts = tile_counts(model, xva, yva)
        counts_shifted = tile_counts(model, xsh, ysh)
        val_counts = dict(zip(COUNT_KEYS, (int(v) for v in counts[sel_val].sum(0))))
        file = gallery / (f"{job.name}.pt" if job.k is None else f".candidate-{job.key}.pt")
        entry = save_module(model, file)
        entry.update({"train_tiles": int(sel_tr.sum()), "val_tiles": int(sel_val.sum()),
                      "steps": fit["steps_run"] + (plan.base_steps if job.from_base else 0),
                      "steps_budget": job.steps + (plan.base_steps if job.from_base else 0),
                      "from_base": job.from_base, "best_step": fit["best_step"],
                      "val_metrics": {**val_counts, **iou_f1(val_counts)}})
        done[job.key] = (entry, counts, counts_shifted)
    comm.quiet_barrier()
    lap("segmentation_models")
    all_done = comm.gather(done, root=0)
    if rank != 0:
        comm.barrier()
        return None
    merged = {key: v for part in all_done for key, v in part.items()}  # type: ignore[union-attr]
    counts_of = {key: c for key, (_, c, _) in merged.items()}
    shifted_of = {key: c for key, (_, _, c) in merged.items()}
    val_scene = tiles.scene[is_val]
    judged = [judge_candidate(c, is_val, counts_of, shifted_of, tr.min_gain, tr.seed, val_scene)
              for c in candidates]
    chosen, k_reason = choose_candidate(judged, tr.seed)
    cand = by_k[chosen.k]
    k = cand.k
    _log(f"bucket count chosen on the held-out scenes: {k_reason}")
    for cj in judged:
        _log(f"k = {cj.k}: gallery held-out IoU {cj.iou:.4f}, minus Mono {cj.vs_mono.text()}")
    table = verdict_table(chosen.verdicts, cand.code_names, cand.hash_map_per_bucket)
    for line in table:
        _log(line)
    warning = hash_map_warning(cand.hash_map, k)
    if warning:
        _log(f"warning: {warning}")
    flagged, _ = route_flagged(emb, is_val, counts_of, chosen, cand, tr.seed, val_scene)
    _log("tiles flagged out-of-distribution map with "
         + (f"bucket {flagged['bucket']}'s model" if flagged["model"] == "bucket"
            else flagged["model"]) + f" ({flagged.get('reason') or flagged.get('stand_in')})")
    # -- the gallery: the chosen candidate's files under their final names, the rest removed ---
    head = heads[k]
    ext_entry = save_module(extractor, gallery / "cem.pt")
    head_entry = {**save_module(head, gallery / "hash.pt"), "n_bits": cfg.models.hash_bits}
    dist = hamming_to_own_centroid(cand.codes, cand.centroids, cand.buckets)
    dist_hist = [np.bincount(dist[~is_val & (cand.buckets == b)],
                             minlength=cfg.models.hash_bits + 1).tolist() for b in range(k)]
    mono_entry = merged["mono"][0]
    bucket_entries = []
    for b, verdict in enumerate(chosen.verdicts):
        code = cand.code_names[b]
        key = f"k{k}-bucket-{code}"
        if verdict.kept:
            entry = dict(merged[key][0])
            os.replace(gallery / entry["file"], gallery / f"bucket-{code}.pt")
            entry["file"] = f"bucket-{code}.pt"
        else:
            entry = {**mono_entry, "same_as": "mono", "fallback": verdict.reason,
                     "train_tiles": verdict.train_tiles}
        entry.update({"index": b, "code": code, "val_tiles": verdict.held_out_tiles,
                      "hash_map": cand.hash_map_per_bucket[b], "acceptance": verdict.record(),
                      "distance_histogram": dist_hist[b]})
        bucket_entries.append(entry)
    for f in gallery.glob(".candidate-*.pt"):
        f.unlink()
    for f in gallery.glob("bucket-*.pt"):  # models of an earlier init of this folder
        if f.name not in {e["file"] for e in bucket_entries}:
            f.unlink()
    summary.update({"k": k, "hash_map": cand.hash_map,
                    "bucket_equals_cluster": cand.bucket_equals_cluster, "n_tiles": n,
                    "n_val": int(is_val.sum()),
                    "buckets_kept": sum(v.kept for v in chosen.verdicts),
                    "gallery_val_iou": chosen.iou, "mono_val_iou": chosen.vs_mono.iou_b,
                    "gallery_minus_mono": chosen.vs_mono.record(),
                    "in_bucket_distance_max": [int(dist[~is_val & (cand.buckets == b)]
                                                   .max(initial=0)) for b in range(k)]})
    curve = {"ks": choice.ks, "mean_intra_variance": choice.mean_intra_variance,
             "knee_score": choice.knee_score,
             "reference_knee_score": choice.reference_knee_score, "variance_choice": choice.k,
             "variance_reason": choice.reason, "chosen_k": k, "reason": k_reason,
             "held_out": {str(cj.k): {"gallery_iou": cj.iou, "minus_mono": cj.vs_mono.record(),
                                      "buckets_kept": sum(v.kept for v in cj.verdicts)}
                          for cj in judged},
             "mono_held_out_iou": chosen.vs_mono.iou_b,
             "min_drop": tr.k_min_drop, "k_min": tr.k_min, "k_max": tr.k_max}
    (gallery / "k_selection.json").write_text(json.dumps(curve, indent=1))
    save_curve_plot(gallery / "k_selection.png", choice.ks, choice.mean_intra_variance, k)

    def held_out(scene: int, first: int, end: int) -> Optional[bool]:
        if scene in holdout.held_out_scenes:
            return True
        cut = holdout.row_split_scenes.get(scene)
        if cut is None or end <= cut:
            return False
        return True if first >= cut else None
    ood_ref, ood_record = fit_embedding_reference(lambda x: embed_all(extractor, x)[1],
                                                  scenes, held_out, cfg)
    if ood_ref is not None:
        tmp_ref = gallery / "ood_reference.npz.tmp"
        with open(tmp_ref, "wb") as fh:
            np.savez(fh, **ood_ref.arrays())
        os.replace(tmp_ref, gallery / "ood_reference.npz")
        ood_record.update({"file": "ood_reference.npz",
                           "sha256": sha256_file(gallery / "ood_reference.npz")})
        _log(f"embedding reference for out-of-distribution routing: "
             f"{ood_record['reference_windows']} windows of trained scenes, "
             f"{ood_record['calibration_windows']} calibration windows of held-out scenes, "
             f"{ood_record['window_px']} px")
    else:
        _log(f"warning: {ood_record['skipped']}")
    manifest = {"format_version": FORMAT_VERSION, "in_channels": in_ch,
                "bands": list(cfg.scenes.bands), "normalization": cfg.to_dict()["normalization"],
                "train_dtypes": sorted({s.dtype for s in scenes}),
                "gsd_m": cfg.scenes.gsd_m, "training_gsd_m": gsd_summary(scenes),
                "training": cfg.to_dict()["training"], "arch": cfg.models.arch,
                "preset": cfg.models.preset, "extractor": ext_entry, "hash_head": head_entry,
                "buckets": bucket_entries, "mono": mono_entry,
                **({"mono_wide": merged["mono-wide"][0]} if "mono-wide" in merged else {}),
                "bucket_mode": tr.bucket_mode, "mono_budget": tr.mono_budget,
                "budget": plan.record(), "summary": summary,
                "validation": {**holdout.record(paths), "held_out_crops": int(is_val.sum()),
                               "unit": "scene"},
                "acceptance_table": table, "flagged_tiles": flagged,
                **({"hash_warning": warning} if warning else {}),
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
                   "held_out": i in holdout.held_out_scenes,
                   "acquisition": dict(s.metadata)} for i, s in enumerate(scenes)]
    wgs84 = np.array([scenes[int(sid)].window_extent_wgs84(Window(*(int(v) for v in win)))
                      for sid, win in zip(tiles.scene, tiles.window)], np.float64).reshape(-1, 4)
    ImageGallery.write(gallery / "images.h5", cand.codes, tiles.scene, tiles.window, tiles.extent,
                       cand.buckets, cfg.models.hash_bits, scene_meta, extent_wgs84=wgs84)
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
    kept = summary["buckets_kept"]
    _log(f"gallery written to {gallery}: k = {k}, {kept} bucket model(s) kept + Mono"
         + (" (every bucket maps with Mono)" if kept == 0 else "") + ", hash mAP "
         + ("n/a" if cand.hash_map is None else f"{cand.hash_map:.4f}")
         + f", {summary['seconds']:.0f} s")
    comm.barrier()
    return summary
