"""Model gallery (bucket bitstring -> segmentation weights) and image gallery (tile codes + metadata).

Model gallery layout (a directory)::

    manifest.json            architecture specs, per-file SHA-256, bucket codes, training counts, metrics
    cem.pt  hash.pt          feature extractor and hash head (state dicts)
    bucket-<bits>.pt         one segmentation model per bucket, named by its centroid bitstring
    mono.pt                  the single "Mono" model trained on all tiles (for comparison, and
                             for out-of-distribution tiles when routing is on)
    mono-wide.pt             optional: Mono of a wider preset (training.mono_wide_preset)

Each bucket entry keeps ``distance_histogram``: how many of its training tiles lie at Hamming
distance 0..n_bits from its centroid; routing thresholds are quantiles of it (``ood_thresholds``).
A bucket too small for a model of its own points at mono.pt (``"same_as": "mono"``).

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
from .stages import OOD_BUCKET, StageModels

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
                + [m[key] for key in ("mono", "mono_wide") if m.get(key)])

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

    def stage_models(self, device: torch.device, arch: Optional[str] = None,
                     preset: Optional[str] = None, bucket_override: Optional[str] = None,
                     ood_quantile: Optional[float] = None) -> StageModels:
        """The networks the stages need; segmenters load lazily on first use of a bucket.

        ``bucket_override='mono'`` (or ``'mono-wide'``) routes every bucket to the Mono model
        (for comparisons). ``ood_quantile`` given: tiles beyond their bucket's threshold
        (``ood_thresholds``) get bucket OOD_BUCKET and the Mono model."""
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
        thresholds = self.ood_thresholds(ood_quantile) if ood_quantile is not None else None

        def load_segmenter(bucket: int) -> nn.Module:
            if bucket_override == "mono-wide":
                entry = self.manifest["mono_wide"]
            elif bucket_override == "mono" or bucket == OOD_BUCKET:
                entry = self.manifest["mono"]
            else:
                entry = self.buckets[bucket]
            return self.load(entry, expect).to(device).to(memory_format=torch.channels_last)
        return StageModels(extractor, hash_head, self.centroids, load_segmenter, thresholds)


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
                self.bucket = f["bucket"][...]
                self.n_bits = int(f.attrs["n_bits"])
                self.scenes: list[dict[str, Any]] = json.loads(f.attrs["scenes_json"])
        except (OSError, KeyError, ValueError) as exc:
            raise GalleryError(f"{self.path}: corrupted image gallery ({exc})") from None

    @staticmethod
    def write(path: str | Path, codes: np.ndarray, scene: np.ndarray, window: np.ndarray,
              extent: np.ndarray, bucket: np.ndarray, n_bits: int,
              scenes: Sequence[dict[str, Any]]) -> None:
        """Write a gallery atomically (temporary name, then rename)."""
        import h5py
        path = Path(path)
        tmp = path.with_suffix(".tmp.h5")
        with h5py.File(tmp, "w") as f:
            f["code"] = codes.astype(np.uint8)
            f["scene"] = scene.astype(np.int32)
            f["window"] = window.astype(np.int64)
            f["extent"] = extent.astype(np.float64)
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
                 "extent": [float(v) for v in self.extent[i]]} for r, i in enumerate(order)]
