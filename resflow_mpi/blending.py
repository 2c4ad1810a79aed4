"""Weighted blending of overlapping sub-window predictions and test-time augmentation (TTA).

Pure compute (torch): a *predictor* maps a batch ``(n, C, H, W)`` to building probabilities
``(n, H, W)``. ``hann_blend`` predicts overlapping sub-windows of the input and averages them
with Hann-window weights; ``tta_average`` averages a predictor over flips (and 90-degree
rotations), each prediction turned back before averaging. ``AugmentedSegmenter`` wraps a
segmentation network so the stages use both unchanged: it returns logits of the averaged
probabilities.

Blending stays inside one tile's read window (tile + halo): tiles are computed by different ranks
and written once each, so a tile never waits for, or writes over, its neighbours' predictions.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

Predictor = Callable[[torch.Tensor], torch.Tensor]
BlendMode = Literal["none", "hann"]
TtaMode = Literal["none", "flips", "d4"]
# Logits of averaged probabilities are clamped here so they stay finite.
PROBABILITY_EPS = 1e-6


def hann_weights(size_px: int, device: torch.device | None = None) -> torch.Tensor:
    """(size_px,) Hann window without its zero end points: every pixel keeps a positive weight,
    the window's centre weighs most."""
    return torch.hann_window(size_px + 2, periodic=False, device=device)[1:-1]


def sub_window_starts(total_px: int, window_px: int) -> list[int]:
    """Offsets of windows of ``window_px`` that cover ``total_px`` with half-window strides; the
    last window ends at ``total_px``."""
    if not 0 < window_px <= total_px:
        raise ValueError(f"window of {window_px} px does not fit {total_px} px")
    stride = max(1, window_px // 2)
    starts = list(range(0, total_px - window_px + 1, stride))
    if starts[-1] != total_px - window_px:
        starts.append(total_px - window_px)
    return starts


def blend_window_px(total_px: int) -> int:
    """The sub-window of ``hann_blend``: half the input, rounded up (3 x 3 windows per input)."""
    return (total_px + 1) // 2


def hann_blend(predict: Predictor, x: torch.Tensor) -> torch.Tensor:
    """Probabilities of ``x`` (n, C, H, W) as the Hann-weighted mean of ``predict`` over
    half-size, half-overlapping sub-windows; (n, H, W)."""
    n, _, h, w = x.shape
    wh, ww = blend_window_px(h), blend_window_px(w)
    weight = hann_weights(wh, x.device)[:, None] * hann_weights(ww, x.device)[None, :]
    total = torch.zeros((n, h, w), dtype=torch.float32, device=x.device)
    norm = torch.zeros((h, w), dtype=torch.float32, device=x.device)
    for r in sub_window_starts(h, wh):
        for c in sub_window_starts(w, ww):
            p = predict(x[:, :, r:r + wh, c:c + ww]).float()
            total[:, r:r + wh, c:c + ww] += p * weight
            norm[r:r + wh, c:c + ww] += weight
    return total / norm


def _d4(k: int, flip: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                     Callable[[torch.Tensor], torch.Tensor]]:
    """One element of the square's symmetry group on the last two axes, and its inverse."""
    def forward(t: torch.Tensor) -> torch.Tensor:
        t = torch.flip(t, (-1,)) if flip else t
        return torch.rot90(t, k, (-2, -1))

    def inverse(t: torch.Tensor) -> torch.Tensor:
        t = torch.rot90(t, -k, (-2, -1))
        return torch.flip(t, (-1,)) if flip else t
    return forward, inverse


def tta_transforms(mode: TtaMode) -> list[tuple[Callable[[torch.Tensor], torch.Tensor],
                                               Callable[[torch.Tensor], torch.Tensor]]]:
    """(transform, inverse) pairs that ``tta_average`` averages over: identity only (none), the
    identity and the horizontal and vertical flips (flips), or all 8 flips and rotations (d4)."""
    if mode == "none":
        return [_d4(0, False)]
    if mode == "flips":
        vertical = (lambda t: torch.flip(t, (-2,)), lambda t: torch.flip(t, (-2,)))
        return [_d4(0, False), _d4(0, True), vertical]
    if mode == "d4":
        return [_d4(k, flip) for flip in (False, True) for k in range(4)]
    raise ValueError(f"tta {mode!r}: one of none, flips, d4")


def tta_average(predict: Predictor, x: torch.Tensor, mode: TtaMode) -> torch.Tensor:
    """Mean of ``predict`` over the ``mode`` transforms of ``x``, each turned back; (n, H, W).
    Rotations need square inputs (tiles are)."""
    pairs = tta_transforms(mode)
    if mode == "d4" and x.shape[-1] != x.shape[-2]:
        raise ValueError(f"d4 test-time augmentation needs square inputs, got {tuple(x.shape)}")
    total = None
    for forward, inverse in pairs:
        p = inverse(predict(forward(x)).float())
        total = p if total is None else total + p
    assert total is not None
    return total / len(pairs)


class AugmentedSegmenter(nn.Module):
    """A segmentation network whose logits are those of its probabilities averaged over TTA
    transforms, each predicted by Hann blending of sub-windows when ``blend`` is "hann"."""

    def __init__(self, model: nn.Module, blend: BlendMode = "none", tta: TtaMode = "none"):
        super().__init__()
        tta_transforms(tta)  # refuse an unknown mode now, not at the first tile
        if blend not in ("none", "hann"):
            raise ValueError(f"blend {blend!r}: one of none, hann")
        self.model, self.blend, self.tta = model, blend, tta

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x).float())[:, 0]

    def _blended(self, x: torch.Tensor) -> torch.Tensor:
        return hann_blend(self._probabilities, x) if self.blend == "hann" else self._probabilities(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = tta_average(self._blended, x, self.tta)
        return torch.logit(p.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS))[:, None]


def augmented(load_segmenter: Callable[[int], nn.Module], blend: BlendMode,
              tta: TtaMode) -> Callable[[int], nn.Module]:
    """``load_segmenter`` (bucket -> network) whose networks blend and augment as asked; the
    loader itself when both are "none" (outputs bit for bit as without)."""
    if blend == "none" and tta == "none":
        return load_segmenter

    def load(bucket: int) -> nn.Module:
        return AugmentedSegmenter(load_segmenter(bucket), blend, tta).eval()
    return load
