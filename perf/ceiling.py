#!/usr/bin/env python3
"""Compute ceiling: the three networks alone on in-memory random tiles, and pipeline efficiency.

The same networks the engine runs (a gallery's CEM, hash head and bucket-0 segmenter, through
``stages.TileStages``) process random tensors of the engine's shape — ``batch_size`` tiles of
``(tile_px + 2*halo_px)`` px — with the same threads and device, no I/O, no queues, no padding of
short batches. On CPU, ``--ranks`` processes measure side by side (as the engine's ranks run), each
with ``--threads`` torch threads; the ceiling is the sum of their best tiles/s. The end-to-end rate
of a real run (``--e2e-report`` or a run made here) divided by the ceiling is the pipeline
efficiency. FLOPs are counted on one batch with torch.utils.flop_counter.FlopCounterMode.

``--arch unet --preset paper --tile-px 1000`` builds *untrained* networks of that size instead of
loading a gallery (weights are random: the speed of a network does not depend on its weights).
``--device cuda`` measures on a GPU (one process; ``--autocast``/``--compile`` as the engine's
``inference.autocast``/``inference.compile``, fp16 autocast by default on a GPU).

Outputs (in --out, default perf/results/ceiling/): ceiling.json, ceiling.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # resflow_mpi without installing
import benchkit as bk  # noqa: E402


def build_stage_models(args: argparse.Namespace, device: Any) -> tuple[Any, dict[str, Any]]:
    """The gallery's networks, or untrained ``--arch/--preset`` ones; and what they are."""
    import numpy as np
    import torch
    from resflow_mpi.stages import StageModels
    if args.arch:
        from resflow_mpi.models import (build_feature_extractor, build_hash_head,
                                        build_segmentation, count_parameters)
        torch.manual_seed(0)
        extractor = build_feature_extractor(3, embed_dim=args.embed_dim)
        head = build_hash_head(extractor.feat_ch, args.hash_bits, args.buckets)
        seg = build_segmentation(args.arch, args.preset, 3)
        rng = np.random.default_rng(0)
        centroids = np.packbits(rng.integers(0, 2, (args.buckets, args.hash_bits), dtype=np.uint8),
                                axis=1)
        seg_dev = seg.eval().to(device).to(memory_format=torch.channels_last)
        models = StageModels(extractor, head, centroids, lambda bucket: seg_dev)
        what = {"source": "untrained (random weights; speed does not depend on weights)",
                "arch": args.arch, "preset": args.preset,
                "segmenter_parameters": count_parameters(seg),
                "extractor_parameters": count_parameters(extractor),
                "hash_head_parameters": count_parameters(head)}
        return models, what
    from resflow_mpi.galleries import ModelGallery
    gallery = ModelGallery(args.gallery)
    models = gallery.stage_models(device)
    m = gallery.manifest
    what = {"source": f"gallery {args.gallery}", "arch": m.get("arch"), "preset": m.get("preset"),
            "segmenter_parameters": m["buckets"][0].get("parameters"),
            "extractor_parameters": m["extractor"].get("parameters"),
            "hash_head_parameters": m["hash_head"].get("parameters")}
    return models, what


def segment_all(stages: Any, x: Any) -> None:
    """Stage 3 on a whole batch the way the engine calls it: ``segment_batch_size`` tiles per
    call (one tile per call on CPU, the full batch on GPU)."""
    step = stages.segment_batch_size
    for i in range(0, x.shape[0], step):
        stages.segment(0, x[i:i + step])


