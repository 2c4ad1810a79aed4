"""The mask store records each scene's identity when laid out and refuses to resume onto a scene
file replaced since (another size, another content), in one line that says to rerun with
--restart. Real GeoTIFFs and a real HDF5 store made here."""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

from resflow_mpi.errors import OutputError
from resflow_mpi.io.maskstore import MaskStore
from resflow_mpi.io.raster import open_scene
from tests.unit.test_scene_semantics import BANDS, make_scene, pixels


def _store(h5: Path, scene: Path, restart: bool = False) -> None:
    info = open_scene(scene, BANDS)  # as a rerun opens it: from the file now at that path
    MaskStore(str(h5), [info], tile_px=32, halo_px=4, code_bytes=2, config_checksum="c",
              gallery_checksum="g", restart=restart).close()


def _refusal(h5: Path, scene: Path) -> str:
    with pytest.raises(OutputError) as e:
        _store(h5, scene)
    msg = str(e.value)
    assert "\n" not in msg and "rerun with --restart" in msg and str(scene) in msg
    return msg


def test_unchanged_scene_resumes(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "s.tif", pixels())
    _store(tmp_path / "masks.h5", scene)
    _store(tmp_path / "masks.h5", scene)  # no error: the same file


def test_scene_of_another_size_is_refused(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "s.tif", pixels())
    h5 = tmp_path / "masks.h5"
    _store(h5, scene)
    make_scene(scene, pixels(90, 120))  # replaced in place by a larger scene
    msg = _refusal(h5, scene)
    assert "scene 0" in msg and "changed since this output was started" in msg
    assert "size 100x70 px -> 120x90 px" in msg
    _store(h5, scene, restart=True)  # --restart lays the store out for the new file
    with h5py.File(h5) as f:
        assert f["scenes/0/mask"].shape == (90, 120)
    _store(h5, scene)


def test_scene_of_the_same_size_with_other_pixels_is_refused(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "s.tif", pixels())
    h5 = tmp_path / "masks.h5"
    _store(h5, scene)
    before = os.stat(scene)
    make_scene(scene, pixels(value=100))  # same size, bands, type, georeferencing
    os.utime(scene, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert os.path.getsize(scene) == before.st_size
    assert "modified " in _refusal(h5, scene)
    # even with its old modification time (copied with cp -p), the header checksum tells
    os.utime(scene, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert "header checksum differs" in _refusal(h5, scene)


def test_store_without_identity_records_is_refused(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "s.tif", pixels())
    h5 = tmp_path / "masks.h5"
    _store(h5, scene)
    with h5py.File(h5, "a") as f:
        del f["scenes/0"].attrs["source_identity"]
    assert "records no identity of scene 0" in _refusal(h5, scene)


def test_a_different_scene_list_keeps_its_own_message(tmp_path: Path) -> None:
    a = make_scene(tmp_path / "a.tif", pixels())
    b = make_scene(tmp_path / "b.tif", pixels(value=50))
    h5 = tmp_path / "masks.h5"
    _store(h5, a)
    with pytest.raises(OutputError, match="different scene 0; rerun with --restart"):
        _store(h5, b)
