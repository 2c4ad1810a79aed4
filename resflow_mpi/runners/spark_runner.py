"""The Spark engine: RESFlow's original cluster design, on the same stages as the MPI engine.

Data flow (as in the paper):

1. The driver checks scenes (``plan_scenes``), the gallery and the output directory, opens the
   HDF5 mask store and reads its resume bitmaps.
2. An RDD of scene *paths*, one partition per scene; a flatMap UDF reads each scene's extent with
   GDAL and yields tile descriptors (never pixels), skipping finished tiles and flagging
   all-nodata ones. The descriptors are repartitioned over the cores.
3. ``mapPartitions``: each partition takes a ticket from the ticket folder (a GPU, or a CPU slot),
   builds the stages once, reads its tiles' pixels lazily from the paths, runs embed + hash and
   the per-bucket segmentation, and emits ``(scene index, compact tile result)`` records.
4. A reduce by scene key merges each scene's tiles into one list (``combineByKey`` with list
   append/extend: the paper's reduceByKey over lists, linear instead of quadratic).
5. The driver pulls the merged scenes one at a time (``toLocalIterator``) and writes them into one
   ordinary single-writer ``masks.h5`` (same layout as the MPI engine); executors then export the
   finished scenes in parallel and the driver writes ``run_report.json``.

The serial merge on one process is the paper's main limit on speed-up, kept here on purpose: it
is what the MPI engine's parallel HDF5 writers replace. Errors a user can cause (``ResflowError``)
in the compute and export tasks travel back as records and are raised on the driver as one line;
any other task failure is still recognised in Spark's error text when a ResflowError caused it.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from .. import errors
from ..config import RunConfig
from ..errors import ConfigError, ResflowError
from ..galleries import ModelGallery
from ..io.gdalenv import configure as configure_io
from ..io.maskstore import MaskStore, TileResult
from ..io.raster import SceneInfo, at_gsd, open_scene
from ..pipeline import (Job, PipelineStats, ResultSink, TileProcessor, TileTask, build_stages,
                        export_outputs, list_source, scene_tasks, stats_dict)
from ..runtime.comm import Communicator
from ..runtime.device import ticket_layout, use_device
from ..tiling import grid_shape, make_tile
from .tickets import TicketFolder

MIN_JAVA_MAJOR = 17
JAVA_HINT = "Java 17 is required for --engine spark: apt-get install default-jre-headless"
PYSPARK_HINT = "pyspark is not installed: run launch/install.sh"
# Key of the per-partition figures in the merged RDD; scene keys are >= 0.
STATS_KEY = -1
# Decoded tiles handed to the mask store per write call (bounds the driver's extra memory).
WRITE_CHUNK_TILES = 256
# scene, tile index, bucket, owned height, owned width, code bytes, has probabilities
_RESULT_HEADER = struct.Struct("<iiiiiiif")  # ..., has_prob, ood_score
_LOG4J2_PROPERTIES = """\
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n%ex
logger.hadoop.name = org.apache.hadoop
logger.hadoop.level = error
logger.sparkenv.name = org.apache.spark.SparkEnv
logger.sparkenv.level = error
logger.utils.name = org.apache.spark.util.Utils
logger.utils.level = error
"""


# -- environment checks (before any JVM starts) -----------------------------------------------
def java_major_version(version_text: str) -> Optional[int]:
    """The major Java version in ``java -version`` output ("1.8.0_x" -> 8, "17.0.15" -> 17)."""
    m = re.search(r'version "(\d+)(?:\.(\d+))?', version_text)
    if m is None:
        return None
    major = int(m.group(1))
    return int(m.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """The java executable Spark will launch (JAVA_HOME first, as spark-submit does, then PATH)."""
    home = os.environ.get("JAVA_HOME")
    if home:
        java = Path(home) / "bin" / "java"
        if not (java.is_file() and os.access(java, os.X_OK)):
            raise ConfigError(f"JAVA_HOME={home} has no executable bin/java; fix JAVA_HOME or "
                              f"unset it. {JAVA_HINT}")
        return str(java)
    found = shutil.which("java")
    if found is None:
        raise ConfigError(f"{JAVA_HINT} (no java on PATH and JAVA_HOME is unset)")
    return found


def check_spark_environment() -> str:
    """Fail with one line when pyspark or Java 17+ is missing; return the java path."""
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise ConfigError(PYSPARK_HINT) from None
    java = find_java()
    try:
        probe = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"{java} -version failed ({exc}). {JAVA_HINT}") from None
    major = java_major_version(probe.stderr + probe.stdout)
    if major is not None and major < MIN_JAVA_MAJOR:
        raise ConfigError(f"{java} is Java {major}. {JAVA_HINT}")
    return java


# -- compact tile results (what crosses the shuffle) -------------------------------------------
def encode_result(result: TileResult) -> bytes:
    """A tile result as bytes: a fixed header, then zlib(mask | code | probabilities)."""
    o = result.tile.owned
    code = np.ascontiguousarray(result.code, np.uint8)
    header = _RESULT_HEADER.pack(result.tile.scene, result.tile.index, result.bucket, o.height,
                                 o.width, code.size, result.prob is not None, result.ood_score)
    body = [np.ascontiguousarray(result.mask, np.uint8).tobytes(), code.tobytes()]
    if result.prob is not None:
        body.append(np.ascontiguousarray(result.prob, np.float16).tobytes())
    # Masks are 0/1/255 runs: level 1 already shrinks them many times at little CPU cost.
    return header + zlib.compress(b"".join(body), 1)


def decode_result(blob: bytes, scene: SceneInfo, tile_px: int, halo_px: int) -> TileResult:
    """Inverse of ``encode_result``; the tile geometry is rebuilt from the scene's grid."""
    scene_index, index, bucket, h, w, code_bytes, has_prob, score = _RESULT_HEADER.unpack_from(blob)
    body = zlib.decompress(blob[_RESULT_HEADER.size:])
    mask = np.frombuffer(body, np.uint8, h * w).reshape(h, w).copy()
    code = np.frombuffer(body, np.uint8, code_bytes, h * w).copy()
    prob = (np.frombuffer(body, np.float16, h * w, h * w + code_bytes).reshape(h, w).copy()
            if has_prob else None)
    _, cols = grid_shape(scene.width, scene.height, tile_px)
    tile = make_tile(scene_index, index // cols, index % cols, scene.width, scene.height,
                     tile_px, halo_px)
    return TileResult(tile, mask, bucket, code, prob, score)


