"""Quicklook PNGs and a self-contained HTML report of a finished run (rank 0, after the run).

Scenes are read at thumbnail resolution only (GDAL decimates while reading), so a report of a
huge archive costs seconds. Every image is embedded in ``report.html`` as a data URI: the page
can be copied alone and opened without a server.
"""
from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Optional, Sequence

import numpy as np

from .errors import InputError, OutputError
from .io.export import MONO_COLOUR, PROBABILITY_NODATA, bucket_map_rgb, dequantize_probability
from .io import vsi
from .io.naming import BUCKETS, COG, MASK, PROBABILITY, output_file_name
from .io.aoi import AreaOfInterest, load_aoi, outline_pixels
from .io.raster import RasterPreview
from .tiling import scaled_geotransform

REPORT_NAME = "report.html"
RUN_REPORT_NAME = "run_report.json"
QUICKLOOK_DIR = "quicklooks"
THUMBNAIL_MAX_PX = 800
STRETCH_PERCENTILES = (2.0, 98.0)
BUILDING_RGB = np.array([1.0, 0.0, 0.0])
BUILDING_ALPHA = 0.45
NODATA_GREY = 0.75
AOI_RGB = np.array([0.0, 1.0, 1.0])  # the area of interest's outline on the image quicklook
PROBABILITY_COLOURMAP = "magma"  # perceptually uniform: dark = no building, light = building
LEGEND_WIDTH_PX = 190
LEGEND_ROW_PX = 20
STAGES = ("read_s", "read_wait_s", "embed_s", "hash_s", "segment_s", "write_s")
STAGE_HELP = {"read_s": "reader threads busy (overlaps compute)",
              "read_wait_s": "compute waited for data",
              "embed_s": "CEM embedding", "hash_s": "deep hashing", "segment_s": "segmentation",
              "write_s": "mask writes (HDF5)"}


@dataclass
class SceneLooks:
    """A scene's quicklook PNGs, and why any are missing."""

    index: int
    overlay_png: Optional[Path] = None
    buckets_png: Optional[Path] = None
    probability_png: Optional[Path] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Quicklooks:
    """Every PNG of a report: per scene, plus the per-rank load and per-stage time charts."""

    scenes: dict[int, SceneLooks] = field(default_factory=dict)
    rank_load_png: Optional[Path] = None
    stage_times_png: Optional[Path] = None

    def paths(self) -> list[Path]:
        """All PNGs written, scenes first."""
        out: list[Path] = []
        for looks in self.scenes.values():
            out += [p for p in (looks.overlay_png, looks.buckets_png, looks.probability_png)
                    if p is not None]
        return out + [p for p in (self.rank_load_png, self.stage_times_png) if p is not None]


def load_run_report(out_dir: str | Path) -> dict[str, Any]:
    """The run's run_report.json as a dict."""
    path = Path(out_dir) / RUN_REPORT_NAME
    if not path.is_file():
        raise InputError(f"{path}: not found; is {out_dir} the output directory of a finished "
                         "`resflow run`?")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable run report ({exc}); rerun `resflow run`") from None


def _locate(out_dir: Path, recorded: str) -> Optional[Path]:
    """A recorded output path, or its namesake in out_dir when the directory was moved."""
    p = Path(recorded)
    if p.is_file():
        return p
    moved = out_dir / p.name
    return moved if moved.is_file() else None


def _scene_outputs(out_dir: Path, scene: dict[str, Any]
                   ) -> tuple[Optional[Path], Optional[Path], Optional[Path]]:
    """The scene's mask GeoTIFF, its COG and the bucket map GeoTIFF (None where absent)."""
    # Current names (<scene>.resflow-<kind>.tif) and those of older runs (<scene>_<kind>.tif).
    suffixes = {MASK: (output_file_name("", MASK), "_mask.tif"),
                COG: (output_file_name("", COG), "_mask_cog.tif"),
                BUCKETS: (output_file_name("", BUCKETS), "_buckets.tif")}
    found: dict[str, Optional[Path]] = dict.fromkeys(suffixes)
    for recorded in scene.get("outputs", []):
        for kind, ends in suffixes.items():
            if Path(recorded).name.endswith(ends):
                found[kind] = _locate(out_dir, recorded)
    return found[MASK], found[COG], found[BUCKETS]


