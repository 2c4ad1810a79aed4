"""Outputs belong to the store that made them, and reports describe the whole job: differential
tests of every exported file against the mask store after ``--restart``, a no-op rerun, a resume
and ``resflow evaluate`` (real GDAL files, real HDF5, the random-weight unit gallery, one process).

The unit gallery's untrained networks give every pixel a building probability between 0.446 and
0.452, so thresholds 0.449 and 0.5 give about half the pixels and none as buildings."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.cli import main
from resflow_mpi.io.export import OutputRecord, bucket_map_rgb
from resflow_mpi.io.maskstore import MaskReader
from resflow_mpi.io.naming import BUCKETS, COG, MASK, output_file_name
from resflow_mpi.io.outlock import OutputLock
from tests.conftest import write_config

gdal.UseExceptions()
LOW, HIGH = 0.449, 0.5  # thresholds: about half of the pixels are buildings, and none


def config(tmp_path: Path, scene: Path, gallery: Path, out: str = "out", **sections: Any) -> Path:
    base: dict[str, Any] = {"scenes": {"inputs": [str(scene)], "split": "all"},
                            "models": {"gallery": str(gallery)},
                            "output": {"dir": str(tmp_path / out)},
                            "tiling": {"tile_px": 32, "halo_px": 8}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return write_config(tmp_path / f"{out}.yaml", **base)


def resflow(*args: str) -> int:
    """The resflow command in this process (one process, no MPI: fast)."""
    return main([*args, "--engine", "local"])


def read(path: Path) -> np.ndarray:
    ds = gdal.Open(str(path))
    return ds.ReadAsArray()


def building_share(mask: np.ndarray) -> float:
    return float((mask == 1).sum() / max(1, (mask != 255).sum()))


def assert_outputs_are_the_store(out: Path, stem: str, mapped_by: str = "buckets") -> str:
    """Every output of scene 0 holds the store's pixels and record; the store id."""
    with MaskReader(str(out / "masks.h5")) as r:
        mask, grid = r.mask(0), r.bucket_grid(0)
        record = OutputRecord.of_store(r, 0, mapped_by)
    paths = {k: out / output_file_name(stem, k) for k in (MASK, COG, BUCKETS)}
    np.testing.assert_array_equal(read(paths[MASK]), mask)
    np.testing.assert_array_equal(read(paths[COG]), mask)
    np.testing.assert_array_equal(read(paths[BUCKETS]), bucket_map_rgb(grid, mapped_by))
    for p in paths.values():
        assert OutputRecord.of_file(p) == record, p
    report = json.loads((out / "run_report.json").read_text())
    assert report["store_id"] == record.store_id
    assert sorted(report["scenes"][0]["outputs"]) == sorted(str(p) for p in paths.values())
    return record.store_id


def test_restart_rewrites_every_output_from_the_new_store(tmp_path: Path,
                                                          unit_fixtures: dict[str, Path]) -> None:
    """Threshold 0.449, then 0.5 with --restart: mask, COG and bucket map are the new store's,
    and the mask equals a fresh run's at 0.5 (before the fix: the first run's files stayed)."""
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg = config(tmp_path, scene, gallery)
    assert resflow("run", str(cfg), "--quiet", "--set", f"inference.threshold={LOW}") == 0
    first_id = assert_outputs_are_the_store(tmp_path / "out", scene.stem)
    first_share = building_share(read(tmp_path / "out" / output_file_name(scene.stem, MASK)))
    assert resflow("run", str(cfg), "--quiet", "--restart",
                   "--set", f"inference.threshold={HIGH}") == 0
    second_id = assert_outputs_are_the_store(tmp_path / "out", scene.stem)
    assert second_id != first_id
    fresh = config(tmp_path, scene, gallery, out="fresh")
    assert resflow("run", str(fresh), "--quiet", "--set", f"inference.threshold={HIGH}") == 0
    restarted = read(tmp_path / "out" / output_file_name(scene.stem, MASK))
    np.testing.assert_array_equal(restarted,
                                  read(tmp_path / "fresh" / output_file_name(scene.stem, MASK)))
    print(f"building share: threshold {LOW} {100 * first_share:.1f} %, after --restart at "
          f"{HIGH} {100 * building_share(restarted):.1f} % (fresh run at {HIGH}: the same)")
    assert first_share > 0.2 and building_share(restarted) == 0.0


