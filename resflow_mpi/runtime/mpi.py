"""MPI start-up, node-local ranks, device binding and abort-on-error, in one place."""
from __future__ import annotations

import os
import socket
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .device import DeviceBinding, choose_binding


def init_runtime() -> Any:
    """Start MPI (explicitly, not at import) and return COMM_WORLD."""
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")  # Debian's h5py: pick the MPI build
    from mpi4py import MPI
    return MPI.COMM_WORLD


def local_comm(comm: Any) -> Any:
    """Ranks sharing this node's memory (MPI_COMM_TYPE_SHARED split)."""
    from mpi4py import MPI
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())


def bind_device(comm: Any, want: str = "auto", threads_per_rank: int = 0) -> DeviceBinding:
    """Every rank learns its node-local rank and gets a device; returns this rank's binding."""
    import torch
    lc = local_comm(comm)
    gpus = torch.cuda.device_count() if want != "cpu" else 0
    binding = choose_binding(comm.Get_rank(), comm.Get_size(), socket.gethostname(),
                             lc.Get_rank(), lc.Get_size(), gpus, want, threads_per_rank)
    # Count ranks on the same physical GPU by UUID: with per-rank CUDA_VISIBLE_DEVICES
    # (srun --gpu-bind=single:1) every rank sees "cuda:0", yet they are different devices.
    key = None
    if binding.device.startswith("cuda"):
        idx = int(binding.device.split(":")[1])
        key = str(getattr(torch.cuda.get_device_properties(idx), "uuid", binding.device))
    keys = lc.allgather(key)
    lc.Free()
    if key is not None:
        import dataclasses
        binding = dataclasses.replace(binding, ranks_sharing_device=keys.count(key))
    return binding


def mpi_library() -> str:
    """The MPI library's own version string (first line)."""
    from mpi4py import MPI
    return MPI.Get_library_version().strip().splitlines()[0]


@contextmanager
def abort_on_error(comm: Any, what: str = "resflow") -> Iterator[None]:
    """Turn an exception on any rank into a prompt MPI_Abort of the whole job (never a hang).

    The failing rank prints its rank and reason; expected errors (ResflowError) print one line.
    """
    from ..errors import ResflowError
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must stop every rank
        rank = comm.Get_rank()
        if isinstance(exc, ResflowError):
            msg = f"error: {exc}"
            code = exc.exit_code
        else:
            msg = f"error: rank {rank} failed: {type(exc).__name__}: {exc}\n" + traceback.format_exc()
            code = 1
        if comm.Get_size() == 1:
            print(msg, file=sys.stderr, flush=True)
            sys.exit(code)
        print(f"[rank {rank}] {msg}\n[rank {rank}] aborting the MPI job", file=sys.stderr, flush=True)
        comm.Abort(code)


def bcast_error(comm: Any, error: Optional[BaseException]) -> None:
    """Collective: if rank 0 hit an expected error, every rank raises it (clean, same exit code)."""
    err = comm.bcast(error, root=0)
    if err is not None:
        raise err


def inject_fault(rank: int, tiles_written: int) -> None:
    """Fault injection for resilience tests: RESFLOW_FAULT="kill|raise:RANK:AFTER_TILES" makes that
    rank SIGKILL itself (or raise) once it has written AFTER_TILES tiles. Unset in production."""
    spec = os.environ.get("RESFLOW_FAULT")
    if not spec:
        return
    kind, r, after = spec.split(":")
    if int(r) != rank or tiles_written < int(after):
        return
    if kind == "kill":
        import signal
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault after {tiles_written} tiles")


def quiet_barrier(comm: Any, poll_s: float = 0.05) -> None:
    """A barrier that sleeps instead of busy-polling, for ranks waiting on long serial work on
    another rank (Open MPI's blocking calls spin and would steal that rank's core)."""
    import time
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)
