"""Fixtures of the cluster tests: a real one-machine Slurm cluster (launch/testcluster/slurm-cluster.sh)
and two "hosts" in network namespaces joined by a veth pair (launch/testcluster/netns-hosts.sh).

Both need root and Debian's packages (`bash launch/install.sh --with-slurm`). Without them the
tests skip with the reason; with RESFLOW_REQUIRE_CLUSTER=1 (set by .ci/run) they fail instead."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import pytest

from tests.conftest import env, resflow, write_config

REPO = Path(__file__).resolve().parents[2]
TESTCLUSTER = REPO / "launch" / "testcluster"
# Not the defaults: a cluster or namespaces someone started by hand keep running undisturbed.
SLURM_PORT = "16817"
NETNS_PREFIX = "rftest"
NETNS_NET = "10.78.0"


def unavailable(reason: str) -> None:
    """Skip with the reason, or fail where the cluster tests are required (CI)."""
    if os.environ.get("RESFLOW_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"cluster test required (RESFLOW_REQUIRE_CLUSTER=1) but {reason}")
    pytest.skip(reason)


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The tests' MPI environment, without any Slurm job variables of an outer allocation."""
    e = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    e["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
    e.update(extra or {})
    return e


def run(cmd: list[str], timeout: float, extra_env: dict[str, str] | None = None,
        cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(cmd, env=cluster_env(extra_env), cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def mask_datasets(out: Path) -> dict[str, np.ndarray]:
    """Every dataset of an output's masks.h5, by path ('scenes/0/mask', 'tiles/code', ...)."""
    found: dict[str, np.ndarray] = {}
    with h5py.File(out / "masks.h5", "r") as f:
        f.visititems(lambda name, obj: found.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
    assert any(n.startswith("scenes/") for n in found) and "tiles/code" in found, sorted(found)
    return found


def assert_same_masks(out: Path, ref: Path) -> None:
    """Masks, buckets, hash codes and done flags equal bit for bit (writer_rank may differ)."""
    got, want = mask_datasets(out), mask_datasets(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        if name.endswith("writer_rank"):
            continue
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


def writer_ranks(out: Path) -> set[int]:
    return {int(r) for name, a in mask_datasets(out).items() if name.endswith("writer_rank")
            for r in np.unique(a)}


def report(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text())


@pytest.fixture(scope="session")
def cluster_run_config(tiny_archive: Path, tiny_gallery: Path, tmp_path_factory) -> Path:
    """A run config over the tiny archive's test split (outputs go where --set output.dir says)."""
    work = tmp_path_factory.mktemp("cluster-cfg")
    return write_config(work / "run.yaml", scenes={"inputs": [str(tiny_archive)], "split": "test"},
                        models={"gallery": str(tiny_gallery)}, output={"dir": str(work / "unused")})


@pytest.fixture(scope="session")
def one_host_reference(cluster_run_config: Path, tmp_path_factory) -> Path:
    """The same run by a plain `mpirun -n 2` on this host: the bit-identity reference."""
    out = tmp_path_factory.mktemp("reference") / "out"
    resflow(["run", str(cluster_run_config), "--set", f"output.dir={out}", "--quiet"], ranks=2)
    return out


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A running one-node Slurm cluster; yields the environment its clients need (SLURM_CONF)."""
    if os.geteuid() != 0:
        unavailable("the one-machine Slurm cluster needs root (slurmd starts jobs as their user)")
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch", "sacct", "sinfo")
               if shutil.which(exe) is None]
    if missing:
        unavailable(f"{', '.join(missing)} not installed: run 'bash launch/install.sh --with-slurm'")
    state = tmp_path_factory.mktemp("slurm")
    script = str(TESTCLUSTER / "slurm-cluster.sh")
    extra = {"RESFLOW_SLURM_PORT": SLURM_PORT}
    started = run(["bash", script, "start", str(state)], timeout=120, extra_env=extra, check=False)
    if started.returncode != 0:
        pytest.fail(f"the test cluster did not start:\n{started.stdout}\n{started.stderr}")
    print(started.stdout)
    try:
        yield {"SLURM_CONF": str(state / "slurm.conf"), "STATE": str(state)}
    finally:
        run(["bash", script, "stop", str(state)], timeout=60, extra_env=extra, check=False)


def _netns_works() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for exe in ("ip", "unshare"):
        if shutil.which(exe) is None:
            return f"{exe} not installed (iproute2 / util-linux)"
    probe = f"{NETNS_PREFIX}probe"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"'ip netns add' failed: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@pytest.fixture(scope="session")
def two_hosts() -> Iterator[dict[str, str]]:
    """Two namespace hosts joined by a veth pair; yields names and addresses."""
    why = _netns_works()
    if why:
        unavailable(why)
    script = str(TESTCLUSTER / "netns-hosts.sh")
    extra = {"RESFLOW_NETNS_PREFIX": NETNS_PREFIX, "RESFLOW_NETNS_NET": NETNS_NET}
    run(["bash", script, "stop"], timeout=30, extra_env=extra, check=False)  # leftovers of a crash
    run(["bash", script, "start"], timeout=30, extra_env=extra)
    try:
        yield {"host1": f"{NETNS_PREFIX}1", "host2": f"{NETNS_PREFIX}2",
               "addr1": f"{NETNS_NET}.1", "addr2": f"{NETNS_NET}.2", "veth1": f"{NETNS_PREFIX}v1",
               **extra}
    finally:
        run(["bash", script, "stop"], timeout=30, extra_env=extra, check=False)


def two_host_mpirun(hosts: dict[str, str], ranks_per_host: int = 2,
                    forward: tuple[str, ...] = ()) -> list[str]:
    """mpirun started on host 1, ranks_per_host ranks on each host, all MPI traffic on the veth
    link: processes on host 2 are started by the netns agent (in place of ssh)."""
    subnet = hosts["RESFLOW_NETNS_NET"] + ".0/24"
    cmd = ["env", f"RESFLOW_NETNS_PREFIX={hosts['RESFLOW_NETNS_PREFIX']}",
           f"RESFLOW_NETNS_NET={hosts['RESFLOW_NETNS_NET']}",
           "bash", str(TESTCLUSTER / "netns-hosts.sh"), "run",
           "mpirun", "-n", str(2 * ranks_per_host),
           "--host", f"{hosts['addr1']}:{ranks_per_host},{hosts['addr2']}:{ranks_per_host}",
           "--mca", "plm_rsh_agent", str(TESTCLUSTER / "netns-agent.sh"),
           "--mca", "btl", "self,vader,tcp", "--mca", "btl_tcp_if_include", subnet,
           "--mca", "oob_tcp_if_include", subnet,
           # One-sided windows between nodes over TCP: osc/rdma needs network atomics and
           # osc/pt2pt refuses MPI_THREAD_MULTIPLE; osc/ucx works (osc/sm stays within a node).
           "--mca", "osc", "ucx,sm"]
    for var in ("PATH", "PYTHONPATH", "H5PY_ALWAYS_USE_MPI", "OMP_NUM_THREADS", *forward):
        cmd += ["-x", var]
    return cmd


def veth_bytes(hosts: dict[str, str]) -> int:
    """Bytes sent + received so far on host 1's end of the veth link."""
    p = subprocess.run(["ip", "-n", hosts["host1"], "-j", "-s", "link", "show", hosts["veth1"]],
                       capture_output=True, text=True, check=True)
    link = json.loads(p.stdout)[0]["stats64"]
    return int(link["rx"]["bytes"]) + int(link["tx"]["bytes"])

