"""Per-rank device binding: node-local rank -> cuda:(local_rank % gpus), else CPU threads.

Replaces RESFlow's GPU ticket folder for the MPI engine: binding is decided once from the node-local
rank, so no two ranks ever race for a device and several ranks per GPU are explicit and reported.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

LAUNCHER_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "PMI_LOCAL_RANK",
                            "MPI_LOCALRANKID", "MV2_COMM_WORLD_LOCAL_RANK", "PALS_LOCAL_RANKID")


@dataclass(frozen=True)
class DeviceBinding:
    """Where one rank computes."""

    rank: int
    size: int
    host: str
    local_rank: int
    local_size: int
    device: str            # "cuda:N" or "cpu"
    threads: int           # torch intra-op threads
    ranks_sharing_device: int
    launcher_local_rank: Optional[int]
    note: str = ""

    def line(self) -> str:
        share = f", shared by {self.ranks_sharing_device} ranks" if self.ranks_sharing_device > 1 else ""
        return (f"rank {self.rank}/{self.size} on {self.host}: local rank {self.local_rank}/"
                f"{self.local_size} -> {self.device}{share}, {self.threads} torch thread(s)"
                + (f" [{self.note}]" if self.note else ""))

    def to_dict(self) -> dict:
        return asdict(self)


# Environment variables a launcher (Open MPI, MPICH/Hydra, Slurm) sets on every rank.
LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process as one of several ranks."""
    for var in LAUNCHER_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            continue
    return False


def launcher_local_rank() -> Optional[int]:
    """The node-local rank the launcher advertises (Open MPI, Slurm, PMI, MPICH, ...), if any."""
    for var in LAUNCHER_LOCAL_RANK_VARS:
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return None


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def cpu_threads(cores: int, local_size: int, from_affinity: bool) -> int:
    """Torch threads per rank: the node's cores shared evenly by its ranks, unless the launcher
    already pinned this rank to its own subset of cores (srun --cpus-per-task, --map-by PE=n)."""
    total = os.cpu_count() or cores
    if from_affinity and cores < total:
        return max(1, cores)  # our affinity mask is already our share
    return max(1, cores // max(1, local_size))


def choose_binding(rank: int, size: int, host: str, local_rank: int, local_size: int,
                   gpu_count: int, want: str = "auto", threads_per_rank: int = 0,
                   node_cores: Optional[int] = None) -> DeviceBinding:
    """Pure decision: which device and how many threads this rank gets."""
    launcher = launcher_local_rank()
    note = ""
    if launcher is not None and launcher != local_rank:
        note = f"launcher says local rank {launcher}, shared-memory split says {local_rank}"
    cores = node_cores if node_cores is not None else usable_cores()
    if want == "cuda" and gpu_count == 0:
        raise RuntimeError(f"rank {rank}: inference.device=cuda but no GPU is visible")
    if gpu_count > 0 and want in ("auto", "cuda"):
        dev = local_rank % gpu_count
        sharing = len(range(dev, local_size, gpu_count))
        threads = threads_per_rank or max(1, cores // max(1, local_size))
        return DeviceBinding(rank, size, host, local_rank, local_size, f"cuda:{dev}", threads,
                             sharing, launcher, note)
    threads = threads_per_rank or cpu_threads(cores, local_size, node_cores is None)
    return DeviceBinding(rank, size, host, local_rank, local_size, "cpu", threads, 1, launcher, note)
    return DeviceBinding(rank, size, host, local_rank, local_size, "cpu", threads, 1, launcher, note)


def use_device(device: str, threads: int) -> "object":
    """Set torch's threads and current CUDA device for this process; return the torch.device."""
    import torch
    torch.set_num_threads(max(1, threads))
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    return torch.device(device)


def apply_binding(binding: DeviceBinding) -> "object":
    """Set torch's threads and current CUDA device; return the torch.device."""
    return use_device(binding.device, binding.threads)


def ticket_layout(want: str, tickets_per_device: int, cpu_slots: int) -> tuple[list[str], int]:
    """Spark's ticket folder: every visible GPU with ``tickets_per_device`` tickets, else CPU slots.

    The driver's GPUs stand for every executor node's (homogeneous nodes, as in the paper)."""
    import torch
    from ..errors import ConfigError
    gpus = torch.cuda.device_count() if want != "cpu" else 0
    if want == "cuda" and gpus == 0:
        raise ConfigError("inference.device=cuda but the Spark driver sees no GPU; use "
                          "inference.device=auto or cpu")
    if gpus:
        return [f"cuda:{i}" for i in range(gpus)], tickets_per_device
    return ["cpu"], cpu_slots
