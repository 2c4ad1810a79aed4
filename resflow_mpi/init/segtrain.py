"""Segmentation training for the model gallery (pure torch: arrays in, trained module out)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .dataparallel import data_parallel_step
from .metrics import COUNT_KEYS, confusion_counts, iou_f1

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


@dataclass(frozen=True)
class TrainingRecipe:
    """How every segmentation model (bucket models and Mono alike) is trained.

    ``augment``: "full" (flips, 90-degree rotations, brightness/contrast/gamma, small scale
    jitter), "geometric" (flips and rotations only) or "none"; ``loss``: "bce_dice" (BCE + soft
    Dice: sparse buildings are not drowned by background) or "bce"; ``schedule``: "cosine" (to
    5 % of the rate) or "constant"; ``patience``: stop after this many validation checks without
    a better held-out IoU (0: train every step)."""

    augment: str = "none"
    loss: str = "bce_dice"
    schedule: str = "cosine"
    patience: int = 4

    @classmethod
    def of(cls, training: Any) -> "TrainingRecipe":
        """The recipe of a ``TrainingConfig``."""
        return cls(training.augment, training.loss, training.lr_schedule,
                   training.early_stop_patience)


def bce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """BCE over valid pixels (nodata excluded)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def photometric_jitter(x: torch.Tensor, rng: np.random.Generator, gain: float = 0.15,
                       offset: float = 0.06, noise: float = 0.02, contrast: float = 0.2,
                       gamma: float = 0.2) -> torch.Tensor:
    """Per-sample, per-band gain/offset (brightness), per-sample contrast about the sample mean,
    gamma on the sample's own range, and noise: the acquisition differences (sensor, haze,
    season) between scenes, so models do not overfit the radiometry of their training scenes."""
    n, c = x.shape[:2]
    g = torch.from_numpy(rng.uniform(1 - gain, 1 + gain, (n, c, 1, 1)).astype(np.float32))
    o = torch.from_numpy(rng.uniform(-offset, offset, (n, c, 1, 1)).astype(np.float32))
    k = torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, (n, 1, 1, 1)).astype(np.float32))
    gm = torch.from_numpy(np.exp(rng.uniform(-gamma, gamma, (n, 1, 1, 1))).astype(np.float32))
    lo = x.amin((1, 2, 3), keepdim=True)
    span = (x.amax((1, 2, 3), keepdim=True) - lo).clamp(min=1e-6)
    x = lo + span * ((x - lo) / span).clamp(0, 1) ** gm
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * k
    z = torch.from_numpy(rng.normal(0, noise, x.shape).astype(np.float32))
    return x * g + o + z


