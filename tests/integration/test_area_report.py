"""The run report's areas (each scene's, the job's total from its tiles, report.html's) equal the
independent ellipsoidal reference of tests/unit/test_area.py, for scenes in EPSG:4326, Web
Mercator and UTM (centre and zone edge) at 0, 45 and 60 degrees, all mapped in one real run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import RESFLOW, env, write_config
from tests.unit.test_area import CASES, REL_TOL, geotransform, reference_m2, write_raster


def test_run_report_areas_equal_the_ellipsoidal_reference(tmp_path: Path,
                                                          unit_gallery: Path) -> None:
    scenes = [write_raster(tmp_path / f"{c.name}.tif", c, 3, 0) for c in CASES]
    cfg = write_config(tmp_path / "cfg.yaml",
                       scenes={"inputs": [str(s) for s in scenes], "split": "all"},
                       models={"gallery": str(unit_gallery)},
                       output={"dir": str(tmp_path / "out"), "quicklooks": True})
    p = subprocess.run([RESFLOW, "run", str(cfg), "--engine", "local", "--quiet"], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    by_path = {Path(s["path"]).name: s for s in report["scenes"]}
    references_km2 = {c.name: reference_m2(c, geotransform(c)) / 1e6 for c in CASES}
    for case in CASES:
        scene = by_path[f"{case.name}.tif"]
        assert scene["complete"]
        assert scene["area_km2"] == pytest.approx(references_km2[case.name], rel=REL_TOL), case.name
    total = sum(references_km2.values())
    assert report["area_km2"] == pytest.approx(total, rel=REL_TOL)   # the sum of every tile's
    assert f"{report['area_km2']:.3f} km2" in (tmp_path / "out" / "report.html").read_text()
