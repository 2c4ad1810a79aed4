"""End to end (`resflow run`, one process, untrained gallery): a scene listed many ways in a
manifest, through a symlinked folder, beside its own outputs and a VRT over it, is mapped and
counted once; a scene file replaced since the last run is refused in one line until --restart."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import yaml
from osgeo import gdal

from tests.conftest import write_config
from tests.integration.test_bad_inputs import assert_clear_error, make_cfg, run, scene

SIZE_PX = 96  # 0.5 m pixels; 4 tiles of 64 px


def test_one_scene_listed_many_ways_is_mapped_and_counted_once(tmp_path: Path,
                                                               unit_gallery: Path) -> None:
    img = tmp_path / "data" / "img"
    img.mkdir(parents=True)
    s = scene(img / "S.tif", size=SIZE_PX)
    gdal.BuildVRT(str(img / "S.vrt"), [str(s)]).FlushCache()
    (tmp_path / "linked").symlink_to(img, target_is_directory=True)
    work = tmp_path / "work"
    work.mkdir()
    manifest = work / "scenes.yaml"
    manifest.write_text(yaml.safe_dump({"predict": [
        "../data/img/S.tif", "./../data/img/../img/S.tif", "../linked/S.tif", "../data/img"]}))
    cfg = write_config(tmp_path / "cfg.yaml", scenes={"manifest": str(manifest)},
                       models={"gallery": str(unit_gallery)}, output={"dir": str(img)},
                       tiling={"tile_px": 64, "halo_px": 8})
    for extra in ((), ("--restart",)):  # the second run finds the first one's outputs in img/
        p = run(cfg, *extra)
        assert p.returncode == 0, p.stderr
        report = json.loads((img / "run_report.json").read_text())
        assert [sc["path"] for sc in report["scenes"]] == [str(s)]
        assert report["tiles"] == 4
        # counted once: the ground area of one 0.5 m scene (UTM scale factor: within 0.1 %)
        assert report["area_km2"] == pytest.approx(SIZE_PX * SIZE_PX * 0.25 / 1e6, rel=1e-3)
        notes = [ln for ln in p.stderr.splitlines() if ln.startswith("note: ")]
        assert sum("mapped once" in ln for ln in notes) == 4, p.stderr  # 3 duplicates + S.vrt
    assert (img / "S.resflow-mask.tif").exists()


def test_replaced_scene_is_refused_until_restart(tmp_path: Path, unit_gallery: Path) -> None:
    s = scene(tmp_path / "s.tif", size=SIZE_PX)
    cfg = make_cfg(tmp_path, unit_gallery, [str(s)], tiling={"tile_px": 64, "halo_px": 8})
    assert run(cfg).returncode == 0
    scene(s, size=SIZE_PX + 64)  # another scene of another size at the same path
    line = assert_clear_error(run(cfg), str(s), "changed since this output was started",
                              f"size {SIZE_PX}x{SIZE_PX} px -> 160x160 px", "--restart")
    print(line)
    p = run(cfg, "--restart")
    assert p.returncode == 0, p.stderr
    with h5py.File(tmp_path / "out" / "masks.h5", "r") as f:
        assert f["scenes/0/mask"].shape == (160, 160)
