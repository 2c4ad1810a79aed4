"""Property-based test of config coercion: no value of any type, set for any key in a YAML file or
with --set, reaches anything but a valid config or a one-line ConfigError."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resflow_mpi.config import SECTIONS, RunConfig, config_from_dict, load_config
from resflow_mpi.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
KEYS = sorted((section, f.name) for section, cls in SECTIONS.items()
              for f in dataclasses.fields(cls))

SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=8) | st.sampled_from(["", "null", "[1,2]", "{a: 1}", "a\nb", "8"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6) | st.integers(-3, 3), inner,
                                        max_size=3), max_leaves=8)
PROPERTY_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def _loads_or_refuses_in_one_line(load: typing.Callable[[], RunConfig]) -> None:
    try:
        cfg = load()
    except ConfigError as exc:
        text = str(exc)
        assert text and "\n" not in text and "\r" not in text, repr(text)
        assert len(text) < 600, text
        return
    assert isinstance(cfg, RunConfig)


@PROPERTY_SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_in_a_mapping_is_a_config_or_one_line_error(key: tuple[str, str],
                                                              value: Any) -> None:
    section, name = key
    _loads_or_refuses_in_one_line(lambda: config_from_dict({section: {name: value}}))


@PROPERTY_SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES, via_set=st.booleans())
def test_any_value_in_yaml_or_set_is_a_config_or_one_line_error(tmp_path: Path,
                                                                key: tuple[str, str], value: Any,
                                                                via_set: bool) -> None:
    section, name = key
    path = tmp_path / "c.yaml"
    if via_set:
        path.write_text(f"{section}: {{}}\n")
        text = json.dumps(value) if not _has_non_finite(value) else yaml.safe_dump(
            value, default_flow_style=True, width=math.inf)
        overrides = [f"{section}.{name}={text}"]
    else:
        path.write_text(yaml.safe_dump({section: {name: value}}))
        overrides = []
    _loads_or_refuses_in_one_line(lambda: load_config(path, overrides))


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


@pytest.mark.parametrize("override, expected", [
    ("labels.values=[1,2]", "key 'labels.values': expected a mapping of names to a list"),
    ("labels.values={building: 1}", "key 'labels.values'.building: expected a list of"),
    ("scenes.blank_fill_values=[[0, x]]", "scenes.blank_fill_values'[0][1]: expected a number"),
])
def test_wrong_type_via_set_names_the_key(tmp_path: Path, override: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tiling: {tile_px: 64}\n")
    with pytest.raises(ConfigError, match="^" + str(path)) as e:
        load_config(path, [override])
    assert expected in str(e.value)


def test_set_fills_a_section_left_empty(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("tiling:\n")
    assert load_config(path, ["tiling.tile_px=512"]).tiling.tile_px == 512


def test_cli_reports_the_wrong_type_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"scenes: {{inputs: [{tmp_path / 'none.tif'}]}}\n"
                    f"output: {{dir: {tmp_path / 'out'}}}\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "resflow_mpi.cli", "run", str(path), "--set",
                           "labels.values=[1,2]"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "labels.values': expected a mapping of names" in lines[0], lines
    assert not (tmp_path / "out").exists()
