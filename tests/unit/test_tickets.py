"""Ticket folder for GPU sharing: exclusivity, capacity, stale recovery and creation under real concurrency."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from resflow_mpi.errors import ConfigError
from resflow_mpi.runners.tickets import Ticket, TicketFolder, holder_start_time

# fork starts workers in milliseconds; the workers only use the stdlib and this module.
MP = multiprocessing.get_context("fork")
POLL_S = 0.002
JOIN_TIMEOUT_S = 30.0


def run_workers(target: Callable[..., None], args_per_worker: list[tuple[Any, ...]]) -> None:
    """Start one process per argument tuple, wait for all and check that each exited cleanly."""
    processes = [MP.Process(target=target, args=args) for args in args_per_worker]
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert [process.exitcode for process in processes] == [0] * len(processes)


def read_records(records_dir: Path) -> list[dict[str, Any]]:
    """Collect the holding intervals every worker wrote."""
    records: list[dict[str, Any]] = []
    for record_file in sorted(records_dir.glob("*.json")):
        records.extend(json.loads(record_file.read_text()))
    return records


def hold_tickets_worker(
    folder_path: str, records_dir: str, rounds: int, hold_s: float, barrier: Any | None
) -> None:
    """Acquire, record the holding interval, release; `rounds` times, meeting a partner in round 0."""
    folder = TicketFolder(folder_path)
    records = []
    for round_index in range(rounds):
        with folder.ticket(timeout_s=20.0, poll_s=POLL_S) as ticket:
            start_ns = time.monotonic_ns()
            time.sleep(hold_s)
            if barrier is not None and round_index == 0:
                # Meeting a second holder while holding proves two tickets can be held at once.
                # Only the first round meets: a lone waiter then always finds a partner among
                # the workers still in round 0 (their count is even), so this cannot deadlock.
                barrier.wait(timeout=15.0)
            end_ns = time.monotonic_ns()
        records.append({"device": ticket.device, "ticket": ticket.name, "pid": os.getpid(), "start_ns": start_ns, "end_ns": end_ns})
    Path(records_dir, f"{os.getpid()}.json").write_text(json.dumps(records))


def max_concurrency(intervals: list[tuple[int, int]]) -> int:
    """Largest number of intervals open at one instant (an end at t closes before a start at t)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    open_now = peak = 0
    for _, change in events:
        open_now += change
        peak = max(peak, open_now)
    return peak


