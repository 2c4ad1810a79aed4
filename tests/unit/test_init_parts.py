"""Initialisation pieces on small data: k selection, centroid codes, mAP, galleries, search."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from resflow_mpi.errors import GalleryError
from resflow_mpi.galleries import ImageGallery, ModelGallery
from resflow_mpi.init.clustering import choose_k, soft_labels
from resflow_mpi.init.hashing import bucket_of, centroid_codes, mean_average_precision
from tests.conftest import RESFLOW, env


def _blobs(true_k: int) -> np.ndarray:
    """40 points around each of ``true_k`` well-separated centres in 8 dimensions."""
    rng = np.random.default_rng(true_k)
    centres = rng.normal(0, 10, (true_k, 8))
    return np.concatenate([c + rng.normal(0, 0.5, (40, 8)) for c in centres])


@pytest.mark.parametrize("true_k", [3, 4, 6])
def test_k_selection_finds_known_cluster_count(true_k: int) -> None:
    x = _blobs(true_k)
    choice = choose_k(x, 2, 10)
    assert choice.k == true_k
    assert choice.ks == list(range(2, 11))
    assert all(a >= b for a, b in zip(choice.mean_intra_variance, choice.mean_intra_variance[1:]))
    assert len(np.unique(choice.labels)) == true_k


def test_k_min_1_one_elongated_blob_is_one_bucket() -> None:
    # One anisotropic Gaussian: every split cuts the variance a lot (the elbow rule alone picks
    # several buckets), but no more than it cuts structureless data of the same spread.
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (150, 8)) * np.array([6, 3, 2, 1, 1, 1, 1, 1])
    assert choose_k(x, 2, 6).k >= 2
    choice = choose_k(x, 1, 6)
    assert choice.k == 1 and (choice.labels == 0).all()
    assert choice.ks == list(range(1, 7)) and len(choice.mean_intra_variance) == 6
    assert choice.reference_knee_score is not None and len(choice.reference_knee_score) == 6
    assert choice.knee_score[0] == choice.reference_knee_score[0] == 1.0
    assert "k = 1" in choice.reason and "Mono only" in choice.reason
    assert choose_k(x, 1, 1).k == 1


@pytest.mark.parametrize("true_k", [2, 3, 5])
def test_k_min_1_keeps_real_clusters(true_k: int) -> None:
    x = _blobs(true_k)
    choice = choose_k(x, 1, 8)
    assert choice.k == true_k
    assert choice.k == choose_k(x, 2, 8).k
    assert choose_k(x, 2, 8).reference_knee_score is None  # k_min >= 2: the rule is unchanged


def test_soft_labels_are_distributions_peaked_on_own_cluster() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (10, 2)), rng.normal(5, 0.1, (10, 2))])
    lab = np.array([0] * 10 + [1] * 10)
    p = soft_labels(x, lab)
    assert np.allclose(p.sum(1), 1) and (p.argmax(1) == lab).all()


def test_centroid_codes_majority_and_distinct() -> None:
    bits = np.array([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0, 0, 0],
                     [0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]], np.uint8)
    packed = np.packbits(bits, axis=1)
    labels = np.array([0, 0, 0, 1, 1])
    cents = centroid_codes(packed, labels, 2, 8)
    assert np.unpackbits(cents, axis=1)[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert np.unpackbits(cents, axis=1)[1].tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    same = centroid_codes(np.packbits(bits[:3], axis=1), np.array([0, 1, 1]), 2, 8)
    assert not np.array_equal(same[0], same[1]), "buckets need distinct codes"


def test_bucket_assignment_hamming_with_ties_to_lowest() -> None:
    cents = np.packbits(np.array([[0] * 8, [1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]], np.uint8), axis=1)
    codes = np.packbits(np.array([[0, 0, 0, 0, 0, 0, 0, 1],    # nearest 0
                                  [1, 1, 1, 1, 1, 1, 1, 0],    # nearest 1
                                  [1, 1, 0, 0, 0, 0, 0, 0],    # d=2 to 0 and 2 to 2 -> 0
                                  [1, 1, 1, 1, 1, 1, 0, 0]],   # d=2 to 1 and 2 to 2 -> 1
                                 np.uint8), axis=1)
    assert bucket_of(codes, cents).tolist() == [0, 1, 0, 1]


def test_map_perfect_and_random() -> None:
    codes = np.packbits(np.array([[0] * 8] * 5 + [[1] * 8] * 5, np.uint8), axis=1)
    labels = np.array([0] * 5 + [1] * 5)
    assert mean_average_precision(codes, labels, codes, labels) == 1.0
    rng = np.random.default_rng(1)
    rand = np.packbits(rng.integers(0, 2, (200, 16)).astype(np.uint8), axis=1)
    lab = rng.integers(0, 4, 200)
    assert mean_average_precision(rand[:50], lab[:50], rand[50:], lab[50:]) < 0.5


def test_search_returns_planted_neighbours(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (500, 32)).astype(np.uint8)
    query = bits[123].copy()
    for i, flips in ((7, 1), (300, 2), (450, 3)):   # planted near copies of tile 123
        b = query.copy()
        b[:flips] ^= 1
        bits[i] = b
    codes = np.packbits(bits, axis=1)
    ImageGallery.write(tmp_path / "images.h5", codes, np.zeros(500, int),
                       np.tile([0, 0, 64, 64], (500, 1)), np.zeros((500, 4)),
                       np.zeros(500, int), 32, [{"name": "s0"}])
    hits = ImageGallery(tmp_path / "images.h5").search(codes[123], k=4)
    assert [h["tile"] for h in hits] == [123, 7, 300, 450]
    assert [h["distance"] for h in hits] == [0, 1, 2, 3]
    p = subprocess.run([RESFLOW, "search", str(tmp_path / "images.h5"), "--tile", "123", "-k", "4",
                        "--json"], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 0, p.stderr
    assert [h["tile"] for h in json.loads(p.stdout)["hits"]] == [123, 7, 300, 450]


def test_model_gallery_round_trip(tiny_gallery: Path) -> None:
    g = ModelGallery(tiny_gallery)
    g.verify()
    manifest = json.loads((tiny_gallery / "manifest.json").read_text())
    assert len(g.buckets) == manifest["summary"]["k"] >= 2
    assert 0.0 <= manifest["summary"]["hash_map"] <= 1.0
    models = g.stage_models(torch.device("cpu"))
    seg = models.segmenter(0)
    assert sum(p.numel() for p in seg.parameters()) == g.buckets[0]["parameters"]
    with torch.inference_mode():
        assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    for b in g.buckets:
        assert set(b["code"]) <= {"0", "1"} and len(b["code"]) == g.n_bits
        assert (tiny_gallery / b["file"]).is_file()
        assert b["file"] == ("mono.pt" if b.get("same_as") == "mono" else f"bucket-{b['code']}.pt")
    assert manifest["mono"]["train_tiles"] >= max(b["train_tiles"] for b in g.buckets)
    gal = ImageGallery(tiny_gallery / "images.h5")
    assert len(gal.codes) == manifest["summary"]["n_tiles"]
    crops = manifest["training_crops"]
    assert crops["used"] == manifest["summary"]["n_tiles"] == sum(
        s["taken"] for s in crops["per_scene"])
    assert crops["requested_per_scene"] == 16 and len(crops["per_scene"]) == 6
    assert all(s["label"].endswith("_mask.tif") and s["label_kind"] == "raster"
               for s in crops["per_scene"])
    assert 0 < crops["building_centred"] <= crops["used"]
    # Held out: the tiny archive has one scene per region, so each holds out a band of rows.
    val = manifest["validation"]
    assert val["unit"] == "scene" and not val["held_out_scenes"]
    assert len(val["row_split_scenes"]) == 6
    assert 0 < manifest["summary"]["n_val"] == val["held_out_crops"] < manifest["summary"]["n_tiles"]
    cut = {s["path"]: r["held_out_rows_from"] for s in gal.scenes
           for p, r in val["row_split_scenes"].items() if p == s["path"]}
    rows = gal.window[:, 1] + gal.window[:, 3]
    starts = gal.window[:, 1]
    paths = [gal.scenes[int(i)]["path"] for i in gal.scene]
    held = np.array([starts[j] >= cut[p] for j, p in enumerate(paths)])
    assert held.sum() == val["held_out_crops"]
    assert all(rows[j] <= cut[p] for j, p in enumerate(paths) if not held[j])  # no straddling
    for b in g.buckets:
        acc = b["acceptance"]
        assert acc["kept"] == (b.get("same_as") != "mono"), acc
        if acc["kept"]:
            assert acc["gain_ci"][0] > manifest["training"]["min_gain"]
            assert acc["shifted_gain_ci"][0] > manifest["training"]["min_gain"]
    assert manifest["flagged_tiles"]["model"] in ("mono", "mono-wide", "bucket")
    assert len(manifest["acceptance_table"]) == len(g.buckets) + 1


def test_untrained_fixture_gallery_loads_routes_and_searches(unit_gallery: Path) -> None:
    g = ModelGallery(unit_gallery)
    g.verify()
    assert len(g.buckets) == 2 and g.centroids.shape == (2, g.n_bits // 8)
    models = g.stage_models(torch.device("cpu"))
    with torch.inference_mode():
        for b in range(len(g.buckets)):
            assert models.segmenter(b)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 64, 64)
    mono = ModelGallery(unit_gallery).stage_models(torch.device("cpu"), bucket_override="mono")
    assert sum(p.numel() for p in mono.segmenter(1).parameters()) == g.manifest["mono"]["parameters"]
    gal = ImageGallery(unit_gallery / "images.h5")
    hits = gal.search(gal.codes[5], k=3)
    assert hits[0]["tile"] == 5 and hits[0]["distance"] == 0 and len(hits) == 3


def test_gallery_refusals(unit_gallery: Path, tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="not a model gallery"):
        ModelGallery(tmp_path)
    bad = tmp_path / "g1"
    shutil.copytree(unit_gallery, bad)
    (bad / "manifest.json").write_text("{ not json")
    with pytest.raises(GalleryError, match="corrupted manifest"):
        ModelGallery(bad)
    other = tmp_path / "g2"
    shutil.copytree(unit_gallery, other)
    with pytest.raises(GalleryError, match="the config asks for 'fcn_resnet'"):
        ModelGallery(other).stage_models(torch.device("cpu"), arch="fcn_resnet").segmenter(0)
    # Weights of another architecture under a valid checksum are refused at load time.
    m = json.loads((other / "manifest.json").read_text())
    m["buckets"][0]["spec"]["base_width"] = m["buckets"][0]["spec"].get("base_width", 8) * 2
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GalleryError, match="cannot load weights"):
        ModelGallery(other).stage_models(torch.device("cpu")).segmenter(0)
