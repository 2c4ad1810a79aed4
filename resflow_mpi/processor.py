"""Turns a stream of tile descriptors into tile results: GDAL window reads joined to the stages.

Reading GDAL windows happens in a background thread (``prefetch_batches`` ahead) while the main
thread runs the networks; task sources (static lists, an MPI work counter) are only ever called
from the main thread, so MPI never needs to be thread-safe.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .config import RunConfig
from .io import OPEN_SCENES
from .io.aoi import inside_mask
from .io.maskstore import TileResult
from .io.raster import SceneInfo, WindowReader
from .stages import OOD_BUCKET, BucketQueues, PendingTile, TileStages, normalize
from .tiling import Tile

TaskSource = Callable[[], Optional[Sequence["TileTask"]]]


@dataclass(frozen=True)
class TileTask:
    """A tile descriptor as scattered by rank 0: where to read, whether it is all nodata (or
    outside the area of interest), the share of its owned pixels inside the area of interest,
    and for a tile on the area's edge the area clipped to its owned window (WKB, scene CRS)."""

    tile: Tile
    empty: bool = False
    inside: float = 1.0
    aoi_wkb: Optional[bytes] = None


@dataclass
class PipelineStats:
    """Counters and per-stage seconds of one worker."""

    tiles: int = 0
    tiles_computed: int = 0
    embed_slots: int = 0      # batch slots the embedding/hashing calls computed (padding included)
    pixels: int = 0
    area_km2: float = 0.0     # ground area of the owned windows (each scene in its own CRS)
    bytes_read: int = 0
    read_s: float = 0.0       # reader-thread busy time (overlaps compute)
    read_wait_s: float = 0.0  # time the compute thread waited for data
    embed_s: float = 0.0
    hash_s: float = 0.0
    segment_s: float = 0.0
    buckets: dict[int, int] = field(default_factory=dict)
    ood_by_scene: dict[int, int] = field(default_factory=dict)  # tiles flagged out of distribution, per scene


@dataclass
class _ReadBatch:
    tasks: list[TileTask]
    x: Optional[np.ndarray]
    valid: list[np.ndarray]
    seconds: float
    nbytes: int


