"""Randomly corrupted GeoTIFF bytes and random YAML reach the readers: only the project's own
clear errors come out — no other exception, no hang, no interpreter crash."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import env

DRIVER = Path(__file__).with_name("fuzz_driver.py")


@pytest.mark.parametrize("mode, n", [("tiff", 400), ("yaml", 400)])
def test_fuzz_readers(tmp_path: Path, mode: str, n: int) -> None:
    e = env()
    e["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    p = subprocess.run([sys.executable, str(DRIVER), mode, "7", str(n), str(tmp_path)],
                       capture_output=True, text=True, timeout=240, env=e)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert p.stdout.strip().endswith(f"ok {n}")
