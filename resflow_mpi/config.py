"""Typed configuration: YAML in, validated once, saved as JSON beside the outputs.

Every section is a frozen dataclass whose fields carry a ``help`` text; the loader refuses unknown
keys, wrong types, bad choices and missing required values *before any work starts*, naming the
file, the dotted key and what was expected. The README's configuration reference is generated from
these dataclasses (``resflow config-doc``), so docs and schema cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin

import yaml

from .errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and a help text (used for validation messages and docs)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class ScenesConfig:
    """Which scenes to map and what to do with a bad one."""

    inputs: list[str] = _f([], "Scenes: globs, directories, .txt lists of paths, or archive.json "
                               "manifests written by `resflow synth` (required for run/init).")
    split: Literal["all", "train", "test"] = _f("all", "Scenes taken from archive.json manifests.")
    manifest: Optional[str] = _f(None, "Scene manifest (YAML or JSON): `train:` and `predict:` "
                                       "lists of {image, label, region} entries; init uses "
                                       "train, run uses predict, evaluate the labelled predict "
                                       "scenes. An archive.json from `resflow synth` also works "
                                       "(train/test). Replaces scenes.inputs and scenes.split.")
    stac_assets: list[str] = _f([], "STAC items in scenes.inputs or a manifest's image: the "
                                    "asset keys or band common names that make each scene's "
                                    "bands, in order (e.g. [red, green, blue] or [visual]); "
                                    "single-band assets are stacked by a VRT in "
                                    "output.dir/stac. Empty: the item's one raster asset.")
    aoi: Optional[str] = _f(None, "Area of interest: a polygon file (any OGR source, any CRS). "
                                  "Tiles outside it are neither read nor computed, pixels "
                                  "outside it are nodata (255) in the outputs, and areas count "
                                  "only inside it; scenes it misses are not mapped.")
    bands: list[int] = _f([1, 2, 3], "1-based band numbers fed to the networks, in order.")
    expect_dtype: Optional[Literal["uint8", "uint16"]] = _f(None, "Refuse scenes of another data "
                                                                  "type (null: uint8 or uint16).")
    on_bad_scene: Literal["fail", "skip"] = _f("fail", "A bad scene fails the job, or is skipped "
                                                       "and listed in the run report.")
    nodata: Optional[Union[float, list[float]]] = _f(
        None, "Nodata value of the scenes (one value, or one per band in scenes.bands; .nan for "
              "NaN); replaces the files' own nodata. Mask and alpha bands are honoured as well.")
    blank_fill: bool = _f(False, "Mark blank fill as nodata: horizontal runs of at least "
                                 "blank_fill_min_run_px pixels whose every band lies in one of "
                                 "blank_fill_values (image collars, the JPEG fringe 250-255).")
    blank_fill_values: list[list[float]] = _f([[0, 5], [250, 255]], "Inclusive [low, high] pixel "
                                              "value ranges of blank fill, in the scenes' units.")
    blank_fill_min_run_px: int = _f(64, "Shortest run of fill pixels (along a row) taken as blank "
                                        "fill, so dark or bright objects are kept.", min=1)
    gsd_m: Optional[float] = _f(
        None, "Ground sample distance in metres the networks see (also for geographic CRSs): "
              "every scene is read resampled to it (training crops too) and masks are written "
              "back on each scene's own grid. The gallery records it; a run leaving it unset "
              "uses the gallery's. null: each scene at its own pixel size.", min=0.001)
    gsd_resampling: Literal["auto", "average", "bilinear", "cubic", "nearest"] = _f(
        "auto", "GDAL resampling of scenes.gsd_m reads (auto: average when coarsening, bilinear "
                "when refining).")


@dataclass(frozen=True)
class LabelsConfig:
    """Ground truth for init and evaluate: where each scene's label is and what its values mean."""

    file: Optional[str] = _f(None, "One label file for every scene that has none in the manifest "
                                   "or archive.json: building polygons (GeoJSON, GeoPackage, "
                                   "Shapefile, any OGR source, any CRS) or a raster on the "
                                   "scene's grid.")
    pattern: str = _f("{stem}_mask.tif", "Label beside each scene, by name ({stem}: the scene "
                                         "file name without extension; relative to the scene's "
                                         "folder), when neither the manifest nor labels.file "
                                         "gives one; e.g. {stem}.geojson.")
    layer: Optional[str] = _f(None, "Vector layer with the polygons (sources with several "
                                    "layers).")
    where: Optional[str] = _f(None, "OGR SQL attribute filter for vector labels, e.g. "
                                    "\"building IS NOT NULL\".")
    class_field: Optional[str] = _f(None, "Vector attribute whose values labels.values maps "
                                          "(null: every polygon is a building).")
    values: Optional[dict[str, list[Union[int, str]]]] = _f(
        None, "Which label values are building, background and ignore, e.g. {building: [255], "
              "background: [0]}; values not listed are refused. null: rasters 1 building, 0 "
              "background, 255 and the raster's nodata ignore (a 0/255 mask is refused).")
    outside: Literal["background", "ignore"] = _f("background", "What vector labels say where "
                                                                "no polygon lies.")
    max_ignore_fraction: float = _f(0.5, "A label that is more than this fraction ignore over "
                                         "its scene is refused.")


