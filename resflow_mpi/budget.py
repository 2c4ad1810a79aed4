"""A memory budget before work: estimate each rank's peak memory from the settings and the models,
and refuse settings the node (or GPU) cannot hold, with the numbers, before any tile is read.

Pure computation (numpy/torch only; no MPI, GDAL or HDF5). What a rank holds at its peak (CPU):

* **baseline**: the interpreter with torch, numpy, GDAL, h5py and MPI loaded (measured per rank
  where possible: the VmRSS of the process at the time of the check; else ``BASELINE_CPU_BYTES``);
* **working set**: what the first tiles add whatever their size (oneDNN kernels and primitive
  caches, the reader thread's allocator arena, HDF5 and MPI buffers): ``WORKING_SET_CPU_BYTES``;
* **weights**: feature extractor + hash head + one segmenter per bucket (buckets load lazily and
  stay resident, so all of them count), float32;
* **read batches**: ``prefetch_batches + 2`` normalised float32 batches of ``batch_size`` tiles of
  ``(tile_px + 2 halo_px)^2 x bands`` (the batch in compute, the queue of read-ahead batches and
  the one the reader thread is filling), plus the reader's stacking copy; never more tiles than
  the rank has (``tiles_per_rank``: a few large tiles fill no queue);
* **embedding**: the zero-padded (always ``batch_size`` tiles) channels-last copy of a batch and
  the feature extractor's activations
  (it pools every tile to a fixed size first, so these are per tile, not per pixel); the main
  thread embeds a batch and then segments it, so only the larger of this and the next part counts;
* **segmentation**: ``segment_batch_size`` tiles through the segmenter. Its activation memory is
  the tensor-liveness peak of one forward pass, traced once at a small probe size (a dispatch mode
  counts every tensor the network allocates and frees; fully convolutional networks scale exactly
  with pixels) times ``ACTIVATION_OVERHEAD`` (oneDNN reorders and workspaces, allocator slack),
  calibrated with the working set against measured peak RSS (perf/memory_budget.py: the estimate
  1.1-1.4x the measured peak for tiles of 512-4096 px and batches of 1-8);
* **write rounds**: ``write_round_batches x batch_size`` finished tiles (uint8 mask, optional
  float16 probabilities), times the ranks under ``parallel.writer=gather`` on rank 0;
* **GDAL block cache**: ``RESFLOW_GDAL_CACHE_MB`` (default 64), or the scene bytes when smaller.

On a GPU the activations, the segmentation queues and the weights live on the device instead;
its estimate adds the CUDA context and uses half-size segmentation activations under fp16/bf16
autocast (embedding stays float32).
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ConfigError

GIB = 1024 ** 3
MIB = 1024 ** 2
BASELINE_CPU_BYTES = 300 * MIB      # a rank after imports + MPI init (277 MiB measured, torch 2.13 CPU)
WORKING_SET_CPU_BYTES = 208 * MIB   # added by the first tiles of any size (perf/memory_budget.py)
CUDA_CONTEXT_BYTES = 600 * MIB      # device memory the CUDA context and cuDNN handles take
ACTIVATION_OVERHEAD = 1.25          # RSS peak / traced tensor-liveness peak (CPU, oneDNN), large tiles
GPU_ACTIVATION_OVERHEAD = 1.3       # the caching allocator's rounding and cuDNN workspaces
PROBE_PX = 64                       # traced forward size (any multiple of the network stride)
DTYPE_BYTES = {"uint8": 1, "uint16": 2, "int16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelSizes:
    """What the budget needs to know about a gallery's networks."""

    extractor_params: int
    hash_params: int
    segmenter_params: int                 # one bucket model
    n_buckets: int
    segment_bytes_per_px: float           # traced liveness peak of one tile, per input pixel
    extract_bytes_per_tile: float         # traced liveness peak of extractor + hash head, per tile


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes per rank (host) and per rank on its GPU, with the parts and the settings used."""

    rank_bytes: int
    gpu_bytes: Optional[int]
    parts: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """For run_report.json / `resflow info`: MiB figures."""
        return {"rank_mb": round(self.rank_bytes / MIB, 1),
                "gpu_mb": None if self.gpu_bytes is None else round(self.gpu_bytes / MIB, 1),
                "parts_mb": {k: round(v / MIB, 1) for k, v in self.parts.items()},
                "settings": dict(self.settings)}


# -- tracing the networks once -------------------------------------------------------------------
def traced_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once while ``fn`` runs (torch ops only), by a dispatch mode
    that adds each new storage when an op returns it and removes it when the last Python tensor on
    it is freed. Deterministic: no allocator or RSS noise."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class _Liveness(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live: dict[int, list[int]] = {}
            self.current = 0
            self.peak = 0

        def _drop(self, ptr: int) -> None:
            entry = self.live.get(ptr)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    self.current -= entry[0]
                    del self.live[ptr]

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr in self.live:
                        self.live[ptr][1] += 1
                    else:
                        self.live[ptr] = [storage.nbytes(), 1]
                        self.current += storage.nbytes()
                        self.peak = max(self.peak, self.current)
                    weakref.finalize(t, self._drop, ptr)
            return out

    mode = _Liveness()
    with torch.inference_mode(), mode:
        fn()
    return mode.peak


def model_sizes(extractor: Any, hash_head: Any, segmenter: Any, n_buckets: int,
                in_channels: int) -> ModelSizes:
    """Parameter counts and traced activation peaks of a gallery's networks (built from their
    specs; weights do not matter). Costs one forward pass at ``PROBE_PX`` per network."""
    import torch
    seg = segmenter.eval().to(memory_format=torch.channels_last)
    x = torch.zeros(1, in_channels, PROBE_PX, PROBE_PX).contiguous(memory_format=torch.channels_last)
    seg_peak = traced_peak_bytes(lambda: torch.sigmoid(seg(x).float()))
    ext, head = extractor.eval(), hash_head.eval()

    def embed() -> None:
        fmap, _ = ext(x)
        head(fmap.float())
    ext_peak = traced_peak_bytes(embed)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return ModelSizes(count(extractor), count(hash_head), count(segmenter), n_buckets,
                      seg_peak / float(PROBE_PX * PROBE_PX), float(ext_peak))


def model_sizes_from_manifest(manifest: dict[str, Any]) -> ModelSizes:
    """:func:`model_sizes` for a gallery manifest. The traced activation peaks come from the
    manifest's ``memory_profile`` (recorded by ``resflow init``) when present: tracing needs
    torch's dispatch-mode machinery, whose first use costs about 2 s of imports per process.
    Older galleries are traced here (architectures rebuilt from their specs)."""
    from .models import build_from_spec
    seg_entry = manifest["buckets"][0] if manifest.get("buckets") else manifest["mono"]
    n_buckets = max(1, len(manifest.get("buckets", [])))
    profile = manifest.get("memory_profile") or {}
    if profile.get("probe_px") == PROBE_PX and all(
            k in profile for k in ("segment_bytes_per_px", "extract_bytes_per_tile")):
        params = lambda e: int(e.get("parameters", 0))  # noqa: E731
        return ModelSizes(params(manifest["extractor"]), params(manifest["hash_head"]),
                          params(seg_entry), n_buckets, float(profile["segment_bytes_per_px"]),
                          float(profile["extract_bytes_per_tile"]))
    return model_sizes(build_from_spec(manifest["extractor"]["spec"]),
                       build_from_spec(manifest["hash_head"]["spec"]),
                       build_from_spec(seg_entry["spec"]), n_buckets,
                       int(manifest.get("in_channels", len(manifest.get("bands", [1, 2, 3])))))


def memory_profile(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a gallery manifest records for :func:`model_sizes_from_manifest` (traced once)."""
    sizes = model_sizes_from_manifest({k: v for k, v in manifest.items() if k != "memory_profile"})
    return {"probe_px": PROBE_PX, "segment_bytes_per_px": sizes.segment_bytes_per_px,
            "extract_bytes_per_tile": sizes.extract_bytes_per_tile}


