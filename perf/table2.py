#!/usr/bin/env python3
"""The paper's Table II on this machine: the four segmentation architectures side by side.

For each architecture at its ``paper`` preset (``--preset`` to change): parameters, training
seconds per sample (one Adam step of the project's own ``train_segmenter`` on a batch of random
tiles with random masks, divided by the batch size) and inference tiles/s (eval mode, one batch
of tiles per call, like the engine on CPU). Every timing is the median of a few repeats after
one warm-up; untrained networks are timed (speed does not depend on the weights). The paper's
figures (parameters, training s/sample on its GPUs) are printed beside ours; it reports no
inference rate per architecture.

Outputs (in --out, default perf/results/table2/): table2.json, table2.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import benchkit as bk

sys.path.insert(0, str(bk.REPO))  # time this checkout's networks, whatever is installed

# Table II of the paper (Lunga et al., RESFlow): parameters and training seconds per sample.
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "fcn_resnet": {"parameters_m": 23.5, "train_s_per_sample": 0.032},
    "unet": {"parameters_m": 13.4, "train_s_per_sample": 0.068},
    "segnet": {"parameters_m": 29.4, "train_s_per_sample": 0.076},
    "deeplabv3": {"parameters_m": 42.5, "train_s_per_sample": 0.111},
}
PAPER_NAMES = {"fcn_resnet": "ResNet50-FCN", "unet": "U-Net", "segnet": "SegNet",
               "deeplabv3": "DeepLab (v3)"}


def _sync(device: Any) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_arch(arch: str, preset: str, tile_px: int, train_batch: int, infer_batch: int,
                 repeats: int, device_name: str, seed: int = 0) -> dict[str, Any]:
    """Parameters, median training s/sample and median inference tiles/s of one architecture."""
    import numpy as np
    import torch

    from resflow_mpi.init.segtrain import train_segmenter
    from resflow_mpi.models import build_segmentation, count_parameters

    device = torch.device(device_name)
    torch.manual_seed(seed)
    model = build_segmentation(arch, preset, in_channels=3).to(device)
    model = model.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(train_batch, 3, tile_px, tile_px)).astype(np.float32)
    y = (rng.random((train_batch, tile_px, tile_px)) > 0.7).astype(np.uint8)
    train_s = []
    if device.type == "cpu":
        for step in range(repeats + 1):  # the first step (allocations, Adam state) is warm-up
            t0 = time.perf_counter()
            train_segmenter(model, x, y, steps=1, batch_size=train_batch, lr=1e-4, seed=step)
            if step:
                train_s.append(time.perf_counter() - t0)
    else:
        # train_segmenter keeps batches on the CPU; on a GPU time the same step on the device.
        from resflow_mpi.init.segtrain import AUX_LOSS_WEIGHTS, dice_bce_loss
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        xb = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
        yb = torch.from_numpy(y).float()[:, None].to(device)
        valid = torch.ones_like(yb)
        model.train()
        for step in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            outputs = model.forward_with_aux(xb) if hasattr(model, "forward_with_aux") \
                else (model(xb),)
            loss = torch.stack([w * dice_bce_loss(o, yb, valid)
                                for w, o in zip(AUX_LOSS_WEIGHTS, outputs)]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(device)
            if step:
                train_s.append(time.perf_counter() - t0)
        model.eval()
    xi = torch.from_numpy(x[:1]).repeat(infer_batch, 1, 1, 1).to(device)
    xi = xi.contiguous(memory_format=torch.channels_last)
    infer_s = []
    with torch.inference_mode():
        for step in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            model(xi)
            _sync(device)
            if step:
                infer_s.append(time.perf_counter() - t0)
    train_step_s = statistics.median(train_s)
    infer_call_s = statistics.median(infer_s)
    paper = PAPER_TABLE2.get(arch, {})
    return {"arch": arch, "name": PAPER_NAMES.get(arch, arch), "preset": preset,
            "parameters": count_parameters(model),
            "train_step_s": train_s, "train_s_per_sample": train_step_s / train_batch,
            "infer_call_s": infer_s, "infer_tiles_per_s": infer_batch / infer_call_s,
            "paper_parameters_m": paper.get("parameters_m"),
            "paper_train_s_per_sample": paper.get("train_s_per_sample")}


def markdown(rows: list[dict[str, Any]], setting: dict[str, Any]) -> str:
    """The table as Markdown, ours beside the paper's."""
    lines = [f"Tile {setting['tile_px']} px, {setting['device']} ({setting['threads']} thread(s)), "
             f"training batch {setting['train_batch']}, inference batch {setting['infer_batch']}, "
             f"median of {setting['repeats']}.", "",
             "| architecture | parameters (ours) | parameters (paper) | training s/sample (ours) "
             "| training s/sample (paper) | inference tiles/s (ours) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paper_p = f"{r['paper_parameters_m']:.1f}M" if r["paper_parameters_m"] else "-"
        paper_t = f"{r['paper_train_s_per_sample']:.3f}" if r["paper_train_s_per_sample"] else "-"
        lines.append(f"| {r['name']} (`{r['arch']}`/{r['preset']}) | {r['parameters'] / 1e6:.2f}M "
                     f"| {paper_p} | {r['train_s_per_sample']:.3f} | {paper_t} "
                     f"| {r['infer_tiles_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="fcn_resnet,unet,segnet,deeplabv3",
                    help="comma-separated architectures (paper order by default)")
    ap.add_argument("--preset", default="paper", help="preset of every architecture")
    ap.add_argument("--tile-px", type=int, default=256, help="square tile side in pixels")
    ap.add_argument("--train-batch", type=int, default=2, help="tiles per training step")
    ap.add_argument("--infer-batch", type=int, default=1, help="tiles per inference call")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="tiny presets, 32 px, 1 repeat")
    ap.add_argument("--out", default=None, help="output folder (default perf/results/table2)")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.tile_px, args.repeats = "tiny", 32, 1
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else bk.default_out("table2")
    out.mkdir(parents=True, exist_ok=True)
    setting = {"tile_px": args.tile_px, "train_batch": args.train_batch,
               "infer_batch": args.infer_batch, "repeats": args.repeats,
               "threads": torch.get_num_threads(), "device": args.device}
    rows = []
    for arch in args.archs.split(","):
        row = measure_arch(arch, args.preset, args.tile_px, args.train_batch, args.infer_batch,
                           args.repeats, args.device)
        print(f"{row['name']:>14}: {row['parameters'] / 1e6:6.2f}M parameters, "
              f"{row['train_s_per_sample']:.3f} s/sample training, "
              f"{row['infer_tiles_per_s']:.2f} tiles/s inference", file=sys.stderr, flush=True)
        rows.append(row)
    table = markdown(rows, setting)
    print(table)
    result = {**bk.header("table2", args), "setting": setting, "rows": rows,
              "table_markdown": table}
    bk.write_json(out / "table2.json", result)
    (out / "table2.md").write_text(table)
    bk.print_done("table2", out / "table2.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
