"""No traceback reaches a user: every bad-input and bad-config case of the suite, run through the
`resflow run` command line, exits non-zero with exactly one `error:` line and no "Traceback".

The cases are those of tests/integration/test_bad_inputs.py and tests/unit/test_config.py (there
checked at the function level), plus the new cases of issues 13 and 17.
"""
from __future__ import annotations

import resource
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import yaml

from tests.conftest import RESFLOW, env, resflow
from tests.integration.test_bad_inputs import SCENE_CASES, make_cfg, scene

AS_LIMIT = 8 * 1024 ** 3  # address-space cap for cases that would allocate without the budget

# -- bad configs (tests/unit/test_config.py): YAML text, overrides, expected fragments ------------
CONFIG_CASES: list[tuple[str, str, list[str], tuple[str, ...]]] = [
    ("unknown key", "tiling:\n  tile_px: 256\n  tile_size: 3\n", [], ("unknown key 'tiling.tile_size'",)),
    ("unknown section", "tilling: {tile_px: 3}\n", [], ("unknown section 'tilling'",)),
    ("tile_px not an integer", "tiling: {tile_px: big}\n", [], ("tiling.tile_px", "an integer")),
    ("tile_px a boolean", "tiling: {tile_px: true}\n", [], ("tiling.tile_px", "an integer")),
    ("batch_size 0", "inference: {batch_size: 0}\n", [], ("inference.batch_size", ">= 1")),
    ("batch_size negative", "inference: {batch_size: -4}\n", [], ("inference.batch_size", ">= 1")),
    ("bad policy", "parallel: {policy: random}\n", [], ("parallel.policy", "one of 'static'")),
    ("bands not a list", "scenes: {bands: 3}\n", [], ("scenes.bands", "a list of an integer")),
    ("hash_bits too large", "models: {hash_bits: 128}\n", [], ("models.hash_bits", "<= 64")),
    ("threshold not a number", "inference: {threshold: high}\n", [], ("inference.threshold", "a number")),
    ("halo >= tile", "tiling: {tile_px: 64, halo_px: 64}\n", [], ("halo_px",)),
    ("collective with dynamic", "parallel: {policy: dynamic, writer: collective}\n", [],
     ("collective needs policy=static",)),
    ("mean/std per band", "normalization: {mode: configured, mean: [1.0]}\n", [], ("one value per band",)),
    ("bad YAML", "tiling:\n  tile_px: [1,\n", [], ("not valid YAML at line",)),
    ("top level not a mapping", "- 1\n- 2\n", [], ("top level must be a mapping",)),
    ("override of an unknown key", "tiling: {tile_px: 128}\n", ["tiling.halo=4"], ("tiling.halo",)),
    ("override without a section", "tiling: {tile_px: 128}\n", ["halo_px=4"], ("section.key=value",)),
    ("override with a bad value", "tiling: {tile_px: 128}\n", ["tiling.halo_px=[1"], ("not valid YAML",)),
]


