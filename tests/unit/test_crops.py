"""Training crops: seeded random crops that may overlap, stratified on buildings, with warnings
when the request exceeds what the scenes hold; and the evaluation metrics they feed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from resflow_mpi.config import config_from_dict
from resflow_mpi.errors import InputError
from resflow_mpi.init.data import crop_warnings, open_scenes, sample_tiles
from resflow_mpi.init.metrics import baseline_counts, confusion_counts, iou, iou_f1
from resflow_mpi.io.labels import LabelSpec
from tests.unit.test_labels import geotransform, make_raster, make_scene

SIDE, CROP = 256, 32


def rare_buildings_scene(tmp_path: Path) -> tuple[list, list]:
    """A 256 px scene with three 6 px buildings, labelled 0/1 on its grid."""
    scene = make_scene(tmp_path / "rare.tif", size=(SIDE, SIDE))
    mask = np.zeros((SIDE, SIDE), np.uint8)
    for r, c in ((30, 40), (200, 60), (120, 220)):
        mask[r:r + 6, c:c + 6] = 1
    label = make_raster(tmp_path / "rare_label.tif", mask, geotransform())
    return open_scenes([str(scene)], config_from_dict({})), [LabelSpec(str(label))]


def crops(scenes: list, labels: list, per_scene: int, fraction: float, seed: int = 0,
          tile_px: int = CROP):
    cfg = config_from_dict({})
    return sample_tiles(scenes, labels, [0], tile_px, per_scene, [1, 2, 3], cfg.normalization,
                        cfg.labels, seed, fraction)


def test_crop_count_seed_and_stratification(tmp_path: Path) -> None:
    scenes, labels = rare_buildings_scene(tmp_path)
    tiles, (rep,) = crops(scenes, labels, 40, 0.5)
    assert len(tiles.x) == rep.taken == 40 and rep.building_centred == 20
    assert tiles.x.shape == (40, 3, CROP, CROP) and tiles.y.shape == (40, CROP, CROP)
    with_building = (tiles.y == 1).any(axis=(1, 2)).sum()
    assert with_building >= 20
    again, _ = crops(scenes, labels, 40, 0.5)
    assert np.array_equal(again.window, tiles.window) and np.array_equal(again.y, tiles.y)
    other, _ = crops(scenes, labels, 40, 0.5, seed=1)
    assert not np.array_equal(other.window, tiles.window)
    uniform, (urep,) = crops(scenes, labels, 40, 0.0)
    assert urep.building_centred == 0
    assert (uniform.y == 1).any(axis=(1, 2)).sum() < with_building / 2
    # Crop windows sit anywhere (not on a grid) and carry the label read at that window.
    assert (tiles.window[:, :2] % CROP != 0).any()
    assert not crop_warnings([rep], 40, CROP)


def test_warnings_when_request_exceeds_the_scenes(tmp_path: Path) -> None:
    scenes, labels = rare_buildings_scene(tmp_path)
    tiles, reps = crops(scenes, labels, 100, 0.5)
    assert len(tiles.x) == 100 and reps[0].capacity == (SIDE // CROP) ** 2
    (line,) = crop_warnings(reps, 100, CROP)
    assert line == ("training.tiles_per_scene=100 is more than 1 of 1 training scene(s) hold "
                    "without overlap (e.g. rare.tif: 64 crops of 32 px); their crops overlap "
                    "(random positions, each valid pixel in ~1.6 crops there)")
    tiles, reps = crops(scenes, labels, 5, 0.5, tile_px=300)
    assert len(tiles.x) == 0
    assert "smaller than training.tile_px=300" in crop_warnings(reps, 5, 300)[0]


def test_mostly_ignored_label_gives_fewer_crops_and_says_so(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "holes.tif", size=(SIDE, SIDE))
    mask = np.full((SIDE, SIDE), 255, np.uint8)
    mask[:40, :40] = 0
    mask[10:20, 10:20] = 1
    label = make_raster(tmp_path / "holes_label.tif", mask, geotransform())
    cfg = config_from_dict({"labels": {"max_ignore_fraction": 0.99}})
    scenes = open_scenes([str(scene)], config_from_dict({}))
    tiles, reps = sample_tiles(scenes, [LabelSpec(str(label))], [0], CROP, 12, [1, 2, 3],
                               cfg.normalization, cfg.labels, 0)
    assert 0 < len(tiles.x) < 12 and (tiles.y != 255).mean() >= 0.9
    assert any(f"only {len(tiles.x)} of 12 crops taken (" in w and "under 90% labelled" in w
               for w in crop_warnings(reps, 12, CROP))
    with pytest.raises(InputError, match="more than labels.max_ignore_fraction=0.5"):
        sample_tiles(scenes, [LabelSpec(str(label))], [0], CROP, 12, [1, 2, 3],
                     cfg.normalization, config_from_dict({}).labels, 0)
    with pytest.raises(InputError, match="training scene has no label"):
        sample_tiles(scenes, [None], [0], CROP, 12, [1, 2, 3], cfg.normalization, cfg.labels, 0)


def test_metrics_counts_and_baselines() -> None:
    truth = np.array([[1, 1, 0, 0], [0, 255, 1, 0]], np.uint8)
    pred = np.array([[1, 0, 1, 0], [0, 1, 1, 255]], np.uint8)
    c = confusion_counts(pred, truth)
    assert c == {"tp": 2, "fp": 1, "fn": 1, "tn": 2}
    assert iou_f1(c) == {"iou": 0.5, "f1": 2 / 3}
    valid = np.ones_like(truth, bool)
    valid[0, 0] = False
    assert confusion_counts(pred, truth, valid) == {"tp": 1, "fp": 1, "fn": 1, "tn": 2}
    b = baseline_counts(np.array([c[k] for k in ("tp", "fp", "fn", "tn")]))
    assert b["all_building"].tolist() == [3, 3, 0, 0]  # 3 building of 6 valid pixels
    assert float(iou(b["all_building"])) == 0.5 and float(iou(b["all_background"])) == 0.0
    assert iou_f1({"tp": 0, "fp": 0, "fn": 0, "tn": 5}) == {"iou": None, "f1": None}
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_counts(pred, truth[:1])


@pytest.mark.parametrize("labels, expected", [
    ({}, "label holds only the values 0 and 255 (1% 255); by default 1 is building and 255 is "
         "ignore, so it would train on no building at all; if 255 marks buildings set "
         "labels.values: {building: [255], background: [0]}"),
    ({"values": {"building": [1], "background": [0, 255]}},
     "none of the 16 training crops holds a building pixel"),
])
def test_init_refuses_bad_labels_before_training(tmp_path: Path, labels: dict,
                                                 expected: str) -> None:
    from tests.conftest import resflow, write_config
    scene = make_scene(tmp_path / "a.tif", size=(SIDE, SIDE))
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[100:125, 40:65] = 255
    make_raster(tmp_path / "a_buildings.tif", mask)
    cfg = write_config(tmp_path / "init.yaml", scenes={"inputs": [str(scene)], "split": "all"},
                       labels={"pattern": "{stem}_buildings.tif", **labels},
                       models={"gallery": str(tmp_path / "g")},
                       output={"dir": str(tmp_path / "out")})
    p = resflow(["init", str(cfg)], check=False, timeout=120)
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert p.returncode == 2 and len(errors) == 1 and expected in errors[0], p.stderr
    assert not (tmp_path / "g" / "manifest.json").exists()
