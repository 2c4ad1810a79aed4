"""`mpirun -n 4` over two "hosts" (network namespaces joined by a veth pair, 2 ranks each, TCP kept
on the veth link, shared file system): node detection, bit-identical masks, collective HDF5
writes from every rank, and a rank killed on the second host."""
from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import (assert_same_masks, cluster_env, report, run, two_host_mpirun,
                                    veth_bytes, writer_ranks)
from tests.conftest import RESFLOW, resflow_with_fault

pytestmark = [pytest.mark.cluster, pytest.mark.mpi, pytest.mark.slow]


def test_info_sees_two_nodes_with_two_local_ranks_each(two_hosts: dict[str, str]) -> None:
    p = run([*two_host_mpirun(two_hosts), RESFLOW, "info"], timeout=300)
    print(p.stdout)
    lines = re.findall(r"^binding: rank (\d)/4 on (\S+): local rank (\d)/(\d)", p.stdout, re.M)
    placed = sorted((int(r), host, int(local), int(n)) for r, host, local, n in lines)
    h1, h2 = two_hosts["host1"], two_hosts["host2"]
    assert placed == [(0, h1, 0, 2), (1, h1, 1, 2), (2, h2, 0, 2), (3, h2, 1, 2)]


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_run_over_two_hosts_is_bit_identical_to_one_host(two_hosts: dict[str, str], policy: str,
                                                         cluster_run_config: Path,
                                                         one_host_reference: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = veth_bytes(two_hosts)
    run([*two_host_mpirun(two_hosts), RESFLOW, "run", str(cluster_run_config), "--quiet",
         "--set", f"output.dir={out}", "--set", f"parallel.policy={policy}"], timeout=400)
    sent = veth_bytes(two_hosts) - before
    r = report(out)
    print(policy, "tiles per rank", r["load_balance"]["tiles_per_rank"], "veth bytes", sent)
    assert r["ranks"] == 4 and all(s["complete"] for s in r["scenes"])
    assert_same_masks(out, one_host_reference)
    assert sent > 0  # the hosts talked over the veth link
    if policy == "static":
        # Every rank wrote its own tiles in the collective HDF5 writes: host 2's 16 tiles of
        # 64 x 64 mask bytes crossed the link.
        assert writer_ranks(out) == {0, 1, 2, 3}
        assert sent > 16 * 64 * 64
    else:
        # dynamic over TCP: rank 0's progress thread keeps the one-sided counter answering while
        # rank 0 computes, so the other host's ranks get tiles too.
        assert len(writer_ranks(out)) > 1, r["load_balance"]["tiles_per_rank"]


def test_rank_killed_on_second_host_aborts_job_and_rerun_resumes(two_hosts: dict[str, str],
                                                                 cluster_run_config: Path,
                                                                 one_host_reference: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    total = report(one_host_reference)["tiles"]
    # One batch (4 tiles) per write round: each rank's 8 tiles take two rounds.
    args = ["run", str(cluster_run_config), "--quiet", "--set", f"output.dir={out}",
            "--set", "parallel.write_round_batches=1"]
    # Rank 3 (on host 2) SIGKILLs itself after its first write round: the whole job must stop (a
    # hang runs into the timeout and fails the test).
    p = subprocess.run([*two_host_mpirun(two_hosts), *resflow_with_fault("kill:3:1"), *args],
                       env=cluster_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode != 0, "a job that lost a rank must fail"
    assert not (out / "run_report.json").exists()
    for _ in range(100):  # the host's daemon may need a moment after mpirun returned
        leftovers = subprocess.run(["ip", "netns", "pids", two_hosts["host2"]], capture_output=True,
                                   text=True).stdout.split()
        if not leftovers:
            break
        time.sleep(0.1)
    assert leftovers == [], "processes of the aborted job still run on host 2"
    run([*two_host_mpirun(two_hosts), RESFLOW, *args], timeout=400)  # the same command resumes
    r = report(out)
    assert all(s["complete"] for s in r["scenes"])
    # the report covers the whole job; only the unfinished tiles were computed again
    assert r["tiles"] == total and 0 < r["invocation"]["tiles"] < total
    assert_same_masks(out, one_host_reference)
