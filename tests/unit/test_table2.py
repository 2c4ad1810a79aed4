"""perf/table2.py --quick: every architecture gets a row with the paper's figures beside ours."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, env


def test_table2_quick_writes_every_architecture(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(REPO / "perf" / "table2.py"), "--quick", "--out",
                        str(tmp_path)], capture_output=True, text=True, env=env(), timeout=300)
    assert p.returncode == 0, p.stderr
    result = json.loads((tmp_path / "table2.json").read_text())
    rows = {r["arch"]: r for r in result["rows"]}
    assert list(rows) == ["fcn_resnet", "unet", "segnet", "deeplabv3"]
    assert {r["paper_parameters_m"] for r in rows.values()} == {23.5, 13.4, 29.4, 42.5}
    for r in rows.values():
        assert r["preset"] == "tiny" and r["parameters"] > 0
        assert r["train_s_per_sample"] > 0 and r["infer_tiles_per_s"] > 0
        assert len(r["train_step_s"]) == len(r["infer_call_s"]) == result["setting"]["repeats"]
    table = (tmp_path / "table2.md").read_text()
    assert table == result["table_markdown"] and table.count("\n| ") == 5