def test_an_output_of_another_store_is_rewritten_not_kept(tmp_path: Path,
                                                          unit_fixtures: dict[str, Path]) -> None:
    """Files this store exported are kept as they are by a no-op rerun; a mask copied in from
    another run's folder (same name) is replaced by this store's on the next rerun."""
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    a = config(tmp_path, scene, gallery, out="a", inference={"threshold": LOW})
    b = config(tmp_path, scene, gallery, out="b", inference={"threshold": HIGH})
    assert resflow("run", str(a), "--quiet") == 0 and resflow("run", str(b), "--quiet") == 0
    names = [output_file_name(scene.stem, k) for k in (MASK, COG, BUCKETS)]
    before = [(tmp_path / "b" / n).stat().st_mtime_ns for n in names]
    assert resflow("run", str(b), "--quiet") == 0
    assert [(tmp_path / "b" / n).stat().st_mtime_ns for n in names] == before
    shutil.copy(tmp_path / "a" / names[0], tmp_path / "b" / names[0])
    assert building_share(read(tmp_path / "b" / names[0])) > 0.2  # the other run's mask
    assert resflow("run", str(b), "--quiet") == 0
    assert_outputs_are_the_store(tmp_path / "b", scene.stem)
    assert building_share(read(tmp_path / "b" / names[0])) == 0.0


def test_an_interrupted_restart_leaves_no_output_of_the_old_store(
        tmp_path: Path, unit_fixtures: dict[str, Path]) -> None:
    """The new store's layout removes the old store's outputs and reports at once, before any
    tile: a restart stopped half way leaves no old file that looks like this run's."""
    from resflow_mpi.config import load_config
    from resflow_mpi.pipeline import discard_stale_outputs
    from resflow_mpi.io.maskstore import MaskStore
    from resflow_mpi.io.raster import prepare_scene
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg_path = config(tmp_path, scene, gallery)
    assert resflow("run", str(cfg_path), "--quiet") == 0
    out = tmp_path / "out"
    cfg = load_config(str(cfg_path), [])
    info = prepare_scene(str(scene), cfg)
    store = MaskStore(str(out / "masks.h5"), [info], 32, 8, 2, cfg.checksum(), "g", restart=True)
    try:
        removed = discard_stale_outputs(out, [info], store.store_id)
    finally:
        store.close()
    assert sorted(p.name for p in removed) == sorted(
        [output_file_name(scene.stem, k) for k in (MASK, COG, BUCKETS)]
        + ["run_report.json"])
    assert not list(out.glob("*.tif")) and not (out / "run_report.json").exists()


def test_reports_describe_the_whole_job_after_a_noop_rerun_and_a_resume(
        tmp_path: Path, unit_fixtures: dict[str, Path]) -> None:
    """run_report.json's tiles, area and buckets equal the store's finished tiles after a rerun
    with nothing to do and after a resume (done flags cleared as a kill leaves them); the
    invocation's own share is reported apart."""
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg = config(tmp_path, scene, gallery, output={"quicklooks": True})
    out = tmp_path / "out"
    assert resflow("run", str(cfg), "--quiet") == 0
    full = json.loads((out / "run_report.json").read_text())
    total, area = full["tiles"], full["area_km2"]
    assert total == 9 and full["invocation"]["tiles"] == 9
    assert area == pytest.approx(full["scenes"][0]["area_km2"], rel=1e-12)

    assert resflow("run", str(cfg), "--quiet") == 0  # nothing left to do
    noop = json.loads((out / "run_report.json").read_text())
    assert (noop["tiles"], noop["invocation"]["tiles"]) == (total, 0)
    assert noop["area_km2"] == pytest.approx(area, rel=1e-12)
    assert noop["bucket_histogram"] == full["bucket_histogram"]
    html = (out / "report.html").read_text()
    assert "0.002 km2" in html and ">9 (9 computed)<" in html and "9 of 9 tiles finished" in html

    with h5py.File(out / "masks.h5", "r+") as f:  # a job killed after 4 of its 9 tiles
        done = f["tiles/done"][...]
        done[4:] = 0
        f["tiles/done"][...] = done
        f["scenes/0"].attrs["complete"] = 0
    assert resflow("run", str(cfg), "--quiet") == 0
    resumed = json.loads((out / "run_report.json").read_text())
    assert (resumed["tiles"], resumed["invocation"]["tiles"]) == (total, 5)
    assert resumed["invocation"]["tiles_resumed"] == 4
    assert resumed["area_km2"] == pytest.approx(area, rel=1e-12)
    assert resumed["scenes"][0]["tiles_done"] == resumed["scenes"][0]["tiles_total"] == 9
    with MaskReader(str(out / "masks.h5")) as r:
        assert int(r.tile_records(0)["done"].sum()) == resumed["tiles"]
    assert "4 tiles finished by earlier runs" in (out / "report.html").read_text()
    print(f"report after a no-op rerun: {noop['tiles']} tiles, {noop['area_km2']:.5f} km2; "
          f"after a resume of 5 of 9 tiles: {resumed['tiles']} tiles, "
          f"{resumed['area_km2']:.5f} km2 (store: {total} tiles, {area:.5f} km2)")


