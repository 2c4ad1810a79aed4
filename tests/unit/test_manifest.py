"""Scene manifests: train/predict lists with labels, relative paths, globs that never take label
files, archive.json compatibility, and one-line errors for bad manifests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import ConfigError, InputError
from resflow_mpi.io.manifest import MANIFEST_SCHEMA, load_manifest, require_labels, scenes_for
from tests.unit.test_labels import geotransform, make_scene, polygons_px, to_map, write_vector


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c"):
        make_scene(tmp_path / "img" / f"{name}.tif")
    make_scene(tmp_path / "img" / "a_mask.tif")  # a label beside a scene, by labels.pattern
    (tmp_path / "osm").mkdir()
    write_vector(tmp_path / "osm" / "b.geojson", to_map(polygons_px(), geotransform(), 4326),
                 4326)
    return tmp_path


def write_manifest(root: Path, doc: object, name: str = "scenes.yaml") -> Path:
    p = root / name
    p.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return p


def test_manifest_train_predict_labels_and_regions(files: Path) -> None:
    m = write_manifest(files, {
        "train": [{"image": "img/a.tif", "region": "north"},
                  {"image": "img/b.tif", "label": "osm/b.geojson", "where": "1 = 1"}],
        "predict": ["img/c.tif", {"image": "img/b.tif", "label": "osm/b.geojson"}]})
    cfg = config_from_dict({"scenes": {"manifest": str(m)}})
    train, predict = scenes_for(cfg, "train"), scenes_for(cfg, "predict")
    assert [Path(e.path).name for e in train] == ["a.tif", "b.tif"]
    assert train[0].label.path == str(files / "img" / "a_mask.tif")   # labels.pattern
    assert train[0].region == "north" and train[1].region == "b"
    assert train[1].label.path == str(files / "osm" / "b.geojson")
    assert train[1].label.where == "1 = 1"
    assert predict[0].label is None and predict[1].label is not None
    labelled = require_labels(scenes_for(cfg, "evaluate"), cfg)
    assert [Path(e.path).name for e in labelled] == ["b.tif"]


def test_globs_and_folders_never_take_label_files(files: Path) -> None:
    m = write_manifest(files, {"train": [{"image": "img/*.tif"}], "predict": [{"image": "img"}]},
                       "scenes.json")
    out = load_manifest(m, config_from_dict({}).labels)
    for section in ("train", "predict"):
        assert [Path(e.path).name for e in out[section]] == ["a.tif", "b.tif", "c.tif"]
    # A label named in the manifest is never a scene either.
    m2 = write_manifest(files, {"train": [{"image": "img/*.tif", "label": "img/c.tif"}]}, "m2.yaml")
    names = [Path(e.path).name for e in load_manifest(m2, config_from_dict({}).labels)["train"]]
    assert names == ["a.tif", "b.tif"]


def test_labels_file_for_every_scene_and_evaluate_without_labels(files: Path) -> None:
    m = write_manifest(files, {"predict": ["img/b.tif", "img/c.tif"]})
    cfg = config_from_dict({"scenes": {"manifest": str(m)}})
    with pytest.raises(InputError) as e:
        require_labels(scenes_for(cfg, "evaluate"), cfg)
    msg = str(e.value)
    assert "\n" not in msg and "none of the 2 scene(s) to evaluate has a label" in msg
    assert str(files / "img" / "b_mask.tif") in msg
    cfg2 = config_from_dict({"scenes": {"manifest": str(m)},
                             "labels": {"file": str(files / "osm" / "b.geojson")}})
    assert len(require_labels(scenes_for(cfg2, "evaluate"), cfg2)) == 2


def test_archive_json_as_manifest_and_as_input(tiny_archive: Path) -> None:
    entries = json.loads(tiny_archive.read_text())
    by_manifest = config_from_dict({"scenes": {"manifest": str(tiny_archive)}})
    by_inputs = config_from_dict({"scenes": {"inputs": [str(tiny_archive)], "split": "all"}})
    for purpose, split in (("train", "train"), ("predict", "test"), ("evaluate", "test")):
        want = [(str(tiny_archive.parent / e["image"]), str(tiny_archive.parent / e["mask"]),
                 e["region"]) for e in entries if e["split"] == split]
        got = [(s.path, s.label.path, s.region) for s in scenes_for(by_manifest, purpose)]
        assert got == want
        if purpose != "predict":  # run with split=all maps every scene
            got = [(s.path, s.label.path, s.region) for s in scenes_for(by_inputs, purpose)]
            assert got == want
    assert len(scenes_for(by_inputs, "predict")) == len(entries)


@pytest.mark.parametrize("doc, pattern", [
    ({"train": [{"image": "img/a.tif", "lable": "x"}]}, r"key 'train\[0\]': unknown key 'lable'"),
    ({"train": [{"label": "osm/b.geojson"}]}, r"key 'train\[0\]': 'image' is required"),
    ({"train": [{"image": 3}]}, r"key 'train\[0\]': key 'image' expected a string, got 3"),
    ({"train": "img/a.tif"}, r"'train' must be a list of scenes"),
    ({"tests": []}, r"unknown section 'tests' \(valid: train, predict\)"),
    ({"train": [], "predict": []}, r"lists no scenes"),
    (["img/a.tif"], r"archive entry \[0\] needs an 'image' path"),
])
def test_bad_manifests_are_one_line_config_errors(files: Path, doc: object, pattern: str) -> None:
    m = write_manifest(files, doc)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_manifest(m, config_from_dict({}).labels)
    assert "\n" not in str(e.value) and str(m) in str(e.value)


@pytest.mark.parametrize("doc, pattern", [
    ({"train": [{"image": "img/zzz.tif"}]},
     r"zzz.tif: scene file not found \(manifest .*train\[0\]"),
    ({"train": [{"image": "img/a.tif", "label": "osm/none.geojson"}]},
     r"none.geojson: label file not found \(manifest .*train\[0\].label\)"),
    ({"train": [{"image": "nothing/*.tif"}]}, r"matches no scene"),
])
def test_missing_files_are_input_errors(files: Path, doc: object, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        load_manifest(write_manifest(files, doc), config_from_dict({}).labels)


def test_bad_manifest_text_and_config_conflicts(files: Path) -> None:
    (files / "bad.yaml").write_text("train: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: scene manifest is not valid YAML at line"):
        load_manifest(files / "bad.yaml", config_from_dict({}).labels)
    with pytest.raises(ConfigError, match="scene manifest not found"):
        load_manifest(files / "nope.yaml", config_from_dict({}).labels)
    with pytest.raises(ConfigError, match="scenes.manifest and scenes.inputs are both set"):
        config_from_dict({"scenes": {"manifest": "m.yaml", "inputs": ["x.tif"]}})
    assert set(MANIFEST_SCHEMA["properties"]) == {"train", "predict"}
