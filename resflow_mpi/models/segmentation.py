"""Per-bucket segmentation networks: U-Net, an FCN and DeepLabv3 on a ResNet encoder, SegNet.

All take a normalised float32 image (N, C, H, W) of any H, W and return building logits
(N, 1, H, W). Inputs are padded (replicate, bottom/right) to a multiple of the network's stride and
the logits cropped back, so callers never have to size tiles for the network.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from resflow_mpi.models.presets import segmentation_preset


def count_parameters(model: nn.Module) -> int:
    """Total number of parameters (trainable or not) of ``model``."""
    return sum(p.numel() for p in model.parameters())


def _check_image(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected an image batch of shape (N, {in_channels}, H, W), "
                         f"got {tuple(x.shape)}")


def _pad_to_multiple(x: torch.Tensor, multiple_px: int) -> torch.Tensor:
    """Pad the bottom/right of ``x`` so H and W are multiples of ``multiple_px``, channels-last."""
    pad_h = -x.shape[-2] % multiple_px
    pad_w = -x.shape[-1] % multiple_px
    if pad_h or pad_w:
        # Replicate rather than reflect: reflect fails when the pad exceeds the image (tiny tiles).
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    # oneDNN convolutions, pooling and concatenation run ~1.3-1.5x faster on CPU in channels-last
    # whatever layout the caller's tensor or the weights are in.
    return x.contiguous(memory_format=torch.channels_last)


class _DoubleConv(nn.Sequential):
    """Two 3x3 conv + BatchNorm + ReLU layers (the U-Net block)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Classic U-Net: ``depth`` max-pools, widths doubling from ``base_width``, skip concats."""

    def __init__(self, in_channels: int, base_width: int = 64, depth: int = 4,
                 up_mode: str = "transpose", preset: str = "custom") -> None:
        super().__init__()
        if in_channels < 1 or base_width < 1 or depth < 1:
            raise ValueError(f"UNet needs in_channels, base_width, depth >= 1; got "
                             f"{in_channels}, {base_width}, {depth}")
        if up_mode not in ("transpose", "bilinear"):
            raise ValueError(f"unknown up_mode {up_mode!r}; valid: transpose, bilinear")
        self.spec: dict[str, Any] = {"kind": "segmentation", "arch": "unet", "preset": preset,
                                     "in_channels": in_channels, "base_width": base_width,
                                     "depth": depth, "up_mode": up_mode}
        self.in_channels = in_channels
        self.stride_px = 2 ** depth
        widths = [base_width * 2 ** level for level in range(depth + 1)]
        self.encoders = nn.ModuleList([_DoubleConv(in_channels, widths[0])])
        self.encoders.extend(_DoubleConv(widths[i - 1], widths[i]) for i in range(1, depth + 1))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for level in reversed(range(depth)):
            if up_mode == "transpose":
                up: nn.Module = nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2)
            else:
                up = nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                    nn.Conv2d(widths[level + 1], widths[level], 1))
            self.ups.append(up)
            self.decoders.append(_DoubleConv(2 * widths[level], widths[level]))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for an image batch (N, C, H, W)."""
        _check_image(x, self.in_channels)
        height, width = x.shape[-2:]
        features = _pad_to_multiple(x, self.stride_px)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                features = self.pool(features)
            features = encoder(features)
            skips.append(features)
        skips.pop()  # the bottleneck output is ``features`` itself
        for up, decoder in zip(self.ups, self.decoders):
            features = decoder(torch.cat([skips.pop(), up(features)], dim=1))
        return self.head(features)[..., :height, :width].contiguous()


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation,
                     bias=False)


class _BasicBlock(nn.Module):
    """ResNet18/34 residual block: two 3x3 convs."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class _Bottleneck(nn.Module):
    """ResNet50+ residual block: 1x1 reduce, 3x3 (strided, "v1.5"), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int,
                 downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual output."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


_BLOCKS: dict[str, type[_BasicBlock] | type[_Bottleneck]] = {"basic": _BasicBlock,
                                                             "bottleneck": _Bottleneck}


def _make_stage(block_cls: type[_BasicBlock] | type[_Bottleneck], in_ch: int, planes: int,
                n_blocks: int, stride: int, dilation: int,
                use_dilation: bool) -> tuple[nn.Sequential, int, int]:
    """One ResNet stage; returns it with its output channels and the dilation after it."""
    previous_dilation = dilation
    if use_dilation:
        dilation *= stride
        stride = 1
    out_ch = planes * block_cls.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_ch))
    # As in torchvision, the first block keeps the previous dilation so the stage's first 3x3
    # conv sees the same neighbourhood spacing as the stage before it.
    blocks = [block_cls(in_ch, planes, stride, previous_dilation, downsample)]
    blocks.extend(block_cls(out_ch, planes, 1, dilation, None) for _ in range(1, n_blocks))
    return nn.Sequential(*blocks), out_ch, dilation


