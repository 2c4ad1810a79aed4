"""Segmentation training for the model gallery (pure torch: arrays in, trained module out)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import add_counts, confusion_counts, iou_f1

# Loss weight of each training output: the main logits, then an auxiliary head's.
AUX_LOSS_WEIGHTS = (1.0, 0.5)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over valid pixels (nodata excluded)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * valid).sum() / valid.sum().clamp(min=1)
    p = torch.sigmoid(logits) * valid
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + (target * valid).sum() + 1)
    return bce + dice


def photometric_jitter(x: torch.Tensor, rng: np.random.Generator, gain: float = 0.15,
                       offset: float = 0.06, noise: float = 0.02) -> torch.Tensor:
    """Per-sample, per-band gain/offset and noise: the acquisition differences (sensor, haze,
    season) between scenes of one bucket and unseen scenes, so narrow bucket models do not
    overfit the exact radiometry of their training scenes."""
    n, c = x.shape[:2]
    g = torch.from_numpy(rng.uniform(1 - gain, 1 + gain, (n, c, 1, 1)).astype(np.float32))
    o = torch.from_numpy(rng.uniform(-offset, offset, (n, c, 1, 1)).astype(np.float32))
    z = torch.from_numpy(rng.normal(0, noise, x.shape).astype(np.float32))
    return x * g + o + z


def train_segmenter(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int,
                    lr: float, seed: int, augment: bool = True,
                    after_step: Optional[Callable[[int], None]] = None,
                    dp: Optional[Any] = None) -> list[float]:
    """``steps`` Adam steps on random batches (flips/rot90 augmentation); returns the loss curve.
    ``after_step(step)`` (1-based) runs after each step; the model is back in train mode after.
    ``dp`` (init.dataparallel.DataParallel): every rank draws the same augmented batch and
    computes its share of it; the ranks' gradients are summed before each step."""
    if len(x) == 0 or steps <= 0:
        return []
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    model.train()
    curve = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), size=min(batch_size, max(2, len(x))))
        xb = torch.from_numpy(x[idx])
        yb = torch.from_numpy(y[idx]).float()[:, None]
        if augment:
            k = int(rng.integers(0, 4))
            xb, yb = torch.rot90(xb, k, (2, 3)), torch.rot90(yb, k, (2, 3))
            if rng.random() < 0.5:
                xb, yb = xb.flip(3), yb.flip(3)
            xb = photometric_jitter(xb, rng)
        n_batch = len(xb)
        if dp is not None:
            mine = dp.share(n_batch)
            xb, yb = xb[mine], yb[mine]
        valid = (yb != 255).float()
        target = (yb == 1).float()
        xb = xb.contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        loss_value = 0.0
        if len(xb):
            # Networks with auxiliary heads (DeepLabV3) return them in training; weights as
            # torchvision.
            outputs = model.forward_with_aux(xb) if hasattr(model, "forward_with_aux") \
                else (model(xb),)
            loss = torch.stack([w * dice_bce_loss(o, target, valid)
                                for w, o in zip(AUX_LOSS_WEIGHTS, outputs)]).sum()
            loss.backward()
            loss_value = float(loss.detach())
        if dp is not None:
            loss_value = dp.sum_gradients(model, len(xb), n_batch, loss_value)
        opt.step()
        sched.step()
        curve.append(loss_value)
        if after_step is not None:
            after_step(len(curve))
            model.train()
    model.eval()
    if dp is not None:
        dp.check_identical(model, "segmentation model")
    return curve


@torch.inference_mode()
def confusion(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 16,
              threshold: float = 0.5) -> dict[str, int]:
    """TP/FP/FN/TN over valid pixels (y != 255)."""
    total: dict[str, int] = {}
    model.eval()
    for i in range(0, len(x), batch_size):
        p = torch.sigmoid(model(torch.from_numpy(x[i:i + batch_size])))[:, 0].numpy() > threshold
        add_counts(total, confusion_counts(p.astype(np.uint8), y[i:i + batch_size]))
    return add_counts(total, {})


def metrics(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    c = confusion(model, x, y)
    return {**c, **iou_f1(c)}


def train_selected(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int,
                   lr: float, seed: int, xv: np.ndarray, yv: np.ndarray,
                   val_every: int) -> dict[str, Any]:
    """``train_segmenter`` keeping the checkpoint with the best validation IoU (checked every
    ``val_every`` steps and at the end): the model is trained to convergence on validation
    however many steps it was given. Without validation tiles the last weights are kept.
    Returns the steps, the chosen step and its validation IoU."""
    best: dict[str, Any] = {"iou": -1.0, "step": steps, "state": None}

    def check(step: int) -> None:
        if len(xv) == 0 or (step % val_every and step != steps):
            return
        iou = metrics(model, xv, yv)["iou"]
        iou = -0.5 if iou is None else iou
        if iou > best["iou"]:
            best.update(iou=iou, step=step, state=copy.deepcopy(model.state_dict()))
    train_segmenter(model, x, y, steps, batch_size, lr, seed, after_step=check)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"steps": steps, "best_step": best["step"],
            "best_val_iou": best["iou"] if best["state"] is not None else None}
