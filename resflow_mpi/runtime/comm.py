"""The communicator: every message between ranks goes through here (the only mpi4py user).

``Communicator(None)`` is one process with the same API (rank 0 of 1), so pipeline code never
branches on "is there MPI": it calls ``bcast``/``gather``/``counter`` and gets the serial answer.
Errors follow one rule everywhere: an expected error (``ResflowError``) on the rank that found it
reaches every rank as the same exception (``root_call`` for rank-0 work, ``raise_first`` after
split work), so all ranks exit cleanly with one line; anything else aborts the job.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
PROGRESS_POLL_S = 0.001  # rank 0's counter progress thread (multi-node jobs only)


class WorkCounter:
    """A job-wide counter handing out task indices: one-sided ``Fetch_and_op`` on rank 0 under MPI,
    a plain integer in one process."""

    def __init__(self, mpi_comm: Any):
        self._value = 0
        self._win = None
        if mpi_comm is None:
            return
        from mpi4py import MPI
        self._MPI = MPI
        # Win.Allocate works in singleton mode too (Win.Create does not with Open MPI 4.1);
        # its memory is not zeroed, so rank 0 puts a zero before anyone reads.
        self._win = MPI.Win.Allocate(8 if mpi_comm.Get_rank() == 0 else 0, 8, comm=mpi_comm)
        if mpi_comm.Get_rank() == 0:
            self._win.Lock(0, MPI.LOCK_EXCLUSIVE)
            self._win.Put([np.zeros(1, np.int64), MPI.INT64_T], 0)
            self._win.Unlock(0)
        # Across nodes over TCP (no network atomics), a Fetch_and_op on rank 0's memory completes
        # only when rank 0 enters MPI; while it computes, the other ranks wait and rank 0 maps
        # nearly every tile. A progress thread on rank 0 keeps the counter answering.
        node = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=mpi_comm.Get_rank())
        spans_nodes = node.Get_size() < mpi_comm.Get_size()
        node.Free()
        self._stop = threading.Event()
        self._progress: Optional[threading.Thread] = None
        if (spans_nodes and mpi_comm.Get_rank() == 0
                and MPI.Query_thread() == MPI.THREAD_MULTIPLE):
            self._progress = threading.Thread(target=self._serve, args=(mpi_comm,),
                                              name="resflow-counter", daemon=True)
            self._progress.start()
        mpi_comm.Barrier()

    def _serve(self, mpi_comm: Any) -> None:
        MPI = self._MPI
        while not self._stop.wait(PROGRESS_POLL_S):
            mpi_comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)

    def add(self, n: int) -> int:
        """Atomically add ``n``; return the value before."""
        if self._win is None:
            old, self._value = self._value, self._value + n
            return old
        MPI = self._MPI
        inc, old_arr = np.array([n], np.int64), np.zeros(1, np.int64)
        self._win.Lock(0, MPI.LOCK_SHARED)
        self._win.Fetch_and_op([inc, MPI.INT64_T], [old_arr, MPI.INT64_T], 0, 0, MPI.SUM)
        self._win.Unlock(0)
        return int(old_arr[0])

    def read(self) -> int:
        return self.add(0)

    def free(self) -> None:
        """Collective under MPI."""
        if self._win is not None:
            self._stop.set()
            if self._progress is not None:
                self._progress.join()
            self._win.Free()
            self._win = None


class Communicator:
    """A thin wrapper of an mpi4py intracommunicator, or of nothing (one process)."""

    def __init__(self, mpi_comm: Any = None):
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank() if mpi_comm is not None else 0
        self.size = mpi_comm.Get_size() if mpi_comm is not None else 1
        self._big: Any = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.mpi is not None and self.size > 1

    # -- collectives -------------------------------------------------------------------------
    def bcast(self, obj: T, root: int = 0) -> T:
        return obj if self.mpi is None else self.mpi.bcast(obj, root=root)

    def gather(self, obj: T, root: int = 0) -> Optional[list[T]]:
        return [obj] if self.mpi is None else self.mpi.gather(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        return [obj] if self.mpi is None else self.mpi.allgather(obj)

    def allreduce_max(self, value: int) -> int:
        if self.mpi is None:
            return value
        from mpi4py import MPI
        return int(self.mpi.allreduce(value, op=MPI.MAX))

    def allreduce_sum(self, value: float) -> float:
        return value if self.mpi is None else self.mpi.allreduce(value)

    def sum_to_all(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of a contiguous array over ranks, in place on every rank. A reduce
        to rank 0 then a broadcast of its bytes: every rank gets the same bits, and a run is
        repeatable for a fixed rank count (an allreduce may associate differently per rank)."""
        if self.mpi is None or self.size == 1:
            return values
        from mpi4py import MPI
        total = np.empty_like(values) if self.rank == 0 else None
        self.mpi.Reduce(values, total, op=MPI.SUM, root=0)
        if self.rank == 0:
            values[...] = total
        self.mpi.Bcast(values, root=0)
        return values

    def barrier(self) -> None:
        if self.mpi is not None:
            self.mpi.Barrier()

    def quiet_barrier(self, poll_s: float = 0.05) -> None:
        """A barrier that sleeps instead of busy-polling, for ranks waiting on long serial work on
        another rank (Open MPI's blocking calls spin and would steal that rank's core)."""
        if self.mpi is None:
            return
        req = self.mpi.Ibarrier()
        while not req.Test():
            time.sleep(poll_s)

    def _pkl5(self) -> Any:
        if self._big is None:
            from mpi4py.util import pkl5
            self._big = pkl5.Intracomm(self.mpi)
        return self._big

    def scatter_big(self, shares: Optional[Sequence[T]], root: int = 0) -> T:
        """Scatter one object per rank; pickles over 2 GiB allowed (huge descriptor lists)."""
        if self.mpi is None:
            assert shares is not None
            return shares[0]
        return self._pkl5().scatter(shares, root=root)

    def bcast_big(self, obj: T, root: int = 0) -> T:
        return obj if self.mpi is None else self._pkl5().bcast(obj, root=root)

    def counter(self) -> WorkCounter:
        """Collective: a new job-wide work counter starting at 0."""
        return WorkCounter(self.mpi)

    def node_split(self) -> tuple[int, int, "Communicator"]:
        """(node-local rank, ranks on this node, node communicator) from a shared-memory split."""
        if self.mpi is None:
            return 0, 1, Communicator(None)
        from mpi4py import MPI
        lc = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        return lc.Get_rank(), lc.Get_size(), Communicator(lc)

    def free(self) -> None:
        """Release a communicator made by ``node_split`` (never COMM_WORLD)."""
        if self.mpi is not None:
            self.mpi.Free()
            self.mpi = None

    def abort(self, code: int) -> None:
        if self.mpi is not None:
            self.mpi.Abort(code)

    # -- the one way errors cross ranks -----------------------------------------------------------
    def root_call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and broadcast its result; an expected error (ResflowError)
        raised there is raised on every rank instead."""
        from ..errors import ResflowError
        result: Any = None
        err: Optional[BaseException] = None
        if self.is_root:
            try:
                result = fn()
            except ResflowError as exc:
                err = exc
        err, result = self.bcast((err, result) if self.is_root else None)
        if err is not None:
            raise shared(err)
        return result

    def raise_first(self, error: Optional[BaseException]) -> None:
        """Collective: after work split over ranks, every rank raises the lowest rank's error."""
        from ..errors import ResflowError
        errors = self.allgather(error if isinstance(error, ResflowError) else None)
        if error is not None and not isinstance(error, ResflowError):
            raise error
        for e in errors:
            if e is not None:
                raise shared(e)

    def map_split(self, items: Sequence[Any], fn: Callable[[Any], T]) -> Optional[list[T]]:
        """Apply ``fn`` to item i on rank i % size; rank 0 gets all results in item order.

        Expected errors reach every rank (``raise_first``)."""
        parts = self.map_shares(list(range(len(items))),
                                lambda idx: [(i, fn(items[i])) for i in idx])
        if parts is None:
            return None
        return [r for _, r in sorted((p for part in parts for p in part), key=lambda p: p[0])]

    def map_shares(self, items: Sequence[Any], fn: Callable[[list[Any]], T]) -> Optional[list[T]]:
        """Call ``fn`` once with this rank's share of ``items`` (item i on rank i % size), for work
        with a per-call setup cost; rank 0 gets every rank's result in rank order. Expected
        errors reach every rank (``raise_first``)."""
        from ..errors import ResflowError
        result: Any = None
        err: Optional[BaseException] = None
        try:
            result = fn(list(items[self.rank::self.size]))
        except ResflowError as exc:
            err = exc
        self.raise_first(err)
        return self.gather(result)


def shared(error: BaseException) -> BaseException:
    """Mark an error that every rank raises together (the job can end cleanly, one line)."""
    error.shared_by_all_ranks = True  # type: ignore[attr-defined]
    return error


def resolve_comm(comm: Any = None) -> Communicator:
    """``None`` -> one process; a Communicator -> itself; an mpi4py comm -> wrapped."""
    if isinstance(comm, Communicator):
        return comm
    return Communicator(comm)


def world() -> Communicator:
    """MPI_COMM_WORLD, started explicitly (never at import)."""
    import os
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")  # Debian's h5py: pick the MPI build
    from mpi4py import MPI
    return Communicator(MPI.COMM_WORLD)