@dataclass(frozen=True)
class TilingConfig:
    """The tile grid: owned tile size and halo (context) around it."""

    tile_px: int = _f(256, "Owned tile size in pixels (each output pixel is owned by one tile).")
    halo_px: int = _f(16, "Context read around each tile and discarded on write.")
    prescan_nodata: bool = _f(False, "Read every pixel of each scene while planning to find its "
                                     "all-nodata tiles. Off: tiles are found all-nodata from the "
                                     "file's block index (sparse GeoTIFFs) or when read; either "
                                     "way they are written as nodata, not computed.")


@dataclass(frozen=True)
class NormalizationConfig:
    """How raw pixel values become network inputs."""

    mode: Literal["range", "configured", "scene"] = _f(
        "range", "range: divide by value_max; configured: (x - mean) / std per band; scene: "
                 "(x - mean) / std with each scene's own band statistics (sampled once).")
    value_max: Optional[float] = _f(None, "Divisor for mode=range (null: 255 for uint8, 2047 "
                                          "for uint16, an 11-bit sensor range; float32 scenes "
                                          "must set it, and their sampled values must lie in "
                                          "[0, value_max]).")
    mean: list[float] = _f([], "Per-band means for mode=configured.")
    std: list[float] = _f([], "Per-band standard deviations for mode=configured.")


@dataclass(frozen=True)
class ModelsConfig:
    """Model gallery and the architectures `resflow init` trains."""

    gallery: str = _f("gallery", "Model gallery directory (written by init, read by run).")
    arch: Literal["unet", "fcn_resnet", "segnet", "deeplabv3"] = _f(
        "unet", "Segmentation architecture (the paper's four: U-Net, ResNet50-FCN, SegNet, "
                "DeepLabv3).")
    preset: Literal["tiny", "small", "paper"] = _f("tiny", "Size preset (paper: the paper's "
                                                           "parameter counts, e.g. 13.4M for U-Net).")
    hash_bits: int = _f(32, "Length B of the binary hash codes (8-64).", min=8, max=64)
    embed_dim: int = _f(32, "Length of the learned CEM embedding.", min=2)