def test_create_makes_tickets_per_device(tmp_path: Path) -> None:
    """create() lays out free tickets for each device; reopening reads the same layout."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0", "cuda:1"], tickets_per_device=2)
    status = folder.status()
    assert status["free"] == ["cuda:0#0", "cuda:0#1", "cuda:1#0", "cuda:1#1"]
    assert status["held"] == [] and status["missing"] == []
    reopened = TicketFolder(tmp_path / "tickets")
    assert reopened.devices == ["cuda:0", "cuda:1"] and reopened.tickets_per_device == 2


def test_create_is_idempotent_and_rejects_another_layout(tmp_path: Path) -> None:
    """A second create with the same layout reuses the folder; a different layout or bad names raise."""
    path = tmp_path / "tickets"
    TicketFolder.create(path, ["cpu"], tickets_per_device=3)
    assert TicketFolder.create(path, ["cpu"], tickets_per_device=3).status()["free"] == ["cpu#0", "cpu#1", "cpu#2"]
    with pytest.raises(ConfigError, match="exists with devices"):
        TicketFolder.create(path, ["cpu"], tickets_per_device=2)
    with pytest.raises(ConfigError, match="exists with devices"):
        TicketFolder(path, ["cuda:0"])
    with pytest.raises(ConfigError, match="bad device name"):
        TicketFolder.create(tmp_path / "other", ["cuda@0"])
    with pytest.raises(ConfigError, match="tickets_per_device"):
        TicketFolder.create(tmp_path / "other", ["cpu"], tickets_per_device=0)
    not_tickets = tmp_path / "not_tickets"
    not_tickets.mkdir()
    (not_tickets / "data.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a ticket folder"):
        TicketFolder.create(not_tickets, ["cpu"])
    with pytest.raises(ConfigError, match="does not exist"):
        TicketFolder(tmp_path / "missing")


def create_folder_worker(folder_path: str, results_dir: str, barrier: Any) -> None:
    """Call create() at the same instant as the other workers and record what it returned."""
    barrier.wait(timeout=15.0)
    folder = TicketFolder.create(folder_path, ["cuda:0", "cuda:1"], tickets_per_device=2)
    Path(results_dir, f"{os.getpid()}.json").write_text(json.dumps([folder.status()["free"]]))


def test_concurrent_create_gives_one_consistent_folder(tmp_path: Path) -> None:
    """Six processes creating the same folder at once agree on one complete folder."""
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    workers = 6
    barrier = MP.Barrier(workers)
    run_workers(create_folder_worker, [(str(tmp_path / "tickets"), str(results_dir), barrier)] * workers)
    expected = ["cuda:0#0", "cuda:0#1", "cuda:1#0", "cuda:1#1"]
    assert read_records(results_dir) == [expected] * workers
    assert sorted(os.listdir(tmp_path / "tickets" / "free")) == expected
    assert os.listdir(tmp_path / "tickets" / "held") == []
    assert sorted(os.listdir(tmp_path)) == ["results", "tickets"]  # no staging folders left behind


def test_each_device_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Six processes looping over two single-ticket GPUs never share a GPU and all finish."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0", "cuda:1"])
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    workers, rounds = 6, 12
    run_workers(hold_tickets_worker, [(str(folder.path), str(records_dir), rounds, 0.003, None)] * workers)
    records = read_records(records_dir)
    assert len(records) == workers * rounds
    assert {record["device"] for record in records} == {"cuda:0", "cuda:1"}
    for device in ("cuda:0", "cuda:1"):
        intervals = sorted((r["start_ns"], r["end_ns"]) for r in records if r["device"] == device)
        for (_, previous_end), (next_start, _) in zip(intervals, intervals[1:]):
            assert next_start > previous_end, f"{device} was handed to two holders at once"
    assert folder.status()["free"] == ["cuda:0#0", "cuda:1#0"]


def test_two_tickets_per_device_allow_exactly_two_holders(tmp_path: Path) -> None:
    """With tickets_per_device=2 two processes hold the device together, never three."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0"], tickets_per_device=2)
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    workers, rounds = 4, 6  # an even number of workers, so every first-round holder finds a partner
    barrier = MP.Barrier(2)
    run_workers(hold_tickets_worker, [(str(folder.path), str(records_dir), rounds, 0.002, barrier)] * workers)
    records = read_records(records_dir)
    assert len(records) == workers * rounds
    assert max_concurrency([(r["start_ns"], r["end_ns"]) for r in records]) == 2
    first, second = folder.acquire(timeout_s=1.0), folder.acquire(timeout_s=1.0)
    assert {first.name, second.name} == {"cuda:0#0", "cuda:0#1"}
    with pytest.raises(TimeoutError):
        folder.acquire(timeout_s=0.05, poll_s=POLL_S)
    first.release()
    second.release()


def hold_until_killed_worker(folder_path: str, acquired: Any) -> None:
    """Take a ticket, report it and block until killed."""
    TicketFolder(folder_path).acquire(timeout_s=10.0)
    acquired.set()
    time.sleep(60.0)