# -- what executors run ------------------------------------------------------------------------
@dataclass(frozen=True)
class SparkJob:
    """Everything an executor needs, shipped with the closures (small: no pixels, no weights)."""

    cfg: RunConfig
    scenes: tuple[SceneInfo, ...]
    ticket_dir: str
    threads: int
    bucket_override: Optional[str] = None


def scene_tile_tasks(item: tuple[int, str], job: SparkJob, coverage: Any,
                     done: Any, aoi: Any = None) -> Iterator[TileTask]:
    """flatMap UDF: read a scene's extent with GDAL, yield its unfinished tiles' descriptors.

    ``coverage``, ``done`` and ``aoi`` are broadcasts of the driver's per-scene nodata coverage,
    resume bitmaps and area of interest (None where absent)."""
    configure_io()  # executors are other processes: GDAL settings are per process
    index, path = item
    t = job.cfg.tiling
    sc = job.cfg.scenes
    info = at_gsd(open_scene(path, sc.bands, sc.expect_dtype), sc.gsd_m, sc.gsd_resampling)
    yield from scene_tasks(index, info, t.tile_px, t.halo_px, coverage.value[index],
                           done.value[index], aoi.value[index] if aoi and aoi.value else None)


def node_tickets(job: SparkJob) -> TicketFolder:
    """This executor node's ticket folder (``<ticket_dir>/<host>``), made on first use from the
    node's OWN devices: nodes need not match the driver, and no folder spans two nodes."""
    cfg = job.cfg
    devices, per_device = ticket_layout(cfg.inference.device, cfg.spark.tickets_per_device,
                                        cfg.spark.cpu_slots)
    return TicketFolder.create(Path(job.ticket_dir) / socket.gethostname(), devices, per_device)


def compute_partition(partition: int, tasks: Iterable[TileTask],
                      job: SparkJob) -> Iterator[tuple[int, Any]]:
    """mapPartitions: hold a ticket, build the stages once, emit (scene, encoded result) records.

    Ends with one ``(STATS_KEY, figures)`` record; a ResflowError is reported in it instead of
    being raised, so the driver can print it as one line."""
    configure_io()
    t_start = time.perf_counter()
    todo = list(tasks)  # descriptors only; pixels are read lazily by the processor
    stats = PipelineStats()
    binding: dict[str, Any] = {"partition": partition, "host": socket.gethostname(),
                               "pid": os.getpid(), "device": None, "ticket": None,
                               "threads": job.threads}
    error: Optional[tuple[str, str]] = None
    mask_bytes = 0  # what the driver will write for this partition (report totals)
    try:
        if todo:
            cfg = job.cfg
            with node_tickets(job).ticket() as ticket:
                device = use_device(ticket.device, job.threads)
                binding.update(device=ticket.device, ticket=ticket.name)
                stages = build_stages(cfg, ModelGallery(cfg.models.gallery), device,
                                      job.bucket_override)
                processor = TileProcessor(job.scenes, cfg, stages)
                stats = processor.stats
                for result in processor.process(list_source(todo, cfg.inference.batch_size)):
                    mask_bytes += result.mask.nbytes + (result.prob.nbytes
                                                        if result.prob is not None else 0)
                    yield result.tile.scene, encode_result(result)
    except ResflowError as exc:
        error = (type(exc).__name__, str(exc))
    figures = stats_dict(stats, partition, time.perf_counter() - t_start, 0.0, mask_bytes,
                         binding)
    figures["error"] = error
    yield STATS_KEY, figures


