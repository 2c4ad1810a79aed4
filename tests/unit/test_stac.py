"""STAC input (io/stac.py through scene discovery) on real files written with pystac: an Item
whose single-band assets are picked by band common name or key and stacked by a VRT, an
ItemCollection and a static catalog, a multi-band asset, remote hrefs over /vsicurl/, and the
one-line errors (missing asset, unknown band name, non-raster asset, several raster assets)."""
from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Optional

import numpy as np
import pystac
import pytest
from osgeo import gdal

from resflow_mpi.errors import InputError
from resflow_mpi.io.discovery import resolve_scene_inputs
from resflow_mpi.io.stac import StacOptions, is_stac, stac_scenes
from resflow_mpi.synth import write_raster_from_array
from tests.integration.test_remote_scenes import http_root  # noqa: F401  (fixture)

GT = (500000.0, 0.5, 0.0, 1000000.0, 0.0, -0.5)
BANDS = {"B04": "red", "B03": "green", "B02": "blue", "B08": "nir"}
SIZE_PX = 32


def band_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """One single-band uint8 GeoTIFF per band key, with distinct pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    return {key: write_raster_from_array(folder / f"{key}.tif",
                                         rng.integers(1, 255, (1, SIZE_PX, SIZE_PX)).astype(np.uint8),
                                         32637, GT, 0) for key in BANDS}


def make_item(item_id: str, files: dict[str, str], href_base: Optional[str] = None) -> pystac.Item:
    """An item with one asset per band (eo:bands common names) plus a metadata asset."""
    item = pystac.Item(item_id, {"type": "Polygon", "coordinates": [[[39, 9], [39.1, 9], [39.1, 9.1],
                                                                      [39, 9.1], [39, 9]]]},
                       [39, 9, 39.1, 9.1], datetime.datetime(2024, 1, 1), {})
    for key, path in files.items():
        href = f"{href_base}/{Path(path).name}" if href_base else path
        item.add_asset(key, pystac.Asset(href, media_type=pystac.MediaType.COG, roles=["data"],
                                         extra_fields={"eo:bands": [{"name": key,
                                                                     "common_name": BANDS[key]}]}))
    item.add_asset("metadata", pystac.Asset("meta.xml", media_type=pystac.MediaType.XML,
                                            roles=["metadata"]))
    return item


def _pixels(path: str) -> np.ndarray:
    return gdal.Open(path).ReadAsArray()


def test_item_bands_by_common_name_and_key(tmp_path: Path) -> None:
    files = band_files(tmp_path / "data")
    item = make_item("scene-1", {k: str(p) for k, p in files.items()})
    item_path = tmp_path / "item.json"
    item.save_object(dest_href=str(item_path), include_self_link=False)
    assert is_stac(str(item_path))
    vrt_dir = tmp_path / "out" / "stac"
    by_name = stac_scenes(str(item_path), StacOptions(("red", "green", "blue"), str(vrt_dir)))
    assert by_name == [str(vrt_dir / "scene-1.vrt")]
    expected = np.stack([_pixels(str(files[k]))[None] for k in ("B04", "B03", "B02")])[:, 0]
    assert np.array_equal(_pixels(by_name[0]), expected)
    stamp = os.stat(by_name[0]).st_mtime_ns
    by_key = stac_scenes(str(item_path), StacOptions(("B04", "B03", "B02"), str(vrt_dir)))
    assert by_key == by_name and os.stat(by_key[0]).st_mtime_ns == stamp, \
        "the same VRT is not rewritten (a rerun resumes the same scene)"
    nir = stac_scenes(str(item_path), StacOptions(("nir", "red", "green"), str(vrt_dir)))
    assert np.array_equal(_pixels(nir[0])[0], _pixels(str(files["B08"])))


def test_item_collection_and_catalog_on_disk(tmp_path: Path) -> None:
    items = [make_item(f"s{i}", {k: str(p) for k, p in band_files(tmp_path / f"d{i}", i).items()})
             for i in range(2)]
    collection = tmp_path / "items.geojson.json"
    pystac.ItemCollection(items).save_object(str(collection))
    catalog = pystac.Catalog("cat", "two scenes")
    for item in items:
        catalog.add_item(item.clone())
    catalog.normalize_hrefs(str(tmp_path / "catalog"))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    opts = StacOptions(("red", "green", "blue"), str(tmp_path / "out" / "stac"))
    for path in (collection, tmp_path / "catalog" / "catalog.json"):
        scenes = resolve_scene_inputs([str(path)], stac=opts)
        assert [Path(s).name for s in scenes] == ["s0.vrt", "s1.vrt"], path
        assert gdal.Open(scenes[1]).RasterCount == 3


def test_one_multiband_asset_is_the_scene(tmp_path: Path) -> None:
    rgb = write_raster_from_array(tmp_path / "visual.tif",
                                  np.ones((3, SIZE_PX, SIZE_PX), np.uint8), 32637, GT, 0)
    item = pystac.Item("v", None, None, datetime.datetime(2024, 1, 1), {})
    item.add_asset("visual", pystac.Asset("visual.tif", media_type=pystac.MediaType.GEOTIFF,
                                          roles=["data"]))
    item.add_asset("thumbnail", pystac.Asset("thumb.png", media_type=pystac.MediaType.PNG,
                                             roles=["thumbnail"]))
    path = tmp_path / "v.json"
    item.save_object(dest_href=str(path), include_self_link=False)
    assert stac_scenes(str(path), StacOptions()) == [str(rgb)]  # the one raster asset, relative
    assert stac_scenes(str(path), StacOptions(("visual",))) == [str(rgb)]


def test_remote_hrefs_read_through_vsicurl(tmp_path: Path,
                                           http_root: tuple[Path, str, list[int]]) -> None:  # noqa: F811
    root, url, sent = http_root
    files = band_files(root)
    item = make_item("remote", {k: str(p) for k, p in files.items()}, href_base=url)
    path = tmp_path / "remote.json"
    item.save_object(dest_href=str(path), include_self_link=False)
    scenes = stac_scenes(str(path), StacOptions(("red", "green", "blue"), str(tmp_path / "vrt")))
    text = Path(scenes[0]).read_text()
    assert f"/vsicurl/{url}/B04.tif" in text
    assert np.array_equal(_pixels(scenes[0])[0], _pixels(str(files["B04"])))
    assert sent


@pytest.mark.parametrize("assets,fragment", [
    (("red", "swir16"), "no asset key or band common name 'swir16' (scenes.stac_assets)"),
    (("metadata",), "asset 'metadata' is not a raster"),
    ((), "4 raster assets (B04, B03, B02, B08); set scenes.stac_assets"),
    (("red", "green", "blue"), "asset 'B04' file not found"),
])
def test_errors_are_one_line(tmp_path: Path, assets: tuple[str, ...], fragment: str) -> None:
    files = band_files(tmp_path / "data")
    if fragment.endswith("file not found"):
        files["B04"].unlink()
    item = make_item("bad", {k: str(p) for k, p in files.items()})
    path = tmp_path / "bad.json"
    item.save_object(dest_href=str(path), include_self_link=False)
    with pytest.raises(InputError) as err:
        resolve_scene_inputs([str(path)], stac=StacOptions(assets, str(tmp_path / "vrt")))
    line = str(err.value)
    assert "\n" not in line and str(path) in line and "'bad'" in line and fragment in line, line


def test_broken_stac_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"type": "Feature", "stac_version": "1.0.0", "properties": {}}')
    with pytest.raises(InputError) as err:
        resolve_scene_inputs([str(path)])
    line = str(err.value)
    assert "\n" not in line and line.startswith(f"{path}: not a readable STAC file"), line
