"""Turns a stream of tile descriptors into tile results: GDAL window reads joined to the stages.

Three kinds of threads per process. Reader threads (``parallel.reader_threads``, each with its own
GDAL handles: a dataset is not thread-safe; GDAL releases the GIL while it decodes) read whole
batches, at most ``inference.prefetch_batches + 1`` ahead; on a GPU they also copy each batch into
pinned memory and start its upload on a copy stream. One compute thread runs the stages (on a
GPU on its own stream, waiting on each batch's upload event). The calling thread pulls task
batches from the source (static lists, an MPI work counter) and hands results on in order, so
the mask writes and every MPI call stay on the thread that drives the job (collective HDF5 writes
and MPI never need to be thread-safe) while the next batches are read and computed.
"""
from __future__ import annotations

import dataclasses

import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

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
    tiles_empty: int = 0      # all nodata (known at planning or found when read): not computed
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
    tasks: list[TileTask]          # tiles found all nodata when read are flagged empty here
    x: Optional[np.ndarray | torch.Tensor]  # inputs of the non-empty tiles (on the GPU: uploading)
    valid: list[np.ndarray]
    seconds: float
    nbytes: int
    uploaded: Optional[torch.cuda.Event] = None  # recorded on the copy stream after the upload
    host: Optional[torch.Tensor] = None           # pinned source of the upload, kept until used


