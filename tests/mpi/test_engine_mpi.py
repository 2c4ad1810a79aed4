"""The MPI engine under mpirun -n 1/2/3: bit-identical outputs for every policy and writer, a
parallel (mpio) HDF5 file written by every rank, and exports on the input's grid."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from osgeo import gdal

from tests.conftest import resflow

pytestmark = pytest.mark.mpi

VARIANTS = [(1, "static", "auto"), (2, "static", "auto"), (3, "static", "auto"),
            (2, "dynamic", "auto"), (3, "dynamic", "auto"), (2, "static", "gather"),
            (3, "static", "independent")]


def read_outputs(out: Path) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    from tests.conftest import store_scenes
    return {i: (s["mask"], s["bucket"], s["writer_rank"], s["code"])
            for i, s in store_scenes(out / "masks.h5").items()}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory, tiny_archive: Path,
                tiny_gallery: Path) -> dict[tuple, Path]:
    from tests.conftest import write_config
    work = tmp_path_factory.mktemp("engine")
    runs = {}
    cfg = write_config(work / "run.yaml", scenes={"inputs": [str(tiny_archive)], "split": "all"},
                       models={"gallery": str(tiny_gallery)}, output={"dir": str(work / "ref")})
    # Single-process reference (no mpirun: a singleton MPI run).
    resflow(["run", str(cfg), "--quiet"])
    runs[("ref",)] = work / "ref"
    # The in-process engine (no MPI at all): the parity reference of every engine.
    resflow(["run", str(cfg), "--quiet", "--engine", "local", "--set",
             f"output.dir={work / 'local'}"])
    runs[("local",)] = work / "local"
    for n, policy, writer in VARIANTS:
        out = work / f"n{n}-{policy}-{writer}"
        resflow(["run", str(cfg), "--quiet", "--set", f"output.dir={out}",
                 "--set", f"parallel.policy={policy}", "--set", f"parallel.writer={writer}",
                 "--set", "parallel.chunk_tiles=2"], ranks=n)
        runs[(n, policy, writer)] = out
    return runs


def test_outputs_bit_identical_across_ranks_policies_writers(engine_runs: dict) -> None:
    ref = read_outputs(engine_runs[("ref",)])
    assert len(ref) >= 4
    # The reference must be non-trivial: buildings found and several buckets used.
    masks = np.concatenate([m.ravel() for m, _, _, _ in ref.values()])
    assert (masks == 1).mean() > 0.01 and (masks == 0).mean() > 0.2
    assert len(np.unique(np.concatenate([b for _, b, _, _ in ref.values()]))) >= 2
    for key in [("local",), *VARIANTS]:
        got = read_outputs(engine_runs[key])
        for i, (m, b, _, c) in ref.items():
            assert np.array_equal(got[i][0], m), f"mask of scene {i} differs for {key}"
            assert np.array_equal(got[i][1], b), f"bucket map of scene {i} differs for {key}"
            assert np.array_equal(got[i][3], c), f"hash codes of scene {i} differ for {key}"


def test_hdf5_written_in_parallel_by_every_rank(engine_runs: dict) -> None:
    if not h5py.get_config().mpi:
        pytest.skip("h5py without MPI (e.g. the pip wheel): runs take the serialized store, "
                    "tested by test_serialized_hdf5_fallback_is_bit_identical")
    for n, policy, writer in VARIANTS:
        path = engine_runs[(n, policy, writer)] / "masks.h5"
        with h5py.File(path, "r") as f:
            assert f.attrs["driver"] == "mpio" and int(f.attrs["mpi_size"]) == n
            writers, done = f["tiles/writer_rank"][...], f["tiles/done"][...]
            assert len(done) == sum(int(g.attrs["grid_rows"]) * int(g.attrs["grid_cols"])
                                    for g in f["scenes"].values())
        assert done.all()
        if writer == "gather":
            assert set(writers) == {0}           # the paper's single merge writer
        elif policy == "static":
            assert set(writers) == set(range(n))  # every rank wrote its own tiles
        else:
            assert set(writers) <= set(range(n)) and len(set(writers)) >= min(n, 2) - 1
        report = json.loads((path.parent / "run_report.json").read_text())
        assert report["ranks"] == n and report["writer"] == (
            {"auto": "collective" if policy == "static" else "independent"}.get(writer, writer))
        assert sum(report["load_balance"]["tiles_per_rank"]) == report["tiles"]


def test_exports_have_input_grid(engine_runs: dict, tiny_archive: Path) -> None:
    out = engine_runs[(2, "static", "auto")]
    report = json.loads((out / "run_report.json").read_text())
    assert all(s["complete"] for s in report["scenes"])
    for s in report["scenes"]:
        src = gdal.Open(s["path"])
        for p in s["outputs"]:
            ds = gdal.Open(p)
            if p.endswith(".resflow-buckets.tif"):
                assert ds.RasterCount == 3
                continue
            assert (ds.RasterXSize, ds.RasterYSize) == (src.RasterXSize, src.RasterYSize)
            assert ds.GetGeoTransform() == src.GetGeoTransform()
            assert ds.GetSpatialRef().IsSame(src.GetSpatialRef())
            assert ds.GetRasterBand(1).GetNoDataValue() == 255
        cog = [p for p in s["outputs"] if p.endswith("-cog.tif")][0]
        assert gdal.Info(cog, format="json")["metadata"]["IMAGE_STRUCTURE"].get("LAYOUT") == "COG"


def test_nodata_in_input_is_nodata_in_mask(engine_runs: dict) -> None:
    out = engine_runs[(2, "static", "auto")]
    report = json.loads((out / "run_report.json").read_text())
    seen_nodata = False
    with h5py.File(out / "masks.h5", "r") as f:
        for s in report["scenes"]:
            src = gdal.Open(s["path"])
            img = src.ReadAsArray()
            nodata = (img == src.GetRasterBand(1).GetNoDataValue()).all(axis=0)
            mask = f[f"scenes/{s['index']}/mask"][...]
            assert (mask[nodata] == 255).all()          # no buildings over nodata
            assert (mask[~nodata] != 255).all()         # every valid pixel was mapped
            seen_nodata |= bool(nodata.any())
    assert seen_nodata, "the tiny archive should contain a nodata collar"


@pytest.mark.parametrize("ranks", [1, 2])
def test_serialized_hdf5_fallback_is_bit_identical(engine_runs: dict, tmp_path: Path,
                                                   ranks: int) -> None:
    """Without parallel HDF5 (h5py lacking MPI, e.g. the pip wheel, or RESFLOW_SERIAL_HDF5=1)
    every rank still computes; masks reach rank 0, which writes an ordinary file: same outputs,
    and the run says which writer it took."""
    import os
    import subprocess

    from tests.conftest import RESFLOW, env
    cfg = engine_runs[("ref",)].parent / "run.yaml"
    out = tmp_path / "serial"
    e = env()
    e["RESFLOW_SERIAL_HDF5"] = "1"
    p = subprocess.run(["mpirun", "-n", str(ranks), "--oversubscribe", "-x", "RESFLOW_SERIAL_HDF5",
                        RESFLOW, "run", str(cfg), "--set", f"output.dir={out}"],
                       env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "h5py has no MPI support (or RESFLOW_SERIAL_HDF5=1)" in p.stderr
    report = json.loads((out / "run_report.json").read_text())
    assert report["writer"] == "gather" and "no MPI support" in report["note"]
    assert sorted(report["load_balance"]["tiles_per_rank"])[0] > 0  # every rank computed
    with h5py.File(out / "masks.h5", "r") as f:
        assert f.attrs["driver"] != "mpio"
    ref = read_outputs(engine_runs[("ref",)])
    got = read_outputs(out)
    for i, (m, b, _, c) in ref.items():
        assert np.array_equal(got[i][0], m) and np.array_equal(got[i][1], b)
        assert np.array_equal(got[i][3], c)
    assert os.path.getsize(out / "masks.h5") > 0
