"""What every engine shares: scene checks, the tile task list, output naming, export and report.

Runners only decide *where* each piece runs; these functions do the same thing under MPI, Spark
and in one process.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..config import RunConfig
from ..errors import InputError, OutputError
from ..io.export import confined, export_scene
from ..io.raster import SceneInfo, prepare_scene, resolve_scene_inputs, same_crs, tile_coverage
from ..pipeline import PipelineStats, TileTask
from ..tiling import tile_grid

H5_NAME = "masks.h5"


@dataclass
class ScenePlan:
    """Scenes that passed the checks, and those skipped (policy on_bad_scene=skip)."""

    scenes: list[SceneInfo]
    coverage: list[Optional[np.ndarray]] = field(default_factory=list)  # valid fraction per tile
    skipped: list[dict[str, str]] = field(default_factory=list)


def check_output_dir(out_dir: str) -> Path:
    """Create the output directory and prove it is writable (before any work starts)."""
    p = Path(out_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OutputError(f"{out_dir}: output directory is not writable ({exc.strerror})") from None
    return p.resolve()


def plan_scenes(cfg: RunConfig) -> ScenePlan:
    """Resolve, open and check every scene; fail or skip bad ones per scenes.on_bad_scene."""
    paths = resolve_scene_inputs(cfg.scenes.inputs, cfg.scenes.split)
    if not paths:
        raise InputError("scenes.inputs: no scenes given (set scenes.inputs in the config)")
    plan = ScenePlan([])
    ref: Optional[SceneInfo] = None
    for path in paths:
        try:
            info = prepare_scene(path, cfg)
            if ref is not None and not same_crs(ref, info):
                raise InputError(f"{path}: CRS (EPSG:{info.epsg}) differs from the first scene's "
                                 f"(EPSG:{ref.epsg}, {ref.path}); map mixed-CRS archives in "
                                 "separate runs or reproject first")
            cov = (tile_coverage(info, cfg.tiling.tile_px, cfg.scenes.bands)
                   if cfg.tiling.prescan_nodata else None)
            if cov is not None and float(cov.max()) == 0.0:
                raise InputError(f"{path}: scene is entirely nodata "
                                 f"({info.validity_text(cfg.scenes.bands)})")
            ref = ref or info
            plan.scenes.append(info)
            plan.coverage.append(cov)
        except InputError as exc:
            if cfg.scenes.on_bad_scene == "fail":
                raise
            plan.skipped.append({"path": path, "reason": str(exc)})
    if not plan.scenes:
        raise InputError(f"no usable scene among {len(paths)} (all skipped: "
                         f"{plan.skipped[0]['reason']} ...)")
    return plan


def build_tasks(plan: ScenePlan, cfg: RunConfig,
                done: Optional[Sequence[np.ndarray]] = None) -> list[TileTask]:
    """Every unfinished tile of every scene, flagged empty where the scene is all nodata."""
    t = cfg.tiling
    tasks: list[TileTask] = []
    for i, s in enumerate(plan.scenes):
        cov = plan.coverage[i].ravel() if plan.coverage[i] is not None else None
        for tile in tile_grid(i, s.width, s.height, t.tile_px, t.halo_px):
            if done is not None and done[i][tile.index]:
                continue
            tasks.append(TileTask(tile, bool(cov is not None and cov[tile.index] == 0.0)))
    return tasks


def scene_stem(info: SceneInfo, index: int) -> str:
    """A safe, unique file stem for a scene's outputs."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(info.path).stem)[:80] or "scene"
    return f"{index:04d}_{stem}"


def export_outputs(cfg: RunConfig, out_dir: Path, h5_path: str, scenes: Sequence[SceneInfo],
                   indices: Sequence[int]) -> dict[int, list[str]]:
    """Export the given (complete) scenes; skip files that already exist (resume)."""
    o = cfg.output
    done: dict[int, list[str]] = {}
    for i in indices:
        stem = scene_stem(scenes[i], i)
        mask_tif = confined(out_dir, f"{stem}_mask.tif")
        cog = confined(out_dir, f"{stem}_mask_cog.tif") if o.cog else None
        buckets = confined(out_dir, f"{stem}_buckets.tif") if o.bucket_map else None
        wanted = [p for p in (mask_tif, cog, buckets) if p is not None]
        if not o.geotiff:
            continue
        if all(p.exists() for p in wanted):
            done[i] = [str(p) for p in wanted]
            continue
        done[i] = [str(p) for p in export_scene(h5_path, i, mask_tif, cog, buckets)]
    return done


