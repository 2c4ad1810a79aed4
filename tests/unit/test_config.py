"""Config loading: unknown keys, wrong types, bad choices and bad YAML fail before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

from resflow_mpi.config import (RunConfig, config_from_dict, config_reference_markdown,
                                load_config)
from resflow_mpi.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_shipped_configs_load() -> None:
    for p in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(p)
        assert isinstance(cfg, RunConfig)


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, "tiling:\n  tile_px: 256\n  tile_size: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "tiling.tile_size" in str(e.value)
    assert "valid keys" in str(e.value)


def test_unknown_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown section 'tilling'"):
        load_config(write(tmp_path, "tilling: {tile_px: 3}\n"))


@pytest.mark.parametrize("text, key, expected", [
    ("tiling: {tile_px: big}", "tiling.tile_px", "an integer"),
    ("tiling: {tile_px: true}", "tiling.tile_px", "an integer"),
    ("inference: {batch_size: 0}", "inference.batch_size", ">= 1"),
    ("parallel: {policy: random}", "parallel.policy", "one of 'static', 'dynamic'"),
    ("scenes: {bands: 3}", "scenes.bands", "a list of an integer"),
    ("models: {hash_bits: 128}", "models.hash_bits", "<= 64"),
    ("inference: {threshold: high}", "inference.threshold", "a number"),
])
def test_wrong_type_names_key_and_expectation(tmp_path: Path, text: str, key: str,
                                              expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert key in str(e.value) and expected in str(e.value)


def test_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match="halo_px"):
        config_from_dict({"tiling": {"tile_px": 64, "halo_px": 64}})
    with pytest.raises(ConfigError, match="collective needs policy=static"):
        config_from_dict({"parallel": {"policy": "dynamic", "writer": "collective"}})
    with pytest.raises(ConfigError, match="one value per band"):
        config_from_dict({"normalization": {"mode": "configured", "mean": [1.0]}})


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(write(tmp_path, "tiling:\n  tile_px: [1,\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_are_validated(tmp_path: Path) -> None:
    p = write(tmp_path, "tiling: {tile_px: 128}\n")
    assert load_config(p, ["tiling.halo_px=4"]).tiling.halo_px == 4
    with pytest.raises(ConfigError, match="tiling.halo"):
        load_config(p, ["tiling.halo=4"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["halo_px=4"])


def test_checksum_ignores_parallel_layout_but_not_tiling() -> None:
    a = config_from_dict({})
    assert a.checksum() == config_from_dict({"parallel": {"policy": "dynamic"},
                                             "inference": {"batch_size": 3}}).checksum()
    assert a.checksum() != config_from_dict({"tiling": {"tile_px": 128}}).checksum()


def test_reference_lists_every_key() -> None:
    import dataclasses
    doc = config_reference_markdown()
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(getattr(RunConfig(), section.name)):
            assert f"`{section.name}.{f.name}`" in doc
