"""Pure-compute models (torch only): segmentation networks, CEM embedding, hash head, bit tools.

Every model stores its constructor arguments in ``model.spec`` (JSON-serialisable) so a gallery
manifest can rebuild the exact architecture with :func:`build_from_spec` before loading weights.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from resflow_mpi.models.embedding import (ConvAutoencoder, FeatureExtractor,
                                          build_feature_extractor)
from resflow_mpi.models.hashing import (HashHead, assign_buckets, build_hash_head, codes_to_bits,
                                        hamming_distance, pack_bits, unpack_bits)
from resflow_mpi.models.presets import (PAPER_PARAMETER_COUNTS, PAPER_PARAMETER_TOLERANCE,
                                        SEGMENTATION_PRESETS, segmentation_preset)
from resflow_mpi.models.segmentation import (SEGMENTATION_CLASSES, DeepLabV3, FCNResNet, SegNet,
                                             UNet, build_segmentation, count_parameters)

__all__ = [
    "ConvAutoencoder", "DeepLabV3", "FCNResNet", "FeatureExtractor", "HashHead", "SegNet", "UNet",
    "PAPER_PARAMETER_COUNTS", "PAPER_PARAMETER_TOLERANCE", "SEGMENTATION_PRESETS",
    "assign_buckets", "build_feature_extractor", "build_from_spec", "build_hash_head",
    "build_segmentation", "codes_to_bits", "count_parameters", "hamming_distance", "pack_bits",
    "segmentation_preset", "unpack_bits",
]

# (kind, arch) -> class; spec keys other than "kind"/"arch" are that class's constructor kwargs.
# Segmentation archs come from the one registry, SEGMENTATION_CLASSES (presets: SEGMENTATION_PRESETS).
_SPEC_CLASSES: dict[tuple[str, str], Callable[..., nn.Module]] = {
    **{("segmentation", arch): cls for arch, cls in SEGMENTATION_CLASSES.items()},
    ("feature_extractor", "cem_conv"): FeatureExtractor,
    ("hash_head", "hash_cnn"): HashHead,
}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture described by a model's ``spec`` (weights are not restored)."""
    if not isinstance(spec, dict):
        raise ValueError(f"model spec must be a dict, got {type(spec).__name__}")
    kind, arch = spec.get("kind"), spec.get("arch")
    kinds = sorted({k for k, _ in _SPEC_CLASSES})
    if kind not in kinds:
        raise ValueError(f"model spec kind {kind!r} is not one of {', '.join(kinds)}")
    archs = sorted(a for k, a in _SPEC_CLASSES if k == kind)
    if arch not in archs:
        raise ValueError(f"model spec arch {arch!r} is not valid for kind {kind!r}; valid archs: "
                         f"{', '.join(archs)}")
    cls = _SPEC_CLASSES[(kind, arch)]
    kwargs = {key: value for key, value in spec.items() if key not in ("kind", "arch")}
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    missing = sorted(name for name, param in params.items()
                     if param.default is inspect.Parameter.empty and name not in kwargs)
    problems = ([f"unknown keys {unknown}"] if unknown else []) + \
        ([f"missing keys {missing}"] if missing else [])
    if problems:
        raise ValueError(f"model spec for {kind}/{arch}: {'; '.join(problems)}; "
                         f"valid keys: {', '.join(params)}")
    return cls(**kwargs)
