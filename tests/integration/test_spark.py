"""The Spark engine (local[2]) against the MPI engine (mpirun -n 2): bit-identical masks and bucket
maps, exports on the input's grid, resume, and a one-line error when Java is missing."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.io.maskstore import TileResult
from resflow_mpi.io.raster import SceneInfo
from resflow_mpi.runners.spark_runner import decode_result, encode_result, java_major_version
from resflow_mpi.tiling import make_tile, tile_grid
from tests.conftest import RESFLOW, VENV_BIN, env, resflow, write_config

pytestmark = pytest.mark.spark

HAVE_JAVA = bool(os.environ.get("JAVA_HOME")) or shutil.which("java") is not None
needs_spark = pytest.mark.skipif(not HAVE_JAVA, reason="Java is not installed")


def read_scenes(h5_path: Path) -> dict[int, dict[str, np.ndarray]]:
    from tests.conftest import store_scenes
    return store_scenes(h5_path)


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory: pytest.TempPathFactory, tiny_archive: Path,
                 tiny_gallery: Path) -> dict[str, Path]:
    """One config (every scene of the tiny archive), run by mpirun -n 2 and by Spark local[2]."""
    pytest.importorskip("pyspark")
    if not HAVE_JAVA:
        pytest.skip("Java is not installed")
    work = tmp_path_factory.mktemp("spark")
    cfg = write_config(work / "run.yaml", scenes={"inputs": [str(tiny_archive)], "split": "all"},
                       models={"gallery": str(tiny_gallery)}, output={"dir": str(work / "mpi")})
    resflow(["run", str(cfg), "--quiet"], ranks=2)
    spark = resflow(["run", str(cfg), "--engine", "spark", "--set", "spark.master=local[2]",
                     "--set", f"output.dir={work / 'spark'}"])
    return {"mpi": work / "mpi", "spark": work / "spark", "config": cfg,
            "spark_stderr": spark.stderr}  # type: ignore[dict-item]


@needs_spark
def test_spark_outputs_bit_identical_to_mpi(both_engines: dict) -> None:
    mpi = read_scenes(both_engines["mpi"] / "masks.h5")
    spark = read_scenes(both_engines["spark"] / "masks.h5")
    assert sorted(spark) == sorted(mpi) and len(mpi) == 8
    masks = np.concatenate([s["mask"].ravel() for s in mpi.values()])
    assert (masks == 1).any() and (masks == 0).any()  # a non-trivial reference
    for i, ref in mpi.items():
        assert np.array_equal(spark[i]["mask"], ref["mask"]), f"mask of scene {i} differs"
        assert np.array_equal(spark[i]["bucket"], ref["bucket"]), f"buckets of scene {i} differ"
        assert np.array_equal(spark[i]["code"], ref["code"]), f"hash codes of scene {i} differ"
        assert spark[i]["done"].all()
    # Spark's progress lines stay readable: no JVM INFO chatter.
    assert " INFO " not in both_engines["spark_stderr"]


@needs_spark
def test_spark_exports_on_input_grid_and_reports(both_engines: dict) -> None:
    out = both_engines["spark"]
    report = json.loads((out / "run_report.json").read_text())
    assert report["engine"] == "spark" and report["master"] == "local[2]"
    assert all(s["complete"] for s in report["scenes"])
    assert report["tiles"] == 8 * 16 == sum(report["load_balance"]["tiles_per_rank"])
    assert {r["binding"]["device"] for r in report["per_rank"] if r["tiles"]} == {"cpu"}
    for scene in report["scenes"]:
        mask_tif = next(p for p in scene["outputs"] if p.endswith(".resflow-mask.tif"))
        assert any(p.endswith(".resflow-buckets.tif") for p in scene["outputs"])
        src, got = gdal.Open(scene["path"]), gdal.Open(mask_tif)
        assert (got.RasterXSize, got.RasterYSize) == (src.RasterXSize, src.RasterYSize)
        assert got.GetGeoTransform() == src.GetGeoTransform()
        assert got.GetSpatialRef().IsSame(src.GetSpatialRef())
        mpi_tif = gdal.Open(str(both_engines["mpi"] / Path(mask_tif).name))
        assert np.array_equal(got.ReadAsArray(), mpi_tif.ReadAsArray())
        mpi_buckets = both_engines["mpi"] / Path(mask_tif).name.replace("-mask.tif", "-buckets.tif")
        assert np.array_equal(gdal.Open(mask_tif.replace("-mask.tif", "-buckets.tif")).ReadAsArray(),
                              gdal.Open(str(mpi_buckets)).ReadAsArray())


@needs_spark
def test_spark_resumes_a_partial_output(both_engines: dict, tmp_path: Path) -> None:
    """An interrupted output (every other tile not done, its pixels garbage) is finished by Spark
    computing exactly the missing tiles, and then equals the MPI engine's output."""
    out = tmp_path / "partial"
    out.mkdir()
    shutil.copy(both_engines["mpi"] / "masks.h5", out / "masks.h5")
    missing = 0
    with h5py.File(out / "masks.h5", "r+") as f:
        tile_px, halo_px = int(f.attrs["tile_px"]), int(f.attrs["halo_px"])
        done = f["tiles/done"][...]
        for g in f["scenes"].values():
            offset = int(g.attrs["tile_offset"])
            for tile in tile_grid(0, int(g.attrs["width"]), int(g.attrs["height"]), tile_px,
                                  halo_px):
                if tile.index % 2:
                    o = tile.owned
                    g["mask"][o.row:o.row + o.height, o.col:o.col + o.width] = 7
                    done[offset + tile.index] = 0
                    missing += 1
            g.attrs["complete"] = 0
        f["tiles/done"][...] = done
    resflow(["run", str(both_engines["config"]), "--engine", "spark", "--quiet",
             "--set", f"output.dir={out}"])
    report = json.loads((out / "run_report.json").read_text())
    assert report["invocation"]["tiles"] == missing and all(s["complete"] for s in report["scenes"])
    assert report["tiles"] == sum(s["tiles_total"] for s in report["scenes"])  # the whole job
    mpi, resumed = read_scenes(both_engines["mpi"] / "masks.h5"), read_scenes(out / "masks.h5")
    for i, ref in mpi.items():
        assert np.array_equal(resumed[i]["mask"], ref["mask"]), f"mask of scene {i} differs"
        assert np.array_equal(resumed[i]["bucket"], ref["bucket"])


