#!/usr/bin/env python3
"""GPU end-to-end throughput without GDAL: scene on disk -> windows -> three stages -> HDF5.

For machines that have a GPU and torch + h5py but no GDAL (the lent benchmark machine has no
GDAL and no network). The scene is a raw uint8 (C, H, W) file on local disk read by window
through ``numpy.memmap`` (real disk/page-cache reads, no TIFF decoding), normalised like the
engine, pushed through the engine's own ``TileStages`` and ``BucketQueues`` (fixed-shape batches,
per-bucket queues, float16 autocast, channels-last), and the owned masks are written tile by tile
into an HDF5 dataset chunked by tile. A reader thread prefetches batches, as in the engine.
What it leaves out versus `resflow run`: DEFLATE decoding by GDAL (measure it on the CPU:
run_report.json's read_s) and MPI. Networks are untrained paper-size ones (speed does not depend
on weights). Writes gpu_e2e.json in --out.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--scene-px", type=int, default=16000)
    p.add_argument("--tile-px", type=int, default=1000)
    p.add_argument("--halo-px", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--arch", default="unet")
    p.add_argument("--preset", default="paper")
    p.add_argument("--buckets", type=int, default=6)
    p.add_argument("--hash-bits", type=int, default=32)
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="torch.compile the segmenter")
    p.add_argument("--work", default="/tmp/resflow-gpu-e2e")
    p.add_argument("--out", default="perf/results/gpu_e2e")
    p.add_argument("--procs", type=int, default=1,
                   help="processes sharing the GPU (as ranks per GPU would), tiles split cyclically")
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.procs > 1 and a.part is None:
        return run_parts(a)

    import h5py
    import torch
    from resflow_mpi.models import (build_feature_extractor, build_hash_head, build_segmentation,
                                    count_parameters)
    from resflow_mpi.stages import BucketQueues, PendingTile, StageModels, TileStages, normalize
    from resflow_mpi.tiling import tile_grid

    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    torch.backends.cudnn.benchmark = True
    # -- the scene: raw uint8 on disk, written by row strips ------------------------------------
    raw = work / f"scene_{a.scene_px}.u8"
    if not raw.exists() or raw.stat().st_size != 3 * a.scene_px ** 2:
        mm = np.lib.format.open_memmap(str(raw) + ".npy", "w+", np.uint8, (3, a.scene_px, a.scene_px))
        rng = np.random.default_rng(0)
        for r0 in range(0, a.scene_px, 1000):
            mm[:, r0:r0 + 1000] = rng.integers(1, 255, (3, min(1000, a.scene_px - r0), a.scene_px),
                                               dtype=np.uint8)
        mm.flush()
        del mm
        Path(str(raw) + ".npy").rename(raw)
    scene = np.lib.format.open_memmap(raw, "r")
    h = w = a.scene_px
    # -- networks -----------------------------------------------------------------------------
    torch.manual_seed(0)
    ext = build_feature_extractor(3)
    head = build_hash_head(ext.feat_ch, a.hash_bits, a.buckets)
    seg = build_segmentation(a.arch, a.preset, 3).eval().to(device).to(memory_format=torch.channels_last)
    cents = np.packbits(np.random.default_rng(0).integers(0, 2, (a.buckets, a.hash_bits),
                                                          dtype=np.uint8), axis=1)
    models = StageModels(ext, head, cents, lambda b: seg)
    stages = TileStages(models, device, a.batch_size, 0.5, True, True, compile_models=a.compile)
    tiles = list(tile_grid(0, w, h, a.tile_px, a.halo_px))
    me, nparts = (int(v) for v in a.part.split("/")) if a.part else (0, 1)
    tiles = tiles[me::nparts]
    # -- reader thread ------------------------------------------------------------------------
    q: "queue.Queue" = queue.Queue(maxsize=3)
    read_s = [0.0]

    def reader() -> None:
        for i in range(0, len(tiles), a.batch_size):
            t0 = time.perf_counter()
            xs = []
            for t in tiles[i:i + a.batch_size]:
                r = t.read
                arr = np.asarray(scene[:, r.row:r.row + r.height, r.col:r.col + r.width])
                top, bottom, left, right = t.pad
                if any(t.pad):
                    arr = np.pad(arr, ((0, 0), (top, bottom), (left, right)), mode="edge")
                xs.append(normalize(arr, "uint8"))
            read_s[0] += time.perf_counter() - t0
            q.put((tiles[i:i + a.batch_size], np.stack(xs)))
        q.put(None)

    f = h5py.File(work / f"masks-{me}.h5", "w")
    dset = f.create_dataset("mask", (h, w), np.uint8, chunks=(min(a.tile_px, h), min(a.tile_px, w)))
    # warm-up (cudnn autotune) on one batch, not timed
    side = a.tile_px + 2 * a.halo_px
    warm = np.zeros((a.batch_size, 3, side, side), np.float32)
    stages.embed_and_hash(warm)
    for b in range(a.buckets):  # compiles (with --compile) and autotunes every bucket's model
        stages.segment(b, warm)
    torch.cuda.synchronize() if device.type == "cuda" else None
    stages.times.embed = stages.times.hash = stages.times.segment = 0.0
    write_s = 0.0
    if nparts > 1:  # file barrier: every process starts timing when all have warmed up
        (work / f"ready-{me}").touch()
        while not (work / "go").exists():
            time.sleep(0.01)
    t_start = time.perf_counter()
    t_start_epoch = time.time()
    th = threading.Thread(target=reader, daemon=True)
    th.start()
    bq = BucketQueues(stages)
    wait_s = 0.0

    def write(done) -> float:
        t0 = time.perf_counter()
        for pt, prob in done:
            t = pt.item
            c, o = t.crop, t.owned
            m = (prob[c.row:c.row + c.height, c.col:c.col + c.width] > 0.5).astype(np.uint8)
            dset[o.row:o.row + o.height, o.col:o.col + o.width] = m
        return time.perf_counter() - t0

    n_done = 0
    while True:
        t0 = time.perf_counter()
        item = q.get()
        wait_s += time.perf_counter() - t0
        if item is None:
            break
        batch, x = item
        x = stages.on_device(x)
        _, codes, buckets = stages.embed_and_hash(x)
        pend = [PendingTile(t, xi, c, int(b)) for t, xi, c, b in zip(batch, x, codes, buckets)]
        done = list(bq.push(pend))
        write_s += write(done)
        n_done += len(done)
    done = list(bq.flush())
    write_s += write(done)
    f.close()
    wall = time.perf_counter() - t_start
    mpx = sum(t.owned.width * t.owned.height for t in tiles) / 1e6
    res = {
        "compile": a.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "scene_px": a.scene_px, "tile_px": a.tile_px,
        "halo_px": a.halo_px, "batch_size": a.batch_size, "tiles": len(tiles),
        "arch": a.arch, "preset": a.preset, "segmenter_parameters": count_parameters(seg),
        "wall_s": wall, "mpixel_per_s": mpx / wall, "tiles_per_s": len(tiles) / wall,
        "km2_per_s_at_0.5m": mpx * 0.25 / wall,
        "stage_s": {"read_thread_busy": read_s[0], "read_wait": wait_s, "embed": stages.times.embed,
                    "hash": stages.times.hash, "segment": stages.times.segment, "write": write_s},
        "paper_per_gpu_mpixel_per_s": 2.9,
        "not_included": "GDAL DEFLATE decoding and MPI (no GDAL on this machine)",
    }
    res["ratio_vs_paper_per_gpu"] = res["mpixel_per_s"] / 2.9
    res.update({"start_epoch": t_start_epoch, "end_epoch": time.time(), "mpixels": mpx})
    name = f"gpu_e2e-part{me}.json" if a.part else "gpu_e2e.json"
    (out / name).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


def run_parts(a: argparse.Namespace) -> int:
    """Start ``--procs`` copies on one GPU, release them together, aggregate their figures."""
    import subprocess
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for f in list(work.glob("ready-*")) + [work / "go"]:
        f.unlink(missing_ok=True)
    argv = [a for a in sys.argv[1:]]
    i = argv.index("--procs")
    del argv[i:i + 2]
    # The scene file is made once, before the copies start.
    subprocess.run([sys.executable, __file__, *argv, "--part", "0/1", "--scene-px", str(a.scene_px),
                    "--out", str(out / "prep")], check=True, stdout=subprocess.DEVNULL)
    (work / "go").unlink(missing_ok=True)
    for f in work.glob("ready-*"):
        f.unlink()
    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--part", f"{k}/{a.procs}"],
                              stdout=subprocess.DEVNULL) for k in range(a.procs)]
    while len(list(work.glob("ready-*"))) < a.procs:
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a copy failed")
        time.sleep(0.05)
    go = time.time()
    (work / "go").touch()
    for p in procs:
        p.wait()
    parts = [json.loads((out / f"gpu_e2e-part{k}.json").read_text()) for k in range(a.procs)]
    wall = max(q["end_epoch"] for q in parts) - go
    mpx = sum(q["mpixels"] for q in parts)
    res = {**{k: v for k, v in parts[0].items() if k not in ("stage_s", "wall_s", "tiles")},
           "procs_per_gpu": a.procs, "wall_s": wall, "mpixels": mpx, "mpixel_per_s": mpx / wall,
           "tiles_per_s": sum(q["tiles"] for q in parts) / wall,
           "km2_per_s_at_0.5m": mpx * 0.25 / wall, "ratio_vs_paper_per_gpu": mpx / wall / 2.9,
           "per_process": [{k: q[k] for k in ("tiles", "wall_s", "stage_s")} for q in parts]}
    (out / "gpu_e2e.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
