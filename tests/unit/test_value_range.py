"""Integer scenes whose values exceed the full scale the models expect are refused (never clipped
into saturation), and a gallery's "null" divisor means its training data type's full scale."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import InputError
from resflow_mpi.galleries import gallery_contract
from resflow_mpi.io.raster import prepare_scene
from resflow_mpi.synth import write_raster_from_array

GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)


def scene(path: Path, top: int, dtype: type = np.uint16) -> Path:
    rng = np.random.default_rng(0)
    return write_raster_from_array(path, rng.integers(1, top, (3, 128, 128)).astype(dtype),
                                   32637, GT, 0)


def test_12_bit_values_under_the_11_bit_default_are_refused(tmp_path: Path) -> None:
    s = scene(tmp_path / "twelve.tif", 4000)
    with pytest.raises(InputError, match=r"uint16 values up to 399\d .* exceed 2047"):
        prepare_scene(s, config_from_dict({}))
    info = prepare_scene(s, config_from_dict({"normalization": {"value_max": 4095}}))
    assert info.dtype == "uint16"


def test_values_within_range_pass(tmp_path: Path) -> None:
    assert prepare_scene(scene(tmp_path / "eleven.tif", 2000), config_from_dict({})).dtype == "uint16"
    assert prepare_scene(scene(tmp_path / "u8.tif", 250, np.uint8), config_from_dict({})).dtype == "uint8"


def test_inherited_training_range_refuses_other_data(tmp_path: Path) -> None:
    """A gallery trained on uint8 (value_max null) hands its 255 to a run that sets nothing: a
    uint16 scene is then refused instead of mapped clipped."""
    manifest = {"normalization": {"mode": "range", "value_max": None}, "train_dtypes": ["uint8"]}
    assert gallery_contract(manifest)["normalization.value_max"] == 255.0
    cfg = config_from_dict({"normalization": {"value_max": 255.0}})
    with pytest.raises(InputError, match="exceed 255"):
        prepare_scene(scene(tmp_path / "u16.tif", 2000), cfg)
    assert gallery_contract({"normalization": {"mode": "range", "value_max": None}})[
        "normalization.value_max"] is None  # older manifests: unknown training type, kept null
