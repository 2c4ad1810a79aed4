"""Checks before any work, shared by the engines: the gallery contract and the memory budget.

No MPI here: a runner calls :func:`preflight` on rank 0 (or the Spark driver) inside its setup,
passes the resulting config to every rank, and delivers a ConfigError to all ranks as usual.
"""
from __future__ import annotations

from typing import Any, Optional

from .budget import MemoryEstimate, check_budget, estimate_memory, model_sizes_from_manifest
from .config import RunConfig
from .galleries import ModelGallery, resolve_run_config
from .io.sysmem import available_memory_bytes, process_rss_bytes


def preflight(cfg: RunConfig, gallery: ModelGallery, *, ranks: int, ranks_per_node: int,
              device: str = "cpu", ranks_per_gpu: int = 1, gpu_total_bytes: Optional[int] = None,
              scene_bytes: Optional[int] = None) -> tuple[RunConfig, MemoryEstimate]:
    """The run config after the gallery contract (unset keys inherited, mismatches refused) and
    its memory estimate, refused when ``ranks_per_node`` such ranks do not fit this node.

    The baseline is this process's current RSS (imports done, nothing read yet); the node's
    available memory adds back what the node's ranks already hold (``ranks_per_node`` x that RSS),
    since MemAvailable no longer counts it."""
    cfg = resolve_run_config(gallery, cfg)
    rss = process_rss_bytes()
    estimate = estimate_memory(cfg, model_sizes_from_manifest(gallery.manifest), device=device,
                               ranks=ranks, scene_bytes=scene_bytes, baseline_bytes=rss)
    node = available_memory_bytes(ranks_per_node * (rss or 0))
    if node is not None:
        check_budget(estimate, ranks_per_node, node, gpu_total_bytes, ranks_per_gpu)
    return cfg, estimate


def gpu_total_bytes(device: str) -> Optional[int]:
    """Total memory of the CUDA device ``device`` ("cuda:N"), or None on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch
    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def estimate_summary(estimate: MemoryEstimate) -> dict[str, Any]:
    """What the run report and `resflow info` show."""
    return estimate.to_dict()
