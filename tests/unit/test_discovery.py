"""Scene discovery (io/discovery.py): which files are scenes, identity by real path, VRTs over
listed scenes, and the differential test: scenes.inputs and a manifest listing the same items
give the same scenes, notes, scene count and area. Every case uses real GDAL files made here."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from osgeo import gdal

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import InputError
from resflow_mpi.io.discovery import resolve_scene_inputs
from resflow_mpi.io.manifest import load_manifest, require_labels, scenes_for
from resflow_mpi.io.naming import mark_output_dir, output_file_name
from resflow_mpi.pipeline import plan_scenes
from tests.unit.test_scene_semantics import make_scene, pixels


# -- rules --------------------------------------------------------------------------------------
def test_scene_identity_by_real_path(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    x = make_scene(a / "x.tif", pixels())
    (tmp_path / "link.tif").symlink_to(x)
    notes: list[str] = []
    got = resolve_scene_inputs([str(x), str(a / ".." / "a" / "x.tif"), str(tmp_path / "link.tif")],
                               notes=notes)
    assert got == [os.path.realpath(x)]
    assert len(notes) == 2 and all("mapped once" in n and str(x) in n for n in notes)
    # a directory with the same file: still once
    assert resolve_scene_inputs([str(a), str(tmp_path / "link.tif")], notes=notes) == got


def test_directory_named_like_a_file_has_its_own_message(tmp_path: Path) -> None:
    (tmp_path / "x.tif").mkdir()
    real = make_scene(tmp_path / "real.tif", pixels())
    for inputs in ([str(tmp_path / "x.tif")], [str(real), str(tmp_path / "x.tif")],
                   [str(tmp_path / "*.tif")]):
        with pytest.raises(InputError, match=r"x.tif: is a directory, not a scene file"):
            resolve_scene_inputs(inputs)


def test_discovery_skips_labels_and_outputs(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    scene = make_scene(inp / "s.tif", pixels())
    for name in ("s_mask.tif", "s_labels.tif", "0000_s_mask_cog.tif", "0000_s_buckets.tif",
                 output_file_name("s", "mask"), output_file_name("s", "buckets"),
                 output_file_name("s", "mask-cog"), "s.tif.msk", "s.tif.ovr"):
        shutil.copy(scene, inp / name)
    (inp / "s.tif.aux.xml").write_text("<PAMDataset/>")
    out = inp / "out"  # an output directory inside the input folder
    (out / "quicklooks").mkdir(parents=True)
    mark_output_dir(out)
    shutil.copy(scene, out / "anything.tif")
    shutil.copy(scene, out / "quicklooks" / "q.tif")
    want = [os.path.realpath(scene)]
    labels = [str(inp / "s_labels.tif")]
    assert resolve_scene_inputs([str(inp)], exclude=labels) == want
    assert resolve_scene_inputs([str(inp / "*.tif")], exclude=labels) == want
    assert resolve_scene_inputs([str(inp / "*")], exclude=labels) == want
    assert resolve_scene_inputs([str(inp / "**" / "*.tif")], exclude=labels) == want
    # output.dir == the input folder: the names (not the marker) tell outputs from scenes
    mark_output_dir(inp)
    assert resolve_scene_inputs([str(inp)], exclude=labels) == want
    only_outputs = tmp_path / "only"
    only_outputs.mkdir()
    shutil.copy(scene, only_outputs / output_file_name("s", "mask"))
    with pytest.raises(InputError, match="no scene found"):
        resolve_scene_inputs([str(only_outputs)])


def test_an_output_named_explicitly_is_refused(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "s.tif", pixels())
    out = tmp_path / output_file_name("s", "buckets")  # 3-band RGB: it would open as a scene
    shutil.copy(scene, out)
    with pytest.raises(InputError, match=r"s.resflow-buckets.tif: is a resflow output, never a "
                                         r"scene \(scenes.inputs\); list the scene it was made"):
        resolve_scene_inputs([str(scene), str(out)])


def test_a_vrt_over_listed_scenes_is_dropped_with_a_note(tmp_path: Path) -> None:
    a = make_scene(tmp_path / "a.tif", pixels())
    b = make_scene(tmp_path / "b.tif", pixels())
    other = tmp_path / "elsewhere"
    other.mkdir()
    c = make_scene(other / "c.tif", pixels())
    gdal.BuildVRT(str(tmp_path / "a.vrt"), [str(a)]).FlushCache()
    notes: list[str] = []
    got = resolve_scene_inputs([str(tmp_path)], notes=notes)
    assert got == [str(a), str(b)]
    assert notes == [f"note: {tmp_path / 'a.vrt'} only reads {a}, listed too; mapped once, "
                     "from the listed file"]
    # listed first, the VRT is still the one dropped
    assert resolve_scene_inputs([str(tmp_path / "a.vrt"), str(a)], notes=[]) == [str(a)]
    # a mosaic over a listed scene and one that is not: kept, with a warning
    gdal.BuildVRT(str(tmp_path / "mosaic.vrt"), [str(b), str(c)]).FlushCache()
    notes = []
    got = resolve_scene_inputs([str(b), str(tmp_path / "mosaic.vrt")], notes=notes)
    assert got == [str(b), str(tmp_path / "mosaic.vrt")]
    assert len(notes) == 1 and notes[0].startswith("warning: ") and "mapped (and counted) twice" \
        in notes[0]
    # two VRTs over one scene that is not listed: both kept, the second with a warning
    gdal.BuildVRT(str(other / "c1.vrt"), [str(c)]).FlushCache()
    gdal.BuildVRT(str(other / "c2.vrt"), [str(c)]).FlushCache()
    notes = []
    got = resolve_scene_inputs([str(other / "c1.vrt"), str(other / "c2.vrt")], notes=notes)
    assert len(got) == 2 and len(notes) == 1
    assert notes[0].startswith(f"warning: {other / 'c2.vrt'} reads {c} (through "
                               f"{other / 'c1.vrt'})")


def test_custom_label_pattern_is_never_a_scene(tmp_path: Path) -> None:
    a = make_scene(tmp_path / "a.tif", pixels())
    make_scene(tmp_path / "a_gt.tif", pixels())
    cfg = config_from_dict({"scenes": {"inputs": [str(tmp_path)]},
                            "labels": {"pattern": "{stem}_gt.tif"}})
    entries = scenes_for(cfg, "predict", notes=[])
    assert [(e.path, e.label.path) for e in entries] == [(str(a), str(tmp_path / "a_gt.tif"))]
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"predict": ["."]}))
    assert load_manifest(m, cfg.labels, notes=[])["predict"] == entries


# -- the manifest's own rules -------------------------------------------------------------------
def test_manifest_scene_listed_twice_with_two_regions_is_an_error(tmp_path: Path) -> None:
    make_scene(tmp_path / "s.tif", pixels())
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"predict": [{"image": "s.tif", "region": "north"},
                                             {"image": "./s.tif", "region": "south"}]}))
    with pytest.raises(InputError) as e:
        load_manifest(m, config_from_dict({}).labels)
    msg = str(e.value)
    assert "\n" not in msg and "s.tif: listed twice with different meanings" in msg
    assert "predict[0]: region 'north'" in msg and "predict[1]: region 'south'" in msg


def test_manifest_scene_in_train_and_predict_warns_at_evaluate(tmp_path: Path) -> None:
    s = make_scene(tmp_path / "s.tif", pixels())
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"train": ["s.tif"], "predict": ["s.tif"]}))
    cfg = config_from_dict({"scenes": {"manifest": str(m)}})
    notes: list[str] = []
    assert [e.path for e in scenes_for(cfg, "predict", notes)] == [str(s)]
    assert notes == []  # mapping a training scene is fine
    scenes_for(cfg, "evaluate", notes)
    assert len(notes) == 1 and notes[0].startswith(f"warning: {s} is listed under both train: "
                                                   "and predict:") and "not held-out" in notes[0]


# -- differential: manifest vs scenes.inputs on the same folders --------------------------------
@pytest.fixture()
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """data/img with scenes S, T, a (+ a.vrt over a.tif), S's label and outputs; a symlinked
    folder to it; the working directory (and the manifest) in work/."""
    img = tmp_path / "data" / "img"
    img.mkdir(parents=True)
    for name, w in (("S", 100), ("T", 80), ("a", 60)):
        make_scene(img / f"{name}.tif", pixels(70, w))
    gdal.BuildVRT(str(img / "a.vrt"), [str(img / "a.tif")]).FlushCache()
    shutil.copy(img / "S.tif", img / "S_mask.tif")
    for kind in ("mask", "mask-cog", "buckets"):
        shutil.copy(img / "S.tif", img / output_file_name("S", kind))
    (tmp_path / "linked").symlink_to(img, target_is_directory=True)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


# items -> (scene names, notes: duplicates dropped, VRTs over listed scenes dropped)
CASES = {
    "dot-dot and dot": (["../data/img/S.tif", "./../data/img/../img/S.tif"], ["S"], (1, 0)),
    "symlinked folder": (["../data/img/S.tif", "../linked/S.tif", "../linked"], ["S", "T", "a"],
                         (2, 1)),
    "folder with outputs, label and a VRT": (["../data/img"], ["S", "T", "a"], (0, 1)),
    "glob with outputs": (["../linked/*"], ["S", "T", "a"], (0, 1)),
    "a.tif + a.vrt named": (["../data/img/a.vrt", "../linked/a.tif"], ["a"], (0, 1)),
    "everything": (["../data/img/S.tif", "./../data/img/../img/S.tif", "../linked/S.tif",
                    "../data/img", "../linked/*.tif", "../data/img/a.vrt"], ["S", "T", "a"],
                   (7, 1)),
}


def _note_kinds(notes: list[str]) -> tuple[int, int]:
    return (sum("mapped once" in n and "only reads" not in n for n in notes),
            sum("only reads" in n for n in notes))


@pytest.mark.parametrize("items, names, notes", CASES.values(), ids=CASES.keys())
def test_manifest_and_inputs_discover_the_same_scenes(folders: Path, items: list[str],
                                                      names: list[str],
                                                      notes: tuple[int, int]) -> None:
    m = folders / "work" / "m.yaml"
    m.write_text(yaml.safe_dump({"predict": items}))
    by_manifest = config_from_dict({"scenes": {"manifest": str(m)}})
    by_inputs = config_from_dict({"scenes": {"inputs": items, "split": "all"}})
    notes_m: list[str] = []
    notes_i: list[str] = []
    got_m = scenes_for(by_manifest, "predict", notes_m)
    got_i = scenes_for(by_inputs, "predict", notes_i)
    assert got_m == got_i  # paths, labels and regions
    img = os.path.realpath(folders / "data" / "img")
    assert [e.path for e in got_m] == [os.path.join(img, f"{n}.tif") for n in names]
    assert [e.region for e in got_m] == names
    assert [e.label.path if e.label else None for e in got_m] == \
        [os.path.join(img, "S_mask.tif") if n == "S" else None for n in names]
    # the same drops, each noted on one line (a manifest names its paths as resolved against
    # its folder, so the texts differ where the items are relative)
    assert _note_kinds(notes_m) == _note_kinds(notes_i) == notes
    assert len(notes_m) == sum(notes) and all("\n" not in n for n in notes_m)


def test_plan_counts_each_scene_once(folders: Path) -> None:
    """run (plan: scenes, area), init (train scenes) and evaluate (labelled scenes) each see
    every scene once, however often it is listed."""
    items = CASES["everything"][0]
    m = folders / "work" / "m.yaml"
    m.write_text(yaml.safe_dump({"train": items, "predict": items}))
    by_manifest = config_from_dict({"scenes": {"manifest": str(m)}})
    assert len(scenes_for(by_manifest, "train", [])) == 3
    labelled = require_labels(scenes_for(by_manifest, "evaluate", []), by_manifest)
    assert [Path(e.path).name for e in labelled] == ["S.tif"]
    for scenes in ({"manifest": str(m)}, {"inputs": items, "split": "all"}):
        plan = plan_scenes(config_from_dict({"scenes": scenes}))
        assert sorted(Path(s.path).name for s in plan.scenes) == ["S.tif", "T.tif", "a.tif"]
        # each scene once: three 0.5 m scenes' ground area (UTM scale factor: within 0.1 %)
        assert sum(s.area_km2 for s in plan.scenes) == pytest.approx(70 * (100 + 80 + 60) * 0.25
                                                                     / 1e6, rel=1e-3)


def test_gdal_virtual_paths_are_kept_as_written(tmp_path: Path) -> None:
    url = "/vsicurl/https://example.org/scenes//a.tif?token=x"
    assert resolve_scene_inputs([url, url], notes=[]) == [url]
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"predict": [url]}))
    assert [e.path for e in load_manifest(m, config_from_dict({}).labels)["predict"]] == [url]