def test_mono_run_bucket_map_shows_mono_not_buckets(tmp_path: Path,
                                                    unit_fixtures: dict[str, Path]) -> None:
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg = config(tmp_path, scene, gallery, output={"quicklooks": True})
    assert resflow("run", str(cfg), "--quiet", "--model", "mono") == 0
    out = tmp_path / "out"
    assert_outputs_are_the_store(out, scene.stem, mapped_by="mono")
    rgb = read(out / output_file_name(scene.stem, BUCKETS))
    assert (rgb == 255).all()  # every tile of the scene was computed, all by Mono: white
    meta = gdal.Open(str(out / output_file_name(scene.stem, BUCKETS))).GetMetadata()
    assert meta["RESFLOW_MAPPED_BY"] == "mono" and "Mono" in meta["RESFLOW_BUCKETS"]
    report = json.loads((out / "run_report.json").read_text())
    assert report["mapped_by"] == "mono"
    assert "every tile by the Mono model" in (out / "report.html").read_text()


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_evaluate_outputs_match_a_run_and_a_training_scene_is_marked(
        tmp_path: Path, unit_fixtures: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    """evaluate at 0.449, then at 0.5 into the same --out: its RESFlow masks equal `resflow run`'s
    store at 0.5 (before the fix: the first evaluate's files stayed); the Mono pass's bucket map
    shows Mono. The scene is the unit gallery's training scene: a warning and a marked region."""
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    before = _digest(gallery)
    ev = config(tmp_path, scene, gallery, out="ev")
    assert resflow("evaluate", str(ev), "--set", f"inference.threshold={LOW}") == 0
    assert resflow("evaluate", str(ev), "--set", f"inference.threshold={HIGH}") == 0
    err = capsys.readouterr().err
    assert "is one of the training scenes" in err and "not held-out" in err
    run = config(tmp_path, scene, gallery, out="run", inference={"threshold": HIGH})
    assert resflow("run", str(run), "--quiet") == 0
    with MaskReader(str(tmp_path / "run" / "masks.h5")) as r:
        store_mask, grid = r.mask(0), r.bucket_grid(0)
    masks = tmp_path / "ev" / "masks"
    for kind in (MASK, COG):
        np.testing.assert_array_equal(read(masks / "resflow" / output_file_name(scene.stem, kind)),
                                      store_mask)
    np.testing.assert_array_equal(read(masks / "mono" / output_file_name(scene.stem, BUCKETS)),
                                  bucket_map_rgb(grid, "mono"))
    assert OutputRecord.of_file(masks / "mono" / output_file_name(scene.stem, MASK)
                                ).mapped_by == "mono"  # type: ignore[union-attr]
    result = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    region = result["regions"][scene.stem]
    assert region["held_out"] is False and region["training_scenes"] == [str(scene)]
    assert "NOT held out" in (tmp_path / "ev" / "evaluation.md").read_text()
    assert _digest(gallery) == before


def test_a_second_evaluate_on_the_same_out_is_refused(tmp_path: Path,
                                                      unit_fixtures: dict[str, Path],
                                                      capsys: pytest.CaptureFixture) -> None:
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    ev = config(tmp_path, scene, gallery, out="ev")
    (tmp_path / "ev").mkdir()
    with OutputLock(tmp_path / "ev", "resflow evaluate (the first)"):
        assert resflow("evaluate", str(ev)) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "is in use by" in lines[0] and "resflow evaluate (the first)" \
        in lines[0], lines
    assert not (tmp_path / "ev" / "evaluation.json").exists()


def test_a_store_without_an_id_is_refused_before_any_tile(tmp_path: Path,
                                                          unit_fixtures: dict[str, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    """A partial store of an older resflow carries no id: its outputs could not be told from
    another run's, so the run asks for --restart (one line) instead of exporting them."""
    scene, gallery = unit_fixtures["scene"], unit_fixtures["gallery"]
    cfg = config(tmp_path, scene, gallery)
    assert resflow("run", str(cfg), "--quiet") == 0
    with h5py.File(tmp_path / "out" / "masks.h5", "r+") as f:
        del f.attrs["store_id"]
    capsys.readouterr()
    assert resflow("run", str(cfg), "--quiet") == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "no store id" in lines[0] and "--restart" in lines[0], lines
    assert resflow("run", str(cfg), "--quiet", "--restart") == 0
    assert_outputs_are_the_store(tmp_path / "out", scene.stem)