@dataclass(frozen=True)
class InferenceConfig:
    """Per-rank execution of the three stages."""

    batch_size: int = _f(8, "Tiles per read batch and per embedding/hashing call (memory per "
                            "rank grows with it).", min=1)
    segment_batch_size: int = _f(0, "Tiles per segmentation call (0: batch_size on GPU, 1 on "
                                    "CPU, where one tile per call is faster).", min=0)
    threshold: float = _f(0.5, "Building probability threshold.")
    prefetch_batches: int = _f(2, "Batches read ahead by the reader threads.", min=0)
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda:(local_rank % gpus) when GPUs "
                                                        "exist, else CPU.")
    threads_per_rank: int = _f(0, "torch threads per rank on CPU (0: cores / ranks per node).",
                               min=0)
    autocast: Literal["auto", "none", "fp16", "bf16"] = _f(
        "auto", "Precision of segmentation: none (float32), fp16 or bf16 autocast on the rank's "
                "device; auto: fp16 on GPU, none on CPU. Embedding and hashing always run in "
                "float32 (a flipped hash bit changes the bucket).")
    channels_last: bool = _f(True, "channels-last memory format for convolutions.")
    compile: bool = _f(False, "torch.compile the segmentation models on GPU (slower start, "
                              "faster steady state; ignored on CPU).")
    save_probabilities: bool = _f(False, "Also store float16 probabilities in the HDF5 output "
                                         "(output.probability stores them as well).")
    blend: Literal["none", "hann"] = _f(
        "none", "none: the network sees each tile's read window (tile + halo) once and the halo "
                "is cropped; hann: the read window is predicted as overlapping sub-windows "
                "(half its size, half-overlapping, 3 x 3 of them) whose probabilities are "
                "averaged with Hann-window weights, so no pixel's prediction comes from a window "
                "edge (2.25x the pixels, about 3x the segmentation time; tiles never exchange "
                "predictions, so blending stays inside each tile's own read window). See "
                "perf/RESULTS.md.")
    tta: Literal["none", "flips", "d4"] = _f(
        "none", "Test-time augmentation: average the building probabilities over the "
                "horizontal and vertical flips (flips: 3 passes) or the 8 flips and 90-degree "
                "rotations (d4: 8 passes). See perf/RESULTS.md for the IoU effect and cost.")
    model: Literal["buckets", "mono"] = _f("buckets", "buckets: each tile by its hash bucket's "
                                                      "model (RESFlow); mono: every tile by the "
                                                      "single Mono model (comparison, fallback).")
    ood_routing: Literal["off", "quantile", "embedding"] = _f(
        "off", "Out-of-distribution routing: off (every tile by its nearest bucket's model, the "
               "paper); quantile: a tile whose code is farther from its bucket's centroid than "
               "the ood_quantile of that bucket's training tiles is flagged (bucket -2 in the "
               "bucket map and the HDF5 output) and mapped by the model init chose for flagged "
               "tiles (Mono unless another did better on held-out scenes); embedding: the same "
               "for a tile whose CEM embedding is farther from the trained scenes' windows (mean "
               "distance to the 5 nearest) than the ood_quantile of the held-out scenes' windows "
               "(calibrated by init for its tiling).")
    ood_quantile: float = _f(0.99, "Quantile of the in-distribution scores (quantile: a bucket's "
                                   "Hamming distances; embedding: held-out training windows' "
                                   "scores) beyond which a tile is out of distribution: about "
                                   "1 - q of in-distribution tiles are flagged. Also used by "
                                   "`resflow evaluate`'s routing column.")