def export_partition(scene_indices: Iterable[int], cfg: RunConfig, out_dir: str,
                     scenes: Sequence[SceneInfo]) -> Iterator[tuple[int, Any]]:
    """Executor side of the export: (scene, paths) pairs, or (STATS_KEY, error) on failure."""
    configure_io()
    try:
        exported = export_outputs(cfg, Path(out_dir), str(Path(out_dir) / "masks.h5"), scenes,
                                  list(scene_indices))
        yield from exported.items()
    except ResflowError as exc:
        yield STATS_KEY, (type(exc).__name__, str(exc))


def scene_partition(key: int, n_scenes: int) -> int:
    """Partitioner of the merged RDD: the figures first (partition 0), then one scene each."""
    return 0 if key == STATS_KEY else 1 + key % n_scenes


def _start_list(value: Any) -> list[Any]:
    return [value]


def _append(values: list[Any], value: Any) -> list[Any]:
    values.append(value)
    return values


def _extend(values: list[Any], more: list[Any]) -> list[Any]:
    values.extend(more)
    return values


# -- driver side -------------------------------------------------------------------------------
def raise_reported(error: Optional[tuple[str, str]]) -> None:
    """Re-raise an executor's ResflowError (class name, message) on the driver."""
    if error is None:
        return
    cls = getattr(errors, error[0], None)
    if not (isinstance(cls, type) and issubclass(cls, ResflowError)):
        cls = ResflowError
    raise cls(error[1])


@contextmanager
def spark_errors() -> Iterator[None]:
    """Turn a Spark job failure caused by a ResflowError in a worker into that error (one line)."""
    try:
        yield
    except ResflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - Py4J/PySpark wrap worker errors in their own types
        found = re.findall(r"resflow_mpi\.errors\.(\w+): ([^\n]*)", str(exc))
        if not found:
            raise
        raise_reported(found[-1])