def scale_jitter(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
                 spread: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """One random zoom in [1 - spread, 1 + spread] for the batch, back to the same size: zoom-in
    crops the centre, zoom-out pads by reflection (labels: nearest, padding ignored)."""
    size = x.shape[-1]
    f = float(rng.uniform(1 - spread, 1 + spread))
    new = max(8, int(round(size * f)))
    if new == size:
        return x, y
    xs = F.interpolate(x, size=(new, new), mode="bilinear", align_corners=False)
    ys = F.interpolate(y, size=(new, new), mode="nearest")
    if new > size:
        a = (new - size) // 2
        return xs[..., a:a + size, a:a + size], ys[..., a:a + size, a:a + size]
    a, b = (size - new) // 2, size - new - (size - new) // 2
    return (F.pad(xs, (a, b, a, b), mode="reflect" if new > max(a, b) else "replicate"),
            F.pad(ys, (a, b, a, b), value=255.0))


# Acquisition shifts of the held-out check: a little beyond the training augmentation, so a model
# that memorised its scenes' radiometry shows it.
ACQUISITION_SHIFT = {"gain": 0.2, "offset": 0.08, "contrast": 0.25, "gamma": 0.25, "noise": 0.02}


def acquisition_shifts(x: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """``copies`` radiometrically shifted copies of ``x`` (seeded: the same on every rank),
    concatenated: (copies * n, C, S, S)."""
    rng = np.random.default_rng([seed, 11])
    return np.concatenate([photometric_jitter(torch.from_numpy(x), rng, **ACQUISITION_SHIFT)
                           .numpy() for _ in range(copies)]) if len(x) else x[:0]


def augment_batch(xb: torch.Tensor, yb: torch.Tensor, rng: np.random.Generator,
                  recipe: TrainingRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's augmentation of one batch (labels 0/1/255 as float, shape (n, 1, S, S))."""
    if recipe.augment == "none":
        return xb, yb
    k = int(rng.integers(0, 4))
    xb, yb = torch.rot90(xb, k, (2, 3)), torch.rot90(yb, k, (2, 3))
    if rng.random() < 0.5:
        xb, yb = xb.flip(3), yb.flip(3)
    if recipe.augment == "full":
        xb, yb = scale_jitter(xb, yb, rng)
        xb = photometric_jitter(xb, rng)
    return xb, yb


def train_segmenter(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int,
                    lr: float, seed: int, recipe: TrainingRecipe = TrainingRecipe(),
                    after_step: Optional[Callable[[int], bool]] = None,
                    dp: Optional[Any] = None) -> list[float]:
    """Up to ``steps`` Adam steps on random augmented batches; returns the loss curve.
    ``after_step(step)`` (1-based) runs after each step and returns True to stop early; the
    model is back in train mode after it. ``dp`` (init.dataparallel.DataParallel): every rank
    draws the same augmented batch and computes its share of it; the ranks' gradients are
    summed before each step."""
    if len(x) == 0 or steps <= 0:
        return []
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
             if recipe.schedule == "cosine" else None)
    loss_fn = dice_bce_loss if recipe.loss == "bce_dice" else bce_loss

    def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        valid, target = (yb != 255).float(), (yb == 1).float()
        xb = xb.contiguous(memory_format=torch.channels_last)
        # Networks with auxiliary heads (DeepLabV3) return them in training; weights as
        # torchvision.
        outputs = model.forward_with_aux(xb) if hasattr(model, "forward_with_aux") \
            else (model(xb),)
        return torch.stack([w * loss_fn(o, target, valid)
                            for w, o in zip(AUX_LOSS_WEIGHTS, outputs)]).sum()
    model.train()
    curve = []
    for _ in range(steps):
        idx = rng.integers(0, len(x), size=min(batch_size, max(2, len(x))))
        xb = torch.from_numpy(x[idx])
        yb = torch.from_numpy(y[idx]).float()[:, None]
        xb, yb = augment_batch(xb, yb, rng, recipe)
        loss_value = data_parallel_step(model, opt, (xb, yb), loss_of, dp)
        if sched is not None:
            sched.step()
        curve.append(loss_value)
        if after_step is not None:
            stop = after_step(len(curve))
            model.train()
            if stop:
                break
    model.eval()
    if dp is not None:
        dp.check_identical(model, "segmentation model")
    return curve


def metrics(model: nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Summed TP/FP/FN/TN over the tiles and their IoU/F1."""
    c = dict(zip(COUNT_KEYS, (int(v) for v in tile_counts(model, x, y).sum(0))))
    return {**c, **iou_f1(c)}


def tile_counts(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 16,
                threshold: float = 0.5) -> np.ndarray:
    """(n, 4) TP/FP/FN/TN per tile over valid pixels (the unit of the paired bootstraps)."""
    out = np.zeros((len(x), 4), np.int64)
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            p = torch.sigmoid(model(torch.from_numpy(x[i:i + batch_size])))[:, 0].numpy()
            for j, (pj, yj) in enumerate(zip(p > threshold, y[i:i + batch_size])):
                c = confusion_counts(pj.astype(np.uint8), yj)
                out[i + j] = (c["tp"], c["fp"], c["fn"], c["tn"])
    return out


def train_selected(model: nn.Module, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int,
                   lr: float, seed: int, xv: np.ndarray, yv: np.ndarray,
                   val_every: int, recipe: TrainingRecipe = TrainingRecipe(),
                   dp: Optional[Any] = None) -> dict[str, Any]:
    """``train_segmenter`` keeping the checkpoint with the best IoU on the held-out tiles
    ``xv``/``yv`` (checked every ``val_every`` steps and at the end), stopping after
    ``recipe.patience`` checks without improvement. Without held-out tiles the last weights
    are kept. ``dp``: data-parallel as ``train_segmenter`` (every rank checks the same weights
    on the same tiles, so all stop together). Returns the steps given and run, the chosen step
    and its held-out IoU."""
    best: dict[str, Any] = {"iou": -1.0, "step": steps, "state": None, "stale": 0}

    def check(step: int) -> bool:
        if len(xv) == 0 or (step % val_every and step != steps):
            return False
        iou = metrics(model, xv, yv)["iou"]
        iou = -0.5 if iou is None else iou
        if iou > best["iou"]:
            best.update(iou=iou, step=step, state=copy.deepcopy(model.state_dict()), stale=0)
        else:
            best["stale"] += 1
        return bool(recipe.patience) and best["stale"] >= recipe.patience
    curve = train_segmenter(model, x, y, steps, batch_size, lr, seed, recipe, after_step=check,
                            dp=dp)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    model.eval()
    return {"steps": steps, "steps_run": len(curve), "best_step": best["step"],
            "best_val_iou": best["iou"] if best["state"] is not None else None}
