"""Shared fixtures: a tiny synthetic archive and a trained tiny gallery, made once per session
with the project's own generator and `resflow init` (real GDAL, real HDF5, real MPI), and the
untrained unit fixtures of tests/fixtures/make_fixtures.py (seeded rasters, a random-weight gallery).

Tests that use ``tiny_gallery`` (they train) and everything under tests/integration are marked
``integration``: ``pytest -m "not integration"`` runs the fast unit tests only."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
VENV_BIN = Path(sys.executable).parent
RESFLOW = str(VENV_BIN / "resflow")
FAULT_DRIVER = str(Path(__file__).resolve().parent / "fault_driver.py")


def resflow_with_fault(spec: str) -> list[str]:
    """The command that runs the resflow CLI with the fault ``spec`` (see tests/fault_driver.py)."""
    return [str(VENV_BIN / "python"), FAULT_DRIVER, spec]
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "H5PY_ALWAYS_USE_MPI": "1",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

TINY_CONFIG = {
    "scenes": {"inputs": [], "split": "train"},
    "tiling": {"tile_px": 64, "halo_px": 8},
    "models": {"gallery": "", "arch": "unet", "preset": "tiny", "hash_bits": 16},
    "inference": {"batch_size": 4, "threads_per_rank": 1},
    "output": {"dir": "", "quicklooks": False},
    "training": {"tile_px": 64, "tiles_per_scene": 16, "cem_epochs": 8, "hash_epochs": 30,
                 "seg_epochs": 24, "k_min": 2, "k_max": 6, "batch_size": 16,
                 # Plumbing tests need no fair Mono (k times the steps) and no second candidate
                 # k (init's comparison of candidates runs in the own-imagery and real-data
                 # tests): keep the fixture fast.
                 "mono_budget": "bucket", "k_candidates": 1},
}


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(MPI_ENV)
    e["PATH"] = f"{VENV_BIN}:{e.get('PATH', '')}"
    return e


def resflow(args: Sequence[str], ranks: Optional[int] = None, cwd: Optional[Path] = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run the resflow CLI, under `mpirun -n ranks` when ranks is given."""
    cmd = [RESFLOW, *args]
    if ranks is not None:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", *cmd]
    p = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def store_scenes(h5_path: str | Path) -> dict[int, dict]:
    """Every scene of a mask store through the project's reader: ``mask``, the per-tile records
    (``bucket``, ``code``, ``writer_rank``, ``done``) and the group's ``attrs``."""
    from resflow_mpi.io.maskstore import MaskReader
    with MaskReader(str(h5_path)) as r:
        return {i: {"mask": r.mask(i), **r.tile_records(i), "attrs": r.scene_attrs(i)}
                for i in range(r.n_scenes())}


def write_config(path: Path, **sections: dict) -> Path:
    """TINY_CONFIG updated section by section, written as YAML."""
    cfg = {k: dict(v) for k, v in TINY_CONFIG.items()}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """archive.json of the generator's 'tiny' preset (seed 0)."""
    from resflow_mpi.synth import synth_archive
    out = tmp_path_factory.mktemp("archive")
    return Path(synth_archive(out, preset="tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_gallery(tiny_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model gallery trained by `resflow init` under `mpirun -n 2` on the tiny archive."""
    work = tmp_path_factory.mktemp("gallery")
    cfg = write_config(work / "init.yaml", scenes={"inputs": [str(tiny_archive)], "split": "train"},
                       models={"gallery": str(work / "gallery")}, output={"dir": str(work / "out")})
    resflow(["init", str(cfg)], ranks=2, timeout=600)
    return work / "gallery"


@pytest.fixture(scope="session")
def unit_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seeded tiny rasters and a random-weight gallery (no training): see make_fixtures.py."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import make_fixtures
    finally:
        sys.path.remove(str(FIXTURES))
    return make_fixtures.make_all(tmp_path_factory.mktemp("unit-fixtures"))


@pytest.fixture(scope="session")
def unit_gallery(unit_fixtures: dict[str, Path]) -> Path:
    """A model gallery in the format `resflow init` writes, with untrained weights."""
    return unit_fixtures["gallery"]


@pytest.fixture()
def run_config(tmp_path: Path, tiny_archive: Path, tiny_gallery: Path):
    """Factory: a run config over the tiny archive's test split with the trained gallery."""
    def make(name: str = "run.yaml", **sections: dict) -> Path:
        base = {"scenes": {"inputs": [str(tiny_archive)], "split": "test"},
                "models": {"gallery": str(tiny_gallery)},
                "output": {"dir": str(tmp_path / "out")}}
        for k, v in sections.items():
            base.setdefault(k, {}).update(v)
        return write_config(tmp_path / name, **base)
    return make


def pytest_configure(config: pytest.Config) -> None:
    for m in ("mpi: runs under mpirun", "spark: needs pyspark + Java",
              "gpu: needs a CUDA device", "slow: takes more than ~30 s",
              "cluster: needs root + Slurm/munge (launch/install.sh --with-slurm) or network "
              "namespaces; a real one-machine cluster (tests/cluster)",
              "integration: trains a gallery (tiny_gallery) or runs whole jobs; "
              "deselect with -m 'not integration'",
              "realdata: needs rasters fetched from PyPI packages (tests/data/fetch_real_data.py)"):
        config.addinivalue_line("markers", m)
    os.environ.setdefault("H5PY_ALWAYS_USE_MPI", "1")
    shutil.which("mpirun")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark as integration every test that trains (uses tiny_gallery) or lives in integration/."""
    integration_dir = Path(__file__).resolve().parent / "integration"
    for item in items:
        if ("tiny_gallery" in getattr(item, "fixturenames", ())
                or integration_dir in Path(str(item.fspath)).resolve().parents):
            item.add_marker(pytest.mark.integration)
