"""Model gallery (bucket bitstring -> segmentation weights) and image gallery (tile codes + metadata).

Model gallery layout (a directory)::

    manifest.json            architecture specs, per-file SHA-256, bucket codes, training counts, metrics
    cem.pt  hash.pt          feature extractor and hash head (state dicts)
    bucket-<bits>.pt         one segmentation model per bucket, named by its centroid bitstring
    mono.pt                  the single "Mono" model trained on all tiles (for comparison, for
                             buckets whose model did not beat it, and for flagged tiles unless
                             init found a better model for them: ``flagged_tiles``)
    mono-wide.pt             optional: Mono of a wider preset (training.mono_wide_preset)

Each bucket entry keeps ``distance_histogram``: how many of its training tiles lie at Hamming
distance 0..n_bits from its centroid; routing thresholds are quantiles of it (``ood_thresholds``).
A bucket too small for a model of its own, or whose model did not beat Mono on its held-out
tiles (``acceptance``), points at mono.pt (``"same_as": "mono"``).

With one bucket (k = 1) there is no bucket file: the bucket's entry points at mono.pt
(``"same_as": "mono"``), so the gallery is Mono alone under the bucket's code.

Weights are plain state dicts loaded with ``torch.load(weights_only=True)`` (no pickle code runs);
every file's checksum and the architecture in the manifest are verified before use.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .errors import GalleryError
from .models import build_from_spec
from .ood import EmbeddingReference
from .stages import DTYPE_RANGE, OOD_BUCKET, StageModels

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bits_to_str(packed: np.ndarray, n_bits: int) -> str:
    """Packed code (K,) uint8 -> '0101...' of length n_bits."""
    return "".join(str(b) for b in np.unpackbits(packed)[:n_bits])


def save_module(model: nn.Module, path: Path) -> dict[str, Any]:
    """Save a state dict atomically; return its manifest entry (spec, file, sha256, params)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return {"spec": getattr(model, "spec", {}), "file": path.name, "sha256": sha256_file(path),
            "parameters": sum(p.numel() for p in model.parameters())}


