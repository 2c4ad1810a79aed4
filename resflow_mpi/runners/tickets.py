"""GPU ticketing through a shared folder: executors on a node take a ticket before GPU work.

Spark schedules no GPUs, so the Spark runner lets the executors of a node share the physical GPUs
through a folder of ticket files in the shared workspace. Each device ("cuda:0", "cuda:1", ...)
has ``tickets_per_device`` ticket files; an executor takes one before it computes on that device
and puts it back afterwards. Without a GPU the same mechanism with a "cpu" device bounds how many
tasks compute at once.

Folder layout::

    <path>/
        layout.json                               {"version": 1, "devices": [...],
                                                   "tickets_per_device": n}
        free/<device>#<k>                         a ticket nobody holds, e.g. free/cuda:0#1
        held/<device>#<k>@<host>@<pid>@<start>    the same file while process <pid> on <host>
                                                  (started at /proc/<pid>/stat field 22) holds it

Guarantees:

* Taking a ticket is ``os.rename(free/<t>, held/<t>@<holder>)`` and putting it back is the
  reverse rename. rename(2) is atomic within one filesystem, so of several processes racing for
  the same free ticket exactly one wins and the others get FileNotFoundError and try the next.
  A ticket file is never copied, so the number of tickets is constant and no device is handed to
  more than ``tickets_per_device`` holders at once.
* ``create`` builds the whole folder under a private staging name next to ``path`` and renames it
  into place, so the folder appears complete or not at all; concurrent callers agree on one
  folder, and a folder that exists with another layout raises ConfigError.
* A ticket whose holder died is returned to the pool (``recover_stale``, also run by ``acquire``
  whenever no ticket is free). On the holder's own host death is decided by pid AND process start
  time, so a reused pid is not taken for the holder; a zombie holder counts as dead. Tickets held
  on another host are only reclaimed when older than ``stale_after_s`` (if given), which must then
  exceed the longest time any task holds a ticket, or a slow live holder loses its ticket.
* Acquisition is not fair (no queue): waiters poll, so a waiter may be overtaken.

Caveats: rename is atomic on local filesystems and on NFSv3+ as seen from a single client, but
attribute caching on NFS can make other clients see a stale directory listing for a while; use a
node-local directory (one ticket folder per node, which is what GPU sharing needs anyway) or a
well-behaved shared filesystem. Host names must be unique among the nodes sharing a folder, since
a holder is recognised by host name. A process killed while inside ``create`` leaves a
``.<name>.creating-*`` directory next to the folder; it is harmless and may be deleted.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

from resflow_mpi.errors import ConfigError, OutputError
from resflow_mpi.io.outlock import process_alive, process_start_time

LOG = logging.getLogger(__name__)

LAYOUT_VERSION = 1
LAYOUT_FILE = "layout.json"
FREE_DIR = "free"
HELD_DIR = "held"
# Separators inside file names; device and host names must not contain them.
TICKET_INDEX_SEP = "#"
HOLDER_SEP = "@"
UNKNOWN_START_TIME = "0"


def ticket_names(devices: Sequence[str], tickets_per_device: int) -> list[str]:
    """Return the ticket file names of a layout, e.g. ["cuda:0#0", "cuda:0#1", "cuda:1#0", ...]."""
    return [f"{device}{TICKET_INDEX_SEP}{index}" for device in devices for index in range(tickets_per_device)]


def device_of_ticket(ticket_name: str) -> str:
    """Return the device a ticket belongs to ("cuda:1#0" -> "cuda:1")."""
    return ticket_name.rsplit(TICKET_INDEX_SEP, 1)[0]


def _validate_layout(path: Path, devices: Sequence[str], tickets_per_device: int) -> list[str]:
    """Check devices and ticket count a user passed; return the devices as a list."""
    if isinstance(devices, str):
        raise ConfigError(f"ticket folder {path}: devices must be a list such as ['cuda:0'], not the string {devices!r}")
    device_list = list(devices)
    if not device_list:
        raise ConfigError(f"ticket folder {path}: devices is empty; pass e.g. ['cuda:0', 'cuda:1'] or ['cpu']")
    for device in device_list:
        if (
            not isinstance(device, str)
            or not device
            or device.startswith(".")
            or any(bad in device for bad in ("/", "\0", HOLDER_SEP, TICKET_INDEX_SEP))
        ):
            raise ConfigError(
                f"ticket folder {path}: bad device name {device!r}; use names like 'cuda:0' or 'cpu' "
                f"without '/', '{HOLDER_SEP}', '{TICKET_INDEX_SEP}' or a leading '.'"
            )
    if len(set(device_list)) != len(device_list):
        raise ConfigError(f"ticket folder {path}: devices {device_list} list a device twice; list each once")
    if isinstance(tickets_per_device, bool) or not isinstance(tickets_per_device, int) or tickets_per_device < 1:
        raise ConfigError(f"ticket folder {path}: tickets_per_device={tickets_per_device!r} must be an integer >= 1")
    return device_list


def _read_layout(path: Path) -> dict[str, Any]:
    """Read and check layout.json of an existing ticket folder."""
    layout_path = path / LAYOUT_FILE
    try:
        layout = json.loads(layout_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"ticket folder {path} has no {LAYOUT_FILE}: it is not a ticket folder; "
            "remove it or choose another path, then call TicketFolder.create"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ticket folder {layout_path} cannot be read ({exc}); remove the folder and recreate it") from None
    if (
        not isinstance(layout, dict)
        or layout.get("version") != LAYOUT_VERSION
        or not isinstance(layout.get("devices"), list)
        or not isinstance(layout.get("tickets_per_device"), int)
    ):
        raise ConfigError(f"ticket folder {layout_path} has an unknown layout {layout!r}; remove the folder and recreate it")
    for sub_dir in (FREE_DIR, HELD_DIR):
        if not (path / sub_dir).is_dir():
            raise ConfigError(f"ticket folder {path} lacks its {sub_dir}/ directory; remove the folder and recreate it")
    return layout


def _host_name() -> str:
    """Return this host's name with the separators used in file names replaced."""
    name = socket.gethostname() or "localhost"
    return name.replace(HOLDER_SEP, "_").replace("/", "_").replace(TICKET_INDEX_SEP, "_")