def assert_one_clean_error(p, *fragments: str) -> str:
    """rc != 0, exactly one `error:` line containing the fragments, no traceback."""
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode != 0, (p.returncode, p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr[-3000:]
    for frag in fragments:
        assert frag in lines[0], lines[0]
    return lines[0]


def run_cli(cfg: Path, sets: tuple[str, ...] | list[str] = (), ranks: Optional[int] = None,
            *extra: str):
    args = ["run", str(cfg), "--quiet", "--no-report-html", *extra]
    for s in sets:
        args += ["--set", s]
    return resflow(args, ranks=ranks, check=False, timeout=300)


@pytest.mark.parametrize("name, text, sets, fragments", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(tmp_path: Path, name: str, text: str, sets: list[str],
                    fragments: tuple[str, ...]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    print(f"{name}: {assert_one_clean_error(run_cli(cfg, sets), 'c.yaml', *fragments)}")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_clean_error(run_cli(tmp_path / "nope.yaml"), "nope.yaml", "config file not found")


# Single-process bad scenes: tests/integration/test_bad_inputs.py (same cases, same one-line check).
MPI_CASES = ["missing file", "wrong band count", "all-nodata scene"]


def _mpi_case(tmp_path: Path, gallery: Path, name: str):
    _, make, sections, fragments = next(c for c in SCENE_CASES if c[0] == name)
    return run_cli(make_cfg(tmp_path, gallery, make(tmp_path), **sections), ranks=2), fragments


# Under mpirun the error is still one `error:` line (not one per rank, prefixed), no traceback.
@pytest.mark.mpi
@pytest.mark.parametrize("name", MPI_CASES)
def test_bad_scene_under_mpirun_one_line(tmp_path: Path, tiny_gallery: Path, name: str) -> None:
    p, fragments = _mpi_case(tmp_path, tiny_gallery, name)
    assert_one_clean_error(p, *fragments)


def _broken_gallery(tmp_path: Path, tiny_gallery: Path, how: str) -> tuple[Path, str]:
    gal = tmp_path / "gallery"
    shutil.copytree(tiny_gallery, gal)
    if how == "no manifest":
        (gal / "manifest.json").unlink()
        return gal, "not a model gallery"
    if how == "corrupted manifest":
        (gal / "manifest.json").write_text("{not json")
        return gal, "corrupted manifest"
    raise ValueError(how)


# (a missing bucket and a corrupted checkpoint: test_bad_inputs.py)
@pytest.mark.parametrize("how", ["no manifest", "corrupted manifest"])
def test_bad_gallery(tmp_path: Path, tiny_gallery: Path, how: str) -> None:
    gal, fragment = _broken_gallery(tmp_path, tiny_gallery, how)
    cfg = make_cfg(tmp_path, gal, [str(scene(tmp_path / "s.tif"))])
    assert_one_clean_error(run_cli(cfg), fragment)


# -- new cases of issues 13 and 17 ---------------------------------------------------------------
@pytest.mark.parametrize("override", ["tiling.tile_px=1000000000", "inference.batch_size=100000"])
def test_settings_beyond_memory_are_refused(tmp_path: Path, tiny_gallery: Path, override: str) -> None:
    cfg = make_cfg(tmp_path, tiny_gallery, [str(scene(tmp_path / "s.tif", size=64))])
    # Should the budget check ever regress, these settings really allocate: cap the address
    # space so the attempt fails fast instead of pressing the machine into the OOM killer.
    args = [RESFLOW, "run", str(cfg), "--quiet", "--no-report-html", "--set", override]
    p = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT)))
    line = assert_one_clean_error(p, "the settings need", "GiB per rank")
    assert override in line
    assert not list((tmp_path / "out").glob("*.h5")), "refused before any work"


@pytest.mark.parametrize("override, key", [("models.hash_bits=32", "models.hash_bits"),
                                           ("normalization.value_max=4095", "normalization.value_max"),
                                           ("scenes.bands=[3,2,1]", "scenes.bands")])
def test_gallery_mismatch_is_refused(tmp_path: Path, tiny_gallery: Path, override: str,
                                     key: str) -> None:
    cfg = make_cfg(tmp_path, tiny_gallery, [str(scene(tmp_path / "s.tif", size=64))])
    assert_one_clean_error(run_cli(cfg, [override]), key, "was trained with")


def test_output_dir_in_use_is_refused(tmp_path: Path, tiny_gallery: Path) -> None:
    from resflow_mpi.io.outlock import OutputLock
    cfg = make_cfg(tmp_path, tiny_gallery, [str(scene(tmp_path / "s.tif", size=64))])
    out = Path(yaml.safe_load(cfg.read_text())["output"]["dir"])
    with OutputLock(out, "resflow run other.yaml"):
        assert_one_clean_error(run_cli(cfg), f"output.dir {out} is in use by pid", "other.yaml")


def test_a_config_that_works_gives_no_error(tmp_path: Path, tiny_gallery: Path) -> None:
    """The sweep's control: the same helper on a good config exits 0 with no error line."""
    cfg = make_cfg(tmp_path, tiny_gallery, [str(scene(tmp_path / "s.tif", size=64))])
    p = run_cli(cfg)
    assert p.returncode == 0 and "error:" not in p.stderr and "Traceback" not in p.stderr, p.stderr
