"""The MPI engine: rank 0 partitions and scatters tile descriptors; every rank reads, computes and
writes its own tiles into one parallel HDF5 file; scenes are exported in parallel over ranks.

Policies: ``static`` scatters per-rank descriptor lists (block or cyclic); ``dynamic`` broadcasts
the descriptor list once and ranks pull chunks from a one-sided work counter on rank 0 (rank 0 also
computes), so slow tiles or slow ranks do not stall the job. Writers: ``collective`` (lock-step
rounds, empty selections for ranks with nothing left), ``independent`` (each rank writes when ready),
``gather`` (masks sent to rank 0, which writes alone — the paper's serial merge). Where h5py has no
MPI support the writer falls back to ``gather`` into an ordinary file (serialized, still correct).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..config import RunConfig
from ..io.maskstore import MaskStore, parallel_hdf5
from ..pipeline import Job, ResultSink, TaskSource, TileTask, counter_source, drive, export_split, list_source
from ..runtime.comm import Communicator
from ..runtime.device import apply_binding
from ..runtime.mpi import after_write_round, bind_device
from ..tiling import split_block, split_cyclic


class MPIRunner:
    """All ranks of ``comm`` compute; rank 0 plans, scatters descriptors and writes the report."""

    name = "mpi"

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.device: Any = None
        self.binding: Optional[dict[str, Any]] = None
        self.policy = "static"
        self.writer = "collective"
        self.note = ""

    def bind(self, cfg: RunConfig) -> Optional[dict[str, Any]]:
        b = bind_device(self.comm, cfg.inference.device, cfg.inference.threads_per_rank)
        self.device = apply_binding(b)
        self.binding = {**b.to_dict(), "line": b.line()}
        return self.binding

    def _choose_writer(self, cfg: RunConfig) -> str:
        self.policy = cfg.parallel.policy
        writer = cfg.parallel.writer
        if writer == "auto":
            writer = "collective" if self.policy == "static" else "independent"
        if not parallel_hdf5():
            self.note = (f"h5py has no MPI support (or RESFLOW_SERIAL_HDF5=1): writer {writer} "
                         "replaced by a serialized gather to rank 0")
            writer = "gather"
        return writer

    def open_store(self, job: Job, restart: bool) -> Optional[MaskStore]:
        self.writer = self._choose_writer(job.cfg)
        if self.note and self.comm.is_root:
            job.say(f"[run] {self.note}")
        t = job.cfg.tiling
        serial = self.writer == "gather" and not parallel_hdf5()
        if serial and not self.comm.is_root:
            return None
        return MaskStore(job.h5_path, job.scenes, t.tile_px, t.halo_px, job.code_bytes,
                         job.cfg.checksum(), job.gallery.checksum,
                         comm=None if serial else self.comm.mpi, restart=restart,
                         save_probabilities=job.cfg.keeps_probabilities)

    def _source(self, job: Job, tasks: Sequence[TileTask]) -> tuple[TaskSource, Any]:
        """Rank 0's descriptors -> this rank's task source (and the work counter to free)."""
        comm, cfg = self.comm, job.cfg
        bs = cfg.inference.batch_size
        if self.policy == "static":
            shares = None
            if comm.is_root:
                split = split_block if cfg.parallel.layout == "block" else split_cyclic
                shares = [[tasks[j] for j in split(len(tasks), r, comm.size)]
                          for r in range(comm.size)]
            return list_source(comm.scatter_big(shares), bs), None
        everything = comm.bcast_big(list(tasks) if comm.is_root else None)
        counter = comm.counter()
        return counter_source(everything, counter, cfg.parallel.chunk_tiles, bs), counter

    def map_tiles(self, job: Job, tasks: Sequence[TileTask], sink: ResultSink,
                  bucket_override: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        comm = self.comm
        total = comm.bcast(len(tasks))
        source, counter = self._source(job, tasks)
        # Stores follow the configured writer on every rank (ranks without a store, under the
        # serialized fallback, hand their results to rank 0); other sinks keep results local.
        store_job = sink is None or getattr(sink, "kind", "local") == "store"
        writer = self.writer if store_job else "independent"

        def after_round(_: int) -> None:
            after_write_round(comm.rank, getattr(sink, "tiles_written", 0))
        figures = drive(job, comm, source, total, sink, writer, self.device, self.binding,
                        bucket_override, after_round)
        if counter is not None:
            counter.free()
        return comm.gather(figures)

    def export(self, job: Job, complete: Sequence[int]) -> dict[int, list[str]]:
        return export_split(job, self.comm, complete)

    def report_extra(self) -> dict[str, Any]:
        extra = {"policy": self.policy, "writer": self.writer}
        if self.note:
            extra["note"] = self.note
        return extra
