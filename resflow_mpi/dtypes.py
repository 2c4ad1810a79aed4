"""Pixel data types the engine reads and the value each maps to 1.0 by default (pure constants)."""
from __future__ import annotations

# Default full scale of integer scenes under normalization.mode "range" (value_max null):
# 8-bit imagery, and 11-bit imagery stored as uint16 (the common pan/multispectral sensors).
DTYPE_RANGE = {"uint8": 255.0, "uint16": 2047.0}