def _resnet_encoder(name: str, in_channels: int, block: str, layers: Sequence[int],
                    base_width: int, output_stride: int) -> tuple[nn.Sequential, list[nn.Sequential],
                                                                list[int]]:
    """Stem and the four stages of a ResNet dilated to ``output_stride``, with each stage's output
    channels; ValueError (naming the network ``name``) for bad arguments."""
    if block not in _BLOCKS:
        raise ValueError(f"unknown block {block!r}; valid: {', '.join(_BLOCKS)}")
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"layers must be 4 positive block counts, got {list(layers)}")
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
    if in_channels < 1 or base_width < 1:
        raise ValueError(f"{name} needs in_channels, base_width >= 1; got "
                         f"{in_channels}, {base_width}")
    block_cls = _BLOCKS[block]
    stem = nn.Sequential(
        nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(base_width), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )
    # Stages after the one reaching ``output_stride`` trade their stride for dilation so the
    # receptive field keeps growing without losing resolution.
    dilate = [False, False, output_stride == 8, True]
    in_ch, dilation = base_width, 1
    stages, widths = [], []
    for index, (n_blocks, use_dilation) in enumerate(zip(layers, dilate)):
        stage, in_ch, dilation = _make_stage(block_cls, in_ch, base_width * 2 ** index,
                                             n_blocks, 1 if index == 0 else 2, dilation,
                                             use_dilation)
        stages.append(stage)
        widths.append(in_ch)
    return stem, stages, widths