class ModelGallery:
    """Reads and verifies a model gallery directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mpath = self.root / MANIFEST
        if not mpath.is_file():
            raise GalleryError(f"{self.root}: not a model gallery (no {MANIFEST}); run `resflow init` "
                               "first or fix models.gallery")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except ValueError as exc:
            raise GalleryError(f"{mpath}: corrupted manifest ({exc})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise GalleryError(f"{mpath}: gallery format {self.manifest.get('format_version')} is "
                               f"not {FORMAT_VERSION}; rebuild it with `resflow init`")
        self.checksum = sha256_file(mpath)
        self.n_bits = int(self.manifest["hash_head"]["n_bits"])
        self.buckets: list[dict[str, Any]] = self.manifest["buckets"]
        self.centroids = np.array([np.packbits(np.array([int(c) for c in b["code"]], np.uint8))
                                   for b in self.buckets], np.uint8)

    def verify(self) -> None:
        """Check every listed file exists and matches its checksum (before any work starts)."""
        for entry in self._entries():
            self._checked_path(entry)

    def _entries(self) -> list[dict[str, Any]]:
        m = self.manifest
        return ([m["extractor"], m["hash_head"], *self.buckets]
                + [m[key] for key in ("mono", "mono_wide", "ood_reference") if m.get(key)])

    def ood_reference(self) -> Optional[EmbeddingReference]:
        """The embedding reference of out-of-distribution scores (``ood``), None for galleries
        built before it."""
        entry = self.manifest.get("ood_reference")
        if not entry:
            return None
        with np.load(self._checked_path(entry)) as a:
            return EmbeddingReference.from_arrays(dict(a))

    def embedding_threshold(self, quantile: float, window_px: int) -> tuple[EmbeddingReference,
                                                                            float]:
        """The reference and the score threshold of ``inference.ood_routing: embedding`` for a run
        whose windows are ``window_px`` (tile_px + 2 halo_px) pixels."""
        ref = self.ood_reference()
        if ref is None:
            raise GalleryError(f"{self.root / MANIFEST}: the gallery has no embedding reference "
                               "(built before embedding routing); rebuild it with `resflow init` "
                               "or set inference.ood_routing: quantile (or off)")
        if ref.window_px != window_px:
            raise GalleryError(
                f"{self.root / MANIFEST}: embedding routing was calibrated on {ref.window_px} px "
                f"windows (tiling.tile_px + 2 x halo_px at init), this run cuts {window_px} px "
                "windows, so its scores would not be comparable: use the tiling of the init "
                "config, retrain with this tiling, or set inference.ood_routing: quantile")
        return ref, ref.threshold(quantile)

    def _checked_path(self, entry: dict[str, Any]) -> Path:
        p = self.root / entry["file"]
        if not p.is_file():
            raise GalleryError(f"{p}: missing from the model gallery (bucket code "
                               f"{entry.get('code', '-')}); rerun `resflow init`")
        if sha256_file(p) != entry["sha256"]:
            raise GalleryError(f"{p}: checksum mismatch, the file is corrupted or was replaced; "
                               "rerun `resflow init`")
        return p

    def load(self, entry: dict[str, Any], expect_spec: Optional[dict[str, Any]] = None) -> nn.Module:
        """Rebuild the module from its spec and load its verified weights."""
        p = self._checked_path(entry)
        spec = entry["spec"]
        if expect_spec is not None:
            for k, v in expect_spec.items():
                if spec.get(k) != v:
                    raise GalleryError(f"{p}: gallery model has {k}={spec.get(k)!r}, the config asks "
                                       f"for {v!r}; use a matching config or rebuild the gallery")
        try:
            model = build_from_spec(spec)
            state = torch.load(p, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError, KeyError, TypeError, EOFError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GalleryError(f"{p}: cannot load weights into {spec.get('arch', spec.get('kind'))} "
                               f"({first[:200]})") from None
        return model.eval()

    def ood_thresholds(self, quantile: float) -> np.ndarray:
        """Per-bucket Hamming-distance thresholds: the ``quantile`` of each bucket's training
        tiles' distances to its centroid, taken as the ceil(q (n + 1))-th smallest of the n
        distances (the split-conformal rule: an in-distribution tile exceeds it with
        probability <= 1 - q), capped at the largest one seen. A bucket without tiles never
        flags."""
        out = np.full(len(self.buckets), self.n_bits, np.int64)
        for i, b in enumerate(self.buckets):
            hist = b.get("distance_histogram")
            if hist is None:
                raise GalleryError(f"{self.root / MANIFEST}: the gallery has no in-bucket distance "
                                   "statistics (built before out-of-distribution routing); "
                                   "rebuild it with `resflow init` or set inference.ood_routing: off")
            counts = np.asarray(hist, np.int64)
            n = int(counts.sum())
            if n == 0:
                continue
            rank = min(n, int(np.ceil(quantile * (n + 1))))
            out[i] = int(np.searchsorted(np.cumsum(counts), rank))
        return out

    def selection_record(self) -> dict[str, Any]:
        """What init chose on its held-out scenes, for run reports: each bucket's verdict
        against Mono, the model of flagged tiles, the held-out scenes (empty for galleries
        made before scene-level validation)."""
        m = self.manifest
        if "validation" not in m:
            return {}
        return {"buckets": [{"code": b.get("code"), "hash_map": b.get("hash_map"),
                             **b.get("acceptance", {})} for b in m.get("buckets", [])],
                "flagged_tiles": m.get("flagged_tiles"), "validation": m["validation"],
                "k": len(m.get("buckets", [])), "hash_warning": m.get("hash_warning")}

    def flagged_model(self) -> str:
        """The name of the model of flagged tiles: "mono", "mono-wide" or "bucket <index>"."""
        choice = self.manifest.get("flagged_tiles") or {"model": "mono"}
        if choice.get("model") == "bucket":
            return f"bucket {int(choice['bucket'])}"
        return "mono-wide" if choice.get("model") == "mono-wide" and \
            self.manifest.get("mono_wide") else "mono"

    def flagged_entry(self) -> dict[str, Any]:
        """The model that maps tiles routing flags: the one init found better than Mono on the
        held-out tiles most unlike the training scenes (``flagged_tiles``), else Mono."""
        choice = self.manifest.get("flagged_tiles") or {"model": "mono"}
        if choice.get("model") == "bucket":
            return self.buckets[int(choice["bucket"])]
        if choice.get("model") == "mono-wide" and self.manifest.get("mono_wide"):
            return self.manifest["mono_wide"]
        return self.manifest["mono"]

    def stage_models(self, device: torch.device, arch: Optional[str] = None,
                     preset: Optional[str] = None, bucket_override: Optional[str] = None,
                     ood_quantile: Optional[float] = None, ood_method: str = "quantile",
                     window_px: Optional[int] = None) -> StageModels:
        """The networks the stages need; segmenters load lazily on first use of a bucket.

        ``bucket_override='mono'`` (or ``'mono-wide'``) routes every bucket to the Mono model
        (for comparisons), ``'flagged'`` to the model of flagged tiles (``flagged_entry``). ``ood_quantile`` given: tiles beyond their threshold get bucket
        OOD_BUCKET (flagged) and the model of ``flagged_entry``; ``ood_method`` "quantile" thresholds each bucket's
        Hamming distances (``ood_thresholds``), "embedding" the embedding score
        (``embedding_threshold``, for runs of ``window_px`` windows). Tiles are scored by the
        embedding reference whenever the gallery has one (evaluate's routing column)."""
        expect = {k: v for k, v in (("arch", arch), ("preset", preset)) if v is not None}
        extractor = self.load(self.manifest["extractor"])
        hash_head = self.load(self.manifest["hash_head"])
        if len(self.buckets) == 0:
            raise GalleryError(f"{self.root}: the gallery lists no bucket models")
        if bucket_override == "mono-wide":
            if not self.manifest.get("mono_wide"):
                raise GalleryError(f"{self.root}: the gallery has no wide Mono model (set "
                                   "training.mono_wide_preset and rerun `resflow init`)")
            expect.pop("preset", None)
        thresholds, limit = None, None
        reference = self.ood_reference()
        if ood_quantile is not None and ood_method == "embedding":
            reference, limit = self.embedding_threshold(ood_quantile, int(window_px or 0))
        elif ood_quantile is not None:
            thresholds = self.ood_thresholds(ood_quantile)

        def load_segmenter(bucket: int) -> nn.Module:
            if bucket_override == "mono-wide":
                entry = self.manifest["mono_wide"]
            elif bucket_override == "mono":
                entry = self.manifest["mono"]
            elif bucket_override == "flagged" or bucket == OOD_BUCKET:
                entry = self.flagged_entry()
            else:
                entry = self.buckets[bucket]
            return self.load(entry, expect).to(device).to(memory_format=torch.channels_last)
        return StageModels(extractor, hash_head, self.centroids, load_segmenter, thresholds,
                           reference, limit)


class ImageGallery:
    """Every tile's hash code with its metadata, in one HDF5 file, searchable by Hamming distance."""

    FIELDS = ("code", "scene", "window", "extent", "bucket")

    def __init__(self, path: str | Path):
        import h5py
        self.path = Path(path)
        if not self.path.is_file():
            raise GalleryError(f"{self.path}: image gallery not found; run `resflow init` first")
        try:
            with h5py.File(self.path, "r") as f:
                self.codes = f["code"][...]
                self.scene = f["scene"][...]
                self.window = f["window"][...]
                self.extent = f["extent"][...]
                # EPSG:4326 extents (galleries from before archives spanned CRSs lack them)
                self.extent_wgs84 = f["extent_wgs84"][...] if "extent_wgs84" in f else None
                self.bucket = f["bucket"][...]
                self.n_bits = int(f.attrs["n_bits"])
                self.scenes: list[dict[str, Any]] = json.loads(f.attrs["scenes_json"])
        except (OSError, KeyError, ValueError) as exc:
            raise GalleryError(f"{self.path}: corrupted image gallery ({exc})") from None

    @staticmethod
    def write(path: str | Path, codes: np.ndarray, scene: np.ndarray, window: np.ndarray,
              extent: np.ndarray, bucket: np.ndarray, n_bits: int,
              scenes: Sequence[dict[str, Any]],
              extent_wgs84: Optional[np.ndarray] = None) -> None:
        """Write a gallery atomically (temporary name, then rename). ``extent`` is in each tile's
        scene CRS; ``extent_wgs84`` the same footprints in EPSG:4326 (lon/lat), comparable across
        scenes in different CRSs."""
        import h5py
        path = Path(path)
        tmp = path.with_suffix(".tmp.h5")
        with h5py.File(tmp, "w") as f:
            f["code"] = codes.astype(np.uint8)
            f["scene"] = scene.astype(np.int32)
            f["window"] = window.astype(np.int64)
            f["extent"] = extent.astype(np.float64)
            if extent_wgs84 is not None:
                f["extent_wgs84"] = extent_wgs84.astype(np.float64)
            f["bucket"] = bucket.astype(np.int16)
            f.attrs["n_bits"] = n_bits
            f.attrs["scenes_json"] = json.dumps(list(scenes))
        os.replace(tmp, path)

    def search(self, query: np.ndarray, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` tiles nearest to a packed code (K,) by Hamming distance (ties: lower index)."""
        from .models.hashing import hamming_distance
        d = hamming_distance(torch.from_numpy(query[None].astype(np.uint8)),
                             torch.from_numpy(self.codes)).numpy()[0]
        order = np.lexsort((np.arange(len(d)), d))[:k]
        return [{"rank": r, "tile": int(i), "distance": int(d[i]), "bucket": int(self.bucket[i]),
                 "scene": self.scenes[int(self.scene[i])]["name"],
                 "window": [int(v) for v in self.window[i]],
                 "extent": [float(v) for v in self.extent[i]],
                 "extent_wgs84": None if self.extent_wgs84 is None else
                 [float(v) for v in self.extent_wgs84[i]]} for r, i in enumerate(order)]


# -- the gallery is the contract -------------------------------------------------------------------
# What a model gallery was trained with, as dotted run-config keys. A run must use the same values:
# the networks only mean something on inputs prepared exactly as in training. Tile and halo sizes are
# not part of the contract: the segmentation networks are fully convolutional and the feature
# extractor pools every tile to a fixed size, so any tile_px/halo_px the config accepts is valid.
CONTRACT_KEYS = ("scenes.bands", "normalization.mode", "normalization.value_max",
                 "normalization.mean", "normalization.std", "models.hash_bits", "models.embed_dim",
                 "models.arch", "models.preset", "scenes.gsd_m")


def gallery_contract(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run-config values a gallery's manifest records (keys missing in old manifests are left out)."""
    norm = manifest.get("normalization") or {}
    found: dict[str, Any] = {
        "scenes.bands": manifest.get("bands"),
        "normalization.mode": norm.get("mode"),
        "normalization.mean": norm.get("mean"),
        "normalization.std": norm.get("std"),
        "models.hash_bits": (manifest.get("hash_head") or {}).get("n_bits"),
        "models.embed_dim": ((manifest.get("extractor") or {}).get("spec") or {}).get("embed_dim"),
        "models.arch": manifest.get("arch"),
        "models.preset": manifest.get("preset"),
    }
    contract = {k: v for k, v in found.items() if v is not None}
    if "gsd_m" in manifest:  # null is a real value here: each scene at its own pixel size
        contract["scenes.gsd_m"] = manifest["gsd_m"]
    if "value_max" in norm:  # null is a real value here: the data type's default divisor
        vmax = norm["value_max"]
        dtypes = manifest.get("train_dtypes") or []
        if vmax is None and len(dtypes) == 1 and dtypes[0] in DTYPE_RANGE:
            vmax = DTYPE_RANGE[dtypes[0]]  # what the networks saw as 1.0 during training
        contract["normalization.value_max"] = vmax
    return contract


def _relevant(key: str, mode: Any) -> bool:
    """Whether ``key`` changes the network input under normalisation ``mode``."""
    if key == "normalization.value_max":
        return mode == "range"
    if key in ("normalization.mean", "normalization.std"):
        return mode == "configured"
    return True


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def _show(value: Any, key: str = "") -> str:
    if value is None:
        return ("null (each scene at its own pixel size)" if key == "scenes.gsd_m"
                else "null (the data type's default)")
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _manifest_of(manifest_or_gallery: "ModelGallery | dict[str, Any]") -> tuple[dict[str, Any], str]:
    if isinstance(manifest_or_gallery, ModelGallery):
        return manifest_or_gallery.manifest, str(manifest_or_gallery.root)
    return manifest_or_gallery, str(manifest_or_gallery.get("_root", "<gallery>"))


def _run_value(cfg: Any, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _null_divisor(manifest: dict[str, Any]) -> bool:
    """Whether the gallery was trained with ``normalization.value_max`` null (its data type's
    full scale): a run that also leaves it null asks for the same thing."""
    norm = manifest.get("normalization") or {}
    return "value_max" in norm and norm["value_max"] is None


def _mismatches(manifest: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    contract = gallery_contract(manifest)
    mode = contract.get("normalization.mode", cfg.normalization.mode)
    out = []
    for key in CONTRACT_KEYS:
        if key not in contract or not _relevant(key, mode):
            continue
        mine = _run_value(cfg, key)
        if key == "normalization.value_max" and mine is None and _null_divisor(manifest):
            continue  # both null; resolve_run_config pins the training type's full scale
        if not _same(mine, contract[key]):
            out.append((key, mine, contract[key]))
    return out


def check_run_config(manifest_or_gallery: "ModelGallery | dict[str, Any]", cfg: Any) -> None:
    """Refuse a run config that differs from what the gallery was trained with (one ConfigError
    naming the key and both values). Compares every key of :data:`CONTRACT_KEYS` the manifest has."""
    from .errors import ConfigError
    manifest, root = _manifest_of(manifest_or_gallery)
    bad = _mismatches(manifest, cfg)
    if bad:
        key, mine, theirs = bad[0]
        more = f" (and {len(bad) - 1} more: {', '.join(k for k, _, _ in bad[1:])})" if len(bad) > 1 else ""
        if key == "normalization.value_max" and theirs is None:
            # A null divisor whose data type the gallery does not record (galleries written
            # before train_dtypes): no number can be checked against it, so none is accepted.
            raise ConfigError(f"{key} is {_show(mine)} but the gallery {root} was trained with "
                              "null, the full scale of a training data type it does not record"
                              f"{more}: remove the setting to map integer scenes as in training; "
                              "to map float scenes, retrain the gallery with `resflow init` (it "
                              "then records the range)")
        raise ConfigError(f"{key} is {_show(mine, key)} but the gallery {root} was trained with "
                          f"{_show(theirs, key)}{more}: remove the setting (the run then uses the "
                          "gallery's value) or retrain the gallery with `resflow init`")


def resolve_run_config(manifest_or_gallery: "ModelGallery | dict[str, Any]", cfg: Any) -> Any:
    """The run config with every contract value the user did not set taken from the gallery, then
    checked with :func:`check_run_config`.

    Inheritance rule: a contract key the user set (in the YAML file or with ``--set``) must equal
    the gallery's value, else the run is refused; a key left unset takes the gallery's value. When
    the config does not know which keys were set (built in code), nothing is inherited and every
    difference is refused."""
    import dataclasses
    from .config import explicit_keys, mark_explicit
    manifest, _ = _manifest_of(manifest_or_gallery)
    explicit = explicit_keys(cfg)
    if explicit is not None:
        contract = gallery_contract(manifest)
        changes: dict[str, dict[str, Any]] = {}
        for key, _, theirs in _mismatches(manifest, cfg):
            if key not in explicit:
                section, name = key.split(".")
                changes.setdefault(section, {})[name] = theirs
        # A null divisor in training meant the training data type's full scale (e.g. 255 for
        # uint8): the run inherits that number, so a scene of another type is refused, not clipped.
        vmax_key = "normalization.value_max"
        if (vmax_key not in explicit and _null_divisor(manifest)
                and contract.get(vmax_key) is not None and cfg.normalization.value_max is None):
            changes.setdefault("normalization", {})["value_max"] = contract[vmax_key]
        # The inherited mode brings the values it needs (e.g. mean/std for mode=configured).
        mode_key = "normalization.mode"
        if "normalization" in changes and mode_key not in explicit and mode_key in contract:
            for key in ("normalization.value_max", "normalization.mean", "normalization.std"):
                if key in contract and key not in explicit:
                    changes["normalization"][key.split(".")[1]] = contract[key]
        if changes:
            cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **v)
                                              for s, v in changes.items()})
            cfg = mark_explicit(cfg.validate("gallery manifest"), explicit)
    check_run_config(manifest_or_gallery, cfg)
    return cfg
