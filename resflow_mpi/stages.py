"""The three deep-learning stages on tensors: embed -> hash -> bucket -> segment.

Pure compute (numpy + torch). Every network call sees a batch of exactly ``batch_size`` tiles
(short batches are zero-padded) so one tile's result never depends on its batch-mates, the rank
that computes it or the engine (MPI, Spark, in-process): kernels are chosen by shape, and the shape
is always the same. Tiles are queued per bucket and segmented when a bucket's queue is full.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .dtypes import DTYPE_RANGE  # float pixels have none: a float scene needs value_max
from .errors import InputError
from .models.hashing import assign_buckets, codes_to_bits, hamming_distance, pack_bits
from .ood import EmbeddingReference

# Bucket value of a tile whose code is out of distribution (farther from its nearest bucket's
# centroid than that bucket's threshold): it is mapped by Mono. -1 stays "not computed / nodata".
OOD_BUCKET = -2


def normalize(raw: np.ndarray, dtype: str, mode: str = "range", value_max: Optional[float] = None,
              mean: Sequence[float] = (), std: Sequence[float] = ()) -> np.ndarray:
    """Raw (C, H, W) pixels -> float32 network input."""
    x = raw.astype(np.float32)
    if mode == "configured":
        m = np.asarray(mean, np.float32)[:, None, None]
        s = np.asarray(std, np.float32)[:, None, None]
        return (x - m) / s
    scale = value_max if value_max else DTYPE_RANGE.get(dtype)
    if scale is None:
        raise InputError(f"{dtype} pixels have no natural range (normalization.value_max): set "
                         "value_max to the value that maps to 1.0")
    return np.clip(x / np.float32(scale), 0.0, 4.0)


@dataclass
class StageModels:
    """The networks of a model gallery, ready for inference."""

    extractor: nn.Module
    hash_head: nn.Module
    centroids: np.ndarray                          # (n_buckets, code_bytes) packed bits
    load_segmenter: Callable[[int], nn.Module]     # bucket index (or OOD_BUCKET) -> model, lazily
    # Per-bucket Hamming-distance thresholds (n_buckets,); None: no Hamming routing.
    ood_thresholds: Optional[np.ndarray] = None
    # The gallery's embedding reference (scores every tile, see ``ood``; None: older gallery) and
    # the score above which a tile is flagged (None: no embedding routing).
    ood_reference: Optional[EmbeddingReference] = None
    ood_score_threshold: Optional[float] = None
    _cache: dict[int, nn.Module] = field(default_factory=dict)

    def segmenter(self, bucket: int) -> nn.Module:
        if bucket not in self._cache:
            self._cache[bucket] = self.load_segmenter(bucket)
        return self._cache[bucket]


@dataclass
class StageTimes:
    """Seconds spent per stage (summed over batches)."""

    embed: float = 0.0
    hash: float = 0.0
    segment: float = 0.0


class TileStages:
    """Runs the three stages on fixed-shape batches on one device.

    Embedding and hashing always run in float32 (no autocast, no TF32): a hash bit that flips
    under reduced precision moves a tile to another bucket. Only segmentation runs under the
    ``autocast`` precision (see ``segment_precision``)."""

    def __init__(self, models: StageModels, device: torch.device, batch_size: int,
                 threshold: float = 0.5, channels_last: bool = True, autocast: str = "auto",
                 compile_models: bool = False, segment_batch_size: int = 0):
        self.models = models
        # Segmentation batch: on CPUs one tile per call is faster per tile (activations stay in
        # cache) and never pads; GPUs want full batches. Fixed either way, so results stay
        # independent of batch-mates.
        self.segment_batch_size = segment_batch_size or (batch_size if device.type == "cuda" else 1)
        # torch.compile (inductor, with freezing: eval BatchNorm folded into the convolutions,
        # activations fused) pays off on GPUs; each bucket model is compiled once, lazily.
        self.compile_models = compile_models and device.type == "cuda"
        self._compiled: dict[int, Any] = {}
        self.device = device
        self.batch_size = batch_size
        self.threshold = threshold
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.precision = segment_precision(autocast, device.type)
        self.times = StageTimes()
        self.centroids = torch.from_numpy(models.centroids)
        for m in (models.extractor, models.hash_head):
            m.eval().to(device)
            if channels_last:
                m.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, models: StageModels, device: torch.device, inference: Any) -> "TileStages":
        """Stages as the ``inference`` section of a run config (InferenceConfig) asks for."""
        i = inference
        return cls(models, device, i.batch_size, i.threshold, i.channels_last, i.autocast,
                   i.compile, i.segment_batch_size)

    def _prepare(self, x: np.ndarray | torch.Tensor, size: Optional[int] = None) -> torch.Tensor:
        """(n, C, S, S) float32 (numpy, or a tensor already on the device) -> zero-padded
        (size or batch_size, C, S, S) tensor on the device."""
        n = x.shape[0]
        size = size or self.batch_size
        if n > size:
            raise ValueError(f"batch of {n} tiles exceeds the fixed batch of {size}")
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        if t.device.type == "cpu" and self.device.type == "cuda":
            t = t.pin_memory()
        t = t.to(self.device, non_blocking=True)
        if n < size:
            t = torch.cat([t, t.new_zeros((size - n,) + tuple(t.shape[1:]))])
        return t.contiguous(memory_format=self.memory_format)

    def on_device(self, x: np.ndarray) -> torch.Tensor | np.ndarray:
        """The batch as the segmentation stage will want it: uploaded once on a GPU (so the
        per-bucket queues hold device tensors), unchanged on CPU."""
        if self.device.type != "cuda":
            return x
        t = torch.from_numpy(np.ascontiguousarray(x)).pin_memory()
        return t.to(self.device, non_blocking=True)

    def _segment_autocast(self) -> Any:
        """Autocast for segmentation at ``self.precision`` (disabled for fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def embed_and_hash(self, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stages 1-2: embeddings (n, D), packed codes (n, K) uint8 and bucket indices (n,)."""
        emb, packed, buckets, _ = self.embed_hash_score(x)
        return emb, packed, buckets

    @torch.inference_mode()
    def embed_hash_score(self, x: np.ndarray | torch.Tensor
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stages 1-2 and the out-of-distribution score: embeddings (n, D), packed codes (n, K)
        uint8, bucket indices (n,) (OOD_BUCKET where routing flags the tile) and scores (n,)
        float32 (NaN where the gallery has no embedding reference)."""
        n = x.shape[0]
        t0 = time.perf_counter()
        with exact_float32(self.device):
            fmap, emb = self.models.extractor(self._prepare(x))
            t1 = time.perf_counter()
            relaxed = self.models.hash_head(fmap)
        packed = pack_bits(codes_to_bits(relaxed).cpu())[:n]
        buckets = assign_buckets(packed, self.centroids)
        if self.models.ood_thresholds is not None:
            buckets = route_out_of_distribution(packed, self.centroids, buckets,
                                                torch.as_tensor(self.models.ood_thresholds))
        emb_n = emb[:n].float().cpu()
        ref, limit = self.models.ood_reference, self.models.ood_score_threshold
        scores = ref.scores(emb_n) if ref is not None else np.full(n, np.nan, np.float32)
        if limit is not None:
            far = torch.from_numpy(scores > limit)
            buckets = torch.where(far, torch.full_like(buckets, OOD_BUCKET), buckets)
        t2 = time.perf_counter()
        self.times.embed += t1 - t0
        self.times.hash += t2 - t1
        return emb_n.numpy(), packed.numpy(), buckets.numpy(), scores

    def _segmenter(self, bucket: int) -> Any:
        if not self.compile_models:
            return self.models.segmenter(bucket)
        if bucket not in self._compiled:
            import torch._inductor.config as inductor_config
            inductor_config.freezing = True
            self._compiled[bucket] = torch.compile(self.models.segmenter(bucket), dynamic=False)
        return self._compiled[bucket]

    @torch.inference_mode()
    def segment(self, bucket: int, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Stage 3: building probabilities (n, S, S) float32 with bucket ``bucket``'s model."""
        n = x.shape[0]
        t0 = time.perf_counter()
        model = self._segmenter(bucket)
        with self._segment_autocast():
            logits = model(self._prepare(x, self.segment_batch_size))
        prob = torch.sigmoid(logits.float())[:n, 0].cpu().numpy()
        self.times.segment += time.perf_counter() - t0
        return prob


AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def segment_precision(autocast: str, device_type: str) -> str:
    """The precision segmentation runs at: ``inference.autocast`` (auto, none, fp16, bf16) on a
    device type; auto means fp16 on a GPU and none (float32) elsewhere."""
    if autocast == "auto":
        return "fp16" if device_type == "cuda" else "none"
    if autocast not in ("none", *AUTOCAST_DTYPES):
        raise ValueError(f"autocast must be auto, none, fp16 or bf16, got {autocast!r}")
    return autocast


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """float32 arithmetic on ``device``: autocast off and, on a GPU, TF32 off for convolutions
    and matrix products (TF32 keeps 10 mantissa bits, enough to flip a hash bit)."""
    with torch.autocast(device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def route_out_of_distribution(packed: torch.Tensor, centroids: torch.Tensor, buckets: torch.Tensor,
                              thresholds: torch.Tensor) -> torch.Tensor:
    """Buckets with OOD_BUCKET where a code's distance to its bucket's centroid exceeds the
    bucket's threshold (a tile unlike every bucket's training tiles)."""
    if len(buckets) == 0:
        return buckets
    d = hamming_distance(packed, centroids)
    rows = torch.arange(len(buckets))
    far = d[rows, buckets.long()].long() > thresholds.long()[buckets.long()]
    return torch.where(far, torch.full_like(buckets, OOD_BUCKET), buckets)


@dataclass
class PendingTile:
    """A tile waiting in its bucket's queue: its input and what stages 1-2 said about it."""

    item: Any
    x: Any                  # (C, S, S) numpy array, or a tensor on the GPU
    code: np.ndarray
    bucket: int
    ood_score: float = float("nan")


class BucketQueues:
    """Per-bucket queues: tiles are segmented ``segment_batch_size`` at a time per bucket model."""

    def __init__(self, stages: TileStages):
        self.stages = stages
        self.queues: dict[int, list[PendingTile]] = {}

    def push(self, tiles: Sequence[PendingTile]) -> Iterator[tuple[PendingTile, np.ndarray]]:
        """Queue tiles; yield (tile, probability) for every bucket queue that became full."""
        for t in tiles:
            q = self.queues.setdefault(t.bucket, [])
            q.append(t)
            if len(q) == self.stages.segment_batch_size:
                yield from self._run(t.bucket)

    def flush(self) -> Iterator[tuple[PendingTile, np.ndarray]]:
        """Segment what is left in every queue (padded batches), buckets in ascending order."""
        for b in sorted(self.queues):
            if self.queues[b]:
                yield from self._run(b)

    def _run(self, bucket: int) -> Iterator[tuple[PendingTile, np.ndarray]]:
        q, self.queues[bucket] = self.queues[bucket], []
        xs = [t.x for t in q]
        batch = torch.stack(xs) if isinstance(xs[0], torch.Tensor) else np.stack(xs)
        prob = self.stages.segment(bucket, batch)
        yield from zip(q, prob)

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues.values())