class FCNResNet(nn.Module):
    """FCN on a 4-stage ResNet encoder, dilated to ``output_stride`` 8 or 16, 1x1 classifier.

    With ``skip`` the stride-4 stage also gets a 1x1 classifier whose logits are added to the
    upsampled deep logits, which sharpens building edges at negligible cost.
    """

    def __init__(self, in_channels: int, block: str = "bottleneck",
                 layers: Sequence[int] = (3, 4, 6, 3), base_width: int = 64,
                 output_stride: int = 8, skip: bool = False, preset: str = "custom") -> None:
        super().__init__()
        self.stem, stages, widths = _resnet_encoder("FCNResNet", in_channels, block, layers,
                                                    base_width, output_stride)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.spec: dict[str, Any] = {"kind": "segmentation", "arch": "fcn_resnet", "preset": preset,
                                     "in_channels": in_channels, "block": block,
                                     "layers": [int(n) for n in layers], "base_width": base_width,
                                     "output_stride": output_stride, "skip": bool(skip)}
        self.in_channels = in_channels
        self.stride_px = output_stride
        self.classifier = nn.Conv2d(widths[3], 1, 1)
        shallow_ch = widths[0]
        self.skip_classifier = nn.Conv2d(shallow_ch, 1, 1) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for an image batch (N, C, H, W)."""
        _check_image(x, self.in_channels)
        height, width = x.shape[-2:]
        padded = _pad_to_multiple(x, self.stride_px)
        shallow = self.layer1(self.stem(padded))
        logits = self.classifier(self.layer4(self.layer3(self.layer2(shallow))))
        if self.skip_classifier is not None:
            logits = F.interpolate(logits, size=shallow.shape[-2:], mode="bilinear",
                                   align_corners=False) + self.skip_classifier(shallow)
        logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :height, :width].contiguous()


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=dilation * (kernel // 2), dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class SegNet(nn.Module):
    """SegNet: VGG-style encoder whose max-pool indices drive the decoder's unpooling.

    Encoder stage ``i`` has ``convs[i]`` 3x3 conv + BN + ReLU layers of ``widths[i]`` channels and
    a 2x2 max-pool; the decoder mirrors it (unpool, then the same convs, the last one narrowing to
    the next shallower width). widths 64-128-256-512-512 with 2-2-3-3-3 convs is the paper's
    VGG16 SegNet (~29.4M parameters).
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (64, 128, 256, 512, 512),
                 convs: Sequence[int] = (2, 2, 3, 3, 3), preset: str = "custom") -> None:
        super().__init__()
        if len(widths) != len(convs) or not widths or min(convs) < 1 or min(widths) < 1:
            raise ValueError(f"SegNet needs as many positive widths as conv counts; got "
                             f"{list(widths)}, {list(convs)}")
        if in_channels < 1:
            raise ValueError(f"SegNet needs in_channels >= 1; got {in_channels}")
        self.spec: dict[str, Any] = {"kind": "segmentation", "arch": "segnet", "preset": preset,
                                     "in_channels": in_channels,
                                     "widths": [int(w) for w in widths],
                                     "convs": [int(n) for n in convs]}
        self.in_channels = in_channels
        self.stride_px = 2 ** len(widths)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width, n_convs in zip(widths, convs):
            layers = [_conv_bn_relu(previous if i == 0 else width, width) for i in range(n_convs)]
            self.encoders.append(nn.Sequential(*layers))
            previous = width
        self.decoders = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width, n_convs = widths[level], convs[level]
            out_width = widths[level - 1] if level > 0 else widths[0]
            layers = [_conv_bn_relu(width, width) for _ in range(n_convs - 1)]
            # The shallowest decoder keeps its last conv at full width; the classifier follows.
            layers.append(_conv_bn_relu(width, out_width))
            self.decoders.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for an image batch (N, C, H, W)."""
        _check_image(x, self.in_channels)
        height, width = x.shape[-2:]
        features = _pad_to_multiple(x, self.stride_px)
        pooled: list[tuple[torch.Tensor, torch.Size]] = []
        for encoder in self.encoders:
            features = encoder(features)
            size = features.shape
            features, indices = F.max_pool2d(features, 2, return_indices=True)
            pooled.append((indices, size))
        for decoder in self.decoders:
            indices, size = pooled.pop()
            features = decoder(F.max_unpool2d(features, indices, 2, output_size=size[-2:]))
        return self.head(features)[..., :height, :width].contiguous()


class _ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, one 3x3 conv per rate, image pooling, 1x1 fuse."""

    def __init__(self, in_ch: int, out_ch: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_ch, out_ch, kernel=1)])
        self.branches.extend(_conv_bn_relu(in_ch, out_ch, dilation=int(r)) for r in rates)
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                        _conv_bn_relu(in_ch, out_ch, kernel=1))
        self.project = _conv_bn_relu(out_ch * (len(rates) + 2), out_ch, kernel=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fused multi-rate features, same spatial size as ``x``."""
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLabV3(nn.Module):
    """DeepLabv3: dilated ResNet encoder (as :class:`FCNResNet`), ASPP head, bilinear upsampling.

    With ``aux_head`` an FCN head on the third stage gives auxiliary logits during training
    (:meth:`forward_with_aux`, weighted 0.5 in the loss as in torchvision's recipe); inference
    uses the main head only. ResNet50, output stride 8, ASPP 256 at rates 12-24-36 and the
    auxiliary head is torchvision's ``deeplabv3_resnet50`` (~42.0M; the paper reports 42.5M).
    Dropout is left out: per-bucket fine-tuning is short and BatchNorm already regularises.
    """

    def __init__(self, in_channels: int, block: str = "bottleneck",
                 layers: Sequence[int] = (3, 4, 6, 3), base_width: int = 64,
                 output_stride: int = 8, aspp_channels: int = 256,
                 atrous_rates: Sequence[int] = (12, 24, 36), aux_head: bool = True,
                 preset: str = "custom") -> None:
        super().__init__()
        if aspp_channels < 1 or not atrous_rates or min(atrous_rates) < 1:
            raise ValueError(f"DeepLabV3 needs aspp_channels >= 1 and positive atrous rates; got "
                             f"{aspp_channels}, {list(atrous_rates)}")
        self.stem, stages, widths = _resnet_encoder("DeepLabV3", in_channels, block, layers,
                                                    base_width, output_stride)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.spec: dict[str, Any] = {"kind": "segmentation", "arch": "deeplabv3", "preset": preset,
                                     "in_channels": in_channels, "block": block,
                                     "layers": [int(n) for n in layers], "base_width": base_width,
                                     "output_stride": output_stride,
                                     "aspp_channels": aspp_channels,
                                     "atrous_rates": [int(r) for r in atrous_rates],
                                     "aux_head": bool(aux_head)}
        self.in_channels = in_channels
        self.stride_px = output_stride
        in_ch = widths[3]
        self.head = nn.Sequential(_ASPP(in_ch, aspp_channels, atrous_rates),
                                  _conv_bn_relu(aspp_channels, aspp_channels),
                                  nn.Conv2d(aspp_channels, 1, 1))
        aux_ch = max(1, widths[2] // 4)
        self.aux = nn.Sequential(_conv_bn_relu(widths[2], aux_ch),
                                 nn.Conv2d(aux_ch, 1, 1)) if aux_head else None

    def _logits(self, x: torch.Tensor, with_aux: bool) -> tuple[torch.Tensor, ...]:
        _check_image(x, self.in_channels)
        height, width = x.shape[-2:]
        padded = _pad_to_multiple(x, self.stride_px)
        mid = self.layer3(self.layer2(self.layer1(self.stem(padded))))
        outputs = [self.head(self.layer4(mid))]
        if with_aux and self.aux is not None:
            outputs.append(self.aux(mid))
        return tuple(F.interpolate(o, size=padded.shape[-2:], mode="bilinear",
                                   align_corners=False)[..., :height, :width].contiguous()
                     for o in outputs)

    def forward_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Training outputs: main logits, then the auxiliary head's when present (N, 1, H, W)."""
        return self._logits(x, with_aux=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1, H, W) for an image batch (N, C, H, W)."""
        return self._logits(x, with_aux=False)[0]


SEGMENTATION_CLASSES: dict[str, type[nn.Module]] = {
    "unet": UNet, "fcn_resnet": FCNResNet, "segnet": SegNet, "deeplabv3": DeepLabV3}


def build_segmentation(arch: str, preset: str, in_channels: int) -> nn.Module:
    """Build network ``arch`` (a key of SEGMENTATION_CLASSES) at ``preset`` for ``in_channels``."""
    kwargs = segmentation_preset(arch, preset)
    return SEGMENTATION_CLASSES[arch](in_channels=in_channels, preset=preset, **kwargs)