def test_missing_java_is_one_line_error(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    cfg = write_config(tmp_path / "run.yaml", scenes={"inputs": [str(tmp_path / "none.tif")]},
                       models={"gallery": str(tmp_path / "gallery")},
                       output={"dir": str(tmp_path / "out")})
    e = env()
    e.pop("JAVA_HOME", None)
    e["PATH"] = str(VENV_BIN)  # no java anywhere on it
    p = subprocess.run([RESFLOW, "run", str(cfg), "--engine", "spark"], env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: Java 17 is required for --engine spark")
    assert "apt-get install default-jre-headless" in lines[0]
    assert not (tmp_path / "out").exists()  # checked before any work started


def test_tile_result_bytes_round_trip() -> None:
    scene = SceneInfo("s.tif", 100, 70, 3, "uint8", 0.0, "", None, (0, 1, 0, 0, 0, -1))
    tile = make_tile(0, 1, 1, 100, 70, 64, 8)  # the ragged corner tile (36 x 6 owned)
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 1, 255], np.uint8), (6, 36))
    prob = rng.random((6, 36)).astype(np.float16)
    code = np.array([3, 250], np.uint8)
    for p in (prob, None):
        got = decode_result(encode_result(TileResult(tile, mask, 5, code, p, 1.25)), scene, 64, 8)
        assert got.tile == tile and got.bucket == 5 and got.ood_score == 1.25
        assert np.array_equal(got.mask, mask) and np.array_equal(got.code, code)
        assert (got.prob is None) if p is None else np.array_equal(got.prob, p)


@pytest.mark.parametrize("text,major", [('openjdk version "17.0.15" 2025-04-15', 17),
                                        ('java version "1.8.0_392"', 8),
                                        ('openjdk version "21" 2023-09-19', 21),
                                        ("no version here", None)])
def test_java_major_version(text: str, major: int) -> None:
    assert java_major_version(text) == major