# -- the estimate --------------------------------------------------------------------------------
def estimate_memory(cfg: Any, models: ModelSizes, *, device: str = "cpu", scene_dtype: str = "uint8",
                    ranks: int = 1, scene_bytes: Optional[int] = None,
                    baseline_bytes: Optional[int] = None,
                    gdal_cache_bytes: Optional[int] = None,
                    tiles_per_rank: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of one rank (rank 0 under the gather writer) for run config ``cfg``.

    ``device``: "cpu" or "cuda"; ``scene_bytes``: raw bytes of the scenes (caps the GDAL cache);
    ``baseline_bytes``: this rank's RSS before work (default ``BASELINE_CPU_BYTES``);
    ``tiles_per_rank``: the most tiles one rank computes (None: unbounded), which bounds the
    tiles read ahead, queued and written (network calls are padded to their full batch)."""
    t, inf = cfg.tiling, cfg.inference
    bands = len(cfg.scenes.bands)
    side = t.tile_px + 2 * t.halo_px
    tile_in = bands * side * side * 4                       # one normalised float32 tile

    def cap(n: int) -> int:
        """``n`` tiles, never more than one rank computes."""
        return n if tiles_per_rank is None else min(n, max(1, tiles_per_rank))
    # Network calls are padded to their fixed batch (stages.py); reads and queues hold real tiles.
    bs = inf.batch_size
    on_gpu = device.startswith("cuda")
    seg_bs = inf.segment_batch_size or (bs if on_gpu else 1)
    batch = bs * tile_in                                    # one padded embedding batch
    read_batch = cap(bs) * tile_in                          # one batch as read
    raw_tile = bands * side * side * DTYPE_BYTES.get(scene_dtype, 4)
    parts: dict[str, int] = {}
    parts["baseline"] = int(baseline_bytes if baseline_bytes is not None else BASELINE_CPU_BYTES)
    weights = 4 * (models.extractor_params + models.hash_params
                   + models.n_buckets * models.segmenter_params)
    # Read-ahead: prefetch queue + the batch in compute (never more tiles than the rank has) +
    # the reader's stacking copy.
    parts["read_batches"] = (cap((inf.prefetch_batches + 2) * bs) * tile_in + read_batch
                             + 3 * raw_tile)
    mask_bytes = t.tile_px * t.tile_px * (1 + (2 if cfg.keeps_probabilities else 0)) + 64
    round_tiles = cap(bs * cfg.parallel.write_round_batches)
    writers = ranks if cfg.parallel.writer == "gather" else 1
    parts["write_round"] = 2 * round_tiles * mask_bytes * writers
    cache = gdal_cache_bytes if gdal_cache_bytes is not None else \
        int(os.environ.get("RESFLOW_GDAL_CACHE_MB", "64")) * MIB
    parts["gdal_cache"] = min(cache, scene_bytes) if scene_bytes is not None else cache
    seg_act = models.segment_bytes_per_px * side * side * seg_bs
    embed_act = models.extract_bytes_per_tile * bs
    gpu: Optional[int] = None
    queued = cap(models.n_buckets * max(0, seg_bs - 1)) * tile_in
    if on_gpu:
        from .stages import segment_precision
        half = 1.0 if segment_precision(inf.autocast, "cuda") == "none" else 0.5
        gpu = int(CUDA_CONTEXT_BYTES + weights + 2 * batch + queued
                  + GPU_ACTIVATION_OVERHEAD * (half * seg_act + embed_act) + seg_bs * tile_in)
        parts["weights"] = weights                          # host copy while loading
        parts["pinned_uploads"] = 2 * read_batch
    else:
        parts["weights"] = 2 * weights                      # state dict + module while loading
        parts["working_set"] = WORKING_SET_CPU_BYTES
        parts["embedding"] = 2 * batch + int(ACTIVATION_OVERHEAD * embed_act)
        parts["segmentation"] = int(ACTIVATION_OVERHEAD * seg_act) + 2 * seg_bs * tile_in
        parts["segment_queues"] = queued
    settings = {"tiling.tile_px": t.tile_px, "tiling.halo_px": t.halo_px,
                "inference.batch_size": bs, "inference.segment_batch_size": seg_bs,
                "inference.prefetch_batches": inf.prefetch_batches,
                "parallel.write_round_batches": cfg.parallel.write_round_batches,
                "bands": bands, "device": device, "n_buckets": models.n_buckets,
                "tiles_per_rank": tiles_per_rank}
    # The main thread embeds a batch, then segments its tiles: the two peaks never coincide.
    phases = max(parts.get("embedding", 0), parts.get("segmentation", 0))
    steady = sum(v for k, v in parts.items() if k not in ("embedding", "segmentation"))
    return MemoryEstimate(int(steady + phases), gpu, parts, settings)


# What to lower for each part of the estimate (largest parts first in the message).
_REMEDY = {"read_batches": "tiling.tile_px, inference.batch_size or inference.prefetch_batches",
           "embedding": "inference.batch_size", "segmentation": "tiling.tile_px or "
           "inference.segment_batch_size", "segment_queues": "inference.segment_batch_size",
           "write_round": "parallel.write_round_batches", "gdal_cache": "RESFLOW_GDAL_CACHE_MB",
           "weights": "models.preset", "pinned_uploads": "inference.batch_size",
           "working_set": "the ranks per node",
           "baseline": "the ranks per node"}


def _gib(n: float) -> str:
    g = n / GIB
    return f"{g:.2f}" if g < 0.1 else f"{g:.1f}" if g < 10_000 else f"{g:.3g}"


def check_budget(estimate: MemoryEstimate, ranks_per_node: int, node_total_bytes: int,
                 gpu_bytes: Optional[int] = None, ranks_per_gpu: int = 1) -> None:
    """Refuse (ConfigError, one line with the numbers) when ``ranks_per_node`` ranks of this
    estimate do not fit the node's available memory, or ``ranks_per_gpu`` ranks do not fit a GPU."""
    s = estimate.settings
    shown = (f"tiling.tile_px={s.get('tiling.tile_px')}, tiling.halo_px={s.get('tiling.halo_px')}, "
             f"inference.batch_size={s.get('inference.batch_size')}, "
             f"inference.segment_batch_size={s.get('inference.segment_batch_size')}")
    big = sorted(((v, k) for k, v in estimate.parts.items() if k != "baseline"), reverse=True)[:2]
    remedy = "; ".join(f"{_REMEDY[k]} ({k.replace('_', ' ')} ~{_gib(v)} GiB)" for v, k in big)
    need = estimate.rank_bytes * ranks_per_node
    if need > node_total_bytes:
        raise ConfigError(
            f"the settings need ~{_gib(estimate.rank_bytes)} GiB per rank x {ranks_per_node} "
            f"rank(s) on this node = {_gib(need)} GiB, the node has {_gib(node_total_bytes)} GiB "
            f"available ({shown}): lower {remedy}, or run fewer ranks per node")
    if gpu_bytes is not None and estimate.gpu_bytes is not None:
        need_gpu = estimate.gpu_bytes * ranks_per_gpu
        if need_gpu > gpu_bytes:
            raise ConfigError(
                f"the settings need ~{_gib(estimate.gpu_bytes)} GiB of GPU memory per rank x "
                f"{ranks_per_gpu} rank(s) per GPU = {_gib(need_gpu)} GiB, the GPU has "
                f"{_gib(gpu_bytes)} GiB ({shown}): lower tiling.tile_px, inference.batch_size or "
                "inference.segment_batch_size, or bind fewer ranks per GPU")
