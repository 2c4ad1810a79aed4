"""MPI start-up, device binding from node-local ranks, and abort-on-error, in one place."""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .comm import Communicator, resolve_comm, world
from .device import DeviceBinding, choose_binding

BUG_HINT = ("this is a bug in resflow-mpi: please report it with the command and the lines above "
            "(rerun with --debug for the full traceback)")


def init_runtime() -> Communicator:
    """Start MPI (explicitly, not at import) and return the world communicator."""
    return world()


def bind_device(comm: Any, want: str = "auto", threads_per_rank: int = 0) -> DeviceBinding:
    """Every rank learns its node-local rank and gets a device; returns this rank's binding."""
    import torch
    comm = resolve_comm(comm)
    local_rank, local_size, node = comm.node_split()
    gpus = torch.cuda.device_count() if want != "cpu" else 0
    binding = choose_binding(comm.rank, comm.size, socket.gethostname(), local_rank, local_size,
                             gpus, want, threads_per_rank)
    # Count ranks on the same physical GPU by UUID: with per-rank CUDA_VISIBLE_DEVICES
    # (srun --gpu-bind=single:1) every rank sees "cuda:0", yet they are different devices.
    key = None
    if binding.device.startswith("cuda"):
        idx = int(binding.device.split(":")[1])
        key = str(getattr(torch.cuda.get_device_properties(idx), "uuid", binding.device))
    keys = node.allgather(key)
    node.free()
    if key is not None:
        binding = dataclasses.replace(binding, ranks_sharing_device=keys.count(key))
    return binding


def mpi_library() -> str:
    """The MPI library's own version string (first line)."""
    from mpi4py import MPI
    return MPI.Get_library_version().strip().splitlines()[0]


def mpi4py_version() -> str:
    import mpi4py
    return str(mpi4py.__version__)


def debug_enabled() -> bool:
    return os.environ.get("RESFLOW_DEBUG", "") not in ("", "0")


INTERRUPT_GRACE_S = 0.4  # how long rank 1 leaves rank 0 to report an interrupt (others: twice)


@contextmanager
def abort_on_error(comm: Any, what: str = "resflow") -> Iterator[None]:
    """Turn an exception on any rank into a prompt end of the whole job (never a hang).

    Expected errors (ResflowError) print one line; an interrupt says where to resume; anything
    else is a bug: one line saying so (the traceback only with --debug / RESFLOW_DEBUG=1).
    """
    from ..errors import Interrupted, ResflowError
    comm = resolve_comm(comm)
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must stop every rank
        rank = comm.rank
        if isinstance(exc, KeyboardInterrupt):
            exc = Interrupted("stopped by SIGINT; rerun the same command to resume (finished "
                              "work is kept)")
        if isinstance(exc, (ResflowError, Interrupted)):
            msg = f"error: {exc}"
            code = exc.exit_code
        else:
            msg = f"error: {what} failed on rank {rank}: {type(exc).__name__}: {exc}; {BUG_HINT}"
            if debug_enabled():
                msg += "\n" + traceback.format_exc()
            code = 1
        if comm.size == 1 or getattr(exc, "shared_by_all_ranks", False):
            if rank == 0:  # every rank has the same error: one line, clean exit everywhere
                print(msg, file=sys.stderr, flush=True)
            sys.exit(code)
        if isinstance(exc, Interrupted) and rank != 0:
            # A signal reaches every rank: rank 0 says it once and ends the job. The others wait
            # a moment for that and speak only when rank 0 is held in a blocking MPI call (rank 1
            # first, then the rest), well within the launcher's SIGTERM-to-SIGKILL delay.
            import time
            time.sleep(INTERRUPT_GRACE_S * min(rank, 2))
        print(f"[rank {rank}] {msg}\n[rank {rank}] aborting the MPI job", file=sys.stderr,
              flush=True)
        comm.abort(code)


WriteRoundHook = Callable[[int, int], None]
_write_round_hook: Optional[WriteRoundHook] = None


def set_write_round_hook(hook: Optional[WriteRoundHook]) -> None:
    """Test seam (fault injection in resilience tests): call ``hook(rank, tiles_written)`` after
    every write round of this process; None removes it. Never set in production."""
    global _write_round_hook
    _write_round_hook = hook


def after_write_round(rank: int, tiles_written: int) -> None:
    """Run the write-round hook, if a test set one."""
    if _write_round_hook is not None:
        _write_round_hook(rank, tiles_written)
