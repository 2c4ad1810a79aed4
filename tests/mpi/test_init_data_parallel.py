"""`resflow init` with the shared models trained data-parallel (training.data_parallel: true):
repeatable for a fixed rank count, and uneven batch shares (3 ranks) work."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from resflow_mpi.init.dataparallel import DataParallel
from resflow_mpi.runtime.comm import Communicator
from tests.conftest import resflow, write_config

pytestmark = pytest.mark.mpi

# Few epochs and crops: this checks the parallel mechanics, not the models' quality.
FAST = {"cem_epochs": 2, "hash_epochs": 4, "seg_epochs": 2, "tiles_per_scene": 8, "k_max": 4}


def model_checksums(gallery: Path) -> dict[str, str]:
    m = json.loads((gallery / "manifest.json").read_text())
    out = {"cem": m["extractor"]["sha256"], "hash": m["hash_head"]["sha256"],
           "mono": m["mono"]["sha256"]}
    out.update({f"bucket-{b['code']}": b["sha256"] for b in m["buckets"]})
    return out


@pytest.fixture(scope="module")
def galleries(tmp_path_factory: pytest.TempPathFactory, tiny_archive: Path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("dp")
    cfg = write_config(work / "init.yaml", scenes={"inputs": [str(tiny_archive)], "split": "train"},
                       models={"gallery": str(work / "unused")}, output={"dir": str(work / "o")},
                       training=FAST)
    runs = {"dp2a": (2, "mpi"), "dp2b": (2, "mpi"), "dp3": (3, "mpi"), "dp2t": (2, "torch"),
            "dp2u": (2, "torch")}
    logs = {}
    for name, (ranks, backend) in runs.items():
        p = resflow(["init", str(cfg), "--set", f"models.gallery={work / name}",
                     "--set", "training.data_parallel=true",
                     "--set", f"training.data_parallel_backend={backend}"], ranks=ranks)
        logs[name] = p.stderr
    return {"work": work, "logs": logs, **{name: work / name for name in runs}}


def test_data_parallel_init_is_repeatable_for_a_rank_count(galleries: dict) -> None:
    a, b = model_checksums(galleries["dp2a"]), model_checksums(galleries["dp2b"])
    assert a == b
    assert "shared models data-parallel" in galleries["logs"]["dp2a"]
    manifest = json.loads((galleries["dp2a"] / "manifest.json").read_text())
    assert manifest["training"]["data_parallel"] is True
    # Another rank count sums gradients in another order: a different (valid) model.
    assert model_checksums(galleries["dp3"])["cem"] != a["cem"]


def test_torch_distributed_backend_is_repeatable_and_agrees_with_mpi(galleries: dict) -> None:
    """gloo all_reduce over the same two ranks: every rank takes the same step (check_identical
    ran), two runs give the same models, and the CEM is the MPI backend's up to summation order."""
    t, u = model_checksums(galleries["dp2t"]), model_checksums(galleries["dp2u"])
    assert t == u
    assert "shared models data-parallel (torch)" in galleries["logs"]["dp2t"]
    manifest = json.loads((galleries["dp2t"] / "manifest.json").read_text())
    assert manifest["training"]["data_parallel_backend"] == "torch"
    a = torch.load(galleries["dp2a"] / "cem.pt", weights_only=True)
    b = torch.load(galleries["dp2t"] / "cem.pt", weights_only=True)
    for name in a:
        if a[name].is_floating_point():
            assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-4), name


def test_uneven_shares_over_three_ranks_give_a_complete_gallery(galleries: dict) -> None:
    manifest = json.loads((galleries["dp3"] / "manifest.json").read_text())
    assert manifest["summary"]["k"] >= 2
    for entry in [manifest["extractor"], manifest["hash_head"], manifest["mono"],
                  *manifest["buckets"]]:
        assert (galleries["dp3"] / entry["file"]).is_file()
    assert manifest["summary"]["hash_map"] > 0


def test_one_process_sum_keeps_gradients_and_batches() -> None:
    dp = DataParallel(Communicator(None))
    assert dp.share(5) == slice(0, 5)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    model(torch.randn(4, 1, 6, 6)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    assert dp.sum_gradients(model, 4, 4, loss=2.5) == pytest.approx(2.5)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    assert int(model[1].num_batches_tracked) == 1
    dp.check_identical(model, "test model")
