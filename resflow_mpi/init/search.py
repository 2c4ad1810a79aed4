"""`resflow search`: nearest tiles in the image gallery by Hamming distance."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..galleries import ImageGallery, ModelGallery, bits_to_str
from ..io.raster import WindowReader, at_gsd, open_scene, scene_statistics
from ..models.hashing import codes_to_bits, pack_bits
from ..stages import normalize
from ..tiling import Tile, Window, window_on_grid


def hash_image(models_dir: str, image: str, window: list[int] | None) -> np.ndarray:
    """Packed code of a GeoTIFF (or one window of it) with the gallery's CEM + hash head."""
    g = ModelGallery(models_dir)
    bands = g.manifest.get("bands", [1, 2, 3])
    native = open_scene(image, bands)
    info = at_gsd(native, g.manifest.get("gsd_m"))  # the ground resolution the gallery saw
    col, row, w, h = window or [0, 0, native.width, native.height]
    if info.native_grid is not None:  # the window is in the file's pixels
        col, row, w, h = window_on_grid(Window(col, row, w, h), (native.width, native.height),
                                        (info.width, info.height))
    if w * h > 4096 * 4096:
        raise InputError(f"{image}: window {w}x{h} is too large to hash at once; pass --window")
    win = Window(col, row, w, h)
    tile = Tile(0, 0, 0, 0, win, win, (0, 0, 0, 0), Window(0, 0, w, h))
    raw, _ = WindowReader(info, bands).read_tile(tile)
    n = g.manifest["normalization"]
    if n["mode"] == "scene":
        mean, std = scene_statistics(info, bands)
        x = normalize(raw, info.dtype, "configured", None, mean, std)
    else:
        x = normalize(raw, info.dtype, n["mode"], n["value_max"], n["mean"], n["std"])
    ext, head = g.load(g.manifest["extractor"]), g.load(g.manifest["hash_head"])
    with torch.inference_mode():
        fmap, _ = ext(torch.from_numpy(x[None]))
        return pack_bits(codes_to_bits(head(fmap))).numpy()[0]


def search_command(args: argparse.Namespace) -> int:
    gal = ImageGallery(args.gallery)
    if args.tile is not None:
        if not 0 <= args.tile < len(gal.codes):
            raise InputError(f"--tile {args.tile}: the gallery has tiles 0..{len(gal.codes) - 1}")
        query = gal.codes[args.tile]
    else:
        models = args.models or str(Path(args.gallery).parent)
        query = hash_image(models, args.image, args.window)
    hits = gal.search(query, args.k)
    if args.json:
        print(json.dumps({"query": bits_to_str(query, gal.n_bits), "hits": hits}, indent=1))
    else:
        print(f"query code {bits_to_str(query, gal.n_bits)}")
        for h in hits:
            print(f"{h['rank']:3d}  tile {h['tile']:6d}  d={h['distance']:2d}  bucket {h['bucket']}  "
                  f"{h['scene']} window {h['window']}")
    return 0
