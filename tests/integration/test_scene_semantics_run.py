"""End to end: `resflow run` honours every input's meaning. A mask-band scene gets nodata where
masked (never building), a float32 0-255 scene maps exactly like its uint8 twin, a white collar
with the blank-fill detector on is nodata, a scene listed twice (symlink) is mapped once, and an
output directory inside the input folder survives a rerun."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from osgeo import gdal

from tests.conftest import resflow, write_config

gdal.UseExceptions()


def _copy_with(src: Path, dst: Path, arr: np.ndarray, mask: np.ndarray | None = None) -> Path:
    """``src``'s georeferencing and nodata with pixels ``arr`` (dtype decides the file's type)."""
    s = gdal.Open(str(src))
    gtype = gdal.GDT_Float32 if arr.dtype == np.float32 else gdal.GDT_Byte
    d = gdal.GetDriverByName("GTiff").Create(str(dst), s.RasterXSize, s.RasterYSize, arr.shape[0],
                                             gtype, ["TILED=YES"])
    d.SetGeoTransform(s.GetGeoTransform())
    d.SetProjection(s.GetProjection())
    for i in range(arr.shape[0]):
        d.GetRasterBand(i + 1).WriteArray(arr[i])
        nd = s.GetRasterBand(i + 1).GetNoDataValue()
        if nd is not None:
            d.GetRasterBand(i + 1).SetNoDataValue(nd)
    if mask is not None:
        d.CreateMaskBand(gdal.GMF_PER_DATASET)
        d.GetRasterBand(1).GetMaskBand().WriteArray(mask.astype(np.uint8) * 255)
    d = None
    return dst


def _read(path: str) -> np.ndarray:
    return gdal.Open(path).ReadAsArray()


def test_run_honours_mask_bands_float_scenes_blank_fill_and_identity(
        tmp_path: Path, tiny_archive: Path, tiny_gallery: Path) -> None:
    entry = next(e for e in json.loads(tiny_archive.read_text()) if e["split"] == "test")
    src = tiny_archive.parent / entry["image"]
    raw = gdal.Open(str(src)).ReadAsArray()
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(src, inp / "d.tif")
    keep = np.zeros(raw.shape[1:], bool)
    keep[:, :150] = True
    _copy_with(src, inp / "a.tif", raw, mask=keep)
    _copy_with(src, inp / "c.tif", raw.astype(np.float32))
    # a JPEG-fringed white collar over the 40 rows with the most buildings in the ground truth
    truth = gdal.Open(str(tiny_archive.parent / entry["mask"])).ReadAsArray() == 1
    per_band = np.convolve(truth.sum(1), np.ones(40), "valid")
    r0 = int(per_band.argmax())
    rows = slice(r0, r0 + 40)
    collar = raw.copy()
    rng = np.random.default_rng(0)
    collar[:, rows, :] = 250 + rng.integers(0, 6, collar[:, rows, :].shape)
    _copy_with(src, inp / "b.tif", collar)
    (tmp_path / "link.tif").symlink_to(inp / "d.tif")
    (inp / "d_mask.tif").symlink_to(tiny_archive.parent / entry["mask"])  # a label: never a scene

    cfg = write_config(tmp_path / "run.yaml",
                       scenes={"inputs": [str(inp), str(tmp_path / "link.tif")], "split": "all",
                               "blank_fill": True},
                       normalization={"value_max": 255},
                       models={"gallery": str(tiny_gallery)},
                       output={"dir": str(inp / "out")})
    p = resflow(["run", str(cfg), "--quiet"])
    assert "mapped once" in p.stderr and "link.tif" in p.stderr
    report = json.loads((inp / "out" / "run_report.json").read_text())
    masks = {Path(s["path"]).name: _read(s["outputs"][0]) for s in report["scenes"]}
    assert sorted(masks) == ["a.tif", "b.tif", "c.tif", "d.tif"]
    d = masks["d.tif"]
    assert (d[:, :150] == 1).any() and (d[:, 150:] == 1).any() and (d[rows] == 1).any()
    # masked pixels are nodata, never building; the rest is the unmasked scene's answer
    assert np.array_equal(masks["a.tif"], np.where(keep, d, 255))
    # float32 0-255 with value_max 255 maps exactly like the uint8 scene
    assert np.array_equal(masks["c.tif"], d)
    # the white collar is nodata, not building
    assert (masks["b.tif"][rows] == 255).all()

    # rerun with the output directory inside the input folder: resumes, takes no output as input
    again = resflow(["run", str(cfg), "--quiet"])
    report2 = json.loads((inp / "out" / "run_report.json").read_text())
    assert sorted(Path(s["path"]).name for s in report2["scenes"]) == sorted(masks), again.stderr
    assert all(s["complete"] for s in report2["scenes"])
