"""The gallery is the contract: a run config that differs from what the gallery was trained with is
refused before work (one line naming the key and both values); unset values come from the gallery."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from resflow_mpi.config import RunConfig, explicit_keys, load_config
from resflow_mpi.errors import ConfigError
from resflow_mpi.galleries import (ModelGallery, check_run_config, gallery_contract,
                                   resolve_run_config)
from tests.conftest import write_config

# (override, key named in the error, the run's value as shown, the gallery's value as shown)
MISMATCHES = [
    ("normalization.value_max=4095", "normalization.value_max", "4095.0", "255.0"),
    ("normalization.mode=scene", "normalization.mode", '"scene"', '"range"'),
    ("scenes.bands=[3,2,1]", "scenes.bands", "[3, 2, 1]", "[1, 2, 3]"),
    ("models.hash_bits=32", "models.hash_bits", "32", "16"),
    ("models.embed_dim=64", "models.embed_dim", "64", "32"),
    ("models.arch=fcn_resnet", "models.arch", '"fcn_resnet"', '"unet"'),
    ("models.preset=small", "models.preset", '"small"', '"tiny"'),
    ("scenes.gsd_m=0.5", "scenes.gsd_m", "0.5", "null (each scene at its own pixel size)"),
]


def cfg_file(tmp_path: Path, gallery: Path) -> Path:
    return write_config(tmp_path / "run.yaml", models={"gallery": str(gallery)},
                        output={"dir": str(tmp_path / "out")})


def test_manifest_records_the_contract(tiny_gallery: Path) -> None:
    c = gallery_contract(ModelGallery(tiny_gallery).manifest)
    assert c == {"scenes.bands": [1, 2, 3], "normalization.mode": "range",
                 "normalization.value_max": 255.0, "normalization.mean": [],
                 "normalization.std": [], "models.hash_bits": 16, "models.embed_dim": 32,
                 "models.arch": "unet", "models.preset": "tiny", "scenes.gsd_m": None}


def test_the_training_config_passes(tmp_path: Path, tiny_gallery: Path) -> None:
    cfg = load_config(cfg_file(tmp_path, tiny_gallery))
    check_run_config(ModelGallery(tiny_gallery), cfg)
    resolved = resolve_run_config(ModelGallery(tiny_gallery), cfg)
    # trained with value_max null on uint8 scenes: the run inherits that full scale, nothing else
    assert cfg.normalization.value_max is None and resolved.normalization.value_max == 255.0
    assert dataclasses.replace(resolved, normalization=cfg.normalization) == cfg


@pytest.mark.parametrize("override, key, mine, theirs", MISMATCHES, ids=[m[1] for m in MISMATCHES])
def test_explicit_mismatch_is_one_clear_error(tmp_path: Path, tiny_gallery: Path, override: str,
                                              key: str, mine: str, theirs: str) -> None:
    cfg = load_config(cfg_file(tmp_path, tiny_gallery), [override])
    gallery = ModelGallery(tiny_gallery)
    for check in (check_run_config, resolve_run_config):
        with pytest.raises(ConfigError) as e:
            check(gallery, cfg)
        msg = str(e.value)
        assert msg == (f"{key} is {mine} but the gallery {tiny_gallery} was trained with {theirs}: "
                       "remove the setting (the run then uses the gallery's value) or retrain the "
                       "gallery with `resflow init`"), msg
        assert "\n" not in msg


def test_configured_normalisation_compares_mean_and_std(tmp_path: Path, tiny_gallery: Path) -> None:
    cfg = load_config(cfg_file(tmp_path, tiny_gallery),
                      ["normalization.mode=configured", "normalization.mean=[1,2,3]",
                       "normalization.std=[4,5,6]"])
    manifest = dict(ModelGallery(tiny_gallery).manifest)
    manifest["normalization"] = {"mode": "configured", "value_max": None,
                                 "mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.5]}
    with pytest.raises(ConfigError, match=r"^normalization.std is \[4.0, 5.0, 6.0\] but the "
                                          r"gallery <gallery> was trained with \[4.0, 5.0, 6.5\]"):
        check_run_config(manifest, cfg)
    manifest["normalization"]["std"] = [4.0, 5.0, 6.0]
    check_run_config(manifest, cfg)


def test_several_mismatches_are_counted_in_one_line(tmp_path: Path, tiny_gallery: Path) -> None:
    cfg = load_config(cfg_file(tmp_path, tiny_gallery), ["models.hash_bits=32", "models.embed_dim=8"])
    with pytest.raises(ConfigError, match=r"models.hash_bits is 32 .* \(and 1 more: "
                                          r"models.embed_dim\)"):
        check_run_config(ModelGallery(tiny_gallery), cfg)


def test_unset_values_are_inherited_from_the_gallery(tmp_path: Path, tiny_gallery: Path) -> None:
    # hash_bits (default 32) and the normalisation are not set: the gallery's 16 bits apply.
    p = tmp_path / "bare.yaml"
    p.write_text(yaml.safe_dump({"models": {"gallery": str(tiny_gallery)},
                                 "output": {"dir": str(tmp_path / "out")}}))
    cfg = load_config(p)
    assert cfg.models.hash_bits == 32 and "models.hash_bits" not in (explicit_keys(cfg) or ())
    with pytest.raises(ConfigError, match="models.hash_bits is 32"):
        check_run_config(ModelGallery(tiny_gallery), cfg)  # the strict check alone refuses
    resolved = resolve_run_config(ModelGallery(tiny_gallery), cfg)
    assert resolved.models.hash_bits == 16
    assert resolved.normalization == dataclasses.replace(cfg.normalization, value_max=255.0)
    assert explicit_keys(resolved) == explicit_keys(cfg)
    # A --set of the same key is explicit: refused, not overridden.
    with pytest.raises(ConfigError, match="models.hash_bits is 32"):
        resolve_run_config(ModelGallery(tiny_gallery), load_config(p, ["models.hash_bits=32"]))


def test_inherited_mode_brings_its_values(tmp_path: Path, tiny_gallery: Path) -> None:
    manifest = dict(ModelGallery(tiny_gallery).manifest)
    manifest["normalization"] = {"mode": "range", "value_max": 4095.0, "mean": [], "std": []}
    cfg = load_config(cfg_file(tmp_path, tiny_gallery))
    assert resolve_run_config(manifest, cfg).normalization.value_max == 4095.0


def test_config_built_in_code_inherits_nothing(tiny_gallery: Path) -> None:
    cfg = RunConfig()
    assert explicit_keys(cfg) is None
    with pytest.raises(ConfigError, match="models.hash_bits is 32 but the gallery"):
        resolve_run_config(ModelGallery(tiny_gallery), cfg)


def test_null_divisor_of_an_unrecorded_type_accepts_no_number(tmp_path: Path,
                                                               unit_fixtures: dict) -> None:
    """A gallery trained with value_max null that does not record its data type (written before
    train_dtypes): an explicit value_max cannot be checked, so it is refused with the way out."""
    gallery = ModelGallery(unit_fixtures["gallery"])
    assert "train_dtypes" not in gallery.manifest
    assert gallery_contract(gallery.manifest)["normalization.value_max"] is None
    cfg = load_config(cfg_file(tmp_path, unit_fixtures["gallery"]), ["normalization.value_max=255"])
    with pytest.raises(ConfigError, match="a training data type it does not record: remove the "
                                          "setting .* to map float scenes, retrain"):
        resolve_run_config(gallery, cfg)
    resolve_run_config(gallery, load_config(cfg_file(tmp_path, unit_fixtures["gallery"])))