def holder_start_time(pid: int) -> str:
    """The start time written into held ticket names: /proc's clock ticks, or "0" unknown."""
    started = process_start_time(pid)
    return UNKNOWN_START_TIME if started is None else str(started)


def _holder_alive(pid: int, start_time: str) -> bool:
    """Whether a holder on this host is alive and is the process named in its ticket."""
    known = start_time.isdigit() and start_time != UNKNOWN_START_TIME
    return process_alive(pid, int(start_time) if known else None)


class _Holder:
    """Identity of the calling process as written into held ticket names (recomputed after fork)."""

    _cached_pid: int | None = None
    _cached_suffix: str = ""

    @classmethod
    def suffix(cls) -> str:
        """Return "@<host>@<pid>@<starttime>" for the calling process."""
        pid = os.getpid()
        if cls._cached_pid != pid:
            cls._cached_suffix = HOLDER_SEP.join(("", _host_name(), str(pid), holder_start_time(pid)))
            cls._cached_pid = pid
        return cls._cached_suffix


def parse_held_name(held_name: str) -> dict[str, Any] | None:
    """Split "<ticket>@<host>@<pid>@<starttime>" into its parts; None for a foreign file name."""
    parts = held_name.split(HOLDER_SEP)
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    ticket_name, host, pid_text, start_time = parts
    return {"ticket": ticket_name, "device": device_of_ticket(ticket_name), "host": host, "pid": int(pid_text), "start_time": start_time}


class Ticket:
    """A ticket taken from a TicketFolder; release it (or leave its `with` block) to put it back."""

    def __init__(self, folder: "TicketFolder", name: str, held_path: Path) -> None:
        """Wrap a ticket that the calling process has just moved into held/."""
        self.folder = folder
        self.name = name
        self.device = device_of_ticket(name)
        self.held_path = held_path
        self._owner_pid = os.getpid()
        self._released = False

    @property
    def released(self) -> bool:
        """Whether release() has run."""
        return self._released

    def release(self) -> None:
        """Put the ticket back into free/; calling it again, or from a forked child, does nothing."""
        # A child forked while the parent held the ticket inherits this object; only the
        # acquiring process may give the ticket back, or the parent's GPU would be handed out.
        if self._released or os.getpid() != self._owner_pid:
            return
        self._released = True
        try:
            os.rename(self.held_path, self.folder.free_dir / self.name)
        except FileNotFoundError:
            LOG.warning(
                "ticket %s was no longer held by this process at release (reclaimed as stale?); "
                "if stale_after_s is set, raise it above the longest task",
                self.held_path,
            )

    def __enter__(self) -> "Ticket":
        """Return the ticket itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Release the ticket, also when the body raised."""
        self.release()

    def __repr__(self) -> str:
        """Show ticket name and state."""
        state = "released" if self._released else "held"
        return f"Ticket({self.name!r}, device={self.device!r}, {state})"


