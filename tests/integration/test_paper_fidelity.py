"""Paper fidelity end to end: k = 1 on a single-regime archive (the gallery is Mono alone and
`resflow run` maps with it), and the new architectures (SegNet, DeepLabv3) through init and run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.galleries import ModelGallery
from tests.conftest import resflow, write_config

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def single_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """archive.json of the generator's 'tiny-single' preset: one regime, six training scenes."""
    from resflow_mpi.synth import synth_archive
    return Path(synth_archive(tmp_path_factory.mktemp("single"), preset="tiny-single", seed=0))


def _mask_of(report: dict) -> np.ndarray:
    mask = [o for o in report["scenes"][0]["outputs"] if o.endswith(".resflow-mask.tif")][0]
    return gdal.Open(mask).ReadAsArray()


def test_k_min_1_on_a_single_regime_archive_is_mono_only(single_archive: Path,
                                                          tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    init_cfg = write_config(tmp_path / "init.yaml",
                            scenes={"inputs": [str(single_archive)], "split": "train"},
                            models={"gallery": str(gallery)},
                            output={"dir": str(tmp_path / "out")},
                            training={"k_min": 1, "seg_epochs": 16})
    p = resflow(["init", str(init_cfg)], ranks=2, timeout=600)
    assert "choice k = 1 from 1..6" in p.stderr and "Mono only" in p.stderr, p.stderr
    curve = json.loads((gallery / "k_selection.json").read_text())
    assert curve["chosen_k"] == 1 and curve["ks"][0] == 1
    assert len(curve["reference_knee_score"]) == len(curve["ks"]) == len(curve["mean_intra_variance"])
    assert "structureless" in curve["variance_reason"] and curve["variance_choice"] == 1
    manifest = json.loads((gallery / "manifest.json").read_text())
    assert manifest["summary"]["k"] == 1
    [bucket] = manifest["buckets"]
    assert bucket["file"] == manifest["mono"]["file"] == "mono.pt" and bucket["same_as"] == "mono"
    assert not list(gallery.glob("bucket-*.pt"))
    ModelGallery(gallery).verify()

    run_cfg = write_config(tmp_path / "run.yaml",
                           scenes={"inputs": [str(single_archive)], "split": "test"},
                           models={"gallery": str(gallery)}, output={"dir": str(tmp_path / "out")})
    resflow(["run", str(run_cfg), "--quiet"], ranks=2)
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["bucket_histogram"] == {"0": report["tiles"]} and report["tiles"] == 16
    mask = _mask_of(report)
    assert mask.shape == (256, 256) and 0 < (mask == 1).mean() < 0.9


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["segnet", "deeplabv3"])
def test_new_architectures_through_init_and_run(arch: str, single_archive: Path,
                                                 tmp_path: Path) -> None:
    gallery = tmp_path / "gallery"
    common = {"models": {"gallery": str(gallery), "arch": arch},
              "output": {"dir": str(tmp_path / "out")},
              "training": {"k_min": 2, "k_max": 2, "tiles_per_scene": 8, "cem_epochs": 2,
                           "hash_epochs": 5, "seg_epochs": 2}}
    init_cfg = write_config(tmp_path / "init.yaml",
                            scenes={"inputs": [str(single_archive)], "split": "train"}, **common)
    resflow(["init", str(init_cfg)], timeout=600)
    manifest = json.loads((gallery / "manifest.json").read_text())
    assert manifest["arch"] == arch and len(manifest["buckets"]) == 2
    assert {b["spec"]["arch"] for b in manifest["buckets"]} == {arch}
    assert manifest["mono"]["spec"]["arch"] == arch
    run_cfg = write_config(tmp_path / "run.yaml",
                           scenes={"inputs": [str(single_archive)], "split": "test"}, **common)
    resflow(["run", str(run_cfg), "--quiet"])
    report = json.loads((tmp_path / "out" / "run_report.json").read_text())
    assert report["tiles"] == 16 and sum(report["bucket_histogram"].values()) == 16
    assert _mask_of(report).shape == (256, 256)
    # A config naming another architecture is refused against this gallery.
    other = "unet"
    bad = write_config(tmp_path / "bad.yaml",
                       scenes={"inputs": [str(single_archive)], "split": "test"},
                       models={"gallery": str(gallery), "arch": other},
                       output={"dir": str(tmp_path / "out-bad")})
    p = resflow(["run", str(bad), "--quiet"], check=False)
    assert p.returncode != 0 and f'models.arch is "{other}"' in p.stderr, p.stderr
    assert f'was trained with "{arch}"' in p.stderr, p.stderr
