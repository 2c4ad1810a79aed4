"""I/O seams: GDAL settings only through io.configure, one GeoTIFF writer, the HDF5 layout read only
through the mask store, no raw GDAL outside io/ (real GDAL, real HDF5, fresh interpreters)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal, osr

from resflow_mpi.errors import ConfigError, InputError
from resflow_mpi.io import geotiff
from resflow_mpi.io.export import export_scene
from resflow_mpi.io.maskstore import MaskReader, MaskStore
from resflow_mpi.io.raster import RasterPreview, open_scene

PKG = Path(__file__).resolve().parents[2] / "resflow_mpi"
GT = (500000.0, 2.0, 0.0, 4000000.0, 0.0, -2.0)


def _python(code: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


STATE = ("json.dumps([gdal.GetUseExceptions(), ogr.GetUseExceptions(), osr.GetUseExceptions(), "
         "gdal.GetCacheMax()])")


def test_importing_the_package_changes_no_gdal_state() -> None:
    modules = sorted(f"resflow_mpi.{'.'.join(p.relative_to(PKG).with_suffix('').parts)}"
                     for p in PKG.rglob("*.py") if p.name != "__init__.py")
    code = (f"import json\nfrom osgeo import gdal, ogr, osr\nbefore = {STATE}\n"
            + "".join(f"import {m}\n" for m in modules)
            + f"print(json.dumps([json.loads(before), json.loads({STATE})]))")
    before, after = _python(code)
    assert "resflow_mpi.io.raster" in modules and "resflow_mpi.io.export" in modules
    assert after == before


def test_io_functions_configure_gdal_themselves(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tif"
    junk.write_text("not a raster")
    code = ("import json\nfrom osgeo import gdal, ogr, osr\n"
            "from resflow_mpi.io.raster import RasterPreview\nfrom resflow_mpi.errors import InputError\n"
            f"try:\n    RasterPreview({str(junk)!r})\n    said = ''\n"
            "except InputError as exc:\n    said = str(exc)\n"
            f"print(json.dumps([said, json.loads({STATE})]))")
    said, state = _python(code)
    assert "not a readable raster" in said
    assert state == [1, 1, 1, 64 * 1024 * 1024]


def test_configure_is_idempotent_and_sets_the_cache() -> None:
    code = ("import json\nfrom osgeo import gdal, ogr, osr\nfrom resflow_mpi.io import gdalenv\n"
            "gdalenv.configure(cache_mb=32)\ngdalenv.configure(cache_mb=32)\n"
            "gdalenv.ensure_configured()\n"
            f"print({STATE})")
    assert _python(code) == [1, 1, 1, 32 * 1024 * 1024]


def test_geotiff_writer_crs_nodata_and_atomic_names(tmp_path: Path) -> None:
    data = np.arange(2 * 30 * 40, dtype=np.uint16).reshape(2, 30, 40)
    p = geotiff.write_array(tmp_path / "a.tif", data, 32633, GT, 7)
    ds = gdal.Open(str(p))
    assert ds.ReadAsArray().tolist() == data.tolist()
    assert ds.GetGeoTransform() == GT
    assert osr.SpatialReference(wkt=ds.GetProjection()).GetAuthorityCode(None) == "32633"
    assert [ds.GetRasterBand(b).GetNoDataValue() for b in (1, 2)] == [7.0, 7.0]
    wkt = ds.GetProjection()
    ds = None
    q = geotiff.write_array(tmp_path / "b.tif", data[0].astype(np.float32), wkt, GT, None)
    assert gdal.Open(str(q)).GetProjection() == wkt
    cog = geotiff.translate_cog(p, tmp_path / "a-cog.tif")
    assert gdal.Open(str(cog)).GetMetadataItem("LAYOUT", "IMAGE_STRUCTURE") == "COG"
    assert not list(tmp_path.glob("*.partial*"))
    with pytest.raises(ConfigError, match="EPSG:999999"):
        geotiff.write_array(tmp_path / "c.tif", data, 999999, GT, None)
    with pytest.raises(ValueError, match="unsupported dtype"):
        geotiff.write_array(tmp_path / "d.tif", data.astype(np.int8), 32633, GT, None)


def test_mask_reader_reads_what_the_store_wrote(unit_fixtures: dict, tmp_path: Path) -> None:
    info = open_scene(unit_fixtures["scene"], (1, 2, 3))
    h5 = str(tmp_path / "masks.h5")
    MaskStore(h5, [info], tile_px=64, halo_px=8, code_bytes=2, config_checksum="c",
              gallery_checksum="g").close()
    with MaskReader(h5) as r:
        meta = r.scene_meta(0)
        assert (meta.width, meta.height, meta.tile_px) == (info.width, info.height, 64)
        assert (meta.grid_rows, meta.grid_cols) == (2, 2)
        assert meta.geotransform == tuple(info.geotransform) and meta.crs_wkt == info.crs_wkt
        assert meta.source_path == info.path
        blocks = list(r.iter_mask_rows(0, 32))
        assert [r0 for r0, _ in blocks] == [0, 32, 64]
        assert sum(b.shape[0] for _, b in blocks) == info.height
        assert r.bucket_grid(0).shape == (2, 2)
    out = tmp_path / "m.tif"
    bt = tmp_path / "b.tif"
    export_scene(h5, 0, out, bucket_tif=bt)
    assert gdal.Open(str(out)).RasterXSize == info.width
    assert gdal.Open(str(bt)).GetGeoTransform()[1] == info.geotransform[1] * 64
    with pytest.raises(Exception, match="cannot read the HDF5 mask store"):
        MaskReader(str(tmp_path / "missing.h5"))


def test_raster_preview_decimates(unit_fixtures: dict) -> None:
    r = RasterPreview(unit_fixtures["scene"])
    assert (r.width, r.height, r.count, r.nodata(1)) == (96, 80, 3, 0.0)
    small = r.read([1, 2], (48, 40))
    assert [a.shape for a in small] == [(40, 48), (40, 48)]
    with pytest.raises(InputError):
        RasterPreview(unit_fixtures["scene"].parent / "nope.tif")


def _imports_and_calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value.startswith(("scenes/", "tiles/")):
            found.add("hdf5-layout")
        elif isinstance(node, ast.JoinedStr) and any(
                isinstance(v, ast.Constant) and str(v.value).startswith(("scenes/", "tiles/"))
                for v in node.values):
            found.add("hdf5-layout")
    return found


def test_gdal_only_in_io_and_hdf5_layout_only_in_the_mask_store() -> None:
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        found = _imports_and_calls(path)
        if rel.parts[0] != "io":
            assert "osgeo" not in found, f"{rel} imports GDAL outside io/"
        if rel.name != "maskstore.py":
            assert "hdf5-layout" not in found, f"{rel} names a mask-store dataset"
    assert "h5py" not in _imports_and_calls(PKG / "io" / "export.py")