class TileProcessor:
    """Turns tile tasks into tile results with the three stages."""

    def __init__(self, scenes: Sequence[SceneInfo], cfg: RunConfig, stages: TileStages):
        self.scenes = list(scenes)
        self.cfg = cfg
        self.stages = stages
        self.code_bytes = stages.centroids.shape[1]
        self.stats = PipelineStats()
        self._readers: OrderedDict[int, WindowReader] = OrderedDict()  # least recent first

    # -- reading (background thread) -----------------------------------------------------------
    def _reader(self, scene: int) -> WindowReader:
        """The scene's open reader; the least recently used one is closed beyond OPEN_SCENES."""
        reader = self._readers.get(scene)
        if reader is None:
            if len(self._readers) >= OPEN_SCENES:
                _, oldest = self._readers.popitem(last=False)
                oldest.close()
            reader = self._readers[scene] = WindowReader(self.scenes[scene],
                                                         self.cfg.scenes.bands)
        else:
            self._readers.move_to_end(scene)
        return reader

    def _read(self, tasks: list[TileTask]) -> _ReadBatch:
        t0 = time.perf_counter()
        xs, valid, nbytes = [], [], 0
        n = self.cfg.normalization
        for task in tasks:
            if task.empty:
                valid.append(np.zeros((task.tile.owned.height, task.tile.owned.width), bool))
                continue
            info = self.scenes[task.tile.scene]
            raw, ok = self._reader(task.tile.scene).read_tile(task.tile)
            nbytes += raw.nbytes
            xs.append(normalize_scene(raw, info, n))
            valid.append(ok)
        x = np.stack(xs) if xs else None
        return _ReadBatch(tasks, x, valid, time.perf_counter() - t0, nbytes)

    # -- results -------------------------------------------------------------------------------
    def _result(self, p: PendingTile, prob: np.ndarray) -> TileResult:
        task, valid = p.item
        c = task.tile.crop
        owned = prob[c.row:c.row + c.height, c.col:c.col + c.width]
        mask = (owned > self.stages.threshold).astype(np.uint8)
        mask[~valid] = 255
        keep = owned.astype(np.float16) if self.cfg.keeps_probabilities else None
        self.stats.buckets[p.bucket] = self.stats.buckets.get(p.bucket, 0) + 1
        if p.bucket == OOD_BUCKET:
            s = task.tile.scene
            self.stats.ood_by_scene[s] = self.stats.ood_by_scene.get(s, 0) + 1
        return TileResult(task.tile, mask, p.bucket, p.code, keep, p.ood_score)

    def _empty_result(self, task: TileTask) -> TileResult:
        o = task.tile.owned
        prob = (np.zeros((o.height, o.width), np.float16)
                if self.cfg.keeps_probabilities else None)
        return TileResult(task.tile, np.full((o.height, o.width), 255, np.uint8), -1,
                          np.zeros(self.code_bytes, np.uint8), prob)

    # -- the loop ------------------------------------------------------------------------------
    def process(self, source: TaskSource) -> Iterator[TileResult]:
        """Pull task batches from ``source`` until it returns None; yield results as they finish."""
        queues = BucketQueues(self.stages)
        depth = self.cfg.inference.prefetch_batches + 1
        pending: deque[Future[_ReadBatch]] = deque()
        exhausted = False
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="resflow-read") as pool:
            while True:
                while not exhausted and len(pending) < depth:
                    tasks = source()
                    if tasks is None:
                        exhausted = True
                    elif tasks:
                        pending.append(pool.submit(self._read, list(tasks)))
                if not pending:
                    break
                t0 = time.perf_counter()
                batch = pending.popleft().result()
                self.stats.read_wait_s += time.perf_counter() - t0
                self.stats.read_s += batch.seconds
                self.stats.bytes_read += batch.nbytes
                yield from self._compute(batch, queues)
            for p, prob in queues.flush():
                yield self._result(p, prob)
        self._sync_times()
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def _compute(self, batch: _ReadBatch, queues: BucketQueues) -> Iterator[TileResult]:
        work: list[tuple[TileTask, np.ndarray]] = []
        for task, valid in zip(batch.tasks, batch.valid):
            self.stats.tiles += 1
            owned_px = task.tile.owned.width * task.tile.owned.height
            self.stats.pixels += owned_px
            info = self.scenes[task.tile.scene]
            self.stats.area_km2 += info.window_area_km2(task.tile.owned) * task.inside
            if task.empty:
                yield self._empty_result(task)
            elif task.aoi_wkb is not None:  # outside the area of interest is nodata
                work.append((task, valid & inside_mask(task.aoi_wkb, info.crs_wkt,
                                                       info.geotransform, task.tile.owned)))
            else:
                work.append((task, valid))
        if batch.x is None:
            return
        bs = self.stages.batch_size
        for i in range(0, len(work), bs):
            x = self.stages.on_device(batch.x[i:i + bs])  # uploaded once on a GPU
            _, codes, buckets, scores = self.stages.embed_hash_score(x)
            self.stats.tiles_computed += len(x)
            self.stats.embed_slots += self.stages.batch_size
            pend = [PendingTile(item, xi, c, int(b), float(sc))
                    for item, xi, c, b, sc in zip(work[i:i + bs], x, codes, buckets, scores)]
            for p, prob in queues.push(pend):
                yield self._result(p, prob)
        self._sync_times()

    def _sync_times(self) -> None:
        t = self.stages.times
        self.stats.embed_s, self.stats.hash_s, self.stats.segment_s = t.embed, t.hash, t.segment


def normalize_scene(raw: np.ndarray, info: SceneInfo, norm: Any) -> np.ndarray:
    """Network input of a raw window of ``info`` under the NormalizationConfig ``norm``."""
    if norm.mode == "scene":
        if info.band_stats is None:
            raise ValueError(f"{info.path}: scene statistics were not computed")
        mean, std = info.band_stats
        return normalize(raw, info.dtype, "configured", None, mean, std)
    return normalize(raw, info.dtype, norm.mode, norm.value_max, norm.mean, norm.std)


def counter_source(tasks: Sequence[TileTask], counter: Any, chunk: int,
                   batch_size: int) -> TaskSource:
    """A task source pulling ``chunk`` tasks at a time from a shared work counter.

    One call gathers chunks until a full compute batch (``batch_size``) is ready, so the
    embedding batch is never padded while tiles remain; chunks stay small for load balance."""
    def next_batch() -> Optional[Sequence[TileTask]]:
        out: list[TileTask] = []
        while len(out) < batch_size:
            n = min(chunk, batch_size - len(out))
            start = counter.add(n)
            if start >= len(tasks):
                break
            out.extend(tasks[start:start + n])
        return out or None
    return next_batch


def list_source(tasks: Sequence[TileTask], batch_size: int) -> TaskSource:
    """A task source over a fixed list, ``batch_size`` tasks per call."""
    it = iter(range(0, len(tasks), batch_size))

    def next_batch() -> Optional[Sequence[TileTask]]:
        i = next(it, None)
        return None if i is None else tasks[i:i + batch_size]
    return next_batch
