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
    lc.Free()
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