def count_flops(stages: Any, x: Any) -> dict[str, float]:
    """FLOPs of one batch through each stage (FlopCounterMode: convolutions and matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        stages.embed_and_hash(x)
    embed_hash = float(fc.get_total_flops())
    with FlopCounterMode(display=False) as fc:
        segment_all(stages, x)
    segment = float(fc.get_total_flops())
    n = x.shape[0]
    return {"embed_hash_per_batch": embed_hash, "segment_per_batch": segment,
            "per_batch": embed_hash + segment, "per_tile": (embed_hash + segment) / n}


def measure_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One process's ceiling: best and median seconds per batch of the three stages."""
    import numpy as np
    import torch
    from resflow_mpi.stages import TileStages
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    models, what = build_stage_models(args, device)
    stages = TileStages(models, device, args.batch_size, channels_last=True, autocast=args.autocast,
                        compile_models=args.compile)
    side = args.tile_px + 2 * args.halo_px
    rng = np.random.default_rng(1)
    x = rng.random((args.batch_size, 3, side, side), dtype=np.float32)
    flops = count_flops(stages, x)
    comm = None
    if "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    for _ in range(args.warmup):
        stages.embed_and_hash(x)
        segment_all(stages, x)
    if comm is not None:
        comm.Barrier()  # every rank measures at the same time, as in a run
    batch_s, stage_s = [], []
    t_end = time.perf_counter() + args.min_seconds
    while len(batch_s) < args.min_batches or time.perf_counter() < t_end:
        before = (stages.times.embed, stages.times.hash, stages.times.segment)
        t0 = time.perf_counter()
        stages.embed_and_hash(x)
        segment_all(stages, x)  # .cpu() inside waits for the GPU
        batch_s.append(time.perf_counter() - t0)
        after = (stages.times.embed, stages.times.hash, stages.times.segment)
        stage_s.append([a - b for a, b in zip(after, before)])
    best = min(batch_s)
    res = {"rank": comm.Get_rank() if comm is not None else 0, "device": str(device),
           "threads": torch.get_num_threads() if device.type == "cpu" else None,
           "batches": len(batch_s), "best_batch_s": best,
           "median_batch_s": statistics.median(batch_s),
           "tiles_per_s_best": args.batch_size / best,
           "tiles_per_s_median": args.batch_size / statistics.median(batch_s),
           "best_stage_s_per_batch": {name: min(s[i] for s in stage_s)
                                      for i, name in enumerate(("embed", "hash", "segment"))},
           "flops": flops, "models": what}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)
    if comm is not None:
        gathered = comm.gather(res, root=0)
        if comm.Get_rank() != 0:
            return {}
        return {"per_rank": gathered}
    return {"per_rank": [res]}


def worker_args(args: argparse.Namespace, json_out: Path) -> list[str]:
    """Re-invoke this script as a measuring worker with the same settings."""
    out = [bk.PYTHON, str(Path(__file__).resolve()), "--worker", str(json_out),
           "--tile-px", str(args.tile_px), "--halo-px", str(args.halo_px),
           "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--device", args.device, "--min-seconds", str(args.min_seconds),
           "--min-batches", str(args.min_batches), "--warmup", str(args.warmup),
           "--hash-bits", str(args.hash_bits), "--embed-dim", str(args.embed_dim),
           "--buckets", str(args.buckets), "--autocast", args.autocast]
    if args.compile:
        out.append("--compile")
    if args.arch:
        out += ["--arch", args.arch, "--preset", args.preset]
    else:
        out += ["--gallery", str(args.gallery)]
    return out


