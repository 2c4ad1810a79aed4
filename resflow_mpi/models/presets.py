"""Architecture presets for the segmentation networks (pure data, no torch).

Each preset is a dict of constructor keyword arguments for the architecture's class. "paper"
presets reproduce the parameter counts reported by RESFlow (U-Net ~13.4M, ResNet50-FCN ~23.5M,
SegNet ~29.4M, DeepLab ~42.5M);
"tiny" and "small" are for CPU tests, demos and small scenes.
"""
from __future__ import annotations

import copy
from typing import Any

SEGMENTATION_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "unet": {
        # base 8, 3 poolings: the CPU-friendly test/demo network (~0.12M parameters).
        "tiny": {"base_width": 8, "depth": 3, "up_mode": "transpose"},
        "small": {"base_width": 16, "depth": 4, "up_mode": "transpose"},
        # Classic U-Net (4 poolings) has ~31M parameters at base 64; parameters scale with the
        # square of the width, so base 42 lands on the paper's 13.4M.
        "paper": {"base_width": 42, "depth": 4, "up_mode": "transpose"},
    },
    "fcn_resnet": {
        "tiny": {"block": "basic", "layers": [1, 1, 1, 1], "base_width": 8,
                 "output_stride": 16, "skip": True},
        "small": {"block": "basic", "layers": [2, 2, 2, 2], "base_width": 16,
                  "output_stride": 8, "skip": True},
        # ResNet50 encoder (Bottleneck 3-4-6-3, width 64) with a 1x1 classifier: ~23.5M.
        "paper": {"block": "bottleneck", "layers": [3, 4, 6, 3], "base_width": 64,
                  "output_stride": 8, "skip": False},
    },
    "segnet": {
        "tiny": {"widths": [8, 16, 32], "convs": [1, 1, 2]},
        "small": {"widths": [16, 32, 64, 128], "convs": [2, 2, 2, 2]},
        # VGG16 encoder (13 convs, BatchNorm) and its mirrored decoder: ~29.4M.
        "paper": {"widths": [64, 128, 256, 512, 512], "convs": [2, 2, 3, 3, 3]},
    },
    "deeplabv3": {
        "tiny": {"block": "basic", "layers": [1, 1, 1, 1], "base_width": 8, "output_stride": 16,
                 "aspp_channels": 16, "atrous_rates": [2, 4, 6], "aux_head": True},
        "small": {"block": "basic", "layers": [2, 2, 2, 2], "base_width": 16, "output_stride": 8,
                  "aspp_channels": 64, "atrous_rates": [6, 12, 18], "aux_head": True},
        # torchvision's deeplabv3_resnet50: ResNet50 at output stride 8, ASPP 256 at 12-24-36,
        # auxiliary FCN head on the third stage: ~42.0M.
        "paper": {"block": "bottleneck", "layers": [3, 4, 6, 3], "base_width": 64,
                  "output_stride": 8, "aspp_channels": 256, "atrous_rates": [12, 24, 36],
                  "aux_head": True},
    },
}

# Parameter counts reported for the RESFlow paper's networks and how close "paper" presets must be.
PAPER_PARAMETER_COUNTS: dict[str, int] = {"unet": 13_400_000, "fcn_resnet": 23_500_000,
                                          "segnet": 29_400_000, "deeplabv3": 42_500_000}
PAPER_PARAMETER_TOLERANCE: dict[str, float] = {"unet": 0.05, "fcn_resnet": 0.10, "segnet": 0.03,
                                               "deeplabv3": 0.03}


def segmentation_preset(arch: str, preset: str) -> dict[str, Any]:
    """Copy of the constructor kwargs of ``arch``/``preset``; ValueError names the valid names."""
    if arch not in SEGMENTATION_PRESETS:
        raise ValueError(f"unknown segmentation arch {arch!r}; valid archs: "
                         f"{', '.join(sorted(SEGMENTATION_PRESETS))}")
    presets = SEGMENTATION_PRESETS[arch]
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for arch {arch!r}; valid presets: "
                         f"{', '.join(presets)}")
    return copy.deepcopy(presets[preset])
