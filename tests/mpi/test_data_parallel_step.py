"""The data-parallel training step under mpirun -n 2 and -n 3 with a last batch smaller than the
rank count (ranks without a share skip the forward pass): every rank ends with the same model,
BatchNorm's counters included, and it is the one-process model up to summation order; the
rendezvous address of the torch backend is one the other hosts can reach."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from resflow_mpi.errors import ConfigError
from resflow_mpi.init.dataparallel import (DIST_ADDR_ENV, UNROUTED_PROBE_ADDR, rendezvous_address,
                                           source_address_towards)
from tests.conftest import env

pytestmark = pytest.mark.mpi

# 5 samples in batches of 4: the last batch (1 sample) leaves 1 of 2 or 2 of 3 ranks without a
# share. The model has BatchNorm (running statistics and num_batches_tracked); the hash head is
# trained through init's own trainer.
SCRIPT = r"""
import json, sys
import torch
from resflow_mpi.init.dataparallel import DataParallel, data_parallel_step
from resflow_mpi.init.hashing import train_hash_head
from resflow_mpi.models import build_hash_head
from resflow_mpi.runtime.comm import world

backend = sys.argv[1]
comm = world()
dp = DataParallel(comm, backend)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4),
                            torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
y = x.mean(1, keepdim=True)
losses = []
model.train()
for epoch in range(3):
    for i in range(0, 5, 4):
        losses.append(data_parallel_step(model, opt, (x[i:i + 4], y[i:i + 4]),
                                         lambda xb, yb: ((model(xb) - yb) ** 2).mean(), dp))
dp.check_identical(model, "test model")
head = build_hash_head(8, 8, 3)
fmaps = torch.randn(5, 8, 4, 4, generator=torch.Generator().manual_seed(2))
soft = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(3)), 1).numpy()
train_hash_head(head, fmaps, soft, epochs=2, batch_size=4, lr=0.01, seed=0, dp=dp)
dp.close()
if comm.rank == 0:
    state = {k: v.tolist() for k, v in model.state_dict().items()}
    print("RESULT " + json.dumps({"state": state, "losses": losses}), flush=True)
"""


def run_training(work: Path, ranks: int, backend: str) -> dict[str, Any]:
    script = work / "dp_step.py"
    script.write_text(SCRIPT)
    cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", sys.executable, str(script), backend]
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.split(" ", 1)[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, str], dict[str, Any]]:
    work = tmp_path_factory.mktemp("dp")
    return {(ranks, backend): run_training(work, ranks, backend)
            for ranks, backend in [(2, "mpi"), (3, "mpi"), (3, "torch")]}


@pytest.mark.parametrize("ranks, backend", [(2, "mpi"), (3, "mpi"), (3, "torch")])
def test_last_batch_smaller_than_the_ranks(runs: dict, ranks: int, backend: str) -> None:
    """Every rank passed check_identical (the job exits 0) and counted every step (3 epochs of
    2 batches), as one process does."""
    state = runs[(ranks, backend)]["state"]
    assert state["1.num_batches_tracked"] == 6
    assert all(np.isfinite(v).all() for v in map(np.asarray, state.values()))


def test_backends_agree_on_uneven_shares(runs: dict) -> None:
    """The same three shares summed by MPI and by torch.distributed: the same model up to
    summation order."""
    a, b = runs[(3, "mpi")], runs[(3, "torch")]
    for name, value in a["state"].items():
        assert np.allclose(b["state"][name], value, rtol=1e-4, atol=1e-6), name
    assert np.allclose(a["losses"], b["losses"], rtol=1e-5)


def test_rendezvous_address_reaches_other_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DIST_ADDR_ENV, raising=False)
    assert rendezvous_address("node1", ["node1", "node1"]) == "127.0.0.1"  # one host
    # Another host (an address as its name): this host's address on the route to it, never the
    # host name's 127.0.1.1 of Debian's /etc/hosts.
    peer_route = source_address_towards(UNROUTED_PROBE_ADDR)
    if peer_route is None or peer_route.startswith("127."):
        with pytest.raises(ConfigError, match=DIST_ADDR_ENV):
            rendezvous_address("node1", ["node1", UNROUTED_PROBE_ADDR])
    else:
        addr = rendezvous_address("node1", ["node1", UNROUTED_PROBE_ADDR])
        assert addr == peer_route and not addr.startswith("127.")
        # a peer name that does not resolve: the default route's address
        assert rendezvous_address("node1", ["node2.invalid"]) == peer_route
    monkeypatch.setenv(DIST_ADDR_ENV, "10.1.2.3")
    assert rendezvous_address("node1", ["node2.invalid"]) == "10.1.2.3"