class TicketFolder:
    """A folder of device tickets shared by the processes of a node (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        devices: Sequence[str] | None = None,
        tickets_per_device: int = 1,
        *,
        stale_after_s: float | None = None,
    ) -> None:
        """Open an existing ticket folder; when devices is given the folder must have that layout."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConfigError(f"ticket folder {self.path} does not exist; make it with TicketFolder.create(path, devices)")
        layout = _read_layout(self.path)
        self.devices: list[str] = list(layout["devices"])
        self.tickets_per_device: int = int(layout["tickets_per_device"])
        if devices is not None:
            wanted_devices = _validate_layout(self.path, devices, tickets_per_device)
            if wanted_devices != self.devices or tickets_per_device != self.tickets_per_device:
                raise ConfigError(
                    f"ticket folder {self.path} exists with devices={self.devices} "
                    f"tickets_per_device={self.tickets_per_device}, not devices={wanted_devices} "
                    f"tickets_per_device={tickets_per_device}; use another path or remove the old folder "
                    "when no executor is running"
                )
        if stale_after_s is not None and stale_after_s <= 0:
            raise ConfigError(f"ticket folder {self.path}: stale_after_s={stale_after_s} must be > 0 or None")
        self.stale_after_s = stale_after_s
        self.ticket_names = ticket_names(self.devices, self.tickets_per_device)
        self._known_tickets = frozenset(self.ticket_names)
        self.free_dir = self.path / FREE_DIR
        self.held_dir = self.path / HELD_DIR

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        devices: Sequence[str],
        tickets_per_device: int = 1,
        *,
        stale_after_s: float | None = None,
    ) -> "TicketFolder":
        """Make the ticket folder unless it exists with this layout; safe to call from many processes."""
        folder_path = Path(path)
        device_list = _validate_layout(folder_path, devices, tickets_per_device)
        if not (folder_path / LAYOUT_FILE).exists():
            cls._build_and_publish(folder_path, device_list, tickets_per_device)
        return cls(folder_path, device_list, tickets_per_device, stale_after_s=stale_after_s)

    @staticmethod
    def _build_and_publish(folder_path: Path, devices: list[str], tickets_per_device: int) -> None:
        """Build a complete folder under a staging name beside folder_path and rename it into place."""
        parent = folder_path.parent
        staging = parent / f".{folder_path.name}.creating-{_host_name()}-{os.getpid()}-{uuid.uuid4().hex}"
        try:
            parent.mkdir(parents=True, exist_ok=True)
            (staging / FREE_DIR).mkdir(parents=True)
            (staging / HELD_DIR).mkdir()
            for name in ticket_names(devices, tickets_per_device):
                (staging / FREE_DIR / name).touch()
            layout = {"version": LAYOUT_VERSION, "devices": devices, "tickets_per_device": tickets_per_device}
            (staging / LAYOUT_FILE).write_text(json.dumps(layout, indent=1) + "\n", encoding="utf-8")
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise OutputError(f"cannot create ticket folder {folder_path} ({exc}); check that {parent} is writable") from None
        try:
            # rename(2) onto a missing or empty directory succeeds; onto a populated one it fails,
            # so exactly one concurrent creator publishes its folder.
            os.rename(staging, folder_path)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise OutputError(f"cannot create ticket folder {folder_path} ({exc}); check the path and its permissions") from None

    def acquire(self, timeout_s: float | None = None, poll_s: float = 0.02) -> Ticket:
        """Take a free ticket of any device, waiting up to timeout_s (None: forever); TimeoutError after."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        holder_suffix = _Holder.suffix()
        while True:
            free_names = [name for name in self._list(self.free_dir) if name in self._known_tickets]
            # Shuffle so racing processes spread over the free tickets instead of all hitting the first.
            random.shuffle(free_names)
            for name in free_names:
                ticket = self._try_take(name, holder_suffix)
                if ticket is not None:
                    return ticket
            if self.recover_stale():
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(self._timeout_message(timeout_s))
            # Jitter keeps waiters from polling in lockstep.
            time.sleep(poll_s * random.uniform(0.5, 1.5))

    def _try_take(self, name: str, holder_suffix: str) -> Ticket | None:
        """Move free/<name> into held/ for this process; None when another process was faster."""
        free_path = self.free_dir / name
        held_path = self.held_dir / (name + holder_suffix)
        try:
            # Touch before the rename: the held file's mtime is its acquisition time for
            # stale_after_s, and after the rename a cross-host recoverer could already see it.
            os.utime(free_path)
            os.rename(free_path, held_path)
        except FileNotFoundError:
            return None
        return Ticket(self, name, held_path)

    @contextlib.contextmanager
    def ticket(self, timeout_s: float | None = None, poll_s: float = 0.02) -> Iterator[Ticket]:
        """Hold a ticket for the duration of a `with` block; it is released also when the block raises."""
        held_ticket = self.acquire(timeout_s=timeout_s, poll_s=poll_s)
        try:
            yield held_ticket
        finally:
            held_ticket.release()

    def recover_stale(self) -> list[str]:
        """Return tickets of dead holders to free/; gives the names of the tickets recovered."""
        this_host = _host_name()
        recovered: list[str] = []
        for held_name in self._list(self.held_dir):
            holder = parse_held_name(held_name)
            if holder is None or holder["ticket"] not in self._known_tickets:
                continue
            if not self._holder_is_gone(holder, held_name, this_host):
                continue
            try:
                # The held name is unique to the dead holder, so if a faster recoverer already
                # moved it (and someone re-took the ticket under another name) this rename fails.
                os.rename(self.held_dir / held_name, self.free_dir / holder["ticket"])
            except FileNotFoundError:
                continue
            LOG.warning(
                "recovered ticket %s from %s pid %s (holder dead or older than stale_after_s) in %s",
                holder["ticket"], holder["host"], holder["pid"], self.path,
            )
            recovered.append(holder["ticket"])
        return recovered

    def _holder_is_gone(self, holder: dict[str, Any], held_name: str, this_host: str) -> bool:
        """Whether a held ticket's holder is dead (this host) or older than stale_after_s (other hosts)."""
        if holder["host"] == this_host:
            return not _holder_alive(holder["pid"], holder["start_time"])
        if self.stale_after_s is None:
            return False
        try:
            held_since_s = os.stat(self.held_dir / held_name).st_mtime
        except FileNotFoundError:
            return False
        return time.time() - held_since_s > self.stale_after_s

    def status(self) -> dict[str, Any]:
        """Describe free and held tickets (with holders and seconds held) for logs."""
        now = time.time()
        free = sorted(name for name in self._list(self.free_dir) if name in self._known_tickets)
        held: list[dict[str, Any]] = []
        for held_name in sorted(self._list(self.held_dir)):
            holder = parse_held_name(held_name)
            if holder is None:
                continue
            try:
                holder["held_s"] = round(now - os.stat(self.held_dir / held_name).st_mtime, 3)
            except FileNotFoundError:
                continue
            held.append(holder)
        accounted = set(free) | {entry["ticket"] for entry in held}
        return {
            "path": str(self.path),
            "devices": list(self.devices),
            "tickets_per_device": self.tickets_per_device,
            "tickets_total": len(self.ticket_names),
            "free": free,
            "held": held,
            # A ticket can look missing for an instant while it is being renamed; persistently
            # missing ones were deleted by hand.
            "missing": sorted(self._known_tickets - accounted),
        }

    def _timeout_message(self, timeout_s: float | None) -> str:
        """Say how many tickets exist and who holds them, for TimeoutError."""
        state = self.status()
        holders = ", ".join(
            f"{entry['ticket']} by {entry['host']} pid {entry['pid']} for {entry['held_s']:.1f} s" for entry in state["held"]
        ) or "nobody (tickets missing from the folder?)"
        return (
            f"no free ticket in {self.path} after {timeout_s} s: {state['tickets_total']} ticket(s) exist "
            f"({self.tickets_per_device} per device on {', '.join(self.devices)}), held: {holders}"
        )

    @staticmethod
    def _list(directory: Path) -> list[str]:
        """List a directory's entries; empty when it vanished."""
        try:
            return os.listdir(directory)
        except FileNotFoundError:
            return []

    def __repr__(self) -> str:
        """Show path and layout."""
        return f"TicketFolder({str(self.path)!r}, devices={self.devices}, tickets_per_device={self.tickets_per_device})"
