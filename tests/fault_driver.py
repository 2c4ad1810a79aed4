"""The resflow CLI with an injected fault, for resilience tests (run by path, under mpirun).

``python tests/fault_driver.py SPEC resflow-args...`` where SPEC is ``kill:RANK:AFTER_TILES`` or
``raise:RANK:AFTER_TILES`` (that rank SIGKILLs itself, or raises, once it has written AFTER_TILES
tiles) or ``slow:RANK:SECONDS`` (that rank sleeps after every write round, so the job lasts long
enough to interrupt). The fault goes in through the engine's write-round test seam
(``resflow_mpi.runtime.mpi.set_write_round_hook``); production code reads no fault setting.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Callable


def fault_hook(spec: str) -> Callable[[int, int], None]:
    """The write-round hook for ``spec`` (see the module docstring)."""
    kind, rank_text, value = spec.split(":")
    fault_rank = int(rank_text)
    if kind not in ("kill", "raise", "slow"):
        raise SystemExit(f"fault_driver: unknown fault {kind!r} (kill, raise, slow)")

    def hook(rank: int, tiles_written: int) -> None:
        if rank != fault_rank:
            return
        if kind == "slow":
            time.sleep(float(value))
            return
        if tiles_written < int(value):
            return
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault after {tiles_written} tiles")
    return hook


if __name__ == "__main__":
    from resflow_mpi.cli import main
    from resflow_mpi.runtime.mpi import set_write_round_hook
    set_write_round_hook(fault_hook(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