def thumbnail_size(width_px: int, height_px: int, max_px: int = THUMBNAIL_MAX_PX) -> tuple[int, int]:
    """(width, height) of a thumbnail whose longer side is at most max_px, aspect kept."""
    scale = min(1.0, max_px / max(width_px, height_px))
    return max(1, round(width_px * scale)), max(1, round(height_px * scale))


def _stretch(band: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Band values to [0, 1], clipped at the 2nd/98th percentile of the valid pixels."""
    values = band[valid] if valid.any() else band.ravel()
    lo, hi = np.percentile(values.astype(np.float64), STRETCH_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((band.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)


def scene_overlay(scene_tif: Path, mask_tif: Path, bands: Sequence[int] = (1, 2, 3),
                  max_px: int = THUMBNAIL_MAX_PX, aoi: Optional[AreaOfInterest] = None
                  ) -> np.ndarray:
    """Contrast-stretched RGB thumbnail with buildings in translucent red and nodata grey, uint8;
    the area of interest's outline in cyan when ``aoi`` is given."""
    scene = RasterPreview(scene_tif)
    mask = RasterPreview(mask_tif)
    size = thumbnail_size(scene.width, scene.height, max_px)
    rgb_bands = [b for b in bands if b <= scene.count][:3] or [1]
    if len(rgb_bands) < 3:
        rgb_bands = [rgb_bands[0]] * 3
    raw = scene.read(rgb_bands, size)
    labels = mask.read([1], size)[0]
    nodata = scene.nodata(rgb_bands[0])
    valid = labels != 255
    if nodata is not None:
        valid &= ~np.all([r == nodata for r in raw], axis=0)
    for r in raw:  # float scenes may mark nodata with NaN
        if r.dtype.kind == "f":
            valid &= np.isfinite(r)
    rgb = np.nan_to_num(np.stack([_stretch(r, valid) for r in raw], axis=-1), nan=NODATA_GREY)
    building = labels == 1
    rgb[building] = (1 - BUILDING_ALPHA) * rgb[building] + BUILDING_ALPHA * BUILDING_RGB
    rgb[~valid] = NODATA_GREY
    if aoi is not None and mask.crs_wkt:
        gt = scaled_geotransform(mask.geotransform, mask.width / size[0], mask.height / size[1])
        rgb[outline_pixels(aoi, mask.crs_wkt, gt, size[0], size[1])] = AOI_RGB
    return np.round(rgb * 255).astype(np.uint8)


def probability_rgb(probability_tif: Path, max_px: int = THUMBNAIL_MAX_PX) -> np.ndarray:
    """Thumbnail of a probability COG (uint8, see ``io.export.quantize_probability``) in the
    PROBABILITY_COLOURMAP from 0 to 1, nodata grey; (h, w, 3) uint8. The COG's overviews are
    averages, so a decimated read shows mean probabilities."""
    from matplotlib import colormaps
    preview = RasterPreview(probability_tif)
    size = thumbnail_size(preview.width, preview.height, max_px)
    prob = dequantize_probability(preview.read([1], size)[0])
    rgb = colormaps[PROBABILITY_COLOURMAP](np.nan_to_num(prob, nan=0.0))[..., :3]
    rgb[np.isnan(prob)] = NODATA_GREY
    return np.round(rgb * 255).astype(np.uint8)


def probability_quicklook(out_dir: Path, scene: dict[str, Any], path: Path) -> Optional[Path]:
    """The scene's probability quicklook at ``path`` when the run exported a probability COG
    (output.probability); None otherwise."""
    suffix = output_file_name("", PROBABILITY)
    found = [_locate(out_dir, o) for o in scene.get("outputs", []) if Path(o).name.endswith(suffix)]
    if not found or found[0] is None:
        return None
    return _save_png(probability_rgb(found[0]), path)


def _figure(width_px: int, height_px: int, dpi: int = 100) -> Any:
    """A matplotlib Figure of an exact pixel size on the Agg canvas (no pyplot, no GUI)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig_or_array: Any, path: Path) -> Path:
    """Write a Figure or an RGB array as PNG under a temporary name, then rename."""
    tmp = path.with_name(f"{path.stem}.partial.png")
    try:
        if isinstance(fig_or_array, np.ndarray):
            from matplotlib.image import imsave
            imsave(tmp, fig_or_array, format="png")
        else:
            fig_or_array.savefig(tmp, format="png", dpi=fig_or_array.dpi)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write quicklook ({exc.strerror or exc})") from None
    return path


def _bucket_label(key: str) -> str:
    if int(key) == -2:
        return "flagged out of distribution"
    return f"bucket {key}" if int(key) >= 0 else "empty"


def bucket_colour(bucket: int) -> tuple[int, int, int]:
    """The RGB colour of a bucket in the bucket maps (black for empty tiles, white for tiles
    flagged out of distribution)."""
    r, g, b = bucket_map_rgb(np.array([[bucket]], np.int64))[:, 0, 0]
    return int(r), int(g), int(b)


def bucket_legend(report: dict[str, Any]) -> list[tuple[tuple[int, int, int], str, int]]:
    """(colour, label, tiles) of every entry of the bucket map's legend: one per bucket, or one
    "Mono" entry when every tile was mapped by the Mono model (``mapped_by`` "mono")."""
    histogram = {str(k): int(v) for k, v in report.get("bucket_histogram", {}).items()}
    if report.get("mapped_by") == "mono":
        colour = tuple(int(v) for v in MONO_COLOUR)
        return [(colour, "every tile by the Mono model", sum(histogram.values()))]  # type: ignore[list-item]
    return [(bucket_colour(int(k)), _bucket_label(k), histogram[k])
            for k in sorted(histogram, key=int)]


def bucket_map_png(bucket_tif: Path, path: Path,
                   legend: Sequence[tuple[tuple[int, int, int], str, int]],
                   max_px: int = THUMBNAIL_MAX_PX) -> Path:
    """The per-tile bucket map upscaled with nearest neighbour, with ``legend`` (see
    ``bucket_legend``) on its right."""
    from matplotlib.patches import Patch
    ds = RasterPreview(bucket_tif)
    cols, rows = ds.width, ds.height
    if max(cols, rows) > max_px:
        w, h = thumbnail_size(cols, rows, max_px)
        rgb = np.stack(ds.read([1, 2, 3], (w, h)), axis=-1)
    else:
        factor = max(1, max_px // max(cols, rows))
        rgb = np.stack(ds.read([1, 2, 3]), axis=-1)
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    h, w = rgb.shape[:2]
    legend_h = (len(legend) + 2) * LEGEND_ROW_PX
    fig = _figure(w + LEGEND_WIDTH_PX, max(h, legend_h))
    fig.patch.set_facecolor("white")
    # figimage places pixels 1:1 (no resampling); its origin is the figure's lower left.
    fig.figimage(rgb, xo=0, yo=fig.bbox.height - h, origin="upper")
    handles = [Patch(facecolor=np.array(colour) / 255, edgecolor="black",
                     label=f"{label} ({tiles} tiles)") for colour, label, tiles in legend]
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=8, frameon=False,
                   title="tiles mapped by", title_fontsize=9)
    return _save_png(fig, path)


def rank_load_png(report: dict[str, Any], path: Path) -> Path:
    """Two bar charts: tiles per rank and busy seconds per rank."""
    lb = report.get("load_balance", {})
    tiles = list(lb.get("tiles_per_rank", []))
    busy = list(lb.get("busy_s_per_rank", []))
    ranks = np.arange(max(len(tiles), len(busy), 1))
    fig = _figure(900, 340)
    for i, (values, title, colour) in enumerate(((tiles, "tiles per rank", "#1f77b4"),
                                                  (busy, "busy seconds per rank", "#ff7f0e"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.bar(ranks[:len(values)], values, color=colour)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rank")
        if len(ranks) <= 32:
            ax.set_xticks(ranks)
        if values and max(values) > 0:
            mean = float(np.mean(values))
            ax.axhline(mean, color="black", linewidth=0.8, linestyle="--", label=f"mean {mean:.3g}")
            ax.legend(fontsize=8)
    fig.suptitle(f"load balance: imbalance (max/mean busy) = {lb.get('imbalance', 1.0):.2f}",
                 fontsize=10)
    fig.tight_layout()
    return _save_png(fig, path)


def stage_times_png(report: dict[str, Any], path: Path) -> Path:
    """Horizontal bars of the seconds spent per stage, summed over ranks."""
    totals = report.get("stage_s_total", {})
    names = [s for s in STAGES if s in totals] + [s for s in totals if s not in STAGES]
    values = [float(totals[s]) for s in names]
    fig = _figure(900, 60 + 36 * max(1, len(names)))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(names, values, color="#2ca02c")
    ax.invert_yaxis()
    ax.set_xlabel("seconds, summed over ranks")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


def _scene_bands(report: dict[str, Any]) -> list[int]:
    bands = report.get("config", {}).get("scenes", {}).get("bands")
    return [int(b) for b in bands] if bands else [1, 2, 3]


def make_quicklooks(out_dir: str | Path) -> Quicklooks:
    """Write every quicklook PNG under out_dir/quicklooks and say which belongs to what."""
    out_dir = Path(out_dir)
    report = load_run_report(out_dir)
    folder = out_dir / QUICKLOOK_DIR
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create quicklook directory ({exc.strerror})") from None
    looks = Quicklooks()
    bands = _scene_bands(report)
    aoi, aoi_note = _report_aoi(report)
    legend = bucket_legend(report)
    for scene in report.get("scenes", []):
        if not scene.get("complete"):
            continue
        sl = SceneLooks(int(scene["index"]))
        looks.scenes[sl.index] = sl
        if aoi_note:
            sl.notes.append(aoi_note)
        mask, mask_cog, buckets = _scene_outputs(out_dir, scene)
        stem = (next((mask.name[:-len(s)] for s in (output_file_name("", MASK), "_mask.tif")
                      if mask.name.endswith(s)), mask.stem)
                if mask is not None else f"{sl.index:04d}")
        if mask is None:
            sl.notes.append("no mask GeoTIFF among the outputs (output.geotiff off?)")
        elif vsi.stat(str(scene["path"])) is None:
            sl.notes.append(f"source scene {scene['path']} not found; no image quicklook")
        else:
            try:
                # The COG has overviews, so its thumbnail read touches a fraction of the file.
                sl.overlay_png = _save_png(scene_overlay(Path(scene["path"]), mask_cog or mask,
                                                         bands, aoi=aoi),
                                           folder / f"{stem}_overlay.png")
            except RuntimeError as exc:
                sl.notes.append(f"image quicklook failed: {str(exc).strip().splitlines()[0]}")
        if buckets is None:
            sl.notes.append("no bucket map among the outputs (output.bucket_map off?)")
        else:
            sl.buckets_png = bucket_map_png(buckets, folder / f"{stem}_buckets.png", legend)
        sl.probability_png = probability_quicklook(out_dir, scene,
                                                   folder / f"{stem}_probability.png")
    looks.rank_load_png = rank_load_png(report, folder / "rank_load.png")
    looks.stage_times_png = stage_times_png(report, folder / "stage_times.png")
    return looks


def _report_aoi(report: dict[str, Any]) -> tuple[Optional[AreaOfInterest], str]:
    """The run's area of interest (drawn on the image quicklooks) and a note when its file can
    no longer be read ((None, '') without one)."""
    path = (report.get("aoi") or {}).get("path")
    if not path:
        return None, ""
    try:
        return load_aoi(str(path)), ""
    except InputError as exc:
        return None, f"area of interest not drawn: {exc}"


def write_quicklooks(out_dir: str | Path) -> list[Path]:
    """Write the quicklook PNGs of a finished run (per complete scene, plus charts); return them."""
    return make_quicklooks(out_dir).paths()


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;
font-size:13px}th{background:#f2f2f2;text-align:left}td.n{text-align:right;
font-variant-numeric:tabular-nums}img{max-width:100%;border:1px solid #ddd;margin:4px 0}
.swatch{display:inline-block;width:14px;height:14px;border:1px solid #333;vertical-align:middle}
.bar{display:inline-block;height:12px;background:#1f77b4}.note{color:#a33}
.looks{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _img(png: Optional[Path], alt: str) -> str:
    return f'<img src="{_data_uri(png)}" alt="{_esc(alt)}">' if png is not None else ""


def _num(value: Any, fmt: str) -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return _esc(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           numeric_cols: Collection[int] = ()) -> str:
    """An HTML table of already escaped/formatted cells; numeric_cols align right."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td{" class=n" if i in numeric_cols else ""}>{c}</td>'
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    t = report.get("throughput", {})
    scenes = report.get("scenes", [])
    done = sum(bool(s.get("complete")) for s in scenes)
    lb = report.get("load_balance", {})
    inv = report.get("invocation", {})
    rows = [("engine", _esc(report.get("engine", "?"))),
            ("ranks", _esc(report.get("ranks", "?"))),
            ("scenes complete", f"{done} / {len(scenes)}"),
            ("scenes skipped", _esc(len(report.get("skipped_scenes", [])))),
            ("tiles finished (whole job)",
             f"{_esc(report.get('tiles', 0))} ({_esc(report.get('tiles_computed', 0))} computed)"),
            ("megapixels (whole job)", _num(report.get("megapixels", 0), ".2f") + " Mpx"),
            ("area (whole job)", _num(report.get("area_km2", 0), ".3f") + " km2")]
    if inv:
        rows.append(("this invocation",
                     f"{_esc(inv.get('tiles', 0))} tiles ({_esc(inv.get('tiles_computed', 0))} "
                     f"computed), {_num(inv.get('area_km2', 0), '.3f')} km2; "
                     f"{_esc(inv.get('tiles_resumed', 0))} tiles finished by earlier runs"))
    rows += [("wall time (this invocation)", _num(report.get("wall_s", 0), ".2f") + " s"),
            ("read", _num(report.get("bytes_read", 0) / 1e9, ".3f") + " GB"),
            ("written", _num(report.get("bytes_written", 0) / 1e9, ".3f") + " GB"),
            ("throughput", f"{_num(t.get('tiles_per_s', 0), '.2f')} tiles/s, "
                           f"{_num(t.get('mpixel_per_s', 0), '.3f')} Mpx/s, "
                           f"{_num(t.get('km2_per_s', 0), '.4f')} km2/s, "
                           f"{_num(t.get('gb_read_per_s', 0), '.4f')} GB/s read"),
            ("load imbalance (max/mean busy)", _num(lb.get("imbalance", 1.0), ".2f"))]
    for key, label in (("finished_at", "finished"), ("config_checksum", "config checksum")):
        if key in report:
            rows.append((label, _esc(report[key])))
    return rows


def _stage_table(report: dict[str, Any]) -> str:
    totals = report.get("stage_s_total", {})
    ranks = max(1, int(report.get("ranks", 1) or 1))
    accounted = sum(float(totals.get(s, 0)) for s in STAGES if s != "read_s") or 1.0
    rows = []
    for s in [s for s in STAGES if s in totals] + [s for s in totals if s not in STAGES]:
        v = float(totals[s])
        share = "" if s == "read_s" else f"{100 * v / accounted:.1f} %"
        rows.append((f"{_esc(s)} <small>{_esc(STAGE_HELP.get(s, ''))}</small>",
                     _num(v, ".3f"), _num(v / ranks, ".3f"), share))
    return _table(["stage", "seconds (all ranks)", "seconds per rank", "share of busy time"], rows,
                  numeric_cols=(1, 2, 3))


def _rank_table(report: dict[str, Any]) -> str:
    busy = report.get("load_balance", {}).get("busy_s_per_rank", [])
    rows = []
    for r in report.get("per_rank", []):
        rank = int(r.get("rank", len(rows)))
        binding = r.get("binding") or {}
        device = binding.get("device", "") if isinstance(binding, dict) else binding
        rows.append((_esc(rank), _esc(r.get("tiles", 0)), _esc(r.get("tiles_computed", "")),
                     _num(r.get("read_wait_s", 0), ".3f"), _num(r.get("embed_s", 0), ".3f"),
                     _num(r.get("hash_s", 0), ".3f"), _num(r.get("segment_s", 0), ".3f"),
                     _num(r.get("write_s", 0), ".3f"),
                     _num(busy[rank], ".3f") if rank < len(busy) else "",
                     _num(r.get("wall_s", 0), ".2f"), _esc(device)))
    return _table(["rank", "tiles", "computed", "read wait s", "embed s", "hash s", "segment s",
                   "write s", "busy s", "wall s", "device"], rows, numeric_cols=range(10))


def _bucket_table(report: dict[str, Any]) -> str:
    legend = bucket_legend(report)
    if not legend:
        return "<p>no tiles were assigned to buckets</p>"
    most = max(n for _, _, n in legend) or 1
    total = sum(n for _, _, n in legend) or 1
    rows = []
    for colour, label, n in legend:
        rows.append((f'<span class="swatch" style="background:{"#%02x%02x%02x" % colour}">'
                     f"</span> {_esc(label)}", _esc(n), f"{100 * n / total:.1f} %",
                     f'<span class="bar" style="width:{max(1, round(240 * n / most))}px"></span>'))
    return _table(["mapped by", "tiles", "share", ""], rows, numeric_cols=(1, 2))


def _ood_section(report: dict[str, Any]) -> str:
    """Out-of-distribution routing: the setting, and the tiles flagged per scene."""
    inf = report.get("config", {}).get("inference", {})
    if inf.get("ood_routing", "off") == "off":
        return "<p>out-of-distribution routing: off (every tile by its nearest bucket)</p>"
    rows = [(_esc(Path(str(s.get("path"))).name), _esc(s.get("ood_tiles", 0)))
            for s in report.get("scenes", [])]
    how = {"embedding": "embedding scores", "quantile": "hash-code distances"}.get(
        str(inf.get("ood_routing")), str(inf.get("ood_routing")))
    return (f"<p>out-of-distribution routing: {_esc(how)} at quantile "
            f"{_esc(inf.get('ood_quantile'))}; {_esc(report.get('ood_tiles', 0))} tile(s) flagged "
            "(mapped by the model init chose for flagged tiles, below)</p>"
            + _table(["scene", "tiles flagged"], rows, numeric_cols=(1,)))


def _selection_section(report: dict[str, Any]) -> str:
    """The gallery's per-bucket verdicts on its held-out scenes (bucket model vs Mono)."""
    sel = report.get("gallery_selection") or {}
    if not sel.get("buckets"):
        return "<p>the gallery records no held-out selection (made before scene-level validation)</p>"

    def num(v: Any) -> str:
        return "n/a" if v is None else f"{float(v):.3f}"

    rows = []
    for b in sel["buckets"]:
        ci = b.get("gain_ci") or [None, None]
        gain = ("n/a" if b.get("gain") is None or None in ci else
                f"{b['gain']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
        rows.append((_esc(b.get("bucket")), _esc(str(b.get("code"))[:12]),
                     _esc(b.get("train_tiles")), _esc(b.get("held_out_tiles")),
                     num(b.get("hash_map")), num(b.get("bucket_iou")), num(b.get("mono_iou")),
                     _esc(gain), "own model" if b.get("kept") else "Mono"))
    val = sel.get("validation", {})
    flagged = sel.get("flagged_tiles") or {}
    who = (f"bucket {flagged.get('bucket')}'s model" if flagged.get("model") == "bucket"
           else str(flagged.get("model", "mono")))
    notes = [f"held-out scenes: {len(val.get('held_out_scenes', []))} whole, "
             f"{len(val.get('row_split_scenes', {}))} by a band of rows; "
             f"{val.get('held_out_crops', 0)} held-out crops",
             f"flagged (out-of-distribution) tiles map with {who}"]
    if sel.get("hash_warning"):
        notes.append(f"warning: {sel['hash_warning']}")
    return (_table(["bucket", "code", "train tiles", "held-out tiles", "hash mAP", "bucket IoU",
                    "Mono IoU", "gain [95 %]", "maps with"], rows, numeric_cols=(2, 3, 4, 5, 6))
            + "".join(f"<p>{_esc(n)}</p>" for n in notes))


def _aoi_section(report: dict[str, Any]) -> str:
    """Which area of interest limited the run, and what it kept ('' without one)."""
    aoi = report.get("aoi")
    if not aoi:
        return ""
    outside = aoi.get("scenes_outside") or []
    rows = [("file", _esc(aoi.get("path"))),
            ("tiles intersecting", f"{_esc(aoi.get('tiles_intersecting'))} of "
                                   f"{_esc(aoi.get('tiles_total'))} (the others neither read "
                                   "nor computed; nodata in the outputs)"),
            ("area inside the scenes", f"{_num(aoi.get('area_km2', 0), '.3f')} km2 (the areas "
                                       "of this report count only the AOI)")]
    if outside:
        rows.append(("scenes outside it (not mapped)", _esc(", ".join(outside))))
    return "<h2>Area of interest</h2>\n" + _table(["", ""], rows)


def _skipped_section(report: dict[str, Any]) -> str:
    skipped = report.get("skipped_scenes", [])
    if not skipped:
        return "<p>none</p>"
    return _table(["scene", "reason"],
                  [(_esc(s.get("path", "?")), _esc(s.get("reason", "?"))) for s in skipped])


def _scene_section(scene: dict[str, Any], looks: Optional[SceneLooks]) -> str:
    state = "complete" if scene.get("complete") else "incomplete (rerun to finish)"
    parts = [f"<h3>scene {_esc(scene.get('index'))}: {_esc(Path(str(scene.get('path'))).name)}</h3>",
             f"<p>{_esc(scene.get('path'))}<br>{_esc(scene.get('width'))} x "
             f"{_esc(scene.get('height'))} px, {_num(scene.get('area_km2', 0), '.3f')} km2, "
             f"{_esc(state)}"
             + (f"; {_esc(scene['tiles_done'])} of {_esc(scene.get('tiles_total'))} tiles "
                f"finished ({_num(scene.get('area_km2_done', 0), '.3f')} km2)"
                if "tiles_done" in scene else "") + "</p>"]
    if scene.get("ood_tiles"):
        parts.append(f"<p>{_esc(scene['ood_tiles'])} tile(s) flagged out of distribution "
                     "(white in the bucket map)</p>")
    outputs = scene.get("outputs", [])
    if outputs:
        parts.append("<p>outputs: " + ", ".join(_esc(Path(o).name) for o in outputs) + "</p>")
    if looks is not None:
        parts.extend(f'<p class="note">{_esc(n)}</p>' for n in looks.notes)
        parts.append('<div class="looks">' + _img(looks.overlay_png, "scene with buildings")
                     + _img(looks.buckets_png, "bucket map") + "</div>")
        if looks.overlay_png is not None:
            parts.append("<p><small>buildings in red, nodata in grey; bands stretched "
                         f"{STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g} "
                         "percentile</small></p>")
        parts.append(_probability_section(looks))
    return "\n".join(parts)


def _probability_section(looks: SceneLooks) -> str:
    """The scene's building-probability quicklook with its colour scale ("" without one)."""
    if looks.probability_png is None:
        return ""
    return (f"<h4>building probability</h4>{_img(looks.probability_png, 'building probability')}"
            f"<p><small>probability 0 (dark) to 1 (light yellow), {PROBABILITY_COLOURMAP} "
            f"colour map; nodata (byte {PROBABILITY_NODATA}) in grey</small></p>")


def render_html(report: dict[str, Any], looks: Quicklooks, title: str) -> str:
    """The report page as one string, images inline."""
    summary = _table(["", ""], _summary_rows(report))
    scenes = "\n".join(_scene_section(s, looks.scenes.get(int(s.get("index", -1))))
                       for s in report.get("scenes", []))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        "<h2>Run summary</h2>", summary, _aoi_section(report),
        "<h2>Time per stage</h2>", _stage_table(report),
        _img(looks.stage_times_png, "seconds per stage"),
        "<h2>Ranks</h2>", _rank_table(report), _img(looks.rank_load_png, "load per rank"),
        "<h2>Buckets</h2>", _bucket_table(report), _ood_section(report),
        "<h2>Bucket models against Mono (held-out scenes)</h2>", _selection_section(report),
        "<h2>Skipped scenes</h2>", _skipped_section(report),
        "<h2>Scenes</h2>", scenes or "<p>no scenes</p>",
        "</body></html>", ""])


def write_html_report(out_dir: str | Path) -> Path:
    """Write quicklooks and the self-contained out_dir/report.html; return the page's path."""
    out_dir = Path(out_dir)
    report = load_run_report(out_dir)
    looks = make_quicklooks(out_dir)
    page = render_html(report, looks, f"resflow run report: {out_dir.resolve().name}")
    path = out_dir / REPORT_NAME
    tmp = out_dir / f".{REPORT_NAME}.partial"
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path
