"""Checks before any work: nothing is created for inputs that fail to load, and tiles too small
for the gallery's networks are named in one warning line."""
from __future__ import annotations

import subprocess
from pathlib import Path

from resflow_mpi.config import config_from_dict
from resflow_mpi.preflight import context_warning, planned_tiles_per_rank
from tests.conftest import RESFLOW, env, write_config


def run_local(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([RESFLOW, "run", str(cfg), "--engine", "local", "--quiet",
                           "--no-report-html"], env=env(), capture_output=True, text=True,
                          timeout=300)


def test_inputs_that_fail_to_load_leave_no_output_dir(tmp_path: Path, unit_gallery: Path,
                                                      unit_fixtures: dict[str, Path]) -> None:
    manifest = tmp_path / "scenes.yaml"
    manifest.write_text("predict: [\n")
    cases = {"manifest": {"scenes": {"manifest": str(manifest)}},
             "missing scene": {"scenes": {"inputs": [str(tmp_path / "absent.tif")]}},
             "missing gallery": {"scenes": {"inputs": [str(unit_fixtures["scene"])]},
                                 "models": {"gallery": str(tmp_path / "no-gallery")}}}
    for name, sections in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        cfg = write_config(tmp_path / f"{name.replace(' ', '-')}.yaml",
                           **{"models": {"gallery": str(unit_gallery)}, **sections,
                              "output": {"dir": str(out)}})
        p = run_local(cfg)
        assert p.returncode == 2, (name, p.stderr)
        assert [ln for ln in p.stderr.splitlines() if ln.startswith("error:")], (name, p.stderr)
        assert not out.exists(), f"{name}: {sorted(out.iterdir())}"


def test_tiles_too_small_for_the_networks_warn_in_one_line(tmp_path: Path, unit_gallery: Path,
                                                           unit_fixtures: dict[str, Path]) -> None:
    cfg = write_config(tmp_path / "c.yaml", scenes={"inputs": [str(unit_fixtures["scene"])]},
                       models={"gallery": str(unit_gallery)}, tiling={"tile_px": 16, "halo_px": 0},
                       output={"dir": str(tmp_path / "out"), "cog": False, "bucket_map": False,
                               "quicklooks": False})
    p = run_local(cfg)
    assert p.returncode == 0, p.stderr
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("warning: tiling.tile_px=16")]
    assert len(warnings) == 1, p.stderr
    assert "tiling.halo_px=0" in warnings[0] and "128 px crops" in warnings[0]


def test_context_rule() -> None:
    trained_on_64 = {"training": {"tile_px": 64}}
    small = config_from_dict({"tiling": {"tile_px": 16, "halo_px": 0}})
    warning = context_warning(small, trained_on_64)
    assert warning is not None and "tile_px + 2 x halo_px >= 32" in warning
    assert context_warning(config_from_dict({"tiling": {"tile_px": 16, "halo_px": 8}}),
                           trained_on_64) is None
    assert context_warning(config_from_dict({"tiling": {"tile_px": 256, "halo_px": 0}}),
                           trained_on_64) is None
    assert context_warning(small, {}) is None  # a manifest without its training settings


def test_planned_tiles_per_rank() -> None:
    assert planned_tiles_per_rank(5, 2, "static") == 3
    assert planned_tiles_per_rank(5, 2, "dynamic") == 5
    assert planned_tiles_per_rank(0, 3, "static") == 0
