"""evaluation.md keeps one table row per region whatever the region's name holds."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from resflow_mpi.init.evaluate import region_tiles, write_evaluation


def test_region_name_with_pipe_and_newline_stays_one_cell(tmp_path: Path) -> None:
    name = "North|South\nquarter"
    per_pass = {"resflow": [(0, 0, 0, 1, 10, 5, 5, 80)], "mono": [(0, 0, 0, 0, 8, 2, 7, 83)]}
    tiles = region_tiles(per_pass, [name], thresholds=np.array([3]))
    write_evaluation(tmp_path, [tiles], [{"seed": 0, "k": 1, "hash_map": 1.0,
                                          "bucket_mode": "finetune", "mono_budget": "total",
                                          "mono_val_iou": None, "gallery": "g"}], 0.99, samples=50)
    lines = (tmp_path / "evaluation.md").read_text().splitlines()
    header, row = lines[0], next(ln for ln in lines if "North" in ln)
    cells = lambda line: len(re.split(r"(?<!\\)\|", line))  # noqa: E731
    assert row.startswith("| North\\|South quarter |")
    assert cells(row) == cells(header)