def peak_rss_mb() -> Optional[float]:
    """This process's peak resident set size (VmHWM) in MB, where /proc has it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def stats_dict(stats: PipelineStats, rank: int, wall_s: float, write_s: float,
               bytes_written: int, binding: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """One rank's figures for the run report."""
    d = asdict(stats)
    d.update({"rank": rank, "wall_s": wall_s, "write_s": write_s, "bytes_written": bytes_written,
              "binding": binding, "peak_rss_mb": peak_rss_mb()})
    return d


def write_report(out_dir: Path, cfg: RunConfig, scenes: Sequence[SceneInfo], engine: str,
                 per_rank: Sequence[dict[str, Any]], wall_s: float, complete: Sequence[int],
                 exported: dict[int, list[str]], skipped: Sequence[dict[str, str]],
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Aggregate per-rank figures into run_report.json (written atomically) and return it."""
    tiles = sum(r["tiles"] for r in per_rank)
    pixels = sum(r["pixels"] for r in per_rank)
    area = sum(r["pixels"] for r in per_rank) * (scenes[0].pixel_area_m2 if scenes else 0) / 1e6
    busy = [r["read_wait_s"] + r["embed_s"] + r["hash_s"] + r["segment_s"] + r["write_s"]
            for r in per_rank]
    per_tile = [r["tiles"] for r in per_rank]
    buckets: dict[str, int] = {}
    for r in per_rank:
        for b, n in r["buckets"].items():
            buckets[str(b)] = buckets.get(str(b), 0) + n
    report = {
        "engine": engine, "ranks": len(per_rank), "wall_s": wall_s,
        "scenes": [{"index": i, "path": s.path, "width": s.width, "height": s.height,
                    "area_km2": s.area_km2, "complete": i in complete,
                    "outputs": exported.get(i, [])} for i, s in enumerate(scenes)],
        "skipped_scenes": list(skipped),
        "tiles": tiles, "tiles_computed": sum(r["tiles_computed"] for r in per_rank),
        "megapixels": pixels / 1e6, "area_km2": area,
        "bytes_read": sum(r["bytes_read"] for r in per_rank),
        "bytes_written": sum(r["bytes_written"] for r in per_rank),
        "throughput": {"tiles_per_s": tiles / wall_s if wall_s else 0.0,
                       "mpixel_per_s": pixels / 1e6 / wall_s if wall_s else 0.0,
                       "km2_per_s": area / wall_s if wall_s else 0.0,
                       "gb_read_per_s": sum(r["bytes_read"] for r in per_rank) / 1e9 / wall_s
                       if wall_s else 0.0},
        "stage_s_total": {k: sum(r[k] for r in per_rank)
                          for k in ("read_s", "read_wait_s", "embed_s", "hash_s", "segment_s",
                                    "write_s")},
        "load_balance": {"tiles_per_rank": per_tile,
                         "busy_s_per_rank": busy,
                         "imbalance": (max(busy) / (sum(busy) / len(busy))) if busy and sum(busy) else 1.0},
        "bucket_histogram": buckets,
        "peak_rss_mb_per_rank": [r.get("peak_rss_mb") for r in per_rank],
        "per_rank": list(per_rank),
        "config": cfg.to_dict(),
        "config_checksum": cfg.checksum(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        report.update(extra)
    tmp = out_dir / "run_report.json.partial"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, out_dir / "run_report.json")
    return report


def summary_line(report: dict[str, Any]) -> str:
    """The one-paragraph summary printed at the end of a run."""
    t = report["throughput"]
    done = sum(s["complete"] for s in report["scenes"])
    return (f"{report['engine']}: {done}/{len(report['scenes'])} scene(s) complete, "
            f"{report['tiles']} tiles ({report['tiles_computed']} computed), "
            f"{report['megapixels']:.1f} Mpx = {report['area_km2']:.2f} km2 in {report['wall_s']:.1f} s "
            f"on {report['ranks']} rank(s): {t['tiles_per_s']:.1f} tiles/s, "
            f"{t['mpixel_per_s']:.2f} Mpx/s, {t['km2_per_s']:.3f} km2/s")