@dataclass(frozen=True)
class ParallelConfig:
    """How tiles are spread over ranks and how masks reach the HDF5 file."""

    policy: Literal["static", "dynamic"] = _f("static", "static: rank 0 scatters descriptor "
                                                        "lists; dynamic: ranks pull chunks.")
    layout: Literal["block", "cyclic"] = _f("cyclic", "Static split of the tile list.")
    chunk_tiles: int = _f(4, "Tiles per request under the dynamic policy.", min=1)
    reader_threads: int = _f(0, "GDAL reader threads per rank, each reading whole batches with "
                                "its own file handles (0: 1 on CPU, where the networks share the "
                                "cores with them; 4 on a GPU, which one thread decoding DEFLATE "
                                "cannot feed).", min=0)
    write_round_batches: int = _f(4, "Batches of masks per write round (collective/gather "
                                     "writers synchronise once per round).", min=1)
    writer: Literal["auto", "collective", "independent", "gather"] = _f(
        "auto", "auto: collective (static) / independent (dynamic) mpio writes; gather: every "
                "rank sends masks to rank 0, the paper's serial merge.")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go."""

    dir: str = _f("out", "Output directory; every file the run writes stays inside it.")
    geotiff: bool = _f(True, "Export each scene's mask as a tiled GeoTIFF.")
    cog: bool = _f(True, "Also export a Cloud-Optimized GeoTIFF.")
    bucket_map: bool = _f(True, "Export the colour-coded per-tile bucket map.")
    quicklooks: bool = _f(True, "PNG quicklooks and an HTML report of the run.")
    probability: bool = _f(False, "Also export each scene's building probability as a uint8 "
                                  "COG <scene>.resflow-probability.tif on the scene's grid "
                                  "(0-254: probability x 254, 255: nodata), from the same pass "
                                  "as the mask; `resflow vectorize` reads it for each polygon's "
                                  "confidence.")


@dataclass(frozen=True)
class TrainingConfig:
    """`resflow init`: embedding, clustering, hashing and per-bucket training."""

    tile_px: int = _f(128, "Training crop size in pixels.", min=16)
    tiles_per_scene: int = _f(48, "Training crops sampled from each training scene (random, "
                                  "seeded, may overlap; the count used is in the gallery "
                                  "manifest).", min=1)
    building_crop_fraction: float = _f(0.5, "Share of the crops centred on building pixels, so "
                                            "rare buildings are not lost; the rest are uniform.")
    val_scene_share: float = _f(0.2, "Share of each region's training scenes held out whole "
                                     "for every model selection (checkpoints, early stopping, "
                                     "k, bucket acceptance, routing): at least one scene per "
                                     "region of two or more; a region's lone scene holds out a "
                                     "band of its rows instead. Listed in the gallery manifest.")
    min_gain: float = _f(0.0, "A bucket keeps its own model only where the lower bound of its "
                              "IoU gain over Mono on its held-out tiles (95 % paired bootstrap) "
                              "is above this; otherwise the bucket maps with Mono.")
    k_candidates: int = _f(2, "Bucket counts from the variance curve trained and compared by "
                              "the whole gallery's held-out IoU (with k = 1, Mono alone); more "
                              "candidates cost more bucket models at init.", min=1)
    augment: Literal["full", "geometric", "none"] = _f(
        "none", "Segmentation augmentation: full (flips, 90-degree rotations, brightness, "
                "contrast, gamma, small scale jitter), geometric (flips and rotations) or none "
                "(the default: at the default budgets augmentation cost held-out IoU, see "
                "perf/RESULTS.md).")
    loss: Literal["bce_dice", "bce"] = _f("bce_dice", "Segmentation loss: BCE + soft Dice (sparse "
                                                      "buildings) or BCE alone.")
    lr_schedule: Literal["cosine", "constant"] = _f("cosine", "Learning-rate schedule of the "
                                                              "segmentation models.")
    early_stop_patience: int = _f(4, "Stop a segmentation model after this many held-out checks "
                                     "(every val_every steps) without a better IoU; 0: never.",
                                  min=0)
    k_min: int = _f(2, "Smallest bucket count tried; 1 also tests for any bucket structure "
                       "(no split beats structureless data by k_min_drop: one bucket, Mono only).",
                    min=1)
    k_max: int = _f(10, "Largest bucket count tried.", min=1)
    k_min_drop: float = _f(0.2, "Elbow rule: the largest k whose added cluster cut the average "
                                "intra-cluster variance by more than this fraction.")
    cem_epochs: int = _f(30, "Autoencoder epochs for the feature extractor.", min=1)
    hash_epochs: int = _f(60, "Hash-network epochs.", min=1)
    seg_epochs: int = _f(12, "Epochs per segmentation model (Mono gets the same).", min=1)
    batch_size: int = _f(16, "Training batch size.", min=1)
    lr: float = _f(0.003, "Adam learning rate.")
    seed: int = _f(0, "Seed for sampling and initialisation.")
    bucket_mode: Literal["finetune", "paper"] = _f(
        "finetune", "finetune: a base model trained on all tiles, then fine-tuned per bucket on "
                    "the bucket's tiles; paper: each bucket model trained from scratch on its "
                    "bucket's tiles only (RESFlow). Recorded in the gallery manifest.")
    min_bucket_tiles: int = _f(8, "A bucket with fewer training tiles gets no model of its own: "
                                  "a warning, and the bucket maps with Mono.", min=1)
    mono_budget: Literal["total", "bucket"] = _f(
        "total", "Mono's training steps: total (the sum of every bucket model's steps: a fair "
                 "comparison) or bucket (one bucket model's steps).")
    mono_wide_preset: Optional[Literal["tiny", "small", "paper"]] = _f(
        None, "Also train a Mono of this (wider) preset, the capacity of k models, under the "
              "same budget (evaluated beside Mono; null: none).")
    val_every: int = _f(50, "Validation IoU every this many steps; each model keeps its best "
                            "checkpoint (training to convergence on validation).", min=1)
    data_parallel: bool = _f(False, "Train the shared models (CEM, hash head, base segmenter) "
                                    "data-parallel over all ranks: each rank computes its share "
                                    "of every batch, gradients are summed over MPI; repeatable "
                                    "for a fixed rank count, not across counts. false: rank 0 "
                                    "trains them with all of its node's cores.")
    data_parallel_backend: Literal["mpi", "torch"] = _f(
        "mpi", "How data-parallel gradients are summed: mpi (the job's MPI communicator: reduce "
               "to rank 0, then broadcast) or torch (torch.distributed all_reduce, gloo, over "
               "the same ranks; rendezvous at rank 0's address on the route to the other ranks' "
               "hosts, or RESFLOW_DIST_ADDR).")


@dataclass(frozen=True)
class SparkConfig:
    """The Spark adapter (`resflow run --engine spark`)."""

    master: str = _f("local[2]", "Spark master URL.")
    tickets_per_device: int = _f(1, "GPU tickets per device (CPU slots when no GPU).", min=1)
    ticket_dir: Optional[str] = _f(None, "Ticket folder in the executors' shared workspace "
                                         "(null: <output.dir>/tickets).")
    cpu_slots: int = _f(2, "Concurrent compute tasks allowed when there is no GPU.", min=1)


@dataclass(frozen=True)
class RunConfig:
    """The whole configuration of a run."""

    scenes: ScenesConfig = field(default_factory=ScenesConfig)
    labels: LabelsConfig = field(default_factory=LabelsConfig)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def keeps_probabilities(self) -> bool:
        """Whether the mask store keeps each pixel's probability (for the store or its export)."""
        return self.inference.save_probabilities or self.output.probability

    def checksum(self) -> str:
        """SHA-256 of everything that changes output pixels (not ranks, policy or batching)."""
        d = self.to_dict()
        relevant = {k: d[k] for k in ("scenes", "tiling", "normalization", "models")}
        relevant["threshold"] = d["inference"]["threshold"]
        if d["inference"]["model"] != "buckets":  # unchanged checksum for existing outputs
            relevant["model"] = d["inference"]["model"]
        if d["inference"]["ood_routing"] != "off":
            relevant["ood"] = [d["inference"]["ood_routing"], d["inference"]["ood_quantile"]]
        for key in ("blend", "tta"):  # absent when off: unchanged checksum for existing outputs
            if d["inference"][key] != "none":
                relevant[key] = d["inference"][key]
        if self.keeps_probabilities:  # a store made without them cannot export them
            relevant["probabilities"] = True
        relevant["scenes"].pop("on_bad_scene")
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()

    def validate(self, source: str = "<config>") -> "RunConfig":
        """Cross-field checks a type check cannot express."""
        t, n = self.tiling, self.normalization
        if t.tile_px < 16:
            raise ConfigError(f"{source}: tiling.tile_px must be >= 16, got {t.tile_px}")
        if t.halo_px < 0 or t.halo_px >= t.tile_px:
            raise ConfigError(f"{source}: tiling.halo_px must be in [0, tile_px), got {t.halo_px}")
        if not self.scenes.bands or any(b < 1 for b in self.scenes.bands):
            raise ConfigError(f"{source}: scenes.bands must list 1-based band numbers")
        sc = self.scenes
        if isinstance(sc.nodata, list) and len(sc.nodata) not in (1, len(sc.bands)):
            raise ConfigError(f"{source}: scenes.nodata needs one value or one per band in "
                              f"scenes.bands ({len(sc.bands)}), got {len(sc.nodata)}")
        if any(len(r) != 2 or r[0] > r[1] for r in sc.blank_fill_values):
            raise ConfigError(f"{source}: scenes.blank_fill_values must be [low, high] pairs with "
                              f"low <= high, got {_short(sc.blank_fill_values)}")
        if n.mode == "configured" and (len(n.mean) != len(self.scenes.bands)
                                       or len(n.std) != len(self.scenes.bands)
                                       or any(s <= 0 for s in n.std)):
            raise ConfigError(f"{source}: normalization.mean/std need one value per band in "
                              f"scenes.bands ({len(self.scenes.bands)}) and std > 0")
        if self.output.probability and not self.output.geotiff:
            raise ConfigError(f"{source}: output.probability needs output.geotiff: true (the "
                              "probability COG is exported beside the mask)")
        if not 0.0 < self.inference.threshold < 1.0:
            raise ConfigError(f"{source}: inference.threshold must be in (0, 1)")
        if not 0.0 < self.inference.ood_quantile <= 1.0:
            raise ConfigError(f"{source}: inference.ood_quantile must be in (0, 1], got "
                              f"{self.inference.ood_quantile}")
        if self.training.k_min > self.training.k_max:
            raise ConfigError(f"{source}: training.k_min must be <= training.k_max")
        if not 0.0 < self.training.val_scene_share < 0.5:
            raise ConfigError(f"{source}: training.val_scene_share must be in (0, 0.5)")
        if self.scenes.manifest is not None and self.scenes.inputs:
            raise ConfigError(f"{source}: scenes.manifest and scenes.inputs are both set; list "
                              "every scene in the manifest (train: / predict:) and drop "
                              "scenes.inputs")
        if not 0.0 <= self.training.building_crop_fraction <= 1.0:
            raise ConfigError(f"{source}: training.building_crop_fraction must be in [0, 1]")
        lab = self.labels
        if not 0.0 < lab.max_ignore_fraction <= 1.0:
            raise ConfigError(f"{source}: labels.max_ignore_fraction must be in (0, 1]")
        if lab.values is not None:
            bad = sorted(set(lab.values) - {"building", "background", "ignore"})
            if bad:
                raise ConfigError(f"{source}: labels.values has unknown class(es) {bad} (valid: "
                                  "building, background, ignore)")
            if not lab.values.get("building"):
                raise ConfigError(f"{source}: labels.values.building must list at least one "
                                  "value (which label values are buildings)")
            seen: dict[str, str] = {}
            for cls, vals in lab.values.items():
                for v in vals:
                    if str(v) in seen and seen[str(v)] != cls:
                        raise ConfigError(f"{source}: labels.values lists {v!r} as both "
                                          f"{seen[str(v)]} and {cls}")
                    seen[str(v)] = cls
        if "{stem}" not in lab.pattern:
            raise ConfigError(f"{source}: labels.pattern must contain {{stem}} (the scene file "
                              f"name without extension), got {lab.pattern!r}")
        if self.parallel.writer == "collective" and self.parallel.policy == "dynamic":
            raise ConfigError(f"{source}: parallel.writer=collective needs policy=static (collective "
                              "writes are lock-step); use writer=auto or independent with dynamic")
        return self


