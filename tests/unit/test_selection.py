"""Model selection on held-out scenes (init.holdout, init.selection, the training recipe): which
scenes are held out, when a bucket keeps its model, which model maps flagged tiles, how k is
chosen, and the recipe's augmentation and early stopping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from resflow_mpi.init.clustering import choose_k
from resflow_mpi.init.data import TileSet
from resflow_mpi.init.holdout import plan_holdout, scene_descriptors, stratum_of
from resflow_mpi.init.segtrain import TrainingRecipe, augment_batch, train_selected
from resflow_mpi.init.selection import (choose_flagged_model, flagged_proxy, gallery_counts,
                                        judge_bucket, paired_gain)
from resflow_mpi.init.metrics import iou as summed_iou
from resflow_mpi.init.workflow import CandidateVerdict, choose_candidate, held_out_crops


def _tiles(rng: np.random.Generator, n: int, tp: int, fp: int, fn: int) -> np.ndarray:
    """(n, 4) per-tile counts around the given means (Poisson)."""
    return np.stack([rng.poisson(tp, n), rng.poisson(fp, n), rng.poisson(fn, n),
                     rng.poisson(500, n)], 1)


def test_holdout_whole_scenes_per_region_and_row_bands_for_lone_scenes() -> None:
    strata = ["a", "a", "a", "a", "a", "b", "b", "c"]
    heights = [512] * 8
    # Two looks in region a (scenes 0-2 dark, 3-4 bright): its 2 held-out scenes cover both.
    desc = np.array([[0.1], [0.12], [0.11], [0.9], [0.92], [0.5], [0.52], [0.3]])
    plan = plan_holdout(strata, heights, 0.4, 128, seed=0, descriptors=desc)
    held = set(plan.held_out_scenes)
    assert len(held & {0, 1, 2}) == 1 and len(held & {3, 4}) == 1
    assert len(held & {5, 6}) == 1                      # at least one of two, never both
    assert 7 not in held and set(plan.row_split_scenes) == {7}   # c's lone scene: a row band
    assert plan.row_split_scenes[7] == 512 - round(512 * 0.3)
    units = plan.units(8, heights)
    assert [(u.scene, u.rows, u.held_out) for u in units if u.scene == 7] == [
        (7, (0, 358), False), (7, (358, 512), True)]
    # Before descriptors exist only the row bands are planned; the same seed gives the same plan.
    early = plan_holdout(strata, heights, 0.4, 128, seed=0)
    assert early.held_out_scenes == [] and early.row_split_scenes == plan.row_split_scenes
    again = plan_holdout(strata, heights, 0.4, 128, seed=0, descriptors=desc)
    assert again.held_out_scenes == plan.held_out_scenes


def test_scenes_without_region_names_form_one_stratum() -> None:
    assert stratum_of("kampala", "/d/s1.tif") == "kampala"
    assert stratum_of("s1", "/d/s1.tif") == ""          # a manifest's default region: the stem
    assert stratum_of(None, "/d/s1.tif") == ""
    plan = plan_holdout(["", "", "", ""], [256] * 4, 0.25, 64, seed=1,
                        descriptors=np.arange(8.0).reshape(4, 2))
    assert len(plan.held_out_scenes) == 1 and not plan.row_split_scenes


def test_held_out_crops_follow_the_plan() -> None:
    plan = plan_holdout(["a", "a", "b"], [300, 300, 300], 0.2, 64, seed=0,
                        descriptors=np.zeros((3, 2)))
    scene = np.array([0, 1, 2, 2])
    rows = np.array([0, 0, 10, plan.row_split_scenes[2]])
    tiles = TileSet(np.zeros((4, 1, 2, 2), np.float32), np.zeros((4, 2, 2), np.uint8), scene,
                    np.stack([np.zeros(4, int), rows, np.full(4, 64), np.full(4, 64)], 1),
                    np.zeros((4, 4)))
    got = held_out_crops(tiles, plan)
    whole = plan.held_out_scenes[0]
    assert got.tolist() == [whole == 0, whole == 1, False, True]


def test_scene_descriptors_are_band_means_and_spreads() -> None:
    x = np.zeros((3, 2, 4, 4), np.float32)
    x[0, 0] = 1.0
    x[2, 1] = np.arange(16).reshape(4, 4)
    d = scene_descriptors(x, np.array([0, 0, 1]), 3)
    assert d[0].tolist() == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert d[1, 1] == pytest.approx(7.5) and d[2].tolist() == [0, 0, 0, 0]


def test_paired_gain_interval() -> None:
    rng = np.random.default_rng(0)
    a = _tiles(rng, 60, 80, 10, 10)
    same = paired_gain(a, a)
    assert same.gain == 0 and same.low == 0 and same.high == 0
    worse = _tiles(rng, 60, 50, 40, 40)
    g = paired_gain(a, worse)
    assert g.iou_a == pytest.approx(summed_iou(a.sum(0)))
    assert g.low > 0.2 and g.low <= g.gain <= g.high
    assert paired_gain(np.zeros((0, 4)), np.zeros((0, 4))).gain is None


def test_bucket_keeps_its_model_only_when_the_lower_bound_beats_mono() -> None:
    rng = np.random.default_rng(1)
    mono = _tiles(rng, 40, 60, 30, 30)
    better = _tiles(rng, 40, 85, 8, 8)
    assert judge_bucket(0, 50, better, mono, 0.0).kept
    assert not judge_bucket(0, 50, better, mono, 0.5).kept      # min_gain above the bound
    noisy = mono + rng.integers(-3, 4, mono.shape).clip(-mono, None)
    v = judge_bucket(1, 50, noisy, mono, 0.0)
    assert not v.kept and "not shown better" in v.reason
    few = judge_bucket(2, 50, better[:2], mono[:2], 0.0)
    assert not few.kept and "too few" in few.reason
    assert not judge_bucket(3, 3, None, mono, 0.0).kept


def test_gallery_counts_take_kept_buckets_only() -> None:
    mono = np.ones((4, 4), int)
    own = np.full((4, 4), 7)
    got = gallery_counts(np.array([0, 1, 0, 2]), {0: own}, mono)
    assert got[:, 0].tolist() == [7, 1, 7, 1]


def test_flagged_tiles_go_to_mono_unless_another_model_is_shown_better() -> None:
    rng = np.random.default_rng(2)
    mono = _tiles(rng, 30, 10, 60, 60)
    good = _tiles(rng, 30, 70, 10, 10)
    assert choose_flagged_model({"mono": mono, "bucket-01": good})[0] == "bucket-01"
    close = mono.copy()
    close[:, 0] = np.clip(close[:, 0] + rng.integers(-2, 3, len(close)), 0, None)
    choice, record = choose_flagged_model({"mono": mono, "bucket-01": close})
    assert choice == "mono" and record["chosen"] == "mono"
    flags = flagged_proxy(np.array([0.1, 5.0, 0.2, 3.0, 0.3]), share=0.4)
    assert flags.tolist() == [False, True, False, True, False]


def test_k_is_chosen_by_held_out_iou_and_a_close_choice_says_so() -> None:
    rng = np.random.default_rng(3)
    mono = _tiles(rng, 50, 60, 30, 30)
    strong = _tiles(rng, 50, 90, 5, 5)
    gain = paired_gain(strong, mono)
    a = CandidateVerdict(2, [], strong, gain)
    b = CandidateVerdict(5, [], mono, paired_gain(mono, mono))
    best, line = choose_candidate([b, a], seed=0)
    assert best.k == 2 and "close" not in line
    near = strong.copy()
    near[:, 0] = np.clip(near[:, 0] + rng.integers(-2, 3, len(near)), 0, None)
    c = CandidateVerdict(3, [], near, gain)
    best, line = choose_candidate([a, c], seed=0)
    assert "close choice" in line
    same = CandidateVerdict(4, [], mono, paired_gain(mono, mono))
    best, line = choose_candidate([same, b], seed=0)
    assert best.k == 4 and "map the held-out crops alike" in line and "close" not in line


def test_variance_curve_candidates_start_at_the_elbow() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(m, 0.1, (20, 2)) for m in (0, 3, 6)])
    choice = choose_k(x, 2, 5)
    cands = choice.candidates(3)
    assert cands[0] == choice.k and len(cands) == 3 and len(set(cands)) == 3
    score = dict(zip(choice.ks, choice.knee_score))
    assert score[cands[1]] >= score[cands[2]]            # then by falling drop ratio
    assert all(score[c] >= score[k] for c in cands[1:] for k in choice.ks
               if k not in cands and k >= 2)
    assert choice.candidates(1) == [choice.k]


def test_augmentation_keeps_shapes_and_label_values() -> None:
    rng = np.random.default_rng(0)
    x = torch.rand(4, 3, 32, 32)
    y = (torch.rand(4, 1, 32, 32) > 0.7).float()
    seen = set()
    for _ in range(20):
        xa, ya = augment_batch(x, y, rng, TrainingRecipe(augment="full"))
        assert xa.shape == x.shape and ya.shape == y.shape
        seen |= set(torch.unique(ya).tolist())
    assert seen <= {0.0, 1.0, 255.0} and {0.0, 1.0} <= seen
    xa, ya = augment_batch(x, y, rng, TrainingRecipe(augment="none"))
    assert torch.equal(xa, x) and torch.equal(ya, y)


def test_early_stopping_ends_training_after_patience_checks() -> None:
    model = torch.nn.Conv2d(1, 1, 1)
    rng = np.random.default_rng(0)
    x = rng.random((8, 1, 8, 8)).astype(np.float32)
    y = (rng.random((8, 8, 8)) > 0.5).astype(np.uint8)
    # lr 0: held-out IoU never improves after the first check, so training stops at check 1 + 2.
    fit = train_selected(model, x, y, 100, 4, 0.0, 0, x, y, val_every=5,
                         recipe=TrainingRecipe(patience=2))
    assert fit["steps_run"] == 15 and fit["best_step"] == 5
    full = train_selected(model, x, y, 20, 4, 0.0, 0, x, y, val_every=5,
                          recipe=TrainingRecipe(patience=0))
    assert full["steps_run"] == 20


def test_scene_first_bootstrap_is_wider_when_scenes_disagree() -> None:
    """Tiles of one scene share its acquisition: a gain carried by one of three scenes is not
    shown by a scene-first bootstrap although a tile bootstrap would call it certain."""
    rng = np.random.default_rng(4)
    mono = _tiles(rng, 60, 50, 30, 30)
    own = mono.copy()
    own[:20, 0] += 40                          # scene 0 gains, scenes 1 and 2 do not
    groups = np.repeat([0, 1, 2], 20)
    plain = paired_gain(own, mono)
    nested = paired_gain(own, mono, groups=groups)
    assert plain.gain == nested.gain
    assert nested.high - nested.low > 1.5 * (plain.high - plain.low)
    assert plain.low > 0 and nested.low <= plain.low


def test_report_html_shows_the_bucket_verdicts() -> None:
    from resflow_mpi.report import Quicklooks, render_html
    sel = {"buckets": [
        {"bucket": 0, "code": "0101", "train_tiles": 40, "held_out_tiles": 12, "hash_map": 0.97,
         "bucket_iou": 0.81, "mono_iou": 0.72, "gain": 0.09, "gain_ci": [0.03, 0.15],
         "kept": True},
        {"bucket": 1, "code": "1010", "train_tiles": 30, "held_out_tiles": 9, "hash_map": 0.64,
         "bucket_iou": 0.55, "mono_iou": 0.58, "gain": -0.03, "gain_ci": [-0.09, 0.02],
         "kept": False}],
        "flagged_tiles": {"model": "mono"}, "k": 2, "hash_warning": "hash held-out mAP low",
        "validation": {"held_out_scenes": ["a.tif"], "row_split_scenes": {},
                       "held_out_crops": 21}}
    html = render_html({"gallery_selection": sel}, Quicklooks(), "t")
    assert "+0.090 [+0.030, +0.150]" in html and "-0.030 [-0.090, +0.020]" in html
    assert html.count("own model") == 1 and "flagged (out-of-distribution) tiles map with mono" in html
    assert "1 whole, 0 by a band of rows; 21 held-out crops" in html
    assert "warning: hash held-out mAP low" in html
    assert "made before scene-level validation" in render_html({}, Quicklooks(), "t")


def test_a_bucket_better_only_as_acquired_maps_with_mono_and_intervals_are_family_wise() -> None:
    from resflow_mpi.init.selection import family_confidence
    rng = np.random.default_rng(5)
    mono = _tiles(rng, 40, 60, 30, 30)
    better = _tiles(rng, 40, 85, 8, 8)
    worse_shifted = _tiles(rng, 80, 40, 40, 40)
    mono_shifted = np.concatenate([mono, mono])
    v = judge_bucket(0, 50, better, mono, 0.0, shifted=(worse_shifted, mono_shifted, None))
    assert not v.kept and "not under acquisition shift" in v.reason
    ok = judge_bucket(0, 50, better, mono, 0.0,
                      shifted=(np.concatenate([better, better]), mono_shifted, None))
    assert ok.kept and ok.record()["shifted_gain"] > 0
    assert family_confidence(4) == pytest.approx(0.9875) and family_confidence(1) == 0.95
    wide = judge_bucket(0, 50, better, mono, 0.0, confidence=family_confidence(10))
    narrow = judge_bucket(0, 50, better, mono, 0.0)
    assert wide.gain.low < narrow.gain.low and wide.record()["confidence"] == 0.995
