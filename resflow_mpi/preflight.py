"""Checks before any work, shared by the engines: the gallery contract and the memory budget.

No MPI here: a runner calls :func:`preflight` on rank 0 (or the Spark driver) inside its setup,
passes the resulting config to every rank, and delivers a ConfigError to all ranks as usual.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

from .budget import MemoryEstimate, check_budget, estimate_memory, model_sizes_from_manifest
from .config import RunConfig
from .galleries import ModelGallery, resolve_run_config
from .io.sysmem import available_memory_bytes, process_rss_bytes


def preflight(cfg: RunConfig, gallery: ModelGallery, *, ranks: int, ranks_per_node: int,
              device: str = "cpu", ranks_per_gpu: int = 1, gpu_total_bytes: Optional[int] = None,
              scene_bytes: Optional[int] = None,
              tiles_per_rank: Optional[int] = None) -> tuple[RunConfig, MemoryEstimate]:
    """The run config after the gallery contract (unset keys inherited, mismatches refused) and
    its memory estimate, refused when ``ranks_per_node`` such ranks do not fit this node; a
    warning line on stderr when the tiles give the networks too little context.

    The baseline is this process's current RSS (imports done, nothing read yet); the node's
    available memory adds back what the node's ranks already hold (``ranks_per_node`` x that RSS),
    since MemAvailable no longer counts it. ``tiles_per_rank``: the most tiles one rank computes
    (from the scene plan), which bounds the batches held."""
    cfg = resolve_run_config(gallery, cfg)
    warning = context_warning(cfg, gallery.manifest)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    rss = process_rss_bytes()
    estimate = estimate_memory(cfg, model_sizes_from_manifest(gallery.manifest), device=device,
                               ranks=ranks, scene_bytes=scene_bytes, baseline_bytes=rss,
                               tiles_per_rank=tiles_per_rank)
    node = available_memory_bytes(ranks_per_node * (rss or 0))
    if node is not None:
        check_budget(estimate, ranks_per_node, node, gpu_total_bytes, ranks_per_gpu)
    return cfg, estimate


def context_warning(cfg: RunConfig, manifest: dict[str, Any]) -> Optional[str]:
    """Why the tiles give the segmentation networks too little context, or None: a network
    input (``tile_px + 2 halo_px``) under half the training crops the gallery's models learned
    from (``training.tile_px`` in its manifest) maps buildings with far lower IoU."""
    t = cfg.tiling
    crop = int((manifest.get("training") or {}).get("tile_px") or 0)
    side = t.tile_px + 2 * t.halo_px
    if crop and 2 * side < crop:
        return (f"tiling.tile_px={t.tile_px} + 2 x tiling.halo_px={t.halo_px} gives the networks "
                f"{side} px of context, under half the {crop} px crops the gallery's models were "
                f"trained on: masks lose accuracy; raise tiling.tile_px or tiling.halo_px so "
                f"tile_px + 2 x halo_px >= {(crop + 1) // 2}")
    return None


def planned_tiles_per_rank(tiles: int, ranks: int, policy: str) -> int:
    """The most of ``tiles`` tiles one of ``ranks`` ranks computes: its static share, or every
    tile under the dynamic policy (a rank may pull them all)."""
    return tiles if policy == "dynamic" else -(-tiles // max(1, ranks))


def gpu_total_bytes(device: str) -> Optional[int]:
    """Total memory of the CUDA device ``device`` ("cuda:N"), or None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def estimate_summary(estimate: MemoryEstimate) -> dict[str, Any]:
    """What the run report and `resflow info` show."""
    return estimate.to_dict()
