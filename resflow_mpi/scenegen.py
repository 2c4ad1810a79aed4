"""Procedural rendering of the synthetic archive: pure numpy, no files.

Each scene belongs to one *acquisition regime* (season, haze, sensor, sun, urban or rural layout),
so an archive differs the way real archives do and clustering of tile embeddings has structure to
find. Every pixel is a pure function of (scene seed, scene name, pixel position), computed from
counter-based hashes with vectorised numpy integer maths, so any window can be rendered on its own
(``render_window``), the block size never changes the output and a 20,000 x 20,000 scene never has
to fit in memory.

Buildings live on a global cell grid (one candidate building per ``cell_px`` cell). A building and
its cast shadow are placed so they stay inside their own cell, which lets a pixel find everything
that can cover it by looking at its own cell only.

``archive_specs`` lists the scenes of each preset archive. Writing them as GeoTIFFs is
``resflow_mpi.io.scenewriter``; ``resflow_mpi.synth`` assembles archives from both.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from resflow_mpi.errors import ConfigError

Colour = tuple[float, float, float, float]  # reflectance 0..1 in band order red, green, blue, NIR

IMAGE_NODATA = 0
MASK_BACKGROUND = 0
MASK_BUILDING = 1
MASK_NODATA = 255
UINT16_MAX_DN = 2047          # 11-bit sensors store their counts in uint16
TIFF_BLOCK_PX = 256
BAND_NAMES = ("red", "green", "blue", "nir")
SPLITS = ("train", "test")
PRESETS = ("tiny", "demo", "large", "tiny-single", "tiny-eval")
SINGLE_REGIME = "temperate-urban"   # the one regime of the "tiny-single" preset
_DTYPE_MAX_DN = {"uint8": 255, "uint16": UINT16_MAX_DN}


@dataclass(frozen=True)
class Regime:
    """How one family of acquisitions looks: land cover, layout, sun, atmosphere and sensor."""

    name: str
    region: str                 # region name the training scenes of this regime carry
    epsg: int                   # UTM zone the regime's scenes are projected in
    sensor: str
    month: int                  # acquisition month (season)
    layout: str                 # "urban": street grid, dense blocks; "rural": roads + scattered houses
    ground_low: Colour          # background colour at low texture values
    ground_high: Colour         # background colour at high texture values
    texture_px: float           # lattice spacing of the coarsest background noise octave
    texture_contrast: float     # stretch of the background noise around its mean
    parcel_px: float            # side of rural field parcels; 0 = no parcel patchwork
    tree_colour: Colour
    tree_cover: float           # approximate fraction of background covered by tree crowns
    tree_px: float              # lattice spacing of the tree-crown noise
    road_colour: Colour
    road_px: float              # road width
    roof_palette: tuple[Colour, ...]
    building_density: float     # probability that a (non-street) cell holds a building
    building_side_px: tuple[float, float]
    building_height_m: tuple[float, float]
    max_rotation_deg: float
    gable_fraction: float       # share of roofs with a ridge (one half shaded)
    cell_px: int                # building cell size; one candidate building per cell
    street_period_cells: int    # urban: every n-th cell row/column is a street
    shadow_strength: float      # fraction of light removed inside cast shadows
    sun_azimuth_deg: float      # clockwise from north
    sun_elevation_deg: float
    haze: float                 # 0..1 mix towards the haze colour (veil + contrast loss)
    haze_colour: Colour
    gain: Colour                # per-band sensor gain
    offset: Colour              # per-band sensor offset (reflectance units)
    noise_sigma: float          # per-pixel sensor noise, reflectance units

    def __post_init__(self) -> None:
        if self.layout not in ("urban", "rural"):
            raise ConfigError(f"regime {self.name!r}: layout must be 'urban' or 'rural', got {self.layout!r}")
        if not self.roof_palette:
            raise ConfigError(f"regime {self.name!r}: roof_palette must hold at least one colour")
        if self.cell_px < 16:
            raise ConfigError(f"regime {self.name!r}: cell_px must be >= 16, got {self.cell_px}")


REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime(
        name="temperate-urban", region="midland", epsg=32633, sensor="SYN-OPT-1", month=7,
        layout="urban", ground_low=(0.32, 0.37, 0.22, 0.44), ground_high=(0.48, 0.50, 0.34, 0.40),
        texture_px=96, texture_contrast=2.0, parcel_px=0,
        tree_colour=(0.07, 0.17, 0.06, 0.52), tree_cover=0.15, tree_px=36,
        road_colour=(0.46, 0.46, 0.47, 0.34), road_px=12,
        roof_palette=((0.58, 0.24, 0.16, 0.32), (0.46, 0.46, 0.48, 0.36), (0.26, 0.26, 0.29, 0.24)),
        building_density=0.8, building_side_px=(14, 40), building_height_m=(6, 15),
        max_rotation_deg=4, gable_fraction=0.6, cell_px=48, street_period_cells=4,
        shadow_strength=0.55, sun_azimuth_deg=150, sun_elevation_deg=55,
        haze=0.04, haze_colour=(0.75, 0.80, 0.90, 0.70),
        gain=(1.0, 1.0, 1.0, 1.0), offset=(0.02, 0.02, 0.03, 0.02), noise_sigma=0.012),
    Regime(
        name="arid-rural", region="steppe", epsg=32637, sensor="SYN-OPT-2", month=8,
        layout="rural", ground_low=(0.52, 0.42, 0.30, 0.50), ground_high=(0.66, 0.54, 0.38, 0.56),
        texture_px=160, texture_contrast=1.6, parcel_px=220,
        tree_colour=(0.22, 0.24, 0.14, 0.35), tree_cover=0.03, tree_px=20,
        road_colour=(0.72, 0.64, 0.52, 0.58), road_px=10,
        roof_palette=((0.84, 0.84, 0.82, 0.70), (0.72, 0.64, 0.50, 0.55), (0.50, 0.30, 0.20, 0.38)),
        building_density=0.16, building_side_px=(8, 26), building_height_m=(3, 6),
        max_rotation_deg=25, gable_fraction=0.2, cell_px=64, street_period_cells=0,
        shadow_strength=0.7, sun_azimuth_deg=120, sun_elevation_deg=68,
        haze=0.02, haze_colour=(0.80, 0.78, 0.72, 0.70),
        gain=(1.05, 1.0, 0.95, 1.0), offset=(0.01, 0.01, 0.01, 0.01), noise_sigma=0.008),
    Regime(
        name="hazy-megacity", region="delta", epsg=32644, sensor="SYN-OPT-1", month=11,
        layout="urban", ground_low=(0.36, 0.36, 0.34, 0.30), ground_high=(0.46, 0.45, 0.42, 0.36),
        texture_px=64, texture_contrast=1.5, parcel_px=0,
        tree_colour=(0.14, 0.20, 0.12, 0.40), tree_cover=0.05, tree_px=28,
        road_colour=(0.28, 0.28, 0.29, 0.22), road_px=16,
        roof_palette=((0.56, 0.56, 0.55, 0.45), (0.24, 0.34, 0.56, 0.30), (0.82, 0.82, 0.80, 0.65)),
        building_density=0.92, building_side_px=(16, 44), building_height_m=(10, 40),
        max_rotation_deg=2, gable_fraction=0.05, cell_px=48, street_period_cells=3,
        shadow_strength=0.45, sun_azimuth_deg=200, sun_elevation_deg=42,
        haze=0.42, haze_colour=(0.72, 0.77, 0.88, 0.60),
        gain=(0.92, 0.95, 1.0, 0.9), offset=(0.03, 0.03, 0.05, 0.02), noise_sigma=0.02),
    Regime(
        name="snow-rural", region="tundra", epsg=32612, sensor="SYN-OPT-3", month=1,
        layout="rural", ground_low=(0.70, 0.72, 0.78, 0.66), ground_high=(0.86, 0.88, 0.92, 0.80),
        texture_px=128, texture_contrast=1.4, parcel_px=0,
        tree_colour=(0.07, 0.11, 0.09, 0.24), tree_cover=0.25, tree_px=24,
        road_colour=(0.42, 0.42, 0.45, 0.35), road_px=9,
        roof_palette=((0.20, 0.18, 0.18, 0.20), (0.48, 0.15, 0.12, 0.26), (0.30, 0.32, 0.36, 0.28)),
        building_density=0.2, building_side_px=(10, 30), building_height_m=(4, 8),
        max_rotation_deg=15, gable_fraction=0.7, cell_px=64, street_period_cells=0,
        shadow_strength=0.45, sun_azimuth_deg=170, sun_elevation_deg=18,
        haze=0.05, haze_colour=(0.85, 0.88, 0.95, 0.80),
        gain=(0.95, 0.95, 1.0, 0.9), offset=(0.0, 0.0, 0.01, 0.0), noise_sigma=0.006),
    Regime(
        name="tropical-suburban", region="coast", epsg=32718, sensor="SYN-OPT-2", month=3,
        layout="urban", ground_low=(0.02, 0.13, 0.03, 0.55), ground_high=(0.07, 0.25, 0.06, 0.62),
        texture_px=48, texture_contrast=2.2, parcel_px=0,
        tree_colour=(0.04, 0.13, 0.04, 0.58), tree_cover=0.35, tree_px=22,
        road_colour=(0.40, 0.36, 0.32, 0.30), road_px=10,
        roof_palette=((0.20, 0.40, 0.72, 0.30), (0.78, 0.42, 0.16, 0.40), (0.86, 0.86, 0.86, 0.70)),
        building_density=0.5, building_side_px=(10, 30), building_height_m=(3, 8),
        max_rotation_deg=10, gable_fraction=0.5, cell_px=48, street_period_cells=5,
        shadow_strength=0.5, sun_azimuth_deg=60, sun_elevation_deg=64,
        haze=0.12, haze_colour=(0.70, 0.78, 0.85, 0.70),
        gain=(1.1, 1.0, 0.9, 1.05), offset=(0.01, 0.02, 0.02, 0.01), noise_sigma=0.035),
    Regime(
        name="desert-city", region="dunes", epsg=32639, sensor="SYN-OPT-3", month=5,
        layout="urban", ground_low=(0.74, 0.64, 0.46, 0.62), ground_high=(0.86, 0.76, 0.58, 0.70),
        texture_px=200, texture_contrast=1.3, parcel_px=0,
        tree_colour=(0.25, 0.30, 0.16, 0.45), tree_cover=0.04, tree_px=18,
        road_colour=(0.24, 0.23, 0.22, 0.22), road_px=14,
        roof_palette=((0.80, 0.74, 0.62, 0.64), (0.68, 0.68, 0.66, 0.58), (0.92, 0.90, 0.86, 0.74)),
        building_density=0.72, building_side_px=(12, 40), building_height_m=(4, 12),
        max_rotation_deg=3, gable_fraction=0.0, cell_px=48, street_period_cells=4,
        shadow_strength=0.65, sun_azimuth_deg=250, sun_elevation_deg=34,
        haze=0.12, haze_colour=(0.86, 0.78, 0.64, 0.75),
        gain=(1.0, 0.97, 0.92, 1.0), offset=(0.0, 0.0, 0.0, 0.0), noise_sigma=0.01),
)}

# Regimes no preset ever trains on: the evaluation's unseen region (a new palette, layout and
# sensor), so RESFlow's buckets meet tiles unlike all of their training tiles.
UNSEEN_REGIMES: dict[str, Regime] = {r.name: r for r in (
    Regime(
        # A colour-infrared sensor (NIR, red, green as the three bands): vegetation is bright
        # red, soil pink, water and asphalt dark cyan; no training regime looks like it.
        name="volcanic-island", region="caldera", epsg=32628, sensor="SYN-CIR-9", month=9,
        layout="rural", ground_low=(0.58, 0.20, 0.26, 0.20), ground_high=(0.80, 0.32, 0.36, 0.30),
        texture_px=40, texture_contrast=2.6, parcel_px=90,
        tree_colour=(0.92, 0.10, 0.18, 0.50), tree_cover=0.25, tree_px=14,
        road_colour=(0.08, 0.30, 0.34, 0.08), road_px=6,
        roof_palette=((0.20, 0.62, 0.70, 0.60), (0.45, 0.80, 0.85, 0.50), (0.10, 0.35, 0.45, 0.80)),
        building_density=0.55, building_side_px=(8, 22), building_height_m=(3, 6),
        max_rotation_deg=45, gable_fraction=0.9, cell_px=36, street_period_cells=0,
        shadow_strength=0.8, sun_azimuth_deg=330, sun_elevation_deg=30,
        haze=0.0, haze_colour=(0.70, 0.70, 0.75, 0.70),
        gain=(1.0, 1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0, 0.0), noise_sigma=0.03),
)}
ALL_REGIMES: dict[str, Regime] = {**REGIMES, **UNSEEN_REGIMES}
UNSEEN_REGIME = "volcanic-island"

# Held-out regions: each borrows a training regime, perturbed, in a neighbouring UTM zone.
HELDOUT_REGIONS: dict[str, tuple[str, int]] = {
    "heldout-A": ("temperate-urban", 32634),
    "heldout-B": ("tropical-suburban", 32719),
    "heldout-C": ("desert-city", 32640),
}
HELDOUT_PERTURB = 0.08
# The evaluation protocol's held-out regions (demo preset), each several scenes: (regime, perturb)
# per scene. perturbed: known regimes moved by HELDOUT_PERTURB; unseen: a regime never trained on;
# mix: both kinds, alternating.
EVAL_REGIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "heldout-perturbed": (("temperate-urban", HELDOUT_PERTURB), ("tropical-suburban", HELDOUT_PERTURB),
                          ("desert-city", HELDOUT_PERTURB), ("arid-rural", HELDOUT_PERTURB)),
    "heldout-unseen": ((UNSEEN_REGIME, 0.0),) * 4,
    "heldout-mix": (("hazy-megacity", HELDOUT_PERTURB), (UNSEEN_REGIME, 0.0),
                    ("snow-rural", HELDOUT_PERTURB), (UNSEEN_REGIME, 0.0)),
}
EVAL_SCENE_PX = 768           # demo held-out scenes: 9 tiles of 256 px each, 36 per region
_SCENE_JITTER = 0.02          # every scene differs a little from its regime, like real acquisitions


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one synthetic scene; the pixels are a pure function of it."""

    name: str
    width: int
    height: int
    regime: str
    region: str
    split: str                  # "train" or "test"
    seed: int
    dtype: str = "uint8"
    bands: int = 3
    epsg: int = 32637
    origin_xy: tuple[float, float] = (500000.0, 1000000.0)
    pixel_m: float = 0.5
    nodata_collar: bool = False
    perturb: float = 0.0        # extra random departure from the regime (held-out regions)

    def __post_init__(self) -> None:
        where = f"scene {self.name!r}"
        if not self.name or any(ch in self.name for ch in "/\\:") or self.name.startswith("."):
            raise ConfigError(f"{where}: name must be a plain file stem")
        if self.regime not in ALL_REGIMES:
            raise ConfigError(f"{where}: unknown regime {self.regime!r}; use one of "
                              f"{sorted(ALL_REGIMES)}")
        if self.split not in SPLITS:
            raise ConfigError(f"{where}: split must be one of {SPLITS}, got {self.split!r}")
        if self.dtype not in _DTYPE_MAX_DN:
            raise ConfigError(f"{where}: dtype must be one of {sorted(_DTYPE_MAX_DN)}, got {self.dtype!r}")
        if self.bands not in (3, 4):
            raise ConfigError(f"{where}: bands must be 3 (RGB) or 4 (RGB+NIR), got {self.bands}")
        if self.width <= 0 or self.height <= 0:
            raise ConfigError(f"{where}: size must be positive, got {self.width}x{self.height}")
        if not self.pixel_m > 0:
            raise ConfigError(f"{where}: pixel_m must be positive, got {self.pixel_m}")
        if self.perturb < 0:
            raise ConfigError(f"{where}: perturb must be >= 0, got {self.perturb}")

    @property
    def geotransform(self) -> tuple[float, float, float, float, float, float]:
        """North-up GDAL geotransform: origin at the top-left corner, square pixels."""
        x0, y0 = self.origin_xy
        return (float(x0), float(self.pixel_m), 0.0, float(y0), 0.0, -float(self.pixel_m))

    def digest(self) -> str:
        """Short stable fingerprint, stored in the image so a stale file is never reused."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Counter-based hashing. Integer maths only, so every pixel's value is bit-identical whatever
# block it is computed in.

_M64 = (1 << 64) - 1
_U = np.uint64
_K_ROW = _U(0x9E3779B97F4A7C15)
_K_COL = _U(0xC2B2AE3D27D4EB4F)
_K_PARAM = _U(0x165667B19E3779F9)


def _splitmix_int(x: int) -> int:
    """splitmix64 on a Python int (scalar keys)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (returns a new array)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> _U(30))
        x *= _U(0xBF58476D1CE4E5B9)
        x ^= x >> _U(27)
        x *= _U(0x94D049BB133111EB)
        x ^= x >> _U(31)
    return x


