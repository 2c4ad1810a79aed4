"""The one pipeline every engine runs: plan scenes -> open the mask store -> build the stages ->
process tiles -> finish -> export -> report.

A ``Runner`` supplies only what differs between engines: how this process binds a device, where
tiles come from and how results are written (``map_tiles``), how finished scenes are exported, and
what it adds to the report. Runners: ``runners.local.LocalRunner`` (one process, no MPI),
``runners.mpi_runner.MPIRunner`` (scatter or one-sided counter; collective, independent or gather
writes), ``runners.spark_runner.SparkRunner`` (RDD partitions, ticket folder, driver merge).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from .blending import augmented
from .config import RunConfig
from .errors import InputError, OutputError, os_error_cause
from .galleries import ModelGallery, resolve_run_config
from .io.aoi import AreaOfInterest, SceneAOI, load_aoi, scene_aoi
from .io.export import OutputRecord, confined, export_scene, outputs_current
from .io.maskstore import MaskReader, MaskStore, TileResult, mark_complete_scenes
from .io.naming import BUCKETS, COG, MASK, PROBABILITY, mark_output_dir, output_file_name
from .io.manifest import scenes_for
from .io.outlock import OutputLock
from .io.outlock import partial_path as job_partial_path
from .io.raster import (SceneInfo, at_gsd, gsd_mismatch, has_valid_pixel, known_empty_tiles,
                        open_scene, prepare_scene, tile_coverage)
from .preflight import estimate_summary, gpu_total_bytes, planned_tiles_per_rank, preflight
from .processor import (PipelineStats, TaskSource, TileProcessor, TileTask, counter_source,
                        list_source, normalize_scene)
from .report import REPORT_NAME as HTML_REPORT_NAME
from .report import RUN_REPORT_NAME
from .runtime.comm import Communicator
from .stages import TileStages
from .tiling import grid_shape, tile_grid

__all__ = ["Job", "Runner", "run_job", "build_stages", "drive", "TileTask", "TaskSource",
           "TileProcessor", "PipelineStats", "list_source", "counter_source", "normalize_scene"]

H5_NAME = "masks.h5"


# -- planning (rank 0 / driver) -----------------------------------------------------------------
@dataclass
class ScenePlan:
    """Scenes that passed the checks, and those skipped (policy on_bad_scene=skip)."""

    scenes: list[SceneInfo]
    # Per tile: valid fraction (tiling.prescan_nodata), else 0 where known all nodata, NaN unknown.
    coverage: list[Optional[np.ndarray]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    aoi: list[Optional[SceneAOI]] = field(default_factory=list)  # scenes.aoi on each scene
    aoi_source: Optional[AreaOfInterest] = None
    outside_aoi: list[str] = field(default_factory=list)  # scenes the AOI misses (not mapped)

    def scene_aoi(self, index: int) -> Optional[SceneAOI]:
        """The AOI on scene ``index`` (None: no scenes.aoi)."""
        return self.aoi[index] if self.aoi else None

    def aoi_summary(self, tile_px: int) -> Optional[dict[str, Any]]:
        """What the AOI kept: tiles intersecting it of all tiles, its area inside the scenes."""
        if self.aoi_source is None:
            return None
        total = sum(int(np.prod(grid_shape(s.width, s.height, tile_px))) for s in self.scenes)
        return {"path": self.aoi_source.path,
                "tiles_intersecting": sum(a.tiles_intersecting for a in self.aoi if a),
                "tiles_total": total,
                "area_km2": sum(a.area_km2 for a in self.aoi if a),
                "scenes_outside": list(self.outside_aoi)}


def check_output_dir(out_dir: str) -> Path:
    """Create the output directory and prove it is writable (before any work starts)."""
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
        mark_output_dir(p)  # scene discovery never takes what is below it as input
    except OSError as exc:
        raise OutputError(f"{out_dir}: output directory is not writable "
                          f"({os_error_cause(exc)})") from None
    return p.resolve()


def plan_scenes(cfg: RunConfig, comm: Optional[Communicator] = None) -> ScenePlan:
    """Resolve, open and check every scene; fail or skip bad ones per scenes.on_bad_scene.

    Header checks and the block-index look-up of all-nodata tiles (or the full nodata prescan
    under tiling.prescan_nodata) are spread over the ranks of ``comm`` (scene i on rank
    i % size); rank 0 assembles the plan and every rank gets it."""
    comm = comm or Communicator(None)

    def scene_paths() -> list[str]:
        paths = [e.path for e in scenes_for(cfg, "predict")]  # label files are never scenes
        if not paths:
            raise InputError(f"{cfg.scenes.manifest or 'scenes.inputs'}: no scenes to map (set "
                             "scenes.inputs, or the predict: list of scenes.manifest)")
        return paths
    paths = comm.root_call(scene_paths)
    aoi = comm.root_call(lambda: load_aoi(cfg.scenes.aoi)) if cfg.scenes.aoi else None

    def check(path: str) -> tuple[str, Any, Any, Any]:
        # Each scene keeps its own CRS and geotransform end to end (archives span UTM zones).
        try:
            on_scene = None
            if aoi is not None:  # from the header alone: a scene the AOI misses is never read
                head = at_gsd(open_scene(path, cfg.scenes.bands, cfg.scenes.expect_dtype),
                              cfg.scenes.gsd_m)  # the tile grid the networks see
                on_scene = scene_aoi(aoi, head.crs_wkt, head.geotransform, head.width,
                                     head.height, cfg.tiling.tile_px)
                if on_scene is None:
                    return "outside", path, "", None
            info = prepare_scene(path, cfg)
            bands, tile_px = cfg.scenes.bands, cfg.tiling.tile_px
            if cfg.tiling.prescan_nodata:
                cov = tile_coverage(info, tile_px, bands)
                has_data = float(cov.max()) > 0.0
            else:  # tiles not known empty from the block index are decided when read
                empty = known_empty_tiles(info, tile_px, bands)
                cov = np.where(empty, 0.0, np.nan).astype(np.float32)
                has_data = not bool((cov == 0.0).all()) and has_valid_pixel(info, bands)
            if not has_data:
                raise InputError(f"{path}: scene is entirely nodata "
                                 f"({info.validity_text(bands)})")
            return "ok", info, cov, on_scene
        except InputError as exc:
            if cfg.scenes.on_bad_scene == "fail":
                raise
            return "skip", path, str(exc), None
    checked = comm.map_split(paths, check)

    def assemble() -> ScenePlan:
        plan = ScenePlan([], aoi_source=aoi)
        for kind, a, b, on_scene in checked or []:
            if kind == "ok":
                plan.scenes.append(a)
                plan.coverage.append(b)
                if aoi is not None:
                    plan.aoi.append(on_scene)
            elif kind == "outside":
                plan.outside_aoi.append(a)
            else:
                plan.skipped.append({"path": a, "reason": b})
        if aoi is not None and plan.outside_aoi and not plan.scenes:
            raise InputError(f"{aoi.path}: the area of interest intersects none of the "
                             f"{len(paths)} scene(s) (scenes.aoi); check its extent and CRS "
                             "against the scenes'")
        if not plan.scenes:
            raise InputError(f"no usable scene among {len(paths)} (all skipped: "
                             f"{plan.skipped[0]['reason']} ...)")
        return plan
    return comm.root_call(assemble)


def scene_tasks(index: int, info: SceneInfo, tile_px: int, halo_px: int,
                coverage: Optional[np.ndarray] = None, done: Optional[np.ndarray] = None,
                aoi: Optional[SceneAOI] = None) -> list[TileTask]:
    """The unfinished tiles of one scene, flagged empty where ``coverage`` is 0 (all nodata; the
    others are found empty, or not, when read) or the tile lies outside the area of interest ``aoi``; a tile on the AOI's edge carries the AOI
    clipped to its owned window (its pixels outside are nodata)."""
    cov = coverage.ravel() if coverage is not None else None
    tasks = []
    for tile in tile_grid(index, info.width, info.height, tile_px, halo_px):
        if done is not None and done[tile.index]:
            continue
        inside = aoi.tile_inside(tile.index) if aoi is not None else 1.0
        empty = bool(cov is not None and cov[tile.index] == 0.0) or inside == 0.0
        tasks.append(TileTask(tile, empty, inside,
                              aoi.edges.get(tile.index) if aoi is not None else None))
    return tasks


def build_tasks(plan: ScenePlan, cfg: RunConfig,
                done: Optional[Sequence[np.ndarray]] = None) -> list[TileTask]:
    """Every unfinished tile of every scene of the plan."""
    t = cfg.tiling
    return [task for i, s in enumerate(plan.scenes)
            for task in scene_tasks(i, s, t.tile_px, t.halo_px, plan.coverage[i],
                                    done[i] if done is not None else None, plan.scene_aoi(i))]


# -- the job ------------------------------------------------------------------------------------
@dataclass
class Job:
    """What every process of a run knows after planning (small: no pixels, no weights)."""

    cfg: RunConfig
    plan: ScenePlan
    gallery: ModelGallery
    out_dir: Path
    quiet: bool = False
    plan_s: float = 0.0  # scene checks + nodata look-up, over all ranks
    memory_estimate: Optional[dict[str, Any]] = None

    @property
    def scenes(self) -> list[SceneInfo]:
        return self.plan.scenes

    @property
    def h5_path(self) -> str:
        return str(self.out_dir / H5_NAME)

    @property
    def code_bytes(self) -> int:
        return int(self.gallery.centroids.shape[1])

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)


def build_stages(cfg: RunConfig, gallery: ModelGallery, device: Any,
                 bucket_override: Optional[str] = None) -> TileStages:
    """The three stages on ``device`` with the gallery's models, as the config asks.

    ``bucket_override``: None (the config), "mono"/"mono-wide" (every tile by Mono), "buckets"
    (nearest bucket, no routing) or "routed" (out-of-distribution routing at ood_quantile, by the
    config's ood_routing method; Hamming distances when routing is off)."""
    routed = bucket_override == "routed" or (bucket_override is None
                                             and cfg.inference.ood_routing != "off")
    method = cfg.inference.ood_routing if cfg.inference.ood_routing != "off" else "quantile"
    models = gallery.stage_models(device, cfg.models.arch, cfg.models.preset,
                                  bucket_override=bucket_override,
                                  ood_quantile=cfg.inference.ood_quantile if routed else None,
                                  ood_method=method,
                                  window_px=cfg.tiling.tile_px + 2 * cfg.tiling.halo_px)
    models = replace(models, load_segmenter=augmented(
        models.load_segmenter, cfg.inference.blend, cfg.inference.tta))
    return TileStages.from_config(models, device, cfg.inference)


class ResultSink(Protocol):
    """Where tile results go: the HDF5 mask store (``kind`` "store": written as the runner's
    writer policy says) or a per-process sink such as an evaluation's counts (``kind`` "local")."""

    kind: str

    def write_results(self, results: Sequence[TileResult], collective: bool = False,
                      n_calls: Optional[int] = None) -> None: ...


class Runner(Protocol):
    """What differs between engines; everything else is ``run_job``."""

    name: str
    comm: Communicator

    def bind(self, cfg: RunConfig) -> Optional[dict[str, Any]]:
        """Bind this process to a device (None where tasks bind their own, as Spark's do)."""

    def open_store(self, job: Job, restart: bool) -> Optional[MaskStore]:
        """The mask store on the processes that write it (None elsewhere)."""

    def map_tiles(self, job: Job, tasks: Sequence[TileTask], sink: ResultSink,
                  bucket_override: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        """Compute every task (``tasks`` is given on rank 0 / the driver) into ``sink``; rank 0
        returns each worker's figures."""

    def export(self, job: Job, complete: Sequence[int]) -> dict[int, list[str]]:
        """Export finished scenes; rank 0 returns scene -> output paths."""

    def report_extra(self) -> dict[str, Any]:
        """Engine-specific entries for the run report."""


def setup_job(cfg: RunConfig, comm: Communicator, quiet: bool,
              binding: Optional[dict[str, Any]], lock: "OutputLock") -> Job:
    """Rank 0 checks the gallery against the config (the gallery contract); all ranks check the
    scenes; then rank 0 creates and locks the output directory (nothing is created for inputs
    that fail to load) and checks the memory budget of the planned tiles. Errors reach every
    rank before any work."""
    b = binding or {}

    def contract() -> RunConfig:
        gallery = ModelGallery(cfg.models.gallery)
        gallery.verify()
        return resolve_run_config(gallery, cfg)
    cfg = comm.root_call(contract)
    t0 = time.perf_counter()
    plan = plan_scenes(cfg, comm)
    plan_s = time.perf_counter() - t0

    def check() -> tuple[Path, dict[str, Any]]:
        out_dir = check_output_dir(cfg.output.dir)
        lock.acquire()  # held to the end of the job; a second job on out_dir is refused here
        tiles = sum(not task.empty for task in build_tasks(plan, cfg))
        aoi = plan.aoi_summary(cfg.tiling.tile_px)
        if aoi is not None and not quiet:
            print(aoi_line(aoi), file=sys.stderr, flush=True)
        _, estimate = preflight(
            cfg, ModelGallery(cfg.models.gallery), ranks=comm.size,
            ranks_per_node=int(b.get("local_size", 1)), device=str(b.get("device", "cpu")),
            ranks_per_gpu=int(b.get("ranks_sharing_device", 1)),
            gpu_total_bytes=gpu_total_bytes(str(b.get("device", "cpu"))),
            tiles_per_rank=planned_tiles_per_rank(tiles, comm.size, cfg.parallel.policy))
        return out_dir, estimate_summary(estimate)
    out_dir, estimate = comm.root_call(check)
    job = Job(cfg, plan, ModelGallery(cfg.models.gallery), out_dir, quiet)
    job.plan_s = plan_s
    job.memory_estimate = estimate
    return job


def run_job(cfg: RunConfig, runner: Runner, restart: bool = False, quiet: bool = False,
            html_report: bool = False) -> Optional[dict[str, Any]]:
    """Map every scene of the config to masks with ``runner``; rank 0 returns the run report.

    Rank 0 (or Spark's driver) holds ``output.dir``'s lock from before the first write to after
    the last (report.html included when ``html_report``)."""
    lock = OutputLock(cfg.output.dir, " ".join(sys.argv))
    try:
        report = _run_job(cfg, runner, restart, quiet, lock)
        if report is not None and html_report and cfg.output.quicklooks:
            from .report import write_html_report
            path = write_html_report(cfg.output.dir)
            if not quiet:
                print(f"report: {path}", flush=True)
        return report
    finally:
        lock.release()


def _run_job(cfg: RunConfig, runner: Runner, restart: bool, quiet: bool,
             lock: "OutputLock") -> Optional[dict[str, Any]]:
    t_start = time.perf_counter()
    comm = runner.comm
    binding = runner.bind(cfg)
    lines = comm.gather(binding["line"] if binding else None)
    if comm.is_root and not quiet and lines:
        for ln in lines:
            if ln:
                print(f"[binding] {ln}", file=sys.stderr, flush=True)
    job = setup_job(cfg, comm, quiet, binding, lock)
    cfg = job.cfg  # with the gallery's values for keys the user left unset
    store = runner.open_store(job, restart)
    tasks: list[TileTask] = []
    if comm.is_root:
        assert store is not None
        if not store.store_id:
            raise OutputError(f"{store.path}: a mask store of an older resflow (no store id, so "
                              "its outputs cannot be told from another run's); rerun with "
                              "--restart")
        removed = discard_stale_outputs(job.out_dir, job.scenes, store.store_id)
        if removed:
            job.say(f"[run] removed {len(removed)} output(s) of an earlier mask store "
                    f"({', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''})")
        warning = gsd_mismatch(job.gallery.manifest.get("training_gsd_m") or {}, job.scenes,
                               cfg.scenes.gsd_m)
        if warning:
            job.say(f"[run] warning: {warning}")
        done = [store.done_mask(i) for i in range(len(job.scenes))]
        tasks = build_tasks(job.plan, cfg, done)
    total = comm.bcast(len(tasks))
    override = "mono" if mapped_by(cfg) == "mono" else None
    try:
        per_worker = runner.map_tiles(job, tasks, store, override)  # type: ignore[arg-type]
    except BaseException:
        if store is not None and comm.size == 1:  # closing is collective: with more ranks,
            store.close()                         # MPI_Abort follows instead
        raise
    complete = finish_store(store, comm)
    t0 = time.perf_counter()
    exported = runner.export(job, complete)
    export_s = time.perf_counter() - t0
    if not comm.is_root:
        return None
    assert per_worker is not None
    lock.check()  # a job that lost its lock must not claim the directory's report
    extra = {"h5_path": job.h5_path, "gallery_checksum": job.gallery.checksum,
             "tiles_total_planned": total, "export_s": export_s, "plan_s": job.plan_s,
             "memory_estimate": job.memory_estimate,
             "model": "mono (every tile by the Mono model)" if override else "buckets (RESFlow)",
             "gallery_selection": job.gallery.selection_record(),
             "ground_resolution": {"gsd_m": cfg.scenes.gsd_m,
                                   "resampled_scenes": sum(s.native_grid is not None
                                                           for s in job.scenes)},
             **runner.report_extra()}
    totals = job_totals(job.h5_path, job.scenes, cfg.tiling.tile_px,
                        [job.plan.scene_aoi(i) for i in range(len(job.scenes))])
    extra["store_id"] = totals.store_id
    aoi = job.plan.aoi_summary(cfg.tiling.tile_px)
    if aoi is not None:
        extra["aoi"] = aoi
    report = write_report(job.out_dir, cfg, job.scenes, runner.name, per_worker,
                          time.perf_counter() - t_start, complete, exported, job.plan.skipped,
                          extra, totals)
    if not quiet:
        print(summary_line(report), flush=True)
    return report


def finish_store(store: Optional[MaskStore], comm: Communicator) -> list[int]:
    """Close the store (collective on its ranks), then rank 0 flags the complete scenes; every
    rank learns which they are."""
    path = store.path if store is not None else None
    if store is not None:
        store.close()
    return comm.root_call(lambda: mark_complete_scenes(path) if path else [])


# -- the tile loop shared by the in-process and MPI runners -------------------------------------
class ProgressPrinter:
    """Rank 0's job-wide progress line: done/total, tiles/s, km2/s, ETA (from a shared counter)."""

    def __init__(self, total: int, km2_per_tile: float, every_s: float = 2.0):
        self.total, self.km2_per_tile, self.every_s = total, km2_per_tile, every_s
        self.t0 = self.last = time.perf_counter()

    def maybe_print(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = done / el
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        print(f"[progress] {done}/{self.total} tiles, {rate:.1f} tiles/s, "
              f"{rate * self.km2_per_tile:.3f} km2/s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


def km2_per_tile(scenes: Sequence[SceneInfo], tile_px: int) -> float:
    """Mean ground area of a grid tile over the job (for rates in km2/s)."""
    n = sum(((s.width + tile_px - 1) // tile_px) * ((s.height + tile_px - 1) // tile_px)
            for s in scenes)
    return sum(s.area_km2 for s in scenes) / max(1, n)


def drive(job: Job, comm: Communicator, source: TaskSource, total: int, sink: ResultSink,
          writer: str, device: Any, binding: Optional[dict[str, Any]],
          bucket_override: Optional[str] = None, on_round: Any = None) -> dict[str, Any]:
    """Process tiles from ``source`` on this rank and write them in rounds; this rank's figures.

    ``writer``: ``independent`` (write when ready), ``collective`` (lock-step rounds over all ranks,
    empty selections when a rank has nothing left) or ``gather`` (rank 0 writes everything)."""
    t_start = time.perf_counter()
    cfg = job.cfg
    proc = TileProcessor(job.scenes, cfg, build_stages(cfg, job.gallery, device, bucket_override))
    done_counter = comm.counter()
    progress = (ProgressPrinter(total, km2_per_tile(job.scenes, cfg.tiling.tile_px))
                if comm.is_root and not job.quiet else None)
    # Closed on any exit, so an error here also stops the reader and compute threads.
    with closing(proc.process(source)) as results:
        # Tiles per write round: collective rounds are lock-step points, so a round spans several
        # batches (masks are small: memory stays bounded by tile and batch size).
        round_tiles = cfg.inference.batch_size * cfg.parallel.write_round_batches
        write_s, exhausted = 0.0, False
        while True:
            buf: list[TileResult] = []
            while not exhausted and len(buf) < round_tiles:
                r = next(results, None)
                if r is None:
                    exhausted = True
                else:
                    buf.append(r)
            t0 = time.perf_counter()
            if writer == "independent":
                if buf:
                    sink.write_results(buf, collective=False)
                more = not exhausted
            else:
                n = comm.allreduce_max(len(buf))
                if n == 0:
                    break
                if writer == "collective":
                    sink.write_results(buf, collective=True, n_calls=n)
                else:  # gather: the paper's single merge writer
                    gathered = comm.gather(buf)
                    if gathered is not None:
                        sink.write_results([x for part in gathered for x in part], collective=False)
                more = True
            write_s += time.perf_counter() - t0
            if buf:
                done_counter.add(len(buf))
                if on_round is not None:
                    on_round(len(buf))
            if progress is not None:
                progress.maybe_print(done_counter.read())
            if not more:
                break
    comm.barrier()
    if progress is not None:
        progress.maybe_print(done_counter.read(), force=True)
    done_counter.free()
    return stats_dict(proc.stats, comm.rank, time.perf_counter() - t_start, write_s,
                      getattr(sink, "bytes_written", 0), binding)


# -- export and report --------------------------------------------------------------------------
def scene_stems(scenes: Sequence[SceneInfo]) -> list[str]:
    """Safe output stems named after the scenes; scenes sharing a name (a/x.tif, b/x.tif) get a
    short hash of their real path, so names never depend on the input order."""
    plain = [re.sub(r"[^A-Za-z0-9._-]", "_", Path(s.path).stem)[:80] or "scene" for s in scenes]
    counts: dict[str, int] = {}
    for stem in plain:
        counts[stem] = counts.get(stem, 0) + 1
    return [stem if counts[stem] == 1 else
            f"{stem}-{hashlib.sha1(os.path.realpath(s.path).encode()).hexdigest()[:8]}"
            for stem, s in zip(plain, scenes)]


def mapped_by(cfg: RunConfig) -> str:
    """What maps the tiles under ``cfg``: "mono" (every tile by Mono) or "buckets"."""
    return "mono" if cfg.inference.model == "mono" else "buckets"


def scene_output_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Every output a scene can have, by kind (mask, COG, bucket map, probability COG), inside
    ``out_dir``."""
    return {kind: confined(out_dir, output_file_name(stem, kind))
            for kind in (MASK, COG, BUCKETS, PROBABILITY)}


def discard_stale_outputs(out_dir: Path, scenes: Sequence[SceneInfo], store_id: str) -> list[Path]:
    """Remove what an earlier mask store left in ``out_dir``: each scene's outputs (any kind)
    whose record names another store (or none), and run_report.json / report.html of another
    store; the paths removed. Called when the store is opened, so an interrupted ``--restart``
    never leaves the old outputs beside the new store."""
    removed: list[Path] = []
    for stem in scene_stems(scenes):
        for path in scene_output_paths(out_dir, stem).values():
            if path.is_file():
                record = OutputRecord.of_file(path)
                if record is None or record.store_id != store_id:
                    removed.append(path)
    report = out_dir / RUN_REPORT_NAME
    if report.is_file():
        try:
            recorded = json.loads(report.read_text()).get("store_id")
        except (OSError, ValueError):
            recorded = None
        if recorded != store_id:
            removed += [p for p in (report, out_dir / HTML_REPORT_NAME) if p.is_file()]
    for path in removed:
        try:
            path.unlink()
        except OSError as exc:
            raise OutputError(f"{path}: cannot remove this output of an earlier mask store "
                              f"({os_error_cause(exc)}); remove it, or use another output.dir"
                              ) from None
    return removed


def export_outputs(cfg: RunConfig, out_dir: Path, h5_path: str, scenes: Sequence[SceneInfo],
                   indices: Sequence[int]) -> dict[int, list[str]]:
    """Export the given (complete) scenes as ``<scene>.resflow-mask.tif`` (+ ``-mask-cog``,
    ``-buckets``, ``-probability``) through one reader of the store. Outputs that already carry
    this store's record are kept (a resumed or repeated run); any other is rewritten."""
    o = cfg.output
    done: dict[int, list[str]] = {}
    if not o.geotiff or not indices:
        return done
    stems = scene_stems(scenes)
    with MaskReader(h5_path) as reader:
        for i in indices:
            paths = scene_output_paths(out_dir, stems[i])
            mask_tif = paths[MASK]
            cog = paths[COG] if o.cog else None
            buckets = paths[BUCKETS] if o.bucket_map else None
            probability = paths[PROBABILITY] if o.probability else None
            wanted = [p for p in (mask_tif, cog, buckets, probability) if p is not None]
            record = OutputRecord.of_store(reader, i, mapped_by(cfg))
            if not outputs_current(wanted, record):
                wanted = export_scene(reader, i, mask_tif, cog, buckets,
                                      mapped_by=record.mapped_by, probability_cog=probability)
            done[i] = [str(p) for p in wanted]
    return done


def export_split(job: Job, comm: Communicator, complete: Sequence[int]) -> dict[int, list[str]]:
    """Export complete scenes in parallel over ranks (scene i of the list on rank i % size),
    each rank through one reader of the store."""
    def share(indices: list[int]) -> dict[int, list[str]]:
        return export_outputs(job.cfg, job.out_dir, job.h5_path, job.scenes, indices)
    parts = comm.map_shares(list(complete), share)
    return {k: v for part in (parts or []) for k, v in part.items()}


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set size (VmHWM) in MB, where /proc has it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def stats_dict(stats: PipelineStats, rank: int, wall_s: float, write_s: float,
               bytes_written: int, binding: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One worker's figures for the run report."""
    d = asdict(stats)
    d.update({"rank": rank, "wall_s": wall_s, "write_s": write_s, "bytes_written": bytes_written,
              "binding": binding, "peak_rss_mb": peak_rss_mb()})
    return d


@dataclass
class SceneTotals:
    """One scene's finished work as the mask store records it (every invocation of the job)."""

    tiles_total: int
    tiles_done: int
    tiles_computed: int       # finished tiles that went through the networks (not all nodata)
    pixels_done: int
    area_km2_done: float
    ood_tiles: int
    buckets: dict[int, int]   # computed finished tiles per bucket (-2: out of distribution)


@dataclass
class JobTotals:
    """The whole job's finished tiles, read from the store: what run_report.json describes."""

    store_id: str
    scenes: list[SceneTotals]

    def total(self, name: str) -> Any:
        return sum(getattr(s, name) for s in self.scenes)

    def bucket_histogram(self) -> dict[str, int]:
        out: dict[int, int] = {}
        for s in self.scenes:
            for b, n in s.buckets.items():
                out[b] = out.get(b, 0) + n
        return {str(b): n for b, n in sorted(out.items())}


def owned_pixels(width: int, height: int, tile_px: int) -> np.ndarray:
    """(n_tiles,) pixels each tile of the grid owns, in tile-index (row-major) order."""
    rows, cols = grid_shape(width, height, tile_px)
    w = np.minimum(tile_px, width - np.arange(cols, dtype=np.int64) * tile_px)
    h = np.minimum(tile_px, height - np.arange(rows, dtype=np.int64) * tile_px)
    return np.outer(h, w).ravel()


def job_totals(h5_path: str, scenes: Sequence[SceneInfo], tile_px: int,
               aoi: Sequence[Optional[SceneAOI]] = ()) -> JobTotals:
    """Every finished tile of the job, resumed or not, with its pixels and ground area (a tile's
    area is its pixels at the scene's mean pixel area, as the tile loop counts it; with an area
    of interest ``aoi`` (per scene), its pixels inside the AOI)."""
    out = []
    with MaskReader(h5_path) as reader:
        for i, s in enumerate(scenes):
            rec = reader.tile_records(i)
            done = rec["done"].astype(bool)
            bucket = rec["bucket"].astype(np.int64)
            computed = done & (bucket != -1)
            owned = owned_pixels(s.width, s.height, tile_px)
            px = int(owned[done].sum())
            on_scene = aoi[i] if i < len(aoi) else None
            px_in = (float((owned * on_scene.inside.ravel())[done].sum())
                     if on_scene is not None else px)
            values, counts = np.unique(bucket[computed], return_counts=True)
            out.append(SceneTotals(len(done), int(done.sum()), int(computed.sum()), px,
                                   px_in * s.area_km2 / max(1, s.width * s.height),
                                   int((bucket[computed] == -2).sum()),
                                   {int(b): int(n) for b, n in zip(values, counts)}))
        return JobTotals(reader.store_id, out)


def write_report(out_dir: Path, cfg: RunConfig, scenes: Sequence[SceneInfo], engine: str,
                 per_rank: Sequence[dict[str, Any]], wall_s: float, complete: Sequence[int],
                 exported: dict[int, list[str]], skipped: Sequence[dict[str, str]],
                 extra: Optional[dict[str, Any]], totals: JobTotals) -> dict[str, Any]:
    """run_report.json (written atomically): the whole job's tiles, area and buckets from the
    store (``totals``: every finished tile, resumed or not), this invocation's work, time and
    throughput from the workers' figures (``invocation``, ``per_rank``)."""
    tiles = sum(r["tiles"] for r in per_rank)
    pixels = sum(r["pixels"] for r in per_rank)
    area = sum(r["area_km2"] for r in per_rank)  # per scene, so mixed CRSs add up correctly
    busy = [r["read_wait_s"] + r["embed_s"] + r["hash_s"] + r["segment_s"] + r["write_s"]
            for r in per_rank]
    per_tile = [r["tiles"] for r in per_rank]
    bytes_read = sum(r["bytes_read"] for r in per_rank)
    job_tiles = totals.total("tiles_done")
    report = {
        "engine": engine, "ranks": len(per_rank), "wall_s": wall_s,
        "scenes": [{"index": i, "path": s.path, "width": s.width, "height": s.height,
                    "area_km2": s.area_km2, "complete": i in complete,
                    "tiles_total": t.tiles_total, "tiles_done": t.tiles_done,
                    "area_km2_done": t.area_km2_done, "ood_tiles": t.ood_tiles,
                    "outputs": exported.get(i, [])}
                   for i, (s, t) in enumerate(zip(scenes, totals.scenes))],
        "ood_tiles": totals.total("ood_tiles"),
        "skipped_scenes": list(skipped),
        "tiles": job_tiles, "tiles_computed": totals.total("tiles_computed"),
        "megapixels": totals.total("pixels_done") / 1e6, "area_km2": totals.total("area_km2_done"),
        "invocation": {"tiles": tiles, "tiles_computed": sum(r["tiles_computed"] for r in per_rank),
                       "megapixels": pixels / 1e6, "area_km2": area,
                       "tiles_resumed": job_tiles - tiles},
        "embed_slots": sum(r.get("embed_slots", 0) for r in per_rank),
        "bytes_read": bytes_read,
        "bytes_written": sum(r["bytes_written"] for r in per_rank),
        "throughput": {"tiles_per_s": tiles / wall_s if wall_s else 0.0,
                       "mpixel_per_s": pixels / 1e6 / wall_s if wall_s else 0.0,
                       "km2_per_s": area / wall_s if wall_s else 0.0,
                       "gb_read_per_s": bytes_read / 1e9 / wall_s if wall_s else 0.0},
        "stage_s_total": {k: sum(r[k] for r in per_rank)
                          for k in ("read_s", "read_wait_s", "embed_s", "hash_s", "segment_s",
                                    "write_s")},
        "load_balance": {"tiles_per_rank": per_tile,
                         "busy_s_per_rank": busy,
                         "imbalance": (max(busy) / (sum(busy) / len(busy)))
                         if busy and sum(busy) else 1.0},
        "bucket_histogram": totals.bucket_histogram(),
        "mapped_by": mapped_by(cfg),
        "peak_rss_mb_per_rank": [r.get("peak_rss_mb") for r in per_rank],
        "per_rank": list(per_rank),
        "config": cfg.to_dict(),
        "config_checksum": cfg.checksum(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        report.update(extra)
    path = out_dir / RUN_REPORT_NAME
    tmp = job_partial_path(path)
    try:
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the run report ({os_error_cause(exc)})") from None
    return report


def aoi_line(aoi: dict[str, Any]) -> str:
    """The plan's line on the area of interest (``ScenePlan.aoi_summary``)."""
    outside = aoi["scenes_outside"]
    return (f"AOI: {aoi['tiles_intersecting']:,} of {aoi['tiles_total']:,} tiles intersect "
            f"{aoi['path']} ({aoi['area_km2']:.3f} km2); the others are neither read nor "
            "computed" + (f"; {len(outside)} scene(s) outside it not mapped" if outside else ""))


def summary_line(report: dict[str, Any]) -> str:
    """The one-paragraph summary printed at the end of a run."""
    t = report["throughput"]
    done = sum(s["complete"] for s in report["scenes"])
    inv = report["invocation"]
    resumed = (f" ({inv['tiles_resumed']} finished by earlier runs)"
               if inv["tiles_resumed"] else "")
    return (f"{report['engine']}: {done}/{len(report['scenes'])} scene(s) complete, "
            f"{report['tiles']} tiles ({report['tiles_computed']} computed), "
            f"{report['megapixels']:.1f} Mpx = {report['area_km2']:.2f} km2{resumed}; this run: "
            f"{inv['tiles']} tiles in {report['wall_s']:.1f} s on {report['ranks']} rank(s): "
            f"{t['tiles_per_s']:.1f} tiles/s, {t['mpixel_per_s']:.2f} Mpx/s, "
            f"{t['km2_per_s']:.3f} km2/s")
