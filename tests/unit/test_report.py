"""HTML run report and quicklooks from a small but real output directory (GDAL-written files)."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from osgeo import gdal

from resflow_mpi.errors import InputError
from resflow_mpi.io import geotiff
from resflow_mpi.io.export import BUCKET_COLOURS, PROBABILITY_NODATA, quantize_probability
from resflow_mpi.report import (LEGEND_WIDTH_PX, NODATA_GREY, PROBABILITY_COLOURMAP,
                                thumbnail_size, write_html_report, write_quicklooks)

gdal.UseExceptions()

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_SCRIPT = REPO / "perf" / "screenshot_report.py"
CHROMIUM = Path("/usr/bin/chromium")
WINDOW_HEIGHT_PX = 4800  # perf/screenshot_report.py's window: the whole test report fits
SCENE_W, SCENE_H = 1000, 600
TILE_PX = 100
GT = (500_000.0, 0.5, 0.0, 1_000_000.0, 0.0, -0.5)
BUILDING = (slice(200, 300), slice(300, 500))  # rows, cols of the one building block
NODATA_COLS = slice(0, 100)                    # left strip is nodata in scene and mask
BUILDING_P, BACKGROUND_P = 0.9, 0.2            # probabilities of the probability COG
# Set by .ci/run: the screenshot test fails instead of skipping when Chromium is missing.
REQUIRE_BROWSER = os.environ.get("RESFLOW_REQUIRE_BROWSER") == "1"


def require_chromium() -> None:
    """Skip without /usr/bin/chromium; fail instead under RESFLOW_REQUIRE_BROWSER=1 (CI)."""
    if CHROMIUM.is_file():
        return
    reason = (f"no {CHROMIUM} (apt-get install -y chromium, or launch/install.sh "
              "--with-chromium)")
    if REQUIRE_BROWSER:
        pytest.fail(f"report screenshot required (RESFLOW_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


def _geotiff(path: Path, data: np.ndarray, nodata: float | None) -> Path:
    bands, h, w = data.shape
    ds = gdal.GetDriverByName("GTiff").Create(str(path), w, h, bands, gdal.GDT_Byte,
                                              ["TILED=YES"])
    ds.SetGeoTransform(GT if w == SCENE_W else (GT[0], GT[1] * TILE_PX, 0.0, GT[3], 0.0,
                                                 GT[5] * TILE_PX))
    ds.SetProjection("EPSG:32637")
    for b in range(bands):
        if nodata is not None:
            ds.GetRasterBand(b + 1).SetNoDataValue(nodata)
        ds.GetRasterBand(b + 1).WriteArray(data[b])
    ds = None
    return path


AOI_WINDOW = (600, 100, 300, 300)  # col, row, width, height of the test AOI on the scene grid


def write_lonlat_aoi(path: Path) -> Path:
    """A GeoJSON polygon in EPSG:4326 covering AOI_WINDOW of the scene (made in its UTM CRS)."""
    from osgeo import ogr, osr
    from resflow_mpi.io.aoi import window_polygon
    from resflow_mpi.tiling import Window
    utm, wgs = osr.SpatialReference(), osr.SpatialReference()
    utm.ImportFromEPSG(32637)
    wgs.ImportFromEPSG(4326)
    for srs in (utm, wgs):
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    poly = window_polygon(GT, Window(*AOI_WINDOW))
    poly.Transform(osr.CoordinateTransformation(utm, wgs))
    ds = ogr.GetDriverByName("GeoJSON").CreateDataSource(str(path))
    layer = ds.CreateLayer("aoi", srs=wgs, geom_type=ogr.wkbPolygon)
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(poly)
    layer.CreateFeature(feature)
    ds = None
    return path


def make_output_dir(root: Path, probability: bool = False, aoi: bool = False
                    ) -> tuple[Path, dict[str, Any]]:
    """One complete scene (scene, mask, bucket map; with ``probability`` a probability COG:
    BUILDING_P on the building, BACKGROUND_P elsewhere, nodata as the mask), one incomplete, one
    skipped; and the report (with ``aoi``: the run's area of interest, AOI_WINDOW in lon/lat)."""
    rng = np.random.default_rng(0)
    scene = rng.integers(20, 230, (3, SCENE_H, SCENE_W), dtype=np.uint8)
    scene[:, :, NODATA_COLS] = 0
    scene_path = _geotiff(root / "scene_a.tif", scene, nodata=0)
    out = root / "out"
    out.mkdir()
    mask = np.zeros((1, SCENE_H, SCENE_W), np.uint8)
    mask[0][BUILDING] = 1
    mask[0, :, NODATA_COLS] = 255
    mask_path = _geotiff(out / "0000_scene_a_mask.tif", mask, nodata=255)
    cog_path = out / "0000_scene_a_mask_cog.tif"
    gdal.Translate(str(cog_path), str(mask_path), format="COG", creationOptions=["BLOCKSIZE=256"])
    rows, cols = SCENE_H // TILE_PX, SCENE_W // TILE_PX
    buckets = (np.arange(rows * cols).reshape(rows, cols) % 3)
    buckets[:, 0] = -1
    rgb = np.zeros((3, rows, cols), np.uint8)
    rgb[:, buckets >= 0] = BUCKET_COLOURS[buckets[buckets >= 0]].T
    bucket_path = _geotiff(out / "0000_scene_a_buckets.tif", rgb, nodata=None)
    outputs = [str(mask_path), str(cog_path), str(bucket_path)]
    if probability:
        prob = np.where(mask[0] == 1, BUILDING_P, BACKGROUND_P)
        q = quantize_probability(prob, mask[0] == 255)
        source = geotiff.write_array(out / "p.tif", q, 32637, GT, PROBABILITY_NODATA)
        outputs.append(str(geotiff.translate(source, out / "scene_a.resflow-probability.tif",
                                             "COG", geotiff.COG_PROBABILITY_OPTIONS)))
        source.unlink()
    per_rank = [{"rank": r, "tiles": t, "tiles_computed": t - 2, "pixels": t * TILE_PX ** 2,
                 "bytes_read": t * 30_000, "bytes_written": t * 10_000, "read_s": 1.0,
                 "read_wait_s": 0.1, "embed_s": 2.0 + r, "hash_s": 0.2, "segment_s": 4.0,
                 "write_s": 0.3, "wall_s": 12.345, "buckets": {}, "binding": {"device": "cpu"}}
                for r, t in enumerate((33, 27))]
    report = {
        "engine": "mpi", "ranks": 2, "wall_s": 12.345,
        "scenes": [{"index": 0, "path": str(scene_path), "width": SCENE_W, "height": SCENE_H,
                    "area_km2": 0.15, "complete": True,
                    "outputs": outputs},
                   {"index": 1, "path": str(root / "scene_b.tif"), "width": 500, "height": 500,
                    "area_km2": 0.0625, "complete": False, "outputs": []}],
        "skipped_scenes": [{"path": str(root / "broken<1>.tif"), "reason": "not a raster & empty"}],
        "tiles": 60, "tiles_computed": 56, "megapixels": 0.6, "area_km2": 0.15,
        "bytes_read": 1_800_000, "bytes_written": 600_000,
        "throughput": {"tiles_per_s": 4.86, "mpixel_per_s": 0.0486, "km2_per_s": 0.01215,
                       "gb_read_per_s": 0.000146},
        "stage_s_total": {"read_s": 2.0, "read_wait_s": 0.2, "embed_s": 5.0, "hash_s": 0.4,
                          "segment_s": 8.0, "write_s": 0.6},
        "load_balance": {"tiles_per_rank": [33, 27], "busy_s_per_rank": [6.6, 7.6],
                         "imbalance": 1.07},
        "bucket_histogram": {"0": 20, "1": 18, "2": 16, "-1": 6},
        "per_rank": per_rank,
        "config": {"scenes": {"bands": [1, 2, 3]}},
    }
    if aoi:
        report["aoi"] = {"path": str(write_lonlat_aoi(root / "aoi.geojson")),
                         "tiles_intersecting": 16, "tiles_total": 60, "area_km2": 0.0225,
                         "scenes_outside": []}
    (out / "run_report.json").write_text(json.dumps(report))
    return out, report


@pytest.fixture()
def out_dir(tmp_path: Path) -> Path:
    return make_output_dir(tmp_path)[0]


def test_quicklooks_have_thumbnail_sizes_and_overlay_colours(out_dir: Path) -> None:
    paths = write_quicklooks(out_dir)
    names = sorted(p.name for p in paths)
    assert names == ["0000_scene_a_buckets.png", "0000_scene_a_overlay.png", "rank_load.png",
                     "stage_times.png"]
    assert all(p.parent == out_dir / "quicklooks" for p in paths)
    tw, th = thumbnail_size(SCENE_W, SCENE_H)
    assert (tw, th) == (800, 480)
    overlay = imread(out_dir / "quicklooks" / "0000_scene_a_overlay.png")
    assert overlay.shape[:2] == (th, tw)
    scale = tw / SCENE_W
    building_px = overlay[int(250 * scale), int(400 * scale), :3]
    assert building_px[0] > building_px[1] + 0.2 and building_px[0] > building_px[2] + 0.2
    assert overlay[th // 2, 5, :3] == pytest.approx([NODATA_GREY] * 3, abs=0.01)
    buckets = imread(out_dir / "quicklooks" / "0000_scene_a_buckets.png")
    assert buckets.shape[1] == 800 + LEGEND_WIDTH_PX and buckets.shape[0] >= 480
    # Nearest-neighbour upscaling by 80: tile (row 0, col 1) is bucket 1, drawn in its colour.
    assert np.round(buckets[40, 120, :3] * 255) == pytest.approx(BUCKET_COLOURS[1], abs=1)
    assert not list((out_dir / "quicklooks").glob("*.partial*"))


def test_html_report_is_self_contained_with_the_summary(out_dir: Path) -> None:
    path = write_html_report(out_dir)
    assert path == out_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    for text in ("mpi", "12.35 s", "60 (56 computed)", "0.60 Mpx", "0.150 km2", "4.86 tiles/s",
                 "segment_s", "8.000", "1 / 2", "scene_a.tif", "incomplete"):
        assert text in page, text
    assert "broken&lt;1&gt;.tif" in page and "not a raster &amp; empty" in page
    assert "broken<1>" not in page
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4
    decoded = {base64.b64decode(i) for i in images}
    on_disk = {p.read_bytes() for p in (out_dir / "quicklooks").glob("*.png")}
    assert decoded == on_disk
    assert not re.search(r'src="(?!data:)', page)  # nothing fetched from disk or network
    assert not list(out_dir.glob("*.partial"))


def test_report_survives_a_moved_output_dir(tmp_path: Path) -> None:
    out, _ = make_output_dir(tmp_path)
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    page = write_html_report(moved).read_text()
    assert page.count("data:image/png;base64,") == 4


def test_missing_run_report_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="run_report.json"):
        write_html_report(tmp_path)


def test_screenshot_refuses_a_dir_without_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "report.html" in proc.stderr


def magma_rgb(p: float) -> np.ndarray:
    """The report's colour of probability ``p`` (0-255 RGB)."""
    from matplotlib import colormaps
    return np.round(np.array(colormaps[PROBABILITY_COLOURMAP](p)[:3]) * 255)


def colour_count(pixels: np.ndarray, rgb: np.ndarray, tol: float = 4.0) -> int:
    """Pixels of an RGB(A) float image within ``tol`` (0-255 units) of ``rgb`` in every channel."""
    return int((np.abs(pixels[..., :3] * 255 - rgb) <= tol).all(axis=-1).sum())


def test_probability_quicklook_shows_the_probabilities(tmp_path: Path) -> None:
    out, _ = make_output_dir(tmp_path, probability=True)
    names = sorted(p.name for p in write_quicklooks(out))
    assert "0000_scene_a_probability.png" in names
    look = imread(out / "quicklooks" / "0000_scene_a_probability.png")
    tw, th = thumbnail_size(SCENE_W, SCENE_H)
    assert look.shape[:2] == (th, tw)
    scale = tw / SCENE_W
    assert np.round(look[int(250 * scale), int(400 * scale), :3] * 255) == pytest.approx(
        magma_rgb(round(BUILDING_P * 254) / 254), abs=1)
    assert np.round(look[int(500 * scale), int(800 * scale), :3] * 255) == pytest.approx(
        magma_rgb(round(BACKGROUND_P * 254) / 254), abs=1)
    assert look[th // 2, 5, :3] == pytest.approx([NODATA_GREY] * 3, abs=0.01)
    page = write_html_report(out).read_text()
    assert "building probability" in page and page.count("data:image/png;base64,") == 5


def cyan_box(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box (row0, row1, col0, col1) of the largest connected set of pixels in the AOI
    outline's colour (a stretched random scene has a few cyan pixels of its own)."""
    from scipy import ndimage
    cyan = (np.abs(pixels[..., :3] * 255 - np.array([0, 255, 255])) <= 4).all(-1)
    parts, n = ndimage.label(cyan, structure=np.ones((3, 3)))
    assert n, "no AOI outline"
    rows, cols = ndimage.find_objects(parts)[int(np.bincount(parts.ravel())[1:].argmax())]
    return rows.start, rows.stop - 1, cols.start, cols.stop - 1


def test_the_image_quicklook_outlines_the_area_of_interest(tmp_path: Path) -> None:
    out, _ = make_output_dir(tmp_path, aoi=True)
    write_quicklooks(out)
    look = imread(out / "quicklooks" / "0000_scene_a_overlay.png")
    scale = thumbnail_size(SCENE_W, SCENE_H)[0] / SCENE_W
    c, r, w, h = AOI_WINDOW
    r0, r1, c0, c1 = cyan_box(look)
    assert (r0, r1, c0, c1) == pytest.approx((r * scale, (r + h) * scale, c * scale,
                                              (c + w) * scale), abs=2)
    inner = look[int(r0 + 4):int(r1 - 4), int(c0 + 4):int(c1 - 4), :3]
    assert (np.abs(inner * 255 - np.array([0, 255, 255])) <= 4).all(-1).mean() < 0.01  # a ring
    page = write_html_report(out).read_text()
    assert "Area of interest" in page and "aoi.geojson" in page


def test_screenshot_of_the_report_shows_the_probability_quicklook(tmp_path: Path) -> None:
    """Headless Chromium renders report.html; the screenshot holds the probability quicklook:
    the building block in the colour of its probability (about 80 x 160 px at thumbnail scale),
    the background in its colour, and the nodata strip grey; and the image quicklook with the
    area of interest's outline (a cyan box of the AOI's size)."""
    require_chromium()
    out, _ = make_output_dir(tmp_path, probability=True, aoi=True)
    write_html_report(out)
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(SCREENSHOT_SCRIPT), str(out), "--png", str(png)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(png.resolve())
    pixels = imread(png)
    assert pixels.shape[:2] == (WINDOW_HEIGHT_PX, 1280) and float(pixels.var()) > 0
    building = colour_count(pixels, magma_rgb(round(BUILDING_P * 254) / 254))
    background = colour_count(pixels, magma_rgb(round(BACKGROUND_P * 254) / 254))
    scale = thumbnail_size(SCENE_W, SCENE_H)[0] / SCENE_W
    block_px = 100 * 200 * scale ** 2
    assert 0.9 * block_px <= building <= 1.1 * block_px, building
    assert background > 10 * block_px, background
    from scipy import ndimage
    near = (np.abs(pixels[..., :3] * 255 - magma_rgb(round(BUILDING_P * 254) / 254)) <= 4).all(-1)
    parts, _ = ndimage.label(near)
    block = ndimage.find_objects(parts)[int(np.bincount(parts.ravel())[1:].argmax())]
    assert (block[0].stop - block[0].start, block[1].stop - block[1].start) == pytest.approx(
        (100 * scale, 200 * scale), abs=2)   # one block of the building's shape
    r0, r1, c0, c1 = cyan_box(pixels)
    assert (r1 - r0, c1 - c0) == pytest.approx((AOI_WINDOW[3] * scale, AOI_WINDOW[2] * scale),
                                               abs=3)


def test_ood_section_names_the_routing_method() -> None:
    from resflow_mpi.report import _ood_section
    report = {"config": {"inference": {"ood_routing": "embedding", "ood_quantile": 0.99}},
              "ood_tiles": 9, "scenes": [{"path": "/d/a.tif", "ood_tiles": 9}]}
    html = _ood_section(report)
    assert "embedding scores at quantile 0.99; 9 tile(s) flagged" in html and "a.tif" in html
    report["config"]["inference"]["ood_routing"] = "quantile"
    assert "hash-code distances at quantile 0.99" in _ood_section(report)
    report["config"]["inference"]["ood_routing"] = "off"
    assert "off (every tile by its nearest bucket)" in _ood_section(report)
