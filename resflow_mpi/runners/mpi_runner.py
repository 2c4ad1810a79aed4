"""The MPI engine: rank 0 partitions and scatters tile descriptors; every rank reads, computes and
writes its own tiles into one parallel HDF5 file; scenes are exported in parallel over ranks.

Policies: ``static`` scatters per-rank descriptor lists (block or cyclic); ``dynamic`` broadcasts
the descriptor list once and ranks pull chunks from a one-sided MPI counter on rank 0 (rank 0 also
computes), so slow tiles or slow ranks do not stall the job. Writers: ``collective`` (lock-step
rounds, empty selections for ranks with nothing left), ``independent`` (each rank writes when ready),
``gather`` (masks sent to rank 0, which writes alone — the paper's serial merge).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import RunConfig
from ..errors import ResflowError
from ..galleries import ModelGallery
from ..io.maskstore import MaskStore, TileResult
from ..pipeline import TaskSource, TileProcessor, TileTask, list_source
from ..runtime.device import apply_binding
from ..runtime.mpi import bcast_error, bind_device, inject_fault
from ..stages import TileStages
from ..tiling import split_block, split_cyclic
from .common import (H5_NAME, ScenePlan, build_tasks, check_output_dir, export_outputs,
                     plan_scenes, stats_dict, summary_line, write_report)


class WorkCounter:
    """A shared counter on rank 0 (MPI one-sided Fetch_and_op): hands out task indices."""

    def __init__(self, comm: Any):
        from mpi4py import MPI
        self.MPI = MPI
        # Win.Allocate works in singleton mode too (Win.Create does not with Open MPI 4.1);
        # its memory is not zeroed, so rank 0 puts a zero before anyone reads.
        self.win = MPI.Win.Allocate(8 if comm.Get_rank() == 0 else 0, 8, comm=comm)
        if comm.Get_rank() == 0:
            self.win.Lock(0, MPI.LOCK_EXCLUSIVE)
            self.win.Put([np.zeros(1, np.int64), MPI.INT64_T], 0)
            self.win.Unlock(0)
        comm.Barrier()

    def add(self, n: int) -> int:
        """Atomically add ``n``; return the value before."""
        MPI = self.MPI
        inc, old = np.array([n], np.int64), np.zeros(1, np.int64)
        self.win.Lock(0, MPI.LOCK_SHARED)
        self.win.Fetch_and_op([inc, MPI.INT64_T], [old, MPI.INT64_T], 0, 0, MPI.SUM)
        self.win.Unlock(0)
        return int(old[0])

    def read(self) -> int:
        return self.add(0)

    def free(self) -> None:
        self.win.Free()


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


def _setup(cfg: RunConfig, comm: Any) -> tuple[Optional[ScenePlan], Optional[ModelGallery], Path]:
    """Rank 0 checks scenes, gallery and output dir; errors reach every rank (clean exit)."""
    rank = comm.Get_rank()
    plan, err = None, None
    if rank == 0:
        try:
            check_output_dir(cfg.output.dir)
            gallery = ModelGallery(cfg.models.gallery)
            gallery.verify()
            plan = plan_scenes(cfg)
        except ResflowError as exc:
            err = exc
    bcast_error(comm, err)
    plan = comm.bcast(plan, root=0)
    gallery = ModelGallery(cfg.models.gallery)
    return plan, gallery, Path(cfg.output.dir).resolve()


def run_mpi(cfg: RunConfig, comm: Any, restart: bool = False, quiet: bool = False) -> Optional[dict]:
    """Map every scene of the config to masks with all ranks of ``comm``; rank 0 returns the report."""
    from mpi4py.util import pkl5
    t_start = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    big = pkl5.Intracomm(comm)  # descriptor lists of huge archives may exceed 2 GiB pickles
    binding = bind_device(comm, cfg.inference.device, cfg.inference.threads_per_rank)
    lines = comm.gather(binding.line(), root=0)
    if rank == 0 and not quiet:
        for ln in lines:
            print(f"[binding] {ln}", file=sys.stderr, flush=True)
    device = apply_binding(binding)
    plan, gallery, out_dir = _setup(cfg, comm)
    assert plan is not None and gallery is not None
    scenes = plan.scenes
    code_bytes = gallery.centroids.shape[1]
    store = MaskStore(str(out_dir / H5_NAME), scenes, cfg.tiling.tile_px, cfg.tiling.halo_px,
                      code_bytes, cfg.checksum(), gallery.checksum, comm=comm, restart=restart,
                      save_probabilities=cfg.inference.save_probabilities)
    # -- rank 0 partitions (skipping finished tiles) and scatters descriptors, never pixels ------
    policy, bs = cfg.parallel.policy, cfg.inference.batch_size
    writer = cfg.parallel.writer
    if writer == "auto":
        writer = "collective" if policy == "static" else "independent"
    tasks_all: list[TileTask] = []
    if rank == 0:
        done = [store.done_mask(i) for i in range(len(scenes))]
        tasks_all = build_tasks(plan, cfg, done)
    total = comm.bcast(len(tasks_all), root=0)
    if policy == "static":
        if rank == 0:
            split = split_block if cfg.parallel.layout == "block" else split_cyclic
            shares = [[tasks_all[j] for j in split(len(tasks_all), r, size)] for r in range(size)]
        my_tasks: Sequence[TileTask] = big.scatter(shares if rank == 0 else None, root=0)
        source: TaskSource = list_source(my_tasks, bs)
        counter = None
    else:
        tasks_all = big.bcast(tasks_all, root=0)
        counter = WorkCounter(comm)
        chunk = cfg.parallel.chunk_tiles

        def source() -> Optional[Sequence[TileTask]]:
            start = counter.add(chunk)  # type: ignore[union-attr]
            return tasks_all[start:start + chunk] if start < len(tasks_all) else None
    done_counter = WorkCounter(comm)
    # -- compute and write ------------------------------------------------------------------
    stages = TileStages(gallery.stage_models(device, cfg.models.arch, cfg.models.preset), device,
                        bs, cfg.inference.threshold, cfg.inference.channels_last,
                        cfg.inference.mixed_precision, cfg.inference.compile,
                        cfg.inference.segment_batch_size)
    proc = TileProcessor(scenes, cfg, stages)
    try:
        results = proc.process(source)
        km2_per_tile = (sum(s.area_km2 for s in scenes) / max(1, sum(
            ((s.width + cfg.tiling.tile_px - 1) // cfg.tiling.tile_px)
            * ((s.height + cfg.tiling.tile_px - 1) // cfg.tiling.tile_px) for s in scenes)))
        progress = ProgressPrinter(total, km2_per_tile) if rank == 0 and not quiet else None
        write_s = 0.0
        exhausted = False
        # Tiles per write round: collective rounds are lock-step points, so a round spans several
        # batches (masks are small: memory stays bounded by tile and batch size).
        round_tiles = bs * cfg.parallel.write_round_batches
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
                store.write_results(buf, collective=False)
                more = not exhausted
            else:
                from mpi4py import MPI
                n = comm.allreduce(len(buf), op=MPI.MAX)
                if n == 0:
                    break
                if writer == "collective":
                    store.write_results(buf, collective=True, n_calls=n)
                else:  # gather: the paper's single merge writer
                    gathered = comm.gather(buf, root=0)
                    if rank == 0:
                        flat = [x for part in gathered for x in part]  # type: ignore[union-attr]
                        store.write_results(flat, collective=False)
                more = True
            write_s += time.perf_counter() - t0
            if buf:
                done_counter.add(len(buf))
                inject_fault(rank, store.tiles_written)
            if progress is not None:
                progress.maybe_print(done_counter.read())
            if not more:
                break
        comm.Barrier()
        if progress is not None:
            progress.maybe_print(done_counter.read(), force=True)
        if counter is not None:
            counter.free()
        done_counter.free()
        store.flush()
        for i in range(len(scenes)):
            store.mark_complete(i)
        complete = [i for i in range(len(scenes)) if store.is_complete(i)]
        bytes_written = store.bytes_written
    except BaseException:
        if size == 1:  # closing is collective: with more ranks, MPI_Abort follows instead
            store.close()
        raise
    store.close()
    # -- export in parallel over ranks: scene i on rank i % size ----------------------------
    t0 = time.perf_counter()
    mine = [i for i in complete if i % size == rank]
    err: Optional[BaseException] = None
    try:
        exported_mine = export_outputs(cfg, out_dir, str(out_dir / H5_NAME), scenes, mine)
    except ResflowError as exc:
        err, exported_mine = exc, {}
    errors = comm.allgather(err)
    for e in errors:
        if e is not None:
            raise e
    export_s = time.perf_counter() - t0
    st = stats_dict(proc.stats, rank, time.perf_counter() - t_start, write_s, bytes_written,
                    binding.to_dict())
    st["export_s"] = export_s
    per_rank = comm.gather(st, root=0)
    exported_all = comm.gather(exported_mine, root=0)
    if rank != 0:
        return None
    exported = {k: v for part in exported_all for k, v in part.items()}  # type: ignore[union-attr]
    report = write_report(out_dir, cfg, scenes, "mpi", per_rank, time.perf_counter() - t_start,  # type: ignore[arg-type]
                          complete, exported, plan.skipped,
                          {"policy": policy, "writer": writer, "h5_path": str(out_dir / H5_NAME),
                           "gallery_checksum": gallery.checksum, "tiles_total_planned": total})
    if not quiet:
        print(summary_line(report), flush=True)
    return report