def summarise(ceiling: dict[str, Any], args: argparse.Namespace,
              e2e: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Job ceiling (sum over ranks), FLOP/s, and efficiency against an end-to-end run."""
    ranks = ceiling["per_rank"]
    flops_tile = ranks[0]["flops"]["per_tile"]
    tiles_s = sum(r["tiles_per_s_best"] for r in ranks)
    px_tile = args.tile_px ** 2
    out: dict[str, Any] = {
        "models": ranks[0]["models"],
        "setting": {"tile_px": args.tile_px, "halo_px": args.halo_px,
                    "input_px": args.tile_px + 2 * args.halo_px, "batch_size": args.batch_size,
                    "device": args.device, "ranks": len(ranks), "threads_per_rank": args.threads,
                    "autocast": args.autocast, "compile": args.compile},
        "ceiling": {"tiles_per_s": tiles_s, "tiles_per_s_median":
                    sum(r["tiles_per_s_median"] for r in ranks),
                    "mpixel_per_s": tiles_s * px_tile / 1e6,
                    "gflop_per_s": tiles_s * flops_tile / 1e9},
        "flops": {"per_tile": flops_tile, "gflop_per_tile": flops_tile / 1e9,
                  **ranks[0]["flops"]},
        "per_rank": ranks,
    }
    if e2e is not None:
        computed = e2e.get("tiles_computed", e2e["tiles"])
        e2e_tiles_s = computed / e2e["wall_s"]
        st = e2e["stage_s_total"]
        compute_s_per_tile = (st["embed_s"] + st["hash_s"] + st["segment_s"]) / max(1, computed)
        ceiling_s_per_tile = statistics.mean(r["best_batch_s"] for r in ranks) / args.batch_size
        out["end_to_end"] = {
            "wall_s": e2e["wall_s"], "ranks": e2e["ranks"], "tiles_computed": computed,
            "tiles_per_s": e2e_tiles_s, "mpixel_per_s": e2e["megapixels"] / e2e["wall_s"],
            "gflop_per_s": e2e_tiles_s * flops_tile / 1e9,
            "compute_s_per_tile": compute_s_per_tile}
        out["efficiency"] = e2e_tiles_s / tiles_s
        # Compute seconds per tile in the run vs in the ceiling: <1 means padded short batches
        # (bucket queues flushed at the end) or slower kernels inside the run.
        out["compute_efficiency"] = ceiling_s_per_tile / compute_s_per_tile if compute_s_per_tile else None
        out["targets"] = [bk.target("pipeline efficiency (end to end / ceiling)", out["efficiency"], 0.8)]
    return out


def plot(result: dict[str, Any], png: Path) -> None:
    """Ceiling vs end-to-end tiles/s (and the share the end-to-end rate reaches)."""
    plt = bk.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    names, vals = ["ceiling (best)", "ceiling (median)"], [result["ceiling"]["tiles_per_s"],
                                                           result["ceiling"]["tiles_per_s_median"]]
    if "end_to_end" in result:
        names.append("end to end")
        vals.append(result["end_to_end"]["tiles_per_s"])
    ax.bar(names, vals, color=["tab:blue", "tab:cyan", "tab:orange"][:len(vals)])
    s = result["setting"]
    title = (f"{s['ranks']} x {s['device']} ({s['threads_per_rank']} thr), tile {s['tile_px']}+2x"
             f"{s['halo_px']}, batch {s['batch_size']}")
    if "efficiency" in result:
        title += f"\nefficiency {result['efficiency']:.2f}"
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("tiles/s")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=bk.default_out("ceiling"))
    p.add_argument("--gallery", default=None, help="model gallery (default: cached benchmark one)")
    p.add_argument("--arch", choices=["unet", "fcn_resnet"], default=None,
                   help="build untrained networks of this architecture instead of a gallery")
    p.add_argument("--preset", choices=["tiny", "small", "paper"], default="paper")
    p.add_argument("--hash-bits", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=32)
    p.add_argument("--buckets", type=int, default=4, help="bucket count of untrained networks")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--ranks", type=int, default=2, help="processes measuring side by side (CPU)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--autocast", choices=["auto", "none", "fp16", "bf16"], default="auto",
                   help="segmentation precision, as inference.autocast")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the segmenter (GPU), as inference.compile")
    p.add_argument("--min-seconds", type=float, default=5.0)
    p.add_argument("--min-batches", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--e2e-report", type=Path, default=None,
                   help="run_report.json of an end-to-end run with the same settings")
    p.add_argument("--no-e2e", action="store_true", help="measure the ceiling only")
    p.add_argument("--no-plot", action="store_true", help="no ceiling.png (no matplotlib needed)")
    p.add_argument("--size", type=int, default=2048, help="scene side of the end-to-end run")
    p.add_argument("--scenes", type=int, default=2, help="scenes of the end-to-end run")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        res = measure_worker(args)
        if res:
            bk.write_json(args.worker, res)
        return 0
    if args.quick:
        args.tile_px, args.halo_px, args.batch_size = 64, 8, 4
        args.size, args.scenes, args.min_seconds, args.min_batches, args.warmup = 256, 2, 0.5, 3, 1
    if args.device == "cuda":
        args.ranks = 1
    if not args.arch:
        args.gallery = str(bk.ensure_gallery(args.gallery))
    args.out.mkdir(parents=True, exist_ok=True)
    result = bk.header("ceiling", args)
    wjson = args.out / "ceiling-workers.json"
    if args.ranks > 1:
        bk.run_command([*bk.mpirun(args.ranks), *worker_args(args, wjson)],
                       env=bk.bench_env(args.threads))
    else:
        bk.run_command(worker_args(args, wjson), env=bk.bench_env(args.threads))
    ceiling = json.loads(wjson.read_text())
    e2e = None
    if args.e2e_report:
        e2e = json.loads(args.e2e_report.read_text())
        result["end_to_end_source"] = str(args.e2e_report)
    elif not args.no_e2e and not args.arch and args.device == "cpu":
        from throughput import measure
        wl = bk.make_workload(args.scenes, args.size)
        run = measure(Path(args.gallery), wl, args.out, args.ranks, args.tile_px, args.halo_px,
                      args.batch_size)
        e2e = run.report
        result["workload"] = wl.to_dict()
        result["end_to_end_source"] = run.command
    result.update(summarise(ceiling, args, e2e))
    bk.write_json(args.out / "ceiling.json", result)
    if not args.no_plot:
        plot(result, args.out / "ceiling.png")
    c = result["ceiling"]
    line = (f"[ceiling] {c['tiles_per_s']:.1f} tiles/s ({c['mpixel_per_s']:.2f} Mpx/s, "
            f"{c['gflop_per_s']:.1f} GFLOP/s, {result['flops']['gflop_per_tile']:.3f} GFLOP/tile)")
    if "efficiency" in result:
        line += (f"; end to end {result['end_to_end']['tiles_per_s']:.1f} tiles/s -> efficiency "
                 f"{result['efficiency']:.2f}")
    print(line)
    bk.print_done("ceiling", args.out / "ceiling.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
