"""How much memory this node (and this process) has: /proc/meminfo, cgroup limits, VmRSS."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


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


def _stat_field(path: Path, key: str) -> int:
    """One ``key value`` line of a cgroup memory.stat file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_paths(proc_cgroup: Path) -> tuple[Optional[str], Optional[str]]:
    """This process's cgroup path in the unified (v2) hierarchy and in v1's memory hierarchy,
    from /proc/<pid>/cgroup lines ``id:controllers:path``; None where a hierarchy is absent."""
    v2 = v1 = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _walk_headroom(root: Path, cgroup_path: Optional[str], limit_name: str, usage_name: str,
                   inactive_key: str) -> Optional[int]:
    """Smallest limit minus usage over the cgroup at ``cgroup_path`` (under the hierarchy's mount
    ``root``) and each parent up to ``root``; the reclaimable inactive page cache counts as free.
    None when no level has a limit."""
    leaf = root / (cgroup_path or "/").lstrip("/")
    if not leaf.is_dir():      # a path from another cgroup namespace: only the mount's own view
        leaf = root
    levels = [leaf, *[p for p in leaf.parents if p == root or root in p.parents]]
    best: Optional[int] = None
    for level in levels:
        limit = _read_int(level / limit_name)
        if limit is None:
            continue
        usage = _read_int(level / usage_name) or 0
        usage -= min(usage, _stat_field(level / "memory.stat", inactive_key))
        headroom = max(0, limit - usage)
        best = headroom if best is None else min(best, headroom)
    return best


def cgroup_headroom_bytes(root_v2: Path = CGROUP_V2, root_v1: Path = CGROUP_V1,
                          proc_cgroup: Path = PROC_SELF_CGROUP) -> Optional[int]:
    """Limit minus current usage of this process's memory cgroup (a Slurm job's ``--mem``, a
    container's limit), or None when there is no limit.

    The process's own cgroup comes from ``proc_cgroup`` (/proc/self/cgroup); every level from it
    up to the hierarchy's root counts and the smallest headroom wins: v2's ``memory.max`` /
    ``memory.current`` under ``root_v2``, else v1's ``memory.limit_in_bytes`` /
    ``memory.usage_in_bytes`` under ``root_v1`` (the memory controller's mount)."""
    v2_path, v1_path = _cgroup_paths(proc_cgroup)
    headroom = _walk_headroom(root_v2, v2_path, "memory.max", "memory.current", "inactive_file")
    if headroom is None:
        headroom = _walk_headroom(root_v1, v1_path, "memory.limit_in_bytes",
                                  "memory.usage_in_bytes", "total_inactive_file")
    return headroom


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
