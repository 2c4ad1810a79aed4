"""Smoke test of the perf/ studies: `perf/run_all.py --quick` on tiny workloads writes every JSON
with every field, plus the pure helpers that turn reports into rates and speed-ups.

No timing asserts: on a shared 2-core machine the numbers mean nothing, their presence does.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, env

PERF = REPO / "perf"
sys.path.insert(0, str(PERF))

SPARK_READY = importlib.util.find_spec("pyspark") is not None and shutil.which("java") is not None

# JSON file -> dotted paths that must exist in it (list items checked through their first element).
REQUIRED: dict[str, list[str]] = {
    "throughput/throughput.json": [
        "study", "command", "machine.cpu", "machine.cores", "machine.date", "workload.gigabytes",
        "workload.area_km2", "run.wall_s", "run.command_wall_s",
        *(f"end_to_end.{k}" for k in ("wall_s", "tiles", "megapixels", "area_km2", "gb_read",
                                      "mpixel_per_s", "tiles_per_s", "km2_per_s", "gb_per_s")),
        *(f"stages_total.{s}.{k}" for s in ("read", "embed", "hash", "segment", "write", "export")
          for k in ("s_sum", "s_max", "mpixel_per_s", "tiles_per_s")),
        "slowest_stage", "per_rank.rank", "per_rank.end_to_end.km2_per_s",
        *(f"per_rank.stages.{s}.mpixel_per_s" for s in ("read", "embed", "hash", "segment", "write",
                                                         "export")),
        "per_rank.share_of_wall.segment", "load_balance.imbalance"],
    "ceiling/ceiling.json": [
        "models.source", "models.segmenter_parameters", "setting.input_px", "setting.batch_size",
        "ceiling.tiles_per_s", "ceiling.tiles_per_s_median", "ceiling.mpixel_per_s",
        "ceiling.gflop_per_s", "flops.per_tile", "flops.segment_per_batch",
        "per_rank.best_batch_s", "per_rank.best_stage_s_per_batch.segment",
        "end_to_end.tiles_per_s", "end_to_end.gflop_per_s", "efficiency", "compute_efficiency",
        "targets.name"],
    "scaling/scaling-strong.json": [
        "mode", "runs.ranks", "runs.wall_s", "runs.command_wall_s", "runs.gb", "runs.km2",
        "runs.speedup", "runs.efficiency", "runs.baseline_ranks", "table_markdown", "targets.met"],
    "scaling/scaling-weak.json": [
        "mode", "runs.ranks", "runs.wall_s", "runs.per_rank_gb", "runs.per_rank_km2",
        "runs.speedup", "runs.efficiency", "table_markdown"],
    "tile_size/tile_size.json": [
        "workload.megapixels", "rows.tile_px", "rows.tiles_per_s", "rows.gb_per_s", "rows.km2_per_s",
        "rows.halo_overhead", "best_tile_px_by_km2_per_s"],
    "side_by_side/side_by_side.json": [
        "cores", "mpi.wall_s", "mpi.command_wall_s", "naive.wall_s", "naive.command_wall_s",
        "naive.tiles", "spark", "speedup.mpi_vs_spark", "speedup.mpi_vs_naive",
        "speedup.mpi_vs_naive_in_process", "agreement.naive_vs_mpi.agreement",
        "agreement.naive_vs_mpi.nodata_mismatch", "agreement.spark_vs_mpi", "targets.goal"],
    "paper_scale/paper_scale.json": [
        "scene.width_px", "scene.area_km2", "generation.seconds", "run.wall_s",
        "run.command_wall_s", "run.throughput.km2_per_s", "peak_rss_per_rank.vmhwm_kb",
        "verification.iou_pooled", "verification.windows.iou",
        "paper_comparison.paper_serial_s", "paper_comparison.full_size_s_projected",
        "paper_comparison.this_setup", "full_size_estimate_s.mapping"],
    "h5_write/h5_write.json": [
        "ranks", "mask.gigabytes", "mask.tiles",
        *(f"variants.{v}.{k}" for v in ("collective", "independent", "gather", "sequential")
          for k in ("best_s", "median_s", "gb_per_s")),
        "ratios.collective_vs_sequential", "ratios.gather_vs_sequential",
        "ratios.collective_vs_gather", "targets.met"],
}


def lookup(data: Any, dotted: str) -> Any:
    """Follow a dotted path; lists are entered through their first element."""
    for key in dotted.split("."):
        if isinstance(data, list):
            assert data, f"empty list before '{key}' in {dotted}"
            data = data[0]
        assert isinstance(data, dict) and key in data, f"missing '{dotted}' (at '{key}')"
        data = data[key]
    return data


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory, tiny_gallery: Path) -> tuple[Path, Any]:
    """`perf/run_all.py --quick` once, workloads and outputs under a temporary folder."""
    out = tmp_path_factory.mktemp("perf")
    e = env()
    e["RESFLOW_PERF_CACHE"] = str(out / "cache")
    cmd = [sys.executable, str(PERF / "run_all.py"), "--quick", "--gallery", str(tiny_gallery),
           "--out", str(out / "quick")] + ([] if SPARK_READY else ["--no-spark"])
    proc = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=900)
    return out / "quick", proc


def test_run_all_quick_runs_every_study(quick_run: tuple[Path, Any]) -> None:
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["studies"]) == {"throughput", "ceiling", "scaling", "tile_size",
                                       "side_by_side", "paper_scale", "h5_write"}
    assert all(s["status"] == "ok" for s in summary["studies"].values())
    assert "## Targets" in (out / "summary.md").read_text()


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_study_json_has_every_field(quick_run: tuple[Path, Any], name: str) -> None:
    out, _ = quick_run
    data = json.loads((out / name).read_text())
    for dotted in REQUIRED[name]:
        lookup(data, dotted)
    pngs = list((out / name).parent.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def test_targets_are_judged_consistently(quick_run: tuple[Path, Any]) -> None:
    out, _ = quick_run
    targets = json.loads((out / "summary.json").read_text())["targets"]
    assert len(targets) == 5
    for t in targets:
        assert t["met"] is None if t["value"] is None else t["met"] == (t["value"] >= t["goal"])


def test_naive_baseline_agrees_with_engine(quick_run: tuple[Path, Any]) -> None:
    out, _ = quick_run
    agreement = json.loads((out / "side_by_side/side_by_side.json").read_text())["agreement"]
    naive = agreement["naive_vs_mpi"]
    assert naive["nodata_mismatch"] == 0  # the quick scene has a nodata collar
    assert naive["agreement"] >= 0.99


@pytest.mark.spark
@pytest.mark.skipif(not SPARK_READY, reason="pyspark or Java is missing")
def test_spark_side_by_side_ran_and_matches_mpi(quick_run: tuple[Path, Any]) -> None:
    out, _ = quick_run
    data = json.loads((out / "side_by_side/side_by_side.json").read_text())
    assert "error" not in data["spark"], data["spark"].get("error")
    assert data["spark"]["tiles"] == data["mpi"]["tiles"]
    assert data["agreement"]["spark_vs_mpi"]["identical"] is True


def test_scaling_merge_rebuilds_the_table(quick_run: tuple[Path, Any], tmp_path: Path) -> None:
    out, _ = quick_run
    src = out / "scaling/scaling-strong.json"
    proc = subprocess.run([sys.executable, str(PERF / "scaling.py"), "--mode", "strong", "--merge",
                           str(src), "--out", str(tmp_path)], env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads((tmp_path / "scaling-strong.json").read_text())
    assert merged["table_markdown"] == json.loads(src.read_text())["table_markdown"]


def test_throughput_job_rate_uses_slowest_rank() -> None:
    from throughput import analyse_report
    rank = {"tiles": 10, "tiles_computed": 10, "pixels": 1_000_000, "bytes_read": 3_000_000,
            "wall_s": 4.0, "read_s": 1.0, "read_wait_s": 0.1, "embed_s": 0.5, "hash_s": 0.1,
            "segment_s": 2.0, "write_s": 0.5, "export_s": 0.2}
    report = {"wall_s": 4.0, "ranks": 2, "tiles": 20, "tiles_computed": 20, "megapixels": 2.0,
              "area_km2": 0.5, "bytes_read": 6_000_000, "load_balance": {},
              "per_rank": [{**rank, "rank": 0}, {**rank, "rank": 1, "segment_s": 4.0}]}
    res = analyse_report(report)
    assert res["per_rank"][0]["stages"]["segment"]["mpixel_per_s"] == pytest.approx(0.5)
    assert res["stages_total"]["segment"]["mpixel_per_s"] == pytest.approx(2.0 / 4.0)
    assert res["end_to_end"]["km2_per_s"] == pytest.approx(0.125)
    assert res["slowest_stage"] == "segment"


def test_scaling_speedups_against_smallest_rank_count() -> None:
    from scaling import add_speedups
    col = ("1 x 1024px", 1024)
    strong = add_speedups("strong", [{"ranks": 1, "column": col, "wall_s": 10.0},
                                     {"ranks": 2, "column": col, "wall_s": 6.25}])
    assert strong[1]["speedup"] == pytest.approx(1.6) and strong[1]["efficiency"] == pytest.approx(0.8)
    weak = add_speedups("weak", [{"ranks": 1, "column": col, "wall_s": 10.0},
                                 {"ranks": 2, "column": col, "wall_s": 12.5}])
    assert weak[1]["efficiency"] == pytest.approx(0.8) and weak[1]["speedup"] == pytest.approx(1.6)
