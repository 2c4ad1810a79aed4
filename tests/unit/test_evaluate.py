"""`resflow evaluate`'s arithmetic and sink, routing thresholds and the training plan, on known data:
exact IoU/F1 from known masks (real GeoTIFF ground truth), bootstrap interval coverage, the
conformal threshold rule, out-of-distribution routing on codes, Mono's fair budget."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from osgeo import gdal

from resflow_mpi.config import RunConfig, config_from_dict
from resflow_mpi.galleries import ModelGallery
from resflow_mpi.init.evaluate import (CountingSink, RegionTiles, region_tiles, summarize_region,
                                       write_evaluation)
from resflow_mpi.init.workflow import plan_training
from resflow_mpi.io.labels import LabelSpec, TruthReader
from resflow_mpi.io.maskstore import TileResult
from resflow_mpi.io.raster import prepare_scene
from resflow_mpi.stages import OOD_BUCKET, route_out_of_distribution
from resflow_mpi.tiling import tile_grid

gdal.UseExceptions()


def _truth_reader(tmp_path: Path, truth: np.ndarray) -> TruthReader:
    """A real georeferenced 3-band GeoTIFF scene and its mask GeoTIFF, read as `evaluate` does."""
    from osgeo import osr
    h, w = truth.shape
    drv = gdal.GetDriverByName("GTiff")
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    for path, arr in ((tmp_path / "s.tif", np.full((3, h, w), 90, np.uint8)),
                      (tmp_path / "s_mask.tif", truth[None])):
        ds = drv.Create(str(path), w, h, arr.shape[0], gdal.GDT_Byte)
        ds.SetGeoTransform((500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5))
        ds.SetProjection(srs.ExportToWkt())
        for b in range(arr.shape[0]):
            ds.GetRasterBand(b + 1).WriteArray(arr[b])
        ds = None
    cfg = config_from_dict({}, "<test>")
    scene = prepare_scene(str(tmp_path / "s.tif"), cfg)
    return TruthReader([scene], [LabelSpec(str(tmp_path / "s_mask.tif"))], cfg.labels)


def test_counting_sink_gives_exact_counts_against_real_truth(tmp_path: Path) -> None:
    truth = np.zeros((8, 8), np.uint8)
    truth[:4, :] = 1                 # top half buildings
    truth[7, 7] = 255                # one ignored pixel
    reader = _truth_reader(tmp_path, truth)
    tiles = list(tile_grid(0, 8, 8, 4, 0))           # four 4x4 tiles
    pred = np.zeros((8, 8), np.uint8)
    pred[:, :4] = 1                  # left half predicted
    pred[0, 0] = 255                 # one nodata prediction
    sink = CountingSink(reader, centroids=np.array([[0b10100000]], np.uint8))
    results = [TileResult(t, pred[t.owned.row:t.owned.row + 4, t.owned.col:t.owned.col + 4].copy(),
                          0, np.array([0b10100011], np.uint8)) for t in tiles]
    sink.write_results(results)
    sink.close()
    total = np.array([t[4:8] for t in sink.tiles]).sum(0)
    # valid = 64 - 2; TP: top-left quarter minus (0,0) = 15; FP: bottom-left = 16;
    # FN: top-right = 16; TN: bottom-right minus (7,7) = 15.
    assert total.tolist() == [15, 16, 16, 15]
    assert {t[3] for t in sink.tiles} == {2}          # Hamming distance of the code to bucket 0


def _record(scene: int, index: int, bucket: int, dist: int, c: tuple[int, int, int, int]) -> tuple:
    return (scene, index, bucket, dist, *c)


def test_known_counts_give_known_iou_f1_baselines_and_routing(tmp_path: Path) -> None:
    regions = ["R"]
    # Two tiles. RESFlow: tp 10 fp 5 fn 5 / tp 0 fp 10 fn 10; Mono: tp 8 fp 2 fn 7 / tp 6 fp 1 fn 4.
    per_pass = {
        "resflow": [_record(0, 0, 0, 1, (10, 5, 5, 80)), _record(0, 1, 1, 9, (0, 10, 10, 80))],
        "mono": [_record(0, 0, 0, 0, (8, 2, 7, 83)), _record(0, 1, 0, 0, (6, 1, 4, 89))],
    }
    tiles = region_tiles(per_pass, regions, thresholds=np.array([3, 3]))
    r = tiles["R"]
    assert r.flagged.tolist() == [False, True]           # tile 1 is 9 bits from its centroid
    assert r.counts["resflow_routed"].tolist() == [[10, 5, 5, 80], [6, 1, 4, 89]]
    result = write_evaluation(tmp_path, [tiles], [{"seed": 0, "k": 2, "hash_map": 1.0,
                                                   "bucket_mode": "finetune", "mono_budget": "total",
                                                   "mono_val_iou": None, "gallery": "g"}], 0.99,
                              samples=200)
    cols = result["regions"]["R"]["columns"]
    assert cols["resflow"]["iou_mean"] == pytest.approx(10 / 40)
    assert cols["resflow"]["f1_mean"] == pytest.approx(20 / 50)
    assert cols["mono"]["iou_mean"] == pytest.approx(14 / 28)
    assert cols["resflow_routed"]["iou_mean"] == pytest.approx(16 / 31)
    positives, negatives = 8 + 7 + 6 + 4, 2 + 83 + 1 + 89
    assert cols["all_building"]["iou_mean"] == pytest.approx(positives / (positives + negatives))
    assert cols["all_background"]["iou_mean"] == 0.0
    assert result["regions"]["R"]["flagged_share_per_seed"] == [0.5]
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["regions"]["R"]["columns"]["mono"]["iou_mean"] == pytest.approx(0.5)
    md = (tmp_path / "evaluation.md").read_text()
    assert "| R | 2 |" in md and "RESFlow+routing" in md and "All-background" in md


def test_bootstrap_interval_covers_the_truth() -> None:
    """Tiles drawn from a known population: the 95 % interval holds the population IoU in
    (about) 95 % of repeated samples."""
    rng = np.random.default_rng(1)
    n_pop = 20000
    pos = rng.integers(0, 400, n_pop)
    tp = rng.binomial(pos, 0.7)
    fp = rng.binomial(4096 - pos, 0.03)
    pop = np.stack([tp, fp, pos - tp, 4096 - pos - fp], 1)
    truth = pop[:, 0].sum() / pop[:, :3].sum()
    covered = 0
    trials = 60
    for t in range(trials):
        sample = pop[rng.integers(0, n_pop, 150)]
        region = RegionTiles([(0, i) for i in range(150)], {"mono": sample},
                             np.zeros(150, bool), np.zeros(150, int))
        lo, hi = summarize_region([region], samples=400)["columns"]["mono"]["iou_ci"]
        assert lo < hi
        covered += lo <= truth <= hi
    assert covered >= 0.85 * trials, f"interval covered the truth in {covered}/{trials} samples"


def test_seed_spread_is_reported() -> None:
    a = RegionTiles([(0, 0), (0, 1)], {"mono": np.array([[5, 5, 0, 90], [5, 0, 5, 90]])},
                    np.zeros(2, bool), np.zeros(2, int))
    b = RegionTiles([(0, 0), (0, 1)], {"mono": np.array([[10, 0, 0, 90], [10, 0, 0, 90]])},
                    np.zeros(2, bool), np.zeros(2, int))
    col = summarize_region([a, b], samples=100)["columns"]["mono"]
    assert col["iou_per_seed"] == [pytest.approx(0.5), pytest.approx(1.0)]
    assert col["iou_mean"] == pytest.approx(0.75)
    assert col["iou_sd"] == pytest.approx(np.std([0.5, 1.0], ddof=1))


def test_ood_thresholds_follow_the_conformal_quantile(tmp_path: Path) -> None:
    manifest = {"format_version": 1, "hash_head": {"n_bits": 8}, "extractor": {}, "buckets": [
        {"code": "00000000", "distance_histogram": [90, 5, 3, 1, 1, 0, 0, 0, 0]},   # n = 100
        {"code": "11111111", "distance_histogram": [3, 0, 0, 1, 0, 0, 0, 0, 0]},    # n = 4
        {"code": "11110000", "distance_histogram": [0] * 9}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    g = ModelGallery(tmp_path)
    # q = 0.95: the ceil(0.95 * 101) = 96th smallest distance is 2 (95 tiles lie within 1);
    # q = 0.99: the 100th is 4; the 4-tile bucket takes its largest (3); an empty one never flags.
    assert g.ood_thresholds(0.95).tolist() == [2, 3, 8]
    assert g.ood_thresholds(0.99).tolist() == [4, 3, 8]
    assert g.ood_thresholds(0.5).tolist() == [0, 0, 8]


def test_route_out_of_distribution_flags_only_far_codes() -> None:
    centroids = torch.tensor([[0b00000000], [0b11111111]], dtype=torch.uint8)
    codes = torch.tensor([[0b00000001], [0b00000111], [0b11111110], [0b11110000]],
                         dtype=torch.uint8)
    buckets = torch.tensor([0, 0, 1, 0])
    routed = route_out_of_distribution(codes, centroids, buckets, torch.tensor([2, 0]))
    # distances to own centroid: 1, 3, 1, 4 against thresholds 2, 2, 0, 2
    assert routed.tolist() == [0, OOD_BUCKET, OOD_BUCKET, OOD_BUCKET]


def _cfg(**training: object) -> RunConfig:
    return config_from_dict({"training": {"seg_epochs": 4, "batch_size": 10, **training}}, "<test>")


def test_mono_gets_the_total_budget_and_small_buckets_fall_back_to_mono() -> None:
    train_buckets = np.array([0] * 40 + [1] * 40 + [2] * 3 + [3] * 17)     # 100 tiles, 10 steps/epoch
    codes = ["00", "01", "10", "11"]
    plan = plan_training(_cfg(min_bucket_tiles=8), [(4, train_buckets, codes)])
    assert plan.too_small == {4: [2]}
    jobs = {j.name: j for j in plan.jobs}
    assert set(jobs) == {"bucket-00", "bucket-01", "bucket-11", "mono"}
    assert jobs["bucket-00"].key == "k4-bucket-00" and jobs["mono"].key == "mono"
    assert plan.base_steps == 20 and jobs["bucket-00"].steps == 20 and jobs["bucket-00"].from_base
    # Mono: base + 3 x 20 steps = the base plus every bucket model's own steps.
    assert jobs["mono"].steps == 3 * 20
    # Balanced over two ranks: Mono alone, the three buckets on the other rank.
    assert [j.name for j in plan.jobs_of(0, 2)] == ["mono"]
    assert len(plan.jobs_of(1, 2)) == 3
    paper = plan_training(_cfg(bucket_mode="paper", mono_wide_preset="small"),
                          [(4, train_buckets, codes)])
    pj = {j.name: j for j in paper.jobs}
    assert paper.base_steps == 0 and not pj["bucket-00"].from_base and pj["bucket-00"].steps == 40
    assert pj["mono"].steps == 3 * 40 and pj["mono-wide"].preset == "small"
    one = plan_training(_cfg(mono_budget="bucket"), [(4, train_buckets, codes)])
    assert {j.name: j.steps for j in one.jobs}["mono"] == 20
    # Two candidate bucket counts: every candidate's bucket models, Mono with the larger budget.
    two = plan_training(_cfg(min_bucket_tiles=8),
                        [(4, train_buckets, codes), (2, (train_buckets > 1).astype(int), ["0", "1"])])
    keys = {j.key for j in two.jobs}
    assert keys == {"k4-bucket-00", "k4-bucket-01", "k4-bucket-11", "k2-bucket-0", "k2-bucket-1",
                    "mono"}
    assert {j.key: j.steps for j in two.jobs}["mono"] == 3 * 20


def test_flagged_tiles_take_the_flagged_models_counts(tmp_path: Path) -> None:
    per_pass = {
        "resflow": [_record(0, 0, 0, 1, (10, 5, 5, 80)), _record(0, 1, 1, 9, (0, 10, 10, 80))],
        "mono": [_record(0, 0, 0, 0, (8, 2, 7, 83)), _record(0, 1, 0, 0, (6, 1, 4, 89))],
        "flagged": [_record(0, 0, 0, 0, (9, 1, 1, 89)), _record(0, 1, 0, 0, (7, 0, 3, 90))],
    }
    r = region_tiles(per_pass, ["R"], thresholds=np.array([3, 3]))["R"]
    assert r.counts["resflow_routed"].tolist() == [[10, 5, 5, 80], [7, 0, 3, 90]]


def test_training_scenes_are_found_by_real_path(tmp_path: Path, unit_fixtures: dict[str, Path]) -> None:
    """The unit gallery's images.h5 lists scene.tif as its training scene: reached through a
    symlinked folder it is still found; another scene is not; no images.h5 is None."""
    from resflow_mpi.init.evaluate import training_scenes_among
    cfg = config_from_dict({}, "<test>")
    linked = tmp_path / "linked"
    linked.symlink_to(unit_fixtures["scene"].parent)
    other = tmp_path / "other.tif"
    other.write_bytes(unit_fixtures["scene"].read_bytes())
    scenes = [prepare_scene(str(p), cfg) for p in (other, linked / unit_fixtures["scene"].name)]
    assert training_scenes_among(unit_fixtures["gallery"], scenes) == [1]
    assert training_scenes_among(tmp_path, scenes) is None