class _ReaderPool:
    """Reader threads, each with its own least-recently-used cache of open scenes."""

    def __init__(self, scenes: Sequence[SceneInfo], bands: Sequence[int], threads: int):
        self.scenes, self.bands = scenes, list(bands)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="resflow-read")
        self._local = threading.local()
        self._caches: list[OrderedDict[int, WindowReader]] = []
        self._lock = threading.Lock()

    def reader(self, scene: int) -> WindowReader:
        """This thread's reader of the scene; its least recent one closes beyond OPEN_SCENES."""
        cache: Optional[OrderedDict[int, WindowReader]] = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = OrderedDict()
            with self._lock:
                self._caches.append(cache)
        reader = cache.get(scene)
        if reader is None:
            if len(cache) >= OPEN_SCENES:
                _, oldest = cache.popitem(last=False)
                oldest.close()
            reader = cache[scene] = WindowReader(self.scenes[scene], self.bands)
        else:
            cache.move_to_end(scene)
        return reader

    def close(self) -> None:
        """Stop the threads (queued reads are cancelled) and close every handle."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for cache in self._caches:
            for r in cache.values():
                r.close()
            cache.clear()


_DONE = object()


class TileProcessor:
    """Turns tile tasks into tile results with the three stages."""

    def __init__(self, scenes: Sequence[SceneInfo], cfg: RunConfig, stages: TileStages):
        self.scenes = list(scenes)
        self.cfg = cfg
        self.stages = stages
        self.code_bytes = stages.centroids.shape[1]
        self.stats = PipelineStats()
        self._cuda = stages.device.type == "cuda"
        self._copy_stream: Optional[torch.cuda.Stream] = (
            torch.cuda.Stream(stages.device) if self._cuda else None)

    # -- reading (reader threads) --------------------------------------------------------------
    def _read(self, readers: _ReaderPool, tasks: list[TileTask]) -> _ReadBatch:
        t0 = time.perf_counter()
        xs, valid, nbytes = [], [], 0
        n = self.cfg.normalization
        for i, task in enumerate(tasks):
            if task.empty:
                valid.append(np.zeros((task.tile.owned.height, task.tile.owned.width), bool))
                continue
            info = self.scenes[task.tile.scene]
            raw, ok = readers.reader(task.tile.scene).read_tile(task.tile)
            nbytes += raw.nbytes
            valid.append(ok)
            if not ok.any():  # all nodata: written as nodata, never computed
                tasks[i] = dataclasses.replace(task, empty=True)
                continue
            xs.append(normalize_scene(raw, info, n))
        batch = _ReadBatch(tasks, None, valid, 0.0, nbytes)
        if xs and self._cuda:
            self._upload(batch, xs)
        elif xs:
            batch.x = np.stack(xs)
        batch.seconds = time.perf_counter() - t0
        return batch

    def _upload(self, batch: _ReadBatch, xs: list[np.ndarray]) -> None:
        """Stack the inputs into pinned memory (torch's caching host allocator reuses it) and
        start their copy to the GPU on the copy stream; ``batch.uploaded`` marks its end."""
        assert self._copy_stream is not None
        host = torch.empty((len(xs),) + xs[0].shape, dtype=torch.float32, pin_memory=True)
        np.stack(xs, out=host.numpy())
        with torch.cuda.stream(self._copy_stream):
            batch.x = host.to(self.stages.device, non_blocking=True)
            batch.uploaded = torch.cuda.Event()
            batch.uploaded.record(self._copy_stream)
        batch.host = host

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
        """Pull task batches from ``source`` until it returns None; yield results as they finish.

        ``source`` is only called from the calling thread, and results are yielded there."""
        depth = self.cfg.inference.prefetch_batches + 1
        readers = _ReaderPool(self.scenes, self.cfg.scenes.bands,
                              reader_threads(self.cfg.parallel.reader_threads, self.stages.device))
        inbox: queue.Queue[Any] = queue.Queue()   # read futures in order, _DONE at the end
        outbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self._compute_thread, args=(inbox, outbox, stop),
                                  name="resflow-compute", daemon=True)
        worker.start()
        waiting, exhausted = 0, False  # read batches not yet taken by the compute thread
        try:
            while True:
                while not exhausted and waiting < depth:
                    tasks = source()
                    if tasks is None:
                        exhausted = True
                        inbox.put(_DONE)
                    elif tasks:
                        inbox.put(readers.executor.submit(self._read, readers, list(tasks)))
                        waiting += 1
                kind, value = outbox.get()
                if kind == "result":
                    yield value
                elif kind == "taken":
                    waiting -= 1
                elif kind == "error":
                    raise value
                else:
                    break
        finally:
            stop.set()
            inbox.put(_DONE)
            worker.join()
            readers.close()
        self._sync_times()

    def _compute_thread(self, inbox: queue.Queue[Any], outbox: queue.Queue[tuple[str, Any]],
                        stop: threading.Event) -> None:
        """Run the stages on each read batch in order; results, errors and progress to outbox."""
        try:
            if self._cuda:
                torch.cuda.set_device(self.stages.device)
                with torch.cuda.stream(torch.cuda.Stream(self.stages.device)):
                    self._compute_all(inbox, outbox, stop)
            else:
                self._compute_all(inbox, outbox, stop)
        except BaseException as exc:  # surfaces in the calling thread as it was raised
            outbox.put(("error", exc))
        else:
            outbox.put(("done", None))

    def _compute_all(self, inbox: queue.Queue[Any], outbox: queue.Queue[tuple[str, Any]],
                     stop: threading.Event) -> None:
        queues = BucketQueues(self.stages)
        while not stop.is_set():
            item: Future[_ReadBatch] = inbox.get()
            if item is _DONE:
                break
            t0 = time.perf_counter()
            batch = item.result()
            self.stats.read_wait_s += time.perf_counter() - t0
            self.stats.read_s += batch.seconds
            self.stats.bytes_read += batch.nbytes
            outbox.put(("taken", None))
            for r in self._compute(batch, queues):
                outbox.put(("result", r))
        if not stop.is_set():
            for p, prob in queues.flush():
                outbox.put(("result", self._result(p, prob)))

    def _compute(self, batch: _ReadBatch, queues: BucketQueues) -> Iterator[TileResult]:
        work: list[tuple[TileTask, np.ndarray]] = []
        for task, valid in zip(batch.tasks, batch.valid):
            self.stats.tiles += 1
            owned_px = task.tile.owned.width * task.tile.owned.height
            self.stats.pixels += owned_px
            info = self.scenes[task.tile.scene]
            self.stats.area_km2 += info.window_area_km2(task.tile.owned) * task.inside
            if task.empty:
                self.stats.tiles_empty += 1
                yield self._empty_result(task)
            elif task.aoi_wkb is not None:  # outside the area of interest is nodata
                work.append((task, valid & inside_mask(task.aoi_wkb, info.crs_wkt,
                                                       info.geotransform, task.tile.owned)))
            else:
                work.append((task, valid))
        if batch.x is None:
            return
        if isinstance(batch.x, torch.Tensor):  # uploading on the copy stream
            assert batch.uploaded is not None
            stream = torch.cuda.current_stream(self.stages.device)
            stream.wait_event(batch.uploaded)
            batch.x.record_stream(stream)
        bs = self.stages.batch_size
        for i in range(0, len(work), bs):
            x = batch.x[i:i + bs]
            if not isinstance(x, torch.Tensor):
                x = self.stages.on_device(x)
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


# One reader thread read and normalised about 15 Mpix/s of 3-band DEFLATE on a busy 2-core VM
# (perf/feed.py, issue 27); a GPU mapping 60+ Mpix/s needs several.
GPU_READER_THREADS = 4


def reader_threads(configured: int, device: torch.device) -> int:
    """Reader threads per rank: ``parallel.reader_threads``, or for 0 one on CPU and
    GPU_READER_THREADS on a GPU."""
    if configured:
        return configured
    return GPU_READER_THREADS if device.type == "cuda" else 1


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
