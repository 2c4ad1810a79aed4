"""The evaluation protocol end to end on the tiny gallery: the unseen-regime region exists and its
tiles lie far from every training code, `resflow run` with out-of-distribution routing flags them
(bucket -2 in the HDF5 output and the bucket map, counted per scene in the run report), and
`resflow evaluate` reports every column with intervals and maps flagged tiles with the model init
chose for them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal

from resflow_mpi.synth import UNSEEN_REGIME, archive_specs, synth_archive
from tests.conftest import resflow, store_scenes, write_config

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def eval_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 'tiny-eval' preset: the tiny training scenes (the tiny gallery's), one perturbed
    known-regime test scene and two scenes of a regime no preset trains on."""
    return Path(synth_archive(tmp_path_factory.mktemp("eval"), preset="tiny-eval", seed=0))


def test_tiny_eval_trains_on_the_tiny_scenes_and_holds_out_an_unseen_regime() -> None:
    tiny = [s for s in archive_specs("tiny") if s.split == "train"]
    ev = archive_specs("tiny-eval")
    assert [s for s in ev if s.split == "train"] == tiny
    unseen = [s for s in ev if s.region == "heldout-unseen"]
    assert len(unseen) == 2 and {s.regime for s in unseen} == {UNSEEN_REGIME}
    assert UNSEEN_REGIME not in {s.regime for s in archive_specs("demo") if s.split == "train"}
    demo_regions = {}
    for s in archive_specs("demo"):
        if s.split == "test":
            demo_regions.setdefault(s.region, []).append(s)
    assert set(demo_regions) == {"heldout-perturbed", "heldout-unseen", "heldout-mix"}
    assert all(len(v) >= 4 for v in demo_regions.values())
    mix = {s.regime for s in demo_regions["heldout-mix"]}
    assert UNSEEN_REGIME in mix and len(mix) > 1


def test_run_with_routing_flags_unseen_tiles(eval_archive: Path, tiny_gallery: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "run.yaml", scenes={"inputs": [str(eval_archive)], "split": "test"},
                       models={"gallery": str(tiny_gallery)}, output={"dir": str(out)},
                       inference={"ood_routing": "embedding", "ood_quantile": 0.99})
    resflow(["run", str(cfg), "--quiet", "--no-report-html"], ranks=2)
    report = json.loads((out / "run_report.json").read_text())
    per_scene = {Path(s["path"]).stem: s for s in report["scenes"]}
    assert report["ood_tiles"] == sum(s["ood_tiles"] for s in report["scenes"]) > 0
    assert report["bucket_histogram"].get("-2", 0) == report["ood_tiles"]
    stored = store_scenes(out / "masks.h5")
    for i, s in enumerate(report["scenes"]):
        bucket = stored[i]["bucket"]
        assert int((bucket == -2).sum()) == per_scene[Path(s["path"]).stem]["ood_tiles"]
    # The unseen regime's tiles are flagged, the perturbed known regime's at most rarely (hash
    # codes alone need not tell them apart: unseen tiles may hash onto a training code).
    unseen = [v["ood_tiles"] for k, v in per_scene.items() if k.startswith("heldout-unseen")]
    assert min(unseen) > per_scene["heldout-perturbed-00"]["ood_tiles"], per_scene
    # The bucket map shows flagged tiles in white.
    bmap = next(p for p in out.glob("heldout-unseen-00*buckets.tif"))
    rgb = gdal.Open(str(bmap)).ReadAsArray()
    white = (rgb == 255).all(0).sum()
    assert white == per_scene["heldout-unseen-00"]["ood_tiles"]