SECTIONS: dict[str, type] = dict(typing.get_type_hints(RunConfig))


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of names to {_type_name(get_args(tp)[1])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


SHOWN_VALUE_CHARS = 80
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 6, 6, 60, 60


def _short(value: Any) -> str:
    """A bounded repr for messages: nested and long values are cut (never fully expanded)."""
    text = _REPR.repr(value)
    return text if len(text) <= SHOWN_VALUE_CHARS else text[:SHOWN_VALUE_CHARS - 3] + "..."


class _Bad:
    """Builds the type-mismatch error only when it is raised (formatting costs)."""

    def __init__(self, value: Any, tp: Any, where: str):
        self.value, self.tp, self.where = value, tp, where

    def __call__(self) -> ConfigError:
        return ConfigError(f"{self.where}: expected {_type_name(self.tp)}, got {_short(self.value)}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against type ``tp``; return it (ints accepted for floats)."""
    origin = get_origin(tp)
    bad = _Bad(value, tp, where)
    if origin is Union:
        if value is None and type(None) in get_args(tp):
            return None
        arms = [arg for arg in get_args(tp) if arg is not type(None)]
        if len(arms) == 1 and value is not None:  # Optional[X]: X's own, more precise, message
            return _coerce(value, arms[0], where)
        for arg in arms:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise bad()
    if origin is Literal:
        if value not in get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, get_args(tp)[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad()
        return {_coerce(k, get_args(tp)[0], where):
                _coerce(v, get_args(tp)[1], f"{where}.{_short(k).strip(chr(39))}")
                for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


# Keys of earlier versions and what replaced them (a config that still has one is told so).
RENAMED_KEYS = {"inference.mixed_precision": "'inference.autocast' (auto, none, fp16 or bf16; "
                                             "true was auto, false none)"}


def _section(cls: type, raw: Any, source: str, name: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: '{name}' must be a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{name}.{key}" in RENAMED_KEYS:
            raise ConfigError(f"{source}: key '{name}.{key}' is now "
                              f"{RENAMED_KEYS[f'{name}.{key}']}; rename it")
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{name}.{_short(key).strip(chr(39))}' (valid keys: "
                              f"{', '.join(sorted(known))})")
    values = {}
    for key, value in raw.items():
        where = f"{source}: key '{name}.{key}'"
        v = _coerce(value, hints[key], where)
        meta = known[key].metadata
        if "min" in meta and v is not None and v < meta["min"]:
            raise ConfigError(f"{where}: expected >= {meta['min']}, got {_short(v)}")
        if "max" in meta and v is not None and v > meta["max"]:
            raise ConfigError(f"{where}: expected <= {meta['max']}, got {_short(v)}")
        values[key] = v
    return cls(**values)


def config_from_dict(raw: Any, source: str = "<config>") -> RunConfig:
    """Build and validate a RunConfig from a parsed YAML/JSON mapping."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(raw).__name__}")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{source}: unknown section {_short(key)} (valid: {', '.join(SECTIONS)})")
    cfg = RunConfig(**{name: _section(cls, raw.get(name), source, name)
                       for name, cls in SECTIONS.items()})
    mark_explicit(cfg, {f"{name}.{key}" for name, sec in raw.items()
                        if isinstance(sec, Mapping) for key in sec})
    return cfg.validate(source)


def mark_explicit(cfg: RunConfig, keys: "set[str] | frozenset[str]") -> RunConfig:
    """Record which dotted keys the user set (in the file or with --set) on ``cfg``."""
    object.__setattr__(cfg, "_explicit_keys", frozenset(keys))
    return cfg


def explicit_keys(cfg: RunConfig) -> Optional[frozenset[str]]:
    """The dotted keys the user set explicitly, or None when unknown (a config not built by
    :func:`config_from_dict`): then every value counts as set."""
    return getattr(cfg, "_explicit_keys", None)


MAX_CONFIG_BYTES = 1 << 20       # a config is a page of text; anything larger is a mistake
MAX_EXPANDED_NODES = 100_000     # YAML nodes after alias expansion (a real config has < 1000)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures the document's size with every alias expanded, before any Python
    object is built, and refuses documents beyond MAX_EXPANDED_NODES (alias bombs) or with
    recursive aliases."""

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node


def _check_expansion(root: yaml.Node) -> None:
    """Expanded node count of a composed YAML graph (shared nodes counted per use), memoised."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _YamlTooLarge("a recursive alias")
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_EXPANDED_NODES:
                    break
        elif isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
                if total > MAX_EXPANDED_NODES:
                    break
        active.discard(key)
        sizes[key] = total
        if total > MAX_EXPANDED_NODES:
            raise _YamlTooLarge(f"more than {MAX_EXPANDED_NODES} values once its aliases (*name) "
                                "are expanded")
        return total

    size(root)


class _YamlTooLarge(Exception):
    """Raised inside the loader; turned into a ConfigError naming the file."""


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> Python data, bounded in input size, alias expansion and nesting depth."""
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: config is larger than {MAX_CONFIG_BYTES // 1024} KiB; a "
                          "configuration is a short YAML file")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 (SafeLoader subclass)
    except _YamlTooLarge as exc:
        raise ConfigError(f"{source}: refused, the YAML holds {exc}; write the values out "
                          "without nested aliases") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML is nested too deeply; a configuration is sections of "
                          "keys") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{at}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw mapping."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"{source}: override {_short(item)} must look like section.key=value")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        value = parse_yaml(text, f"{source}: override {_short(item)}")
        if raw.get(section) is None:
            raw[section] = {}
        sec = raw[section]
        if not isinstance(sec, dict):
            raise ConfigError(f"{source}: override {_short(item)}: '{section}' is not a mapping")
        sec[key] = value
    return raw


def load_config(path: str | Path, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML config file, apply overrides, validate; raise ConfigError naming the problem."""
    p = Path(path)
    try:
        if p.is_file() and p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{p}: config is larger than {MAX_CONFIG_BYTES // 1024} KiB; a "
                              "configuration is a short YAML file")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read config file ({exc})") from None
    raw = parse_yaml(text, str(p))
    if raw is None:
        raw = {}
    if isinstance(raw, dict):
        raw = apply_overrides(raw, overrides or [], str(p))
    return config_from_dict(raw, str(p))


def config_reference_markdown() -> str:
    """The configuration reference (every key, its type, default and meaning) as Markdown."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            shown = json.dumps(default)
            lines.append(f"| `{name}.{f.name}` | {_type_name(hints[f.name])} | `{shown}` | "
                         f"{f.metadata['help']} |")
    return "\n".join(lines) + "\n"