def _as_u64(values: np.ndarray) -> np.ndarray:
    # Negative cell indices (margins left of the scene) wrap to distinct uint64 values.
    return np.asarray(values, dtype=np.int64).astype(np.uint64)


def _hash_grid(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """uint64 hash of every (row, col) pair of two 1-D integer arrays: shape (rows, cols)."""
    with np.errstate(over="ignore"):
        row_h = _mix(_as_u64(rows) * _K_ROW + _U(key))
        col_t = _as_u64(cols) * _K_COL
    return _mix(row_h[:, None] ^ col_t[None, :])


def _hash_pairs(key: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint64 hash of element-wise (a, b) integer pairs of equal shape."""
    with np.errstate(over="ignore"):
        h = _mix(_as_u64(a) * _K_ROW + _U(key))
        h ^= _as_u64(b) * _K_COL
    return _mix(h)


def _unit(h: np.ndarray) -> np.ndarray:
    """Uniform float64 in [0, 1) from the top 53 bits of a uint64 hash."""
    return (h >> _U(11)).astype(np.float64) * (1.0 / (1 << 53))


def _param(h: np.ndarray, index: int) -> np.ndarray:
    """Independent uniform number ``index`` derived from a per-cell hash."""
    with np.errstate(over="ignore"):
        return _unit(_mix(h + _K_PARAM * _U(index + 1)))


def _value_noise(key: int, rows: np.ndarray, cols: np.ndarray, spacing_px: float) -> np.ndarray:
    """Smooth value noise in [0, 1) at pixel centres: hashed lattice, smoothstep interpolation."""
    def axis(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = (coords.astype(np.float64) + 0.5) / spacing_px
        cell = np.floor(pos).astype(np.int64)
        frac = pos - cell
        return cell, (frac * frac * (3.0 - 2.0 * frac)).astype(np.float32)

    row_cell, row_w = axis(rows)
    col_cell, col_w = axis(cols)
    lat_rows = np.arange(row_cell.min(), row_cell.max() + 2)
    lat_cols = np.arange(col_cell.min(), col_cell.max() + 2)
    lattice = _unit(_hash_grid(key, lat_rows, lat_cols)).astype(np.float32)
    # Bilinear interpolation is separable: interpolate along columns on the few lattice rows,
    # then along rows per pixel row.
    jc = col_cell - lat_cols[0]
    across = lattice[:, jc] * (1.0 - col_w) + lattice[:, jc + 1] * col_w
    ir = row_cell - lat_rows[0]
    return across[ir] * (1.0 - row_w)[:, None] + across[ir + 1] * row_w[:, None]


def _fbm(key: int, rows: np.ndarray, cols: np.ndarray, spacing_px: float, octaves: int) -> np.ndarray:
    """Fractal sum of value-noise octaves, normalised to [0, 1), mean about 0.5."""
    total = np.zeros((len(rows), len(cols)), np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        weight = 0.5 ** octave
        total += np.float32(weight) * _value_noise(_splitmix_int(key + octave), rows, cols,
                                                   spacing_px / 2 ** octave)
        weight_sum += weight
    total *= np.float32(1.0 / weight_sum)
    return total


def _sin_cos_small(angle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin/cos by Taylor series for |angle| <= ~0.5 rad: plain arithmetic, so identical in any
    array shape (numpy's SIMD transcendental kernels are not guaranteed to be)."""
    a2 = angle * angle
    sin = angle * (1.0 - a2 / 6.0 * (1.0 - a2 / 20.0 * (1.0 - a2 / 42.0 * (1.0 - a2 / 72.0))))
    cos = 1.0 - a2 / 2.0 * (1.0 - a2 / 12.0 * (1.0 - a2 / 30.0 * (1.0 - a2 / 56.0)))
    return sin, cos


# ---------------------------------------------------------------------------------------------
# Scene model: scalar per-scene state (keys, sun, roads, collar) derived once from the spec.

@dataclass(frozen=True)
class _Road:
    """A straight rural road: centre line in Hesse normal form, in pixel units."""

    normal_x: float
    normal_y: float
    distance_px: float          # signed distance of the road centre line from the pixel origin
    half_width_px: float


@dataclass(frozen=True)
class _SceneModel:
    """Per-scene scalars every block needs; derived once from the spec."""

    spec: SceneSpec
    regime: Regime
    keys: dict[str, int]                # hash key per independent random stream
    sun_azimuth_deg: float
    sun_elevation_deg: float
    shadow_dir: tuple[float, float]     # unit vector (x east, y down) along which shadows fall
    roads: tuple[_Road, ...]
    collar: tuple                       # () or ("corner", k, fraction) or ("side", k, frac, slope)
    acquisition_date: str
    max_dn: int


def perturb_regime(regime: Regime, amount: float, key: int) -> Regime:
    """The regime with colours, gains, haze, density and sun moved by ``amount`` (deterministic)."""
    if amount <= 0:
        return regime
    rng = np.random.default_rng(key)

    def colour(c: Colour) -> Colour:
        return tuple(float(np.clip(v + 0.5 * amount * rng.standard_normal(), 0.02, 0.98)) for v in c)

    return dataclasses.replace(
        regime,
        ground_low=colour(regime.ground_low), ground_high=colour(regime.ground_high),
        tree_colour=colour(regime.tree_colour), road_colour=colour(regime.road_colour),
        roof_palette=tuple(colour(c) for c in regime.roof_palette),
        gain=tuple(float(g * (1.0 + 0.5 * amount * rng.standard_normal())) for g in regime.gain),
        haze=float(np.clip(regime.haze + 0.5 * amount * rng.standard_normal(), 0.0, 0.6)),
        building_density=float(np.clip(regime.building_density * (1 + amount * rng.standard_normal()),
                                       0.05, 0.95)),
        sun_azimuth_deg=float((regime.sun_azimuth_deg + 40 * amount * rng.standard_normal()) % 360),
        sun_elevation_deg=float(np.clip(regime.sun_elevation_deg + 20 * amount * rng.standard_normal(),
                                        15, 80)),
    )


@lru_cache(maxsize=64)
def _scene_model(spec: SceneSpec) -> _SceneModel:
    scene_key = _splitmix_int(_splitmix_int(spec.seed & _M64) ^ zlib.crc32(spec.name.encode()))
    keys = {name: _splitmix_int(scene_key ^ (salt * 0x9E3779B97F4A7C15 & _M64))
            for salt, name in enumerate(("ground", "parcel", "tree", "cells", "density", "haze",
                                         "noise", "roads", "collar", "regime", "date", "detail"), 1)}
    regime = perturb_regime(ALL_REGIMES[spec.regime], _SCENE_JITTER + spec.perturb, keys["regime"])
    rng = np.random.default_rng(keys["roads"])
    elevation = float(np.clip(regime.sun_elevation_deg + rng.uniform(-3, 3), 10, 85))
    azimuth = float((regime.sun_azimuth_deg + rng.uniform(-8, 8)) % 360)
    # The sun is at (sin az, -cos az) in image coordinates (y grows southwards); shadows fall away.
    shadow_dir = (-math.sin(math.radians(azimuth)), math.cos(math.radians(azimuth)))

    roads: list[_Road] = []
    if regime.layout == "rural":
        for _ in range(int(rng.integers(1, 4))):
            theta = rng.uniform(0, math.pi)
            px, py = rng.uniform(0.15, 0.85) * spec.width, rng.uniform(0.15, 0.85) * spec.height
            nx, ny = math.cos(theta), math.sin(theta)
            roads.append(_Road(nx, ny, nx * px + ny * py, regime.road_px / 2))

    collar: tuple = ()
    if spec.nodata_collar:
        crng = np.random.default_rng(keys["collar"])
        if crng.uniform() < 0.5:
            collar = ("corner", int(crng.integers(4)), float(crng.uniform(0.25, 0.5)))
        else:
            collar = ("side", int(crng.integers(4)), float(crng.uniform(0.06, 0.18)),
                      float(crng.uniform(-0.05, 0.05)))

    drng = np.random.default_rng(keys["date"])
    date = f"{2016 + int(drng.integers(8)):04d}-{regime.month:02d}-{1 + int(drng.integers(28)):02d}"
    return _SceneModel(spec=spec, regime=regime, keys=keys, sun_azimuth_deg=azimuth,
                       sun_elevation_deg=elevation, shadow_dir=shadow_dir, roads=tuple(roads),
                       collar=collar, acquisition_date=date, max_dn=_DTYPE_MAX_DN[spec.dtype])


def scene_metadata(spec: SceneSpec) -> dict[str, str]:
    """The acquisition attributes written as GDAL metadata items on the scene image."""
    model = _scene_model(spec)
    return {
        "RESFLOW_REGIME": spec.regime, "RESFLOW_REGION": spec.region, "RESFLOW_SPLIT": spec.split,
        "ACQUISITION_DATE": model.acquisition_date,
        "SUN_ELEVATION": f"{model.sun_elevation_deg:.1f}", "SUN_AZIMUTH": f"{model.sun_azimuth_deg:.1f}",
        "SENSOR": model.regime.sensor, "RESFLOW_SEED": str(spec.seed),
        "RESFLOW_SPEC_DIGEST": spec.digest(),
    }


# ---------------------------------------------------------------------------------------------
# Rendering

def _cell_params(model: _SceneModel, cell_rows: np.ndarray, cell_cols: np.ndarray) -> dict:
    """Per-cell building parameters, shape (len(cell_rows), len(cell_cols)), all float32 except
    ``roof`` (palette index). Absent buildings have half sizes of -1."""
    reg, spec = model.regime, model.spec
    size = reg.cell_px
    h = _hash_grid(model.keys["cells"], cell_rows, cell_cols)
    centre_rows, centre_cols = cell_rows * size + size // 2, cell_cols * size + size // 2
    # Coarse noise on the cells clusters houses into villages and denser blocks.
    density = reg.building_density * (0.35 + 1.3 * _value_noise(
        model.keys["density"], centre_rows, centre_cols, 6.0 * size).astype(np.float64))
    present = _param(h, 0) < np.clip(density, 0.0, 0.97)
    if reg.layout == "urban" and reg.street_period_cells > 0:
        period = reg.street_period_cells
        present &= (cell_rows % period != 0)[:, None] & (cell_cols % period != 0)[None, :]
    for road in model.roads:
        dist = np.abs((centre_cols + 0.5)[None, :] * road.normal_x
                      + (centre_rows + 0.5)[:, None] * road.normal_y - road.distance_px)
        present &= dist > road.half_width_px + 0.75 * size

    lo, hi = reg.building_side_px
    side_a = lo + _param(h, 1) * (hi - lo)
    side_b = np.clip(side_a * (0.55 + 0.9 * _param(h, 2)), lo, hi)
    half_w, half_h = side_a / 2, side_b / 2
    angle = (2 * _param(h, 3) - 1) * math.radians(reg.max_rotation_deg)
    sin, cos = _sin_cos_small(angle)

    h_lo, h_hi = reg.building_height_m
    height_px = (h_lo + _param(h, 4) * (h_hi - h_lo)) / spec.pixel_m
    shadow_len = np.minimum(height_px / math.tan(math.radians(model.sun_elevation_deg)), 0.3 * size)
    shadow_x, shadow_y = shadow_len * model.shadow_dir[0], shadow_len * model.shadow_dir[1]

    # Shrink buildings whose rotated footprint plus shadow would leave the cell (minus a margin
    # that keeps neighbours apart), then place them at random inside the room left.
    margin = 2.0 if reg.layout == "urban" else 4.0
    room = size - 2 * margin
    ext_x = np.abs(half_w * cos) + np.abs(half_h * sin)
    ext_y = np.abs(half_w * sin) + np.abs(half_h * cos)
    scale = np.minimum(1.0, np.minimum((room - np.abs(shadow_x)) / (2 * ext_x),
                                       (room - np.abs(shadow_y)) / (2 * ext_y)))
    half_w, half_h, ext_x, ext_y = half_w * scale, half_h * scale, ext_x * scale, ext_y * scale
    x_lo = margin + ext_x + np.maximum(0.0, -shadow_x)
    x_hi = size - margin - ext_x - np.maximum(0.0, shadow_x)
    y_lo = margin + ext_y + np.maximum(0.0, -shadow_y)
    y_hi = size - margin - ext_y - np.maximum(0.0, shadow_y)
    centre_x = x_lo + _param(h, 5) * np.maximum(x_hi - x_lo, 0.0)
    centre_y = y_lo + _param(h, 6) * np.maximum(y_hi - y_lo, 0.0)

    # Shadow vector in the building frame (u along half_w, v along half_h); kept off zero so the
    # slab test below never divides by zero (1e-3 px is invisible).
    shadow_u = shadow_x * cos + shadow_y * sin
    shadow_v = -shadow_x * sin + shadow_y * cos
    shadow_u = np.where(np.abs(shadow_u) < 1e-3, 1e-3, shadow_u)
    shadow_v = np.where(np.abs(shadow_v) < 1e-3, 1e-3, shadow_v)

    roof = np.minimum((_param(h, 7) * len(reg.roof_palette)).astype(np.int64), len(reg.roof_palette) - 1)
    brightness = 0.85 + 0.3 * _param(h, 8)
    gabled = _param(h, 9) < reg.gable_fraction
    f32 = np.float32
    return {
        "cx": centre_x.astype(f32), "cy": centre_y.astype(f32), "cos": cos.astype(f32),
        "sin": sin.astype(f32), "hw": np.where(present, half_w, -1.0).astype(f32),
        "hh": np.where(present, half_h, -1.0).astype(f32),
        "inv_su": (1.0 / shadow_u).astype(f32), "inv_sv": (1.0 / shadow_v).astype(f32),
        "roof": roof, "bright": brightness.astype(f32), "gabled": gabled & present,
    }


def _collar_mask(model: _SceneModel, rows: np.ndarray, cols: np.ndarray) -> np.ndarray | None:
    """True where the scene has no data (its edge cuts across the raster), or None."""
    if not model.collar:
        return None
    w, h = model.spec.width, model.spec.height
    r = rows.astype(np.float64)[:, None] + 0.5
    c = cols.astype(np.float64)[None, :] + 0.5
    if model.collar[0] == "corner":
        _, corner, fraction = model.collar
        x = c if corner in (0, 2) else w - c
        y = r if corner in (0, 1) else h - r
        return x / w + y / h < fraction
    _, side, fraction, slope = model.collar
    if side in (0, 1):
        depth = c if side == 0 else w - c
        return depth < fraction * w + slope * (r - h / 2)
    depth = r if side == 2 else h - r
    return depth < fraction * h + slope * (c - w / 2)


def render_window(spec: SceneSpec, col: int, row: int, width: int, height: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of one window of a scene: image (bands, height, width) in spec.dtype, mask (height,
    width) uint8 with 1 building / 0 background / 255 nodata. Independent of how windows are cut."""
    if width <= 0 or height <= 0 or col < 0 or row < 0 or col + width > spec.width \
            or row + height > spec.height:
        raise ValueError(f"window {col},{row} {width}x{height} outside scene {spec.width}x{spec.height}")
    model = _scene_model(spec)
    reg, nb = model.regime, spec.bands
    rows = np.arange(row, row + height, dtype=np.int64)
    cols = np.arange(col, col + width, dtype=np.int64)
    r_px = (rows.astype(np.float32) + np.float32(0.5))[:, None]
    c_px = (cols.astype(np.float32) + np.float32(0.5))[None, :]

    def col3(colour: Sequence[float]) -> np.ndarray:
        return np.asarray(colour[:nb], np.float32)[:, None, None]

    # Background: smooth soil/vegetation texture, optionally a patchwork of field parcels.
    tex = _fbm(model.keys["ground"], rows, cols, reg.texture_px, 3)
    tex -= np.float32(0.5)
    tex *= np.float32(reg.texture_contrast)
    tex += np.float32(0.5)
    np.clip(tex, 0.0, 1.0, out=tex)
    if reg.parcel_px > 0:
        angle = (model.keys["parcel"] % 1000) / 1000.0 * 0.6 - 0.3
        ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        pu = np.floor((c_px * ca + r_px * sa) / np.float32(reg.parcel_px)).astype(np.int64)
        pv = np.floor((r_px * ca - c_px * sa) / np.float32(0.6 * reg.parcel_px)).astype(np.int64)
        parcel = _unit(_hash_pairs(model.keys["parcel"], pu, pv)).astype(np.float32)
        tex = np.float32(0.6) * parcel + np.float32(0.4) * tex
    low, high = col3(reg.ground_low), col3(reg.ground_high)
    image = low + (high - low) * tex[None]

    # Tree crowns: thresholded fine noise; threshold approximates the wanted cover fraction.
    if reg.tree_cover > 0:
        crowns = _fbm(model.keys["tree"], rows, cols, reg.tree_px, 2)
        threshold = 0.5 + 0.16 * statistics.NormalDist().inv_cdf(1.0 - reg.tree_cover)
        trees = crowns > np.float32(threshold)
        shade = np.float32(0.7) + np.float32(2.0) * (crowns[trees] - np.float32(threshold))
        for b in range(nb):
            image[b][trees] = np.float32(reg.tree_colour[b]) * np.minimum(shade, np.float32(1.15))

    # Cell grid: which cell every pixel is in, and its position inside that cell.
    size = reg.cell_px
    cell_r, cell_c = rows // size, cols // size
    cell_rows = np.arange(cell_r[0], cell_r[-1] + 1)
    cell_cols = np.arange(cell_c[0], cell_c[-1] + 1)
    y_in = ((rows - cell_r * size).astype(np.float32) + np.float32(0.5))[:, None]
    x_in = ((cols - cell_c * size).astype(np.float32) + np.float32(0.5))[None, :]

    # Roads: urban street grid through every n-th cell row/column, rural straight roads.
    road = np.zeros((height, width), bool)
    if reg.layout == "urban" and reg.street_period_cells > 0:
        half = np.float32(reg.road_px / 2)
        centre = np.float32(size / 2)
        road |= ((cell_r % reg.street_period_cells == 0)[:, None] & (np.abs(y_in - centre) < half))
        road |= ((cell_c % reg.street_period_cells == 0)[None, :] & (np.abs(x_in - centre) < half))
    for rd in model.roads:
        dist = np.abs(c_px * np.float32(rd.normal_x) + r_px * np.float32(rd.normal_y)
                      - np.float32(rd.distance_px))
        road |= dist < np.float32(rd.half_width_px)
    if road.any():
        road_shade = np.float32(0.92) + np.float32(0.16) * tex[road]
        for b in range(nb):
            image[b][road] = np.float32(reg.road_colour[b]) * road_shade

    # Buildings and their shadows, each tested against its own cell's building only.
    params = _cell_params(model, cell_rows, cell_cols)
    flat = ((cell_r - cell_rows[0]) * len(cell_cols))[:, None] + (cell_c - cell_cols[0])[None, :]

    def take(name: str) -> np.ndarray:
        return np.take(params[name].ravel(), flat)

    dx = x_in - take("cx")
    dy = y_in - take("cy")
    cos, sin = take("cos"), take("sin")
    u = dx * cos + dy * sin
    v = dy * cos - dx * sin
    del dx, dy, cos, sin
    half_w, half_h = take("hw"), take("hh")
    building = (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    # A pixel is in shadow if moving it back along the shadow vector by a fraction t in [0, 1]
    # lands inside the footprint: intersect the t-intervals of both slabs of the rectangle.
    inv_su, inv_sv = take("inv_su"), take("inv_sv")
    t1, t2 = (u - half_w) * inv_su, (u + half_w) * inv_su
    t_lo, t_hi = np.minimum(t1, t2), np.maximum(t1, t2)
    t1, t2 = (v - half_h) * inv_sv, (v + half_h) * inv_sv
    np.maximum(t_lo, np.minimum(t1, t2), out=t_lo)
    np.minimum(t_hi, np.maximum(t1, t2), out=t_hi)
    del t1, t2, inv_su, inv_sv
    shadow = (np.maximum(t_lo, np.float32(0)) <= np.minimum(t_hi, np.float32(1))) \
        & (half_w > 0) & ~building
    # Skylight keeps shadows slightly blue: blue loses less light than the other bands.
    tint = np.asarray([1.0, 1.0, 0.8, 1.0][:nb], np.float32) * np.float32(reg.shadow_strength)
    for b in range(nb):
        image[b][shadow] *= np.float32(1.0) - tint[b]

    if building.any():
        cell_of = flat[building]
        roof_idx = np.take(params["roof"].ravel(), cell_of)
        shade = np.take(params["bright"].ravel(), cell_of)
        # Gabled roofs: the half on one side of the ridge (long axis) is darker.
        across_ridge = np.where(half_w[building] >= half_h[building], v[building], u[building])
        gabled = np.take(params["gabled"].ravel(), cell_of)
        shade = shade * np.where(gabled & (across_ridge > 0), np.float32(0.78), np.float32(1.0))
        palette = np.asarray([c[:nb] for c in reg.roof_palette], np.float32)
        for b in range(nb):
            image[b][building] = palette[roof_idx, b] * shade

    # Atmosphere: a patchy veil towards the haze colour (adds light, removes contrast).
    if reg.haze > 0:
        veil = _value_noise(model.keys["haze"], rows, cols, 700.0)
        veil *= np.float32(0.4 * reg.haze)
        veil += np.float32(0.8 * reg.haze)
        image *= np.float32(1.0) - veil[None]
        image += col3(reg.haze_colour) * veil[None]

    # Sensor: gain, offset, noise, quantisation. One 64-bit hash per pixel gives 16 bits of
    # noise per band.
    noise_bits = _hash_grid(model.keys["noise"], rows, cols)
    full = np.float32(model.max_dn)
    noise_scale = np.float32(reg.noise_sigma * math.sqrt(12.0) / 65536.0)
    out = np.empty((nb, height, width), spec.dtype)
    for b in range(nb):
        band = image[b]
        band *= np.float32(reg.gain[b])
        band += np.float32(reg.offset[b])
        noise = ((noise_bits >> _U(16 * b)) & _U(0xFFFF)).astype(np.float32)
        noise -= np.float32(32768.0)
        noise *= noise_scale
        band += noise
        band *= full
        np.rint(band, out=band)
        # Valid pixels stay >= 1 in every band so that all-zero unambiguously means nodata.
        np.clip(band, 1.0, full, out=band)
        out[b] = band

    mask = building.astype(np.uint8)
    nodata = _collar_mask(model, rows, cols)
    if nodata is not None:
        out[:, nodata] = IMAGE_NODATA
        mask[nodata] = MASK_NODATA
    return out, mask


# ---------------------------------------------------------------------------------------------
# Archives

REGIME_ORDER = tuple(REGIMES)


def _scene_seed(seed: int, index: int) -> int:
    return _splitmix_int((seed & _M64) * 1_000_003 + index) >> 1   # >> 1: fits a signed int64


ARCHIVE_EPSG = 32637


def _origin(epsg: int, seed: int, index: int) -> tuple[float, float]:
    """A plausible UTM origin on a 1 m grid: eastings 200-780 km, northings by hemisphere."""
    rng = np.random.default_rng(_scene_seed(seed, index + 7919))
    easting = float(round(rng.uniform(200_000, 780_000)))
    south = 32701 <= epsg <= 32760
    northing = float(round(rng.uniform(6_500_000, 9_500_000) if south else rng.uniform(500_000, 7_000_000)))
    return easting, northing


def archive_specs(preset: str, seed: int = 0, dtype: str = "uint8",
                  size_px: int | None = None, epsg: int | None = ARCHIVE_EPSG) -> list[SceneSpec]:
    """Scene specs of a preset archive: "tiny" (tests), "demo", "large" (one benchmark scene),
    "tiny-single" (tests: six training scenes and one test scene of one regime, no structure to
    cluster, so `k_min: 1` chooses one bucket) or "tiny-eval" (tests: the tiny training scenes,
    one perturbed known test scene and two of the unseen regime).

    The demo's test split is the evaluation protocol's three held-out regions (EVAL_REGIONS),
    four scenes each.

    Like a national archive mapped in one projection, every scene shares ``epsg`` (default UTM
    37N); ``epsg=None`` gives each regime its own zone (a mixed-CRS archive, for tests)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown archive preset {preset!r}; use one of {PRESETS}")
    if size_px is not None and size_px <= 0:
        raise ConfigError(f"size_px must be positive, got {size_px}")
    specs: list[SceneSpec] = []
    index = 0

    archive_epsg = epsg

    def add(name: str, regime: str, region: str, split: str, epsg: int, size: int, collar: bool,
            perturb: float = 0.0) -> None:
        nonlocal index
        epsg = archive_epsg or epsg
        side = size_px or size
        specs.append(SceneSpec(name=name, width=side, height=side, regime=regime, region=region,
                               split=split, seed=_scene_seed(seed, index), dtype=dtype, epsg=epsg,
                               origin_xy=_origin(epsg, seed, index), nodata_collar=collar,
                               perturb=perturb))
        index += 1

    if preset == "tiny-single":
        regime = REGIMES[SINGLE_REGIME]
        for i in range(6):
            add(f"train-{i:02d}-{regime.name}", regime.name, regime.region, "train", regime.epsg,
                256, collar=False)
        add(f"test-00-{regime.name}", regime.name, regime.region, "test", regime.epsg, 256,
            collar=False)
        return specs
    if preset == "large":
        add("large-00-temperate-urban", "temperate-urban", "benchmark", "test",
            REGIMES["temperate-urban"].epsg, 20000, True)
        return specs
    size, repeats, heldout = (1024, 2, ()) if preset == "demo" \
        else (256, 1, ("heldout-A", "heldout-B") if preset == "tiny" else ())
    for i in range(repeats * len(REGIME_ORDER)):
        regime = REGIMES[REGIME_ORDER[i % len(REGIME_ORDER)]]
        add(f"train-{i:02d}-{regime.name}", regime.name, regime.region, "train", regime.epsg, size,
            collar=i % 4 == 2)
    if preset == "tiny-eval":  # tests: one perturbed known scene, two of the unseen regime
        add("heldout-perturbed-00", "temperate-urban", "heldout-perturbed", "test",
            REGIMES["temperate-urban"].epsg, 256, collar=False, perturb=HELDOUT_PERTURB)
        for j in range(2):
            add(f"heldout-unseen-{j:02d}", UNSEEN_REGIME, "heldout-unseen", "test",
                UNSEEN_REGIMES[UNSEEN_REGIME].epsg, 256, collar=False)
    if preset == "demo":
        for region, scenes in EVAL_REGIONS.items():
            for j, (regime_name, perturb) in enumerate(scenes):
                add(f"{region}-{j:02d}-{regime_name}", regime_name, region, "test",
                    ALL_REGIMES[regime_name].epsg, EVAL_SCENE_PX, collar=j == 3, perturb=perturb)
    for j, region in enumerate(heldout):
        regime_name, epsg = HELDOUT_REGIONS[region]
        add(f"{region}-00", regime_name, region, "test", epsg, size, collar=j % 2 == 1,
            perturb=HELDOUT_PERTURB)
    return specs