@pytest.mark.parametrize("reap_first", [False, True], ids=["zombie-holder", "reaped-holder"])
def test_ticket_of_killed_holder_is_recovered(tmp_path: Path, reap_first: bool) -> None:
    """A holder killed by SIGKILL leaves its ticket in held/; the next acquire gets it back."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0"])
    acquired = MP.Event()
    holder = MP.Process(target=hold_until_killed_worker, args=(str(folder.path), acquired))
    holder.start()
    try:
        assert acquired.wait(15.0)
        assert [entry["pid"] for entry in folder.status()["held"]] == [holder.pid]
        assert folder.recover_stale() == []  # alive holders keep their ticket
        os.kill(holder.pid, signal.SIGKILL)
        if reap_first:
            holder.join(10.0)
        with folder.ticket(timeout_s=10.0, poll_s=POLL_S) as ticket:
            assert ticket.name == "cuda:0#0"
            assert [entry["pid"] for entry in folder.status()["held"]] == [os.getpid()]
    finally:
        holder.kill()
        holder.join(10.0)
    assert folder.status()["free"] == ["cuda:0#0"]


def test_reused_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    """A held ticket naming a live pid with another start time belongs to a dead process."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0", "cuda:1"])
    host, pid = socket.gethostname(), os.getpid()
    os.rename(folder.free_dir / "cuda:0#0", folder.held_dir / f"cuda:0#0@{host}@{pid}@{holder_start_time(pid)}")
    os.rename(folder.free_dir / "cuda:1#0", folder.held_dir / f"cuda:1#0@{host}@{pid}@1")
    assert folder.recover_stale() == ["cuda:1#0"]
    assert folder.status()["free"] == ["cuda:1#0"]


def test_other_host_ticket_is_kept_unless_older_than_stale_after_s(tmp_path: Path) -> None:
    """Another node's holder cannot be probed, so only stale_after_s can reclaim its ticket."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0"])
    held_path = folder.held_dir / "cuda:0#0@other-node@12345@999"
    os.rename(folder.free_dir / "cuda:0#0", held_path)
    an_hour_ago = time.time() - 3600.0
    os.utime(held_path, (an_hour_ago, an_hour_ago))
    assert folder.recover_stale() == []
    assert TicketFolder(folder.path, stale_after_s=7200.0).recover_stale() == []
    with TicketFolder(folder.path, stale_after_s=60.0).ticket(timeout_s=1.0) as ticket:
        assert ticket.name == "cuda:0#0"


def test_ticket_is_released_when_the_body_raises(tmp_path: Path) -> None:
    """Both `with folder.ticket()` and `with folder.acquire()` give the ticket back on an exception."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cpu"])
    with pytest.raises(RuntimeError, match="task failed"):
        with folder.ticket(timeout_s=1.0) as ticket:
            assert folder.status()["free"] == []
            raise RuntimeError("task failed")
    assert ticket.released and folder.status()["free"] == ["cpu#0"]
    with pytest.raises(RuntimeError, match="task failed"):
        with folder.acquire(timeout_s=1.0):
            raise RuntimeError("task failed")
    assert folder.status()["free"] == ["cpu#0"]


def release_in_child_worker(ticket: Ticket) -> None:
    """Try to release a ticket inherited from the parent."""
    ticket.release()


def test_release_is_idempotent_and_only_by_the_acquirer(tmp_path: Path) -> None:
    """Releasing twice returns one ticket; a forked child releasing its copy changes nothing."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cpu"], tickets_per_device=2)
    ticket = folder.acquire(timeout_s=1.0)
    run_workers(release_in_child_worker, [(ticket,)])
    assert len(folder.status()["held"]) == 1
    ticket.release()
    other = folder.acquire(timeout_s=1.0)
    ticket.release()  # must not free the ticket `other` now holds
    assert len(folder.status()["free"]) == 1
    other.release()
    assert len(folder.status()["free"]) == 2


def test_timeout_names_the_holders(tmp_path: Path) -> None:
    """A timed-out acquire says how many tickets exist and who holds them."""
    folder = TicketFolder.create(tmp_path / "tickets", ["cuda:0"])
    with folder.ticket(timeout_s=1.0):
        with pytest.raises(TimeoutError) as raised:
            folder.acquire(timeout_s=0.05, poll_s=POLL_S)
    message = str(raised.value)
    assert "1 ticket(s) exist" in message
    assert f"cuda:0#0 by {socket.gethostname()} pid {os.getpid()}" in message