@contextmanager
def patched_environ(values: dict[str, str], remove: Sequence[str]) -> Iterator[None]:
    """Set/unset environment variables for what starts inside the block (the JVM), then restore."""
    saved = {k: os.environ.get(k) for k in (*values, *remove)}
    os.environ.update(values)
    for k in remove:
        os.environ.pop(k, None)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_spark(cfg: RunConfig, log_dir: Path) -> Any:
    """A SparkContext for ``spark.master``, quiet, with workers on this interpreter."""
    from pyspark import SparkConf, SparkContext
    log_conf = log_dir / "log4j2.properties"
    log_conf.write_text(_LOG4J2_PROPERTIES)
    local = cfg.spark.master.startswith("local")
    conf = (SparkConf().setMaster(cfg.spark.master).setAppName("resflow")
            .set("spark.ui.enabled", "false")
            .set("spark.ui.showConsoleProgress", "false")
            .set("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log_conf}")
            # Python workers are reused across tasks: a partition's models load once per task,
            # the interpreter (torch, GDAL) once per worker.
            .set("spark.python.worker.reuse", "true"))
    env = {"PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    if local:
        # Otherwise Spark binds (and warns about) the machine's external interface.
        conf.set("spark.driver.host", "127.0.0.1").set("spark.driver.bindAddress", "127.0.0.1")
        env["SPARK_LOCAL_IP"] = "127.0.0.1"
    # Debian's h5py picks its MPI build whenever this variable exists (even "0"); executors only
    # read masks.h5 serially, so they get the serial build and never start MPI in a Spark worker.
    with patched_environ(env, remove=["H5PY_ALWAYS_USE_MPI"]):
        sc = SparkContext(conf=conf)
    sc.setLogLevel("WARN")
    return sc


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


class SparkRunner:
    """The driver plans and writes; executors compute RDD partitions under GPU/CPU tickets."""

    name = "spark"

    def __init__(self) -> None:
        check_spark_environment()
        self.comm = Communicator(None)  # the driver is one process; Spark owns the parallelism
        self.sc: Any = None
        self.log_dir = Path(tempfile.mkdtemp(prefix="resflow-spark-"))
        self.extra: dict[str, Any] = {"writer": "driver (serial merge)"}

    def bind(self, cfg: RunConfig) -> Optional[dict[str, Any]]:
        return None  # executors bind per partition through the ticket folder

    def open_store(self, job: Job, restart: bool) -> Optional[MaskStore]:
        t = job.cfg.tiling
        return MaskStore(job.h5_path, job.scenes, t.tile_px, t.halo_px, job.code_bytes,
                         job.cfg.checksum(), job.gallery.checksum, comm=None, restart=restart,
                         save_probabilities=job.cfg.keeps_probabilities)

    def _context(self, cfg: RunConfig) -> Any:
        if self.sc is None:
            self.sc = start_spark(cfg, self.log_dir)
        return self.sc

    def map_tiles(self, job: Job, tasks: Sequence[TileTask], sink: ResultSink,
                  bucket_override: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        cfg, scenes, t = job.cfg, job.scenes, job.cfg.tiling
        ticket_dir = Path(cfg.spark.ticket_dir or job.out_dir / "tickets")
        spark_job = SparkJob(cfg, tuple(scenes), str(ticket_dir),
                             cfg.inference.threads_per_rank or 1, bucket_override)
        sc = self._context(cfg)
        n_cores = sc.defaultParallelism
        _say(job.quiet, f"[spark] {cfg.spark.master}: {len(scenes)} scene(s) over {n_cores} "
                        f"partition(s), ticket folders per node under {ticket_dir}")
        # The RDD holds scene paths (as in the paper); executors re-derive the tiles of each
        # scene, skipping the ones the driver's plan no longer lists (finished on resume).
        todo: list[Optional[np.ndarray]] = []
        for i, s in enumerate(scenes):
            rows, cols = grid_shape(s.width, s.height, t.tile_px)
            finished = np.ones(rows * cols, bool)
            todo.append(finished)
        for task in tasks:
            todo[task.tile.scene][task.tile.index] = False  # type: ignore[index]
        coverage_bc = sc.broadcast(job.plan.coverage)
        done_bc = sc.broadcast([d if d.any() else None for d in todo])  # type: ignore[union-attr]
        aoi_bc = sc.broadcast(job.plan.aoi)
        paths = [s.path for s in scenes]
        merged = (sc.parallelize(list(enumerate(paths)), numSlices=len(paths))
                  .flatMap(partial(scene_tile_tasks, job=spark_job, coverage=coverage_bc,
                                   done=done_bc, aoi=aoi_bc))
                  .repartition(n_cores)
                  .mapPartitionsWithIndex(partial(compute_partition, job=spark_job))
                  .combineByKey(_start_list, _append, _extend, numPartitions=len(scenes) + 1,
                                partitionFunc=partial(scene_partition, n_scenes=len(scenes))))
        per_partition: list[dict[str, Any]] = []
        write_s = 0.0
        with spark_errors():
            # Partition 0 holds the figures: an executor's error is raised before any write.
            for key, values in merged.toLocalIterator():
                if key == STATS_KEY:
                    per_partition = sorted(values, key=lambda f: f["rank"])
                    for figures in per_partition:
                        raise_reported(figures.pop("error"))
                    continue
                t0 = time.perf_counter()
                for i in range(0, len(values), WRITE_CHUNK_TILES):
                    sink.write_results([decode_result(b, scenes[key], t.tile_px, t.halo_px)
                                        for b in values[i:i + WRITE_CHUNK_TILES]])
                write_s += time.perf_counter() - t0
                _say(job.quiet, f"[merge] scene {key}: {len(values)} tile(s) written in "
                                f"{time.perf_counter() - t0:.2f} s")
        self.extra.update({"master": cfg.spark.master, "merge_write_s": write_s,
                           "merge_bytes_written": getattr(sink, "bytes_written", 0),
                           "ticket_dir": str(ticket_dir),
                           "tickets": {p.name: TicketFolder(p).ticket_names
                                       for p in sorted(ticket_dir.iterdir())
                                       if (p / "layout.json").is_file()}})
        return per_partition

    def export(self, job: Job, complete: Sequence[int]) -> dict[int, list[str]]:
        exported: dict[int, list[str]] = {}
        if not complete:
            return exported
        sc = self._context(job.cfg)
        with spark_errors():
            pairs = (sc.parallelize(list(complete), numSlices=len(complete))
                     .mapPartitions(partial(export_partition, cfg=job.cfg, out_dir=str(job.out_dir),
                                            scenes=job.scenes))
                     .collect())
        for key, value in pairs:
            if key == STATS_KEY:
                raise_reported(value)
            exported[key] = value
        return exported

    def report_extra(self) -> dict[str, Any]:
        return dict(self.extra)

    def close(self) -> None:
        if self.sc is not None:
            self.sc.stop()
            self.sc = None
        shutil.rmtree(self.log_dir, ignore_errors=True)
