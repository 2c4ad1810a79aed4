"""How much memory this node (and this process) has: /proc/meminfo, cgroup limits, VmRSS."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < (1 << 60) else None  # v1 reports "no limit" as a huge number


def meminfo_bytes(key: str = "MemAvailable", path: Path = Path("/proc/meminfo")) -> Optional[int]:
    """A /proc/meminfo field in bytes (MemAvailable: what new allocations can get without swap)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_headroom_bytes(root_v2: Path = CGROUP_V2, root_v1: Path = CGROUP_V1) -> Optional[int]:
    """Limit minus current usage of this process's memory cgroup (a Slurm job's allocation, a
    container's limit), or None when there is no limit."""
    for limit_file, usage_file in ((root_v2 / "memory.max", root_v2 / "memory.current"),
                                   (root_v1 / "memory.limit_in_bytes",
                                    root_v1 / "memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None:
            usage = _read_int(usage_file) or 0
            return max(0, limit - usage)
    return None


def process_rss_bytes(pid: str = "self") -> Optional[int]:
    """Current resident set (VmRSS) of a process in bytes."""
    return meminfo_bytes("VmRSS", Path(f"/proc/{pid}/status"))


def available_memory_bytes(already_used_bytes: int = 0) -> Optional[int]:
    """Memory the ranks of this node may use: MemAvailable, capped by the cgroup headroom, plus
    ``already_used_bytes`` (the RSS the node's ranks hold already, which both figures exclude
    but a per-rank estimate includes). None where neither figure exists."""
    figures = [f for f in (meminfo_bytes("MemAvailable"), cgroup_headroom_bytes()) if f is not None]
    if not figures:
        return None
    return min(figures) + max(0, already_used_bytes)
