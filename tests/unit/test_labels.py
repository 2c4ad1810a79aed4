"""Labels as data: vector labels in another CRS rasterise exactly like the raster route, value
mappings, and every bad label is a one-line error naming the file (real GDAL/OGR files)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pytest
from osgeo import gdal, ogr, osr

from resflow_mpi.config import LabelsConfig
from resflow_mpi.errors import InputError
from resflow_mpi.io.labels import LabelSpec, TruthReader, open_label_source
from resflow_mpi.io.raster import open_scene

gdal.UseExceptions()
ogr.UseExceptions()

UTM = 32637
ORIGIN = (500_000.0, 1_000_200.0)
PIXEL_M = 2.0
W, H = 200, 150


def srs(epsg: int) -> osr.SpatialReference:
    s = osr.SpatialReference()
    s.ImportFromEPSG(epsg)
    s.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    return s


def geotransform(rotation_m: float = 0.0) -> tuple[float, ...]:
    return (ORIGIN[0], PIXEL_M, rotation_m, ORIGIN[1], rotation_m, -PIXEL_M)


def make_scene(path: Path, gt: Sequence[float] = geotransform(), epsg: int = UTM,
               size: tuple[int, int] = (W, H)) -> Path:
    ds = gdal.GetDriverByName("GTiff").Create(str(path), size[0], size[1], 3, gdal.GDT_Byte)
    ds.SetGeoTransform(list(gt))
    ds.SetProjection(srs(epsg).ExportToWkt())
    rng = np.random.default_rng(0)
    for b in range(3):
        ds.GetRasterBand(b + 1).WriteArray(rng.integers(1, 255, (size[1], size[0]), np.uint8))
    ds = None
    return path


def make_raster(path: Path, arr: np.ndarray, gt: Optional[Sequence[float]] = geotransform(),
                epsg: Optional[int] = UTM, nodata: Optional[float] = None,
                gdal_type: int = gdal.GDT_Byte) -> Path:
    bands = 1 if arr.ndim == 2 else arr.shape[0]
    ds = gdal.GetDriverByName("GTiff").Create(str(path), arr.shape[-1], arr.shape[-2], bands,
                                              gdal_type)
    if gt is not None:
        ds.SetGeoTransform(list(gt))
    if epsg is not None:
        ds.SetProjection(srs(epsg).ExportToWkt())
    for b in range(bands):
        band = ds.GetRasterBand(b + 1)
        band.WriteArray(arr if arr.ndim == 2 else arr[b])
        if nodata is not None:
            band.SetNoDataValue(nodata)
    ds = None
    return path


def pix(gt: Sequence[float], c: float, r: float) -> tuple[float, float]:
    return gt[0] + c * gt[1] + r * gt[2], gt[3] + c * gt[4] + r * gt[5]


def polygons_px() -> list[list[tuple[float, float]]]:
    """Building outlines in scene pixel coordinates: rectangles and rotated quads, some crossing
    the 64-px tile edges, none in the right third (windows there hold no polygon)."""
    rng = np.random.default_rng(7)
    polys = [[(60.3, 20.2), (70.6, 20.2), (70.6, 45.7), (60.3, 45.7)],     # crosses col 64
             [(10.25, 58.3), (30.4, 58.3), (30.4, 71.8), (10.25, 71.8)],   # crosses row 64
             [(55.1, 55.3), (75.2, 60.9), (70.7, 77.4), (50.3, 72.2)],     # crosses both, rotated
             [(2.2, 2.3), (9.7, 2.3), (9.7, 8.6), (2.2, 8.6)]]
    for _ in range(12):
        cx, cy = rng.uniform(5, 125), rng.uniform(5, 140)
        a, s1, s2 = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(2, 9)
        d1, d2 = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
        polys.append([tuple(np.array([cx, cy]) + u * s1 * d1 + v * s2 * d2)
                      for u, v in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
    return polys


def ring_geometry(points: Sequence[tuple[float, float]]) -> ogr.Geometry:
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in list(points) + [points[0]]:
        ring.AddPoint_2D(float(x), float(y))
    poly = ogr.Geometry(ogr.wkbPolygon)
    poly.AddGeometry(ring)
    return poly


def write_vector(path: Path, polys_map: list[list[tuple[float, float]]], epsg: int,
                 driver: str = "GeoJSON", fields: Optional[list[dict[str, Any]]] = None,
                 layer: str = "buildings", geoms: Optional[list[ogr.Geometry]] = None,
                 with_srs: bool = True) -> Path:
    """Polygons given in map coordinates of ``epsg`` (x, y order), written with OGR."""
    drv = ogr.GetDriverByName(driver)
    ds = drv.Open(str(path), 1) if path.exists() and driver == "GPKG" else \
        drv.CreateDataSource(str(path))
    lyr = ds.CreateLayer(layer, srs(epsg) if with_srs else None, ogr.wkbUnknown)
    names = sorted({k for f in (fields or []) for k in f})
    for k in names:
        sample = next(f[k] for f in fields or [] if k in f)
        lyr.CreateField(ogr.FieldDefn(k, ogr.OFTInteger if isinstance(sample, int)
                                      else ogr.OFTString))
    for i, g in enumerate(geoms if geoms is not None else [ring_geometry(p) for p in polys_map]):
        f = ogr.Feature(lyr.GetLayerDefn())
        for k, v in (fields[i] if fields else {}).items():
            f.SetField(k, v)
        f.SetGeometry(g)
        lyr.CreateFeature(f)
    ds = None
    return path


def to_map(polys: list[list[tuple[float, float]]], gt: Sequence[float], epsg: int = UTM,
           scene_epsg: int = UTM) -> list[list[tuple[float, float]]]:
    pts = [[pix(gt, c, r) for c, r in p] for p in polys]
    if epsg == scene_epsg:
        return pts
    ct = osr.CoordinateTransformation(srs(scene_epsg), srs(epsg))
    return [[tuple(q[:2]) for q in ct.TransformPoints(p)] for p in pts]


def rasterise_full(path: Path, polys_map: list[list[tuple[float, float]]],
                   gt: Sequence[float], epsg: int = UTM) -> Path:
    """The raster route: the same polygons (scene CRS) burnt onto the whole scene grid."""
    vpath = write_vector(path.with_suffix(".scene-crs.geojson"), polys_map, epsg)
    make_raster(path, np.zeros((H, W), np.uint8), gt, epsg)
    out = gdal.Open(str(path), gdal.GA_Update)
    src = gdal.OpenEx(str(vpath), gdal.OF_VECTOR)
    gdal.RasterizeLayer(out, [1], src.GetLayer(0), burn_values=[1])
    out = None
    return path


def source(label: Path, scene: Path, **cfg: Any) -> Any:
    spec_keys = {k: cfg.pop(k) for k in ("layer", "where", "class_field") if k in cfg}
    return open_label_source(LabelSpec(str(label), **spec_keys), open_scene(scene),
                             LabelsConfig(**cfg))


def windows() -> list[tuple[int, int, int, int]]:
    tiles = [(c, r, 64, 64) for r in range(0, H, 64) for c in range(0, W, 64)]
    halo = [(c - 8, r - 8, 80, 80) for c, r, _, _ in tiles]       # halo windows leave the scene
    return tiles + halo + [(37, 11, 50, 70), (140, 0, 60, 150), (0, 0, W, H)]


GEO_GT = (39.0, 2e-5, 0.0, 9.05, 0.0, -2e-5)  # a drone scene in EPSG:4326, about 2 m pixels


@pytest.mark.parametrize("gt, scene_epsg, label_epsg, driver", [
    (geotransform(), UTM, 4326, "GeoJSON"),        # OSM footprints over a UTM scene
    (geotransform(), UTM, 4326, "GPKG"),           # the same, from a spatially indexed source
    (geotransform(0.35), UTM, 4326, "GeoJSON"),    # rotated scene grid
    (GEO_GT, 4326, UTM, "GPKG"),                   # geographic scene, projected labels
])
def test_vector_labels_in_another_crs_match_raster_route_per_window(
        tmp_path: Path, gt: tuple[float, ...], scene_epsg: int, label_epsg: int, driver: str
) -> None:
    scene = make_scene(tmp_path / "scene.tif", gt, scene_epsg)
    polys = polygons_px()
    raster_label = rasterise_full(tmp_path / "truth.tif", to_map(polys, gt, scene_epsg,
                                                                 scene_epsg), gt, scene_epsg)
    suffix = {"GeoJSON": "geojson", "GPKG": "gpkg"}[driver]
    vector_label = write_vector(tmp_path / f"buildings.{suffix}",
                                to_map(polys, gt, label_epsg, scene_epsg), label_epsg, driver)
    rsrc, vsrc = source(raster_label, scene), source(vector_label, scene)
    assert (rsrc.kind, vsrc.kind) == ("raster", "vector")
    assert vsrc.indexed == (driver == "GPKG")
    full = gdal.Open(str(raster_label)).ReadAsArray()
    assert 300 < int(full.sum()) < 0.2 * W * H
    empty_windows = 0
    for col, row, w, h in windows():
        v = vsrc.read_window(col, row, w, h)
        r = rsrc.read_window(col, row, w, h)
        assert v.shape == (h, w) and v.dtype == np.uint8
        assert np.array_equal(v, r), (col, row, w, h, int((v != r).sum()))
        empty_windows += int(not (v == 1).any())
    assert empty_windows >= 3  # the right third holds no polygon
    assert vsrc.check().values == {"feature": len(polys)}


def test_vector_check_summary_and_gpkg_layers_where_class_field(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    polys = to_map(polygons_px(), geotransform(), 4326)
    kinds = ["house", "shed", "yes", "ruin"] * 4
    gpkg = write_vector(tmp_path / "osm.gpkg", polys[:16], 4326, "GPKG",
                        [{"building": k, "levels": i} for i, k in enumerate(kinds)])
    write_vector(gpkg, polys[:2], 4326, "GPKG", layer="roads")
    with pytest.raises(InputError, match="holds 2 layers .*labels.layer"):
        source(gpkg, scene)
    values = {"building": ["house", "yes"], "background": ["shed"], "ignore": ["ruin"]}
    src = source(gpkg, scene, layer="buildings", class_field="building", values=values)
    s = src.check()
    assert s.values == {"house": 4, "shed": 4, "yes": 4, "ruin": 4}
    assert s.building_cells.any() and 0 < s.building_fraction < 0.2
    full = src.read_window(0, 0, W, H)
    assert set(np.unique(full)) <= {0, 1, 255} and (full == 255).any() and (full == 1).any()
    # where filter: only houses are buildings
    only = source(gpkg, scene, layer="buildings", where="building = 'house'")
    only = only.read_window(0, 0, W, H)
    assert 0 < int((only == 1).sum()) < int((full == 1).sum())
    # Sources of one file share its handle; each keeps its own filter.
    assert np.array_equal(src.read_window(0, 0, W, H), full)


def test_raster_values_0_255_01_and_class_codes(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    base = np.zeros((H, W), np.uint8)
    base[10:40, 20:60] = 1
    base[100:120, 150:190] = 1
    m01 = make_raster(tmp_path / "m01.tif", base)
    assert np.array_equal(source(m01, scene).read_window(0, 0, W, H), base)
    m255 = make_raster(tmp_path / "m255.tif", base * 255)
    with pytest.raises(InputError, match=r"only the values 0 and 255 .*labels.values: "
                                         r"\{building: \[255\], background: \[0\]\}"):
        source(m255, scene).check()
    ok = source(m255, scene, values={"building": [255], "background": [0]})
    ok.check()
    assert np.array_equal(ok.read_window(0, 0, W, H), base)
    coded = base.copy()
    coded[60:80, :] = 3
    coded[0:5, :] = 9
    m_coded = make_raster(tmp_path / "classes.tif", coded.astype(np.uint16),
                          gdal_type=gdal.GDT_UInt16)
    with pytest.raises(InputError, match=r"classes.tif: label values 3, 9 are not in labels.val"):
        source(m_coded, scene).check()
    src = source(m_coded, scene, values={"building": [1, 3], "background": [0], "ignore": [9]})
    s = src.check()
    assert s.values == {"0": int((coded == 0).sum()), "1": int((coded == 1).sum()),
                        "3": int((coded == 3).sum()), "9": int((coded == 9).sum())}
    got = src.read_window(0, 0, W, H)
    assert np.array_equal(got, np.where(coded == 9, 255, np.isin(coded, [1, 3]).astype(np.uint8)))
    # The raster's declared nodata is ignore under the default mapping.
    nd = base.copy()
    nd[:, :10] = 7
    assert (source(make_raster(tmp_path / "nd.tif", nd, nodata=7), scene)
            .read_window(0, 0, 20, 5) == 255)[:, :10].all()


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def test_bad_labels_are_one_line_errors(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    polys = to_map(polygons_px(), geotransform(), 4326)
    base = np.zeros((H, W), np.uint8)
    base[:, :120] = 255
    cases = []
    cases.append((lambda: source(make_raster(tmp_path / "ign.tif", base), scene,
                                 values={"building": [1], "background": [0], "ignore": [255]}
                                 ).check(), r"60% of the label .* is ignore .*max_ignore_fraction"))
    shifted = list(geotransform())
    shifted[0] += 10 * PIXEL_M
    cases.append((lambda: source(make_raster(tmp_path / "grid.tif", base * 0, shifted), scene),
                  r"another grid than its scene .*gdalwarp -r near -t_srs EPSG:32637 -te"))
    cases.append((lambda: source(make_raster(tmp_path / "rgb.tif", np.zeros((3, H, W), np.uint8)),
                                 scene), r"has 3 bands"))
    cases.append((lambda: source(make_raster(tmp_path / "small.tif", np.zeros((10, 10), np.uint8),
                                             None, None), scene), r"without georeferencing"))
    far = [[(x + 5.0, y + 5.0) for x, y in p] for p in polys]
    cases.append((lambda: source(write_vector(tmp_path / "far.geojson", far, 4326), scene).check(),
                  r"far.geojson: labels do not overlap scene scene.tif .*check the label file"))
    good = write_vector(tmp_path / "b.geojson", polys, 4326,
                        fields=[{"building": "yes"}] * len(polys))
    cases.append((lambda: source(good, scene, class_field="kind", values={"building": ["yes"]}),
                  r"class field 'kind' not in layer .*fields: building"))
    cases.append((lambda: source(good, scene, class_field="building"),
                  r"need labels.values"))
    cases.append((lambda: source(good, scene, class_field="building",
                                 values={"building": ["house"]}).check(),
                  r"class field 'building' values yes are not in labels.values"))
    cases.append((lambda: source(good, scene, where="buildin = 'yes'"), r"not valid OGR SQL"))
    cases.append((lambda: source(good, scene, where="building = 'no'").check(),
                  r"no feature of layer .* matches the where filter"))
    pts = [ogr.CreateGeometryFromWkt(f"POINT ({p[0][0]} {p[0][1]})") for p in polys]
    cases.append((lambda: source(write_vector(tmp_path / "pts.geojson", [], 4326, geoms=pts),
                                 scene).check(), r"are points or lines; building labels must be"))
    shp = write_vector(tmp_path / "noprj.shp", to_map(polygons_px(), geotransform()), UTM,
                       "ESRI Shapefile", with_srs=False)
    cases.append((lambda: source(shp, scene), r"has no CRS .*\.prj"))
    cases.append((lambda: source(tmp_path / "missing.geojson", scene), r"label file not found"))
    (tmp_path / "junk.geojson").write_text("{ not json")
    cases.append((lambda: source(tmp_path / "junk.geojson", scene), r"not a readable"))
    cases.append((lambda: source(make_raster(tmp_path / "w.tif", base * 0), scene, where="a = 1"),
                  r"raster label takes no where filter"))
    for fn, pattern in cases:
        with pytest.raises(InputError) as exc:
            fn()
        assert re.search(pattern, one_line(exc)), one_line(exc)


def test_plausible_label_problems_warn(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    polys = to_map(polygons_px(), geotransform(), 4326)
    # The label's extent covers the scene but no polygon lies on it: a warning, not an error.
    ext_poly = [(x - 0.02, y) for x, y in polys[0]]
    lone = write_vector(tmp_path / "lone.geojson", [ext_poly, [(x + 0.02, y) for x, y in
                                                               polys[0]]], 4326)
    s = source(lone, scene).check()
    assert any("no building polygon over scene" in w for w in s.warnings)
    mixed = [ring_geometry(p) for p in polys[:3]] + \
        [ogr.CreateGeometryFromWkt(f"LINESTRING ({polys[4][0][0]} {polys[4][0][1]}, "
                                   f"{polys[4][2][0]} {polys[4][2][1]})")]
    s = source(write_vector(tmp_path / "mixed.geojson", [], 4326, geoms=mixed), scene).check()
    assert any("1 point/line feature(s)" in w for w in s.warnings)


def test_truth_reader_for_evaluate(tmp_path: Path) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    polys = polygons_px()
    raster = rasterise_full(tmp_path / "truth.tif", to_map(polys, geotransform()), geotransform())
    vector = write_vector(tmp_path / "b.geojson", to_map(polys, geotransform(), 4326), 4326)
    infos = [open_scene(scene)] * 3
    reader = TruthReader(infos, [LabelSpec(str(raster)), LabelSpec(str(vector)), None],
                         LabelsConfig())
    assert np.array_equal(reader.window(0, 10, 20, 64, 64), reader.window(1, 10, 20, 64, 64))
    with pytest.raises(InputError, match="scene has no label to evaluate against"):
        reader.check_all()
    reader.close()


@pytest.mark.parametrize("name, driver", [("l.geojson", "GeoJSON"), ("l.gpkg", "GPKG"),
                                          ("l.tif", None)])
def test_corrupted_label_files_give_only_input_errors(tmp_path: Path, name: str,
                                                      driver: Optional[str]) -> None:
    scene = make_scene(tmp_path / "scene.tif")
    polys = to_map(polygons_px(), geotransform(), 4326)
    good = tmp_path / name
    if driver is None:
        rasterise_full(good, to_map(polygons_px(), geotransform()), geotransform())
    else:
        write_vector(good, polys, 4326, driver)
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(11)
    for i in range(25):
        bad = bytearray(data)
        if i % 3 == 0:
            bad = bad[:int(rng.integers(1, len(bad)))]
        else:
            for pos in rng.integers(0, len(bad), int(rng.integers(1, 40))):
                bad[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"bad{i}{good.suffix}"
        path.write_bytes(bytes(bad))
        try:
            src = open_label_source(LabelSpec(str(path)), open_scene(scene), LabelsConfig())
            src.check()
            src.read_window(-5, 10, 70, 60)
        except InputError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
