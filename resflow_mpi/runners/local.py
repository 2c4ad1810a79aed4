"""The in-process engine: one process, no MPI launcher; the reference for parity tests and the
simplest way to debug a run (``resflow run CFG --engine local``)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

from ..config import RunConfig
from ..io.maskstore import MaskStore
from ..pipeline import Job, ResultSink, TileTask, drive, export_split, list_source
from ..runtime.comm import Communicator
from ..runtime.device import apply_binding
from ..runtime.mpi import bind_device


class LocalRunner:
    """Every tile in this process, written as it finishes, scenes exported one after another."""

    name = "local"

    def __init__(self) -> None:
        self.comm = Communicator(None)
        self.device: Any = None
        self.binding: Optional[dict[str, Any]] = None

    def bind(self, cfg: RunConfig) -> Optional[dict[str, Any]]:
        b = bind_device(self.comm, cfg.inference.device, cfg.inference.threads_per_rank)
        self.device = apply_binding(b)
        self.binding = {**b.to_dict(), "line": b.line()}
        return self.binding

    def open_store(self, job: Job, restart: bool) -> Optional[MaskStore]:
        t = job.cfg.tiling
        return MaskStore(job.h5_path, job.scenes, t.tile_px, t.halo_px, job.code_bytes,
                         job.cfg.checksum(), job.gallery.checksum, comm=None, restart=restart,
                         save_probabilities=job.cfg.keeps_probabilities)

    def map_tiles(self, job: Job, tasks: Sequence[TileTask], sink: ResultSink,
                  bucket_override: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        source = list_source(list(tasks), job.cfg.inference.batch_size)
        return [drive(job, self.comm, source, len(tasks), sink, "independent", self.device,
                      self.binding, bucket_override)]

    def export(self, job: Job, complete: Sequence[int]) -> dict[int, list[str]]:
        return export_split(job, self.comm, complete)

    def report_extra(self) -> dict[str, Any]:
        return {"writer": "independent"}