def test_embedding_routing_flags_the_unseen_regime_and_keeps_known_regimes(
        eval_archive: Path, tiny_gallery: Path, tmp_path: Path) -> None:
    """ood_routing: embedding (init's reference, calibrated on held-out training windows cut as
    the run cuts them, from the held-out scenes): most tiles of a regime no bucket was trained on
    are flagged; new scenes of the trained regimes keep their bucket models; another window size
    is refused."""
    manifest = json.loads((tiny_gallery / "manifest.json").read_text())
    assert manifest["ood_reference"]["window_px"] == 64 + 2 * 8
    new_known = Path(synth_archive(tmp_path / "new", preset="tiny", seed=5))
    shares = {}
    for name, archive, split in (("eval", eval_archive, "test"), ("new", new_known, "train")):
        out = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml",
                           scenes={"inputs": [str(archive)], "split": split},
                           models={"gallery": str(tiny_gallery)}, output={"dir": str(out)},
                           inference={"ood_routing": "embedding", "ood_quantile": 0.99})
        resflow(["run", str(cfg), "--quiet", "--no-report-html"], ranks=2)
        for s in json.loads((out / "run_report.json").read_text())["scenes"]:
            tiles = -(-s["width"] // 64) * -(-s["height"] // 64)
            key = "new-known" if name == "new" else Path(s["path"]).stem.rsplit("-", 1)[0]
            shares.setdefault(key, []).append((s["ood_tiles"], tiles))
    share = {k: sum(a for a, _ in v) / sum(b for _, b in v) for k, v in shares.items()}
    print("share of tiles flagged:", share)
    assert share["heldout-unseen"] > 0.5, share
    assert share["new-known"] <= 0.1, share
    bad = resflow(["run", str(cfg), "--quiet", "--set", "tiling.halo_px=16",
                   "--set", f"output.dir={tmp_path / 'bad'}"], check=False)
    assert bad.returncode != 0
    assert "calibrated on 80 px windows" in bad.stderr and "Traceback" not in bad.stderr


def test_evaluate_routes_unseen_regime_to_mono(eval_archive: Path, tiny_gallery: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "eval"
    cfg = write_config(tmp_path / "ev.yaml", scenes={"inputs": [str(eval_archive)], "split": "test"},
                       models={"gallery": str(tiny_gallery)}, output={"dir": str(out)},
                       inference={"ood_routing": "embedding", "ood_quantile": 0.99})
    resflow(["evaluate", str(cfg)], ranks=2)
    result = json.loads((out / "evaluation.json").read_text())
    unseen, known = result["regions"]["heldout-unseen"], result["regions"]["heldout-perturbed"]
    assert unseen["tiles"] == 32 and known["tiles"] == 16
    # Most unseen tiles are flagged by their embedding score; mapped by Mono, routing costs
    # nothing against Mono there.
    assert unseen["flagged_share_per_seed"][0] > 0.5
    assert result["galleries"][0]["ood_routing"] == "embedding"
    cols = unseen["columns"]
    if result["galleries"][0]["flagged_model"] == "mono":   # flagged tiles: Mono's counts
        assert cols["resflow_routed"]["iou_mean"] >= cols["mono"]["iou_mean"] - 0.01
    for region in (unseen, known):
        assert set(region["columns"]) >= {"all_building", "all_background", "mono", "resflow",
                                          "resflow_routed"}
        lo, hi = region["columns"]["mono"]["iou_ci"]
        assert lo <= region["columns"]["mono"]["iou_mean"] <= hi
    md = (out / "evaluation.md").read_text()
    assert "heldout-unseen" in md and "RESFlow+routing" in md and "embedding scores" in md


def test_evaluate_over_two_seeds_trains_each_gallery_and_reports_the_spread(
        eval_archive: Path, tiny_gallery: Path, tmp_path: Path) -> None:
    """`--seeds 2` where models.gallery was trained with another training section: both seeds
    are trained under mpirun into <out>/seed-galleries/ (models.gallery is left byte for byte
    as it was), then every column is reported per seed with its mean and spread; a rerun reuses
    both galleries."""
    out = tmp_path / "eval"
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny_gallery, gallery)
    before = {p.name: p.read_bytes() for p in gallery.iterdir() if p.is_file()}
    cfg = write_config(tmp_path / "ev.yaml", scenes={"inputs": [str(eval_archive)], "split": "test"},
                       models={"gallery": str(gallery)}, output={"dir": str(out)},
                       training={"cem_epochs": 2, "hash_epochs": 4, "seg_epochs": 2})
    first = resflow(["evaluate", str(cfg), "--seeds", "2"], ranks=2, timeout=600)
    assert first.stderr.count("[evaluate] training seed") == 2, first.stderr
    assert {p.name: p.read_bytes() for p in gallery.iterdir() if p.is_file()} == before
    seeds = [out / "seed-galleries" / f"seed{i}" for i in (0, 1)]
    manifests = [json.loads((g / "manifest.json").read_text()) for g in seeds]
    assert [m["training"]["seed"] for m in manifests] == [0, 1]
    result = json.loads((out / "evaluation.json").read_text())
    assert result["seeds"] == 2
    for region in result["regions"].values():
        for col in ("mono", "resflow"):
            c = region["columns"][col]
            assert len(c["iou_per_seed"]) == 2
            assert c["iou_mean"] == pytest.approx(float(np.mean(c["iou_per_seed"])))
    assert "mean ± sd over seeds" in (out / "evaluation.md").read_text()
    again = resflow(["evaluate", str(cfg), "--seeds", "2"], ranks=2, timeout=600)
    assert "[evaluate] training seed" not in again.stderr
    assert json.loads((out / "evaluation.json").read_text())["regions"] == result["regions"]
