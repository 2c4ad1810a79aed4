"""`resflow run` on a STAC item (one process, untrained gallery): single-band assets picked by
common name are stacked into one scene, mapped, and a rerun resumes it (the VRT is not
rewritten); the same item as a manifest `image:` names the same scene."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.conftest import write_config
from tests.integration.test_bad_inputs import run
from tests.unit.test_stac import band_files, make_item

TILING = {"tile_px": 16, "halo_px": 4}


def test_stac_item_is_mapped_and_resumed(tmp_path: Path, unit_gallery: Path) -> None:
    files = band_files(tmp_path / "data")
    item = make_item("scene-1", {k: str(p) for k, p in files.items()})
    item_path = tmp_path / "item.json"
    item.save_object(dest_href=str(item_path), include_self_link=False)
    out = tmp_path / "out"
    common = {"models": {"gallery": str(unit_gallery)}, "output": {"dir": str(out)},
              "tiling": TILING}
    cfg = write_config(tmp_path / "cfg.yaml", scenes={"inputs": [str(item_path)], "split": "all",
                                                      "stac_assets": ["red", "green", "blue"]},
                       **common)
    for tiles_this_run in (4, 0):
        p = run(cfg)
        assert p.returncode == 0, p.stderr
        report = json.loads((out / "run_report.json").read_text())
        assert [s["path"] for s in report["scenes"]] == [str(out / "stac" / "scene-1.vrt")]
        assert report["tiles"] == 4 and report["invocation"]["tiles"] == tiles_this_run
    assert (out / "scene-1.resflow-mask.tif").exists()
    manifest = tmp_path / "scenes.yaml"
    manifest.write_text(yaml.safe_dump({"predict": [{"image": "item.json", "region": "r"}]}))
    out2 = tmp_path / "out2"
    cfg2 = write_config(tmp_path / "cfg2.yaml", scenes={"manifest": str(manifest),
                                                        "stac_assets": ["red", "green", "blue"]},
                        **{**common, "output": {"dir": str(out2)}})
    p = run(cfg2)
    assert p.returncode == 0, p.stderr
    report = json.loads((out2 / "run_report.json").read_text())
    assert [s["path"] for s in report["scenes"]] == [str(out2 / "stac" / "scene-1.vrt")]
    assert report["tiles_computed"] == 4
