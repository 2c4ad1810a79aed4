"""Fuzz driver (run in a child process so a crash or hang is caught by the test, not fatal to it).

Usage: python fuzz_driver.py tiff|yaml SEED N WORKDIR. Prints "ok N" when every case ended either
in success or in one of the project's own errors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml

from resflow_mpi.config import config_from_dict, load_config
from resflow_mpi.errors import ResflowError
from resflow_mpi.io.raster import WindowReader, open_scene, tile_coverage
from resflow_mpi.synth import write_raster_from_array
from resflow_mpi.tiling import tile_grid

GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)


def fuzz_tiff(rng: np.random.Generator, n: int, work: Path) -> int:
    arr = rng.integers(1, 255, (3, 300, 300)).astype(np.uint8)
    arr[:, :40, :] = 0
    clean = write_raster_from_array(work / "clean.tif", arr, 32637, GT, 0).read_bytes()
    for i in range(n):
        data = bytearray(clean)
        kind = rng.integers(0, 4)
        if kind == 0:      # flip random bytes anywhere
            for pos in rng.integers(0, len(data), rng.integers(1, 50)):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 1:    # damage the header and IFD
            for pos in rng.integers(0, min(len(data), 512), rng.integers(1, 20)):
                data[pos] = int(rng.integers(0, 256))
        elif kind == 2:    # truncate
            data = data[: int(rng.integers(0, len(data)))]
        else:              # random garbage of random size
            data = bytearray(rng.integers(0, 256, int(rng.integers(0, 4096))).astype(np.uint8).tobytes())
        p = work / f"f{i}.tif"
        p.write_bytes(bytes(data))
        try:
            info = open_scene(p)
            tile_coverage(info, 64, [1, 2, 3])
            reader = WindowReader(info, [1, 2, 3])
            for t in list(tile_grid(0, info.width, info.height, 64, 8))[:: 7]:
                reader.read_tile(t)
            reader.close()
        except ResflowError:
            pass
        p.unlink()
    return n


def random_yaml_value(rng: np.random.Generator, depth: int = 0) -> object:
    k = rng.integers(0, 7 if depth < 3 else 5)
    if k == 0:
        return int(rng.integers(-5, 5000))
    if k == 1:
        return float(rng.normal() * 100)
    if k == 2:
        return bool(rng.integers(0, 2))
    if k == 3:
        return str(rng.choice(["static", "dynamic", "unet", "tiny", "auto", "", "x" * 5, "local[2]"]))
    if k == 4:
        return None
    if k == 5:
        return [random_yaml_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    keys = ["scenes", "tiling", "models", "inference", "parallel", "output", "tile_px",
            "halo_px", "batch_size", "policy", "bands", "inputs", "gallery", "threshold", "bogus"]
    return {str(rng.choice(keys)): random_yaml_value(rng, depth + 1) for _ in range(rng.integers(0, 5))}


def fuzz_yaml(rng: np.random.Generator, n: int, work: Path) -> int:
    p = work / "c.yaml"
    for i in range(n):
        if i % 3 == 0:  # structurally random YAML text, also invalid YAML
            text = "".join(rng.choice(list("ab:{}[]- \n\t'\"#&*!|>%@`,0123456789"))
                           for _ in range(rng.integers(0, 120)))
        else:
            text = yaml.safe_dump(random_yaml_value(rng))
        p.write_text(text)
        try:
            load_config(p)
        except ResflowError:
            pass
        try:
            config_from_dict(random_yaml_value(rng))
        except ResflowError:
            pass
    return n


if __name__ == "__main__":
    mode, seed, n, work = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    rng = np.random.default_rng(seed)
    done = (fuzz_tiff if mode == "tiff" else fuzz_yaml)(rng, n, work)
    print(f"ok {done}")
