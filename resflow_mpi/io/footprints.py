"""Right-angle regularisation of building outlines (shapely 2, planar coordinates in metres).

A polygon traced from mask pixels is a staircase. ``regularize`` turns it into a building-like
outline whose corners are right angles:

1. the dominant orientation is the direction of the long side of the polygon's minimum rotated
   rectangle;
2. a polygon that fills at least ``RECTANGULARITY`` of that rectangle becomes the rectangle;
3. any other polygon is rotated so the dominant orientation is the x axis, simplified
   (Douglas-Peucker, ``tolerance_m``), every edge is classed horizontal or vertical by its angle,
   runs of one class merge into one edge placed at their length-weighted mean, consecutive edges
   meet at right angles, and the outline is rotated back. Holes are treated alike.

A result that is invalid or whose area differs from the input's by more than ``MAX_AREA_CHANGE``
falls back to the minimum rotated rectangle when that is close in area, else to the simplified
outline; ``RegularizeResult.method`` says which.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LinearRing, Polygon

RECTANGULARITY = 0.85   # polygon area / its minimum rotated rectangle's area
MAX_AREA_CHANGE = 0.25  # relative area change accepted from the snapped outline

Method = Literal["rectangle", "orthogonal", "simplified"]


@dataclass(frozen=True)
class RegularizeResult:
    """A regularised polygon and how it was made."""

    polygon: Polygon
    method: Method


def dominant_angle_deg(polygon: Polygon) -> float:
    """Direction (degrees from the x axis, in [0, 180)) of the long side of the polygon's minimum
    rotated rectangle."""
    rect = polygon.minimum_rotated_rectangle
    coords = np.asarray(rect.exterior.coords)[:3] if isinstance(rect, Polygon) else None
    if coords is None or len(coords) < 3:
        return 0.0
    a, b = coords[1] - coords[0], coords[2] - coords[1]
    side = a if np.hypot(*a) >= np.hypot(*b) else b
    return math.degrees(math.atan2(side[1], side[0])) % 180.0


def _corners(runs: list[tuple[bool, float]]) -> np.ndarray:
    """Closed ring of the corners where consecutive alternating runs meet."""
    corners = []
    for k in range(len(runs)):
        (h1, v1), (_, v2) = runs[k - 1], runs[k]
        corners.append((v2, v1) if h1 else (v1, v2))  # previous H at y=v1 meets this V at x=v2
    corners.append(corners[0])
    return np.asarray(corners, float)


def _orthogonal_ring(coords: np.ndarray, min_edge: float) -> np.ndarray | None:
    """A closed rectilinear ring from an axis-aligned-ish ring (first point repeated at the
    end): edges classed horizontal/vertical, runs of one class merged at their length-weighted
    level, then jogs shorter than ``min_edge`` removed (their two parallel neighbours merge);
    None when fewer than four edges remain."""
    pts = coords[:-1]
    n = len(pts)
    if n < 4:
        return None
    edges = [(pts[i], pts[(i + 1) % n]) for i in range(n)]
    horizontal = [abs(b[0] - a[0]) >= abs(b[1] - a[1]) for a, b in edges]
    # Start at a class change so no run wraps around the end of the list.
    start = next((i for i in range(n) if horizontal[i] != horizontal[i - 1]), None)
    if start is None:
        return None
    runs: list[tuple[bool, float]] = []   # (horizontal, the run's y or x)
    weights: list[float] = []             # the run's outline length
    for k in range(n):
        i = (start + k) % n
        a, b = edges[i]
        length = float(np.hypot(*(b - a))) or 1e-12
        level = (a[1] + b[1]) / 2 if horizontal[i] else (a[0] + b[0]) / 2
        if runs and runs[-1][0] == horizontal[i]:
            h, value = runs[-1]
            w = weights[-1]
            runs[-1] = (h, (value * w + level * length) / (w + length))
            weights[-1] = w + length
        else:
            runs.append((horizontal[i], level))
            weights.append(length)
    if len(runs) % 2:
        return None
    while len(runs) > 4:
        ring = _corners(runs)
        lengths = np.hypot(*np.diff(ring, axis=0).T)  # edge k runs from corner k to k + 1
        k = int(np.argmin(lengths))
        if lengths[k] >= min_edge:
            break
        # Corner k joins runs k - 1 and k, so edge k is run k: drop it, merge its neighbours.
        j = k
        before, after = (j - 1) % len(runs), (j + 1) % len(runs)
        w = weights[before] + weights[after]
        merged = (runs[before][0], (runs[before][1] * weights[before]
                                    + runs[after][1] * weights[after]) / w)
        keep = [i for i in range(len(runs)) if i not in (j, after)]
        runs = [merged if i == before else runs[i] for i in keep]
        weights = [w if i == before else weights[i] for i in keep]
    if len(runs) < 4:
        return None
    return _corners(runs)


def _snap(ring: LinearRing, centre: shapely.Point, angle: float, tolerance: float
          ) -> np.ndarray | None:
    """The ring rotated by -angle about centre, simplified and made rectilinear (not rotated back)."""
    flat = affinity.rotate(Polygon(ring), -angle, origin=centre)
    simple = flat.simplify(tolerance, preserve_topology=True)
    if not isinstance(simple, Polygon) or simple.is_empty:
        return None
    return _orthogonal_ring(np.asarray(simple.exterior.coords), 2.0 * tolerance)


def regularize(polygon: Polygon, tolerance_m: float) -> RegularizeResult:
    """``polygon`` (planar, metres) with right-angle corners; see the module docstring."""
    if polygon.is_empty or polygon.area <= 0:
        return RegularizeResult(polygon, "simplified")
    angle = dominant_angle_deg(polygon)
    rect = polygon.minimum_rotated_rectangle
    rect_ok = isinstance(rect, Polygon) and rect.area > 0
    if rect_ok and polygon.area / rect.area >= RECTANGULARITY:
        return RegularizeResult(shapely.normalize(rect), "rectangle")
    centre = polygon.centroid
    shell = _snap(polygon.exterior, centre, angle, tolerance_m)
    holes: list[np.ndarray] = []
    for interior in polygon.interiors:
        hole = _snap(interior, centre, angle, tolerance_m)
        if hole is not None:
            holes.append(hole)
    if shell is not None:
        snapped = affinity.rotate(Polygon(shell, holes), angle, origin=centre)
        if (snapped.is_valid and snapped.area > 0
                and abs(snapped.area - polygon.area) <= MAX_AREA_CHANGE * polygon.area):
            return RegularizeResult(shapely.normalize(snapped), "orthogonal")
    if rect_ok and rect.area <= (1 + MAX_AREA_CHANGE) * polygon.area:
        return RegularizeResult(shapely.normalize(rect), "rectangle")
    return RegularizeResult(polygon.simplify(tolerance_m, preserve_topology=True), "simplified")


def corner_angles_deg(ring_coords: Sequence[Sequence[float]]) -> list[float]:
    """Interior turning angles (degrees, 0-180) at every vertex of a closed ring."""
    pts = np.asarray(ring_coords, float)[:-1]
    out = []
    for i in range(len(pts)):
        a, b = pts[i - 1] - pts[i], pts[(i + 1) % len(pts)] - pts[i]
        cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        out.append(math.degrees(math.acos(max(-1.0, min(1.0, cos)))))
    return out
