"""STAC input: an Item, ItemCollection or static catalog on disk -> one scene path per item.

Read with ``pystac``. Each item's bands come from ``scenes.stac_assets``: asset keys or band
common names (``eo:bands`` / STAC 1.1 ``bands``), in the order the networks take them; empty:
the item's one raster asset. One asset (all its bands, in order) is the scene itself; single-band
assets (one per name) become one scene through a GDAL VRT (``gdal.BuildVRT(separate=True)``),
written to ``<output.dir>/stac/<item>.vrt`` only when its content changes, so a rerun finds the
same scene (resume). Hrefs may be local (relative to the STAC file) or remote (http(s) is read
through /vsicurl/, s3:// through /vsis3/; see ``io.vsi``).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import InputError
from .gdalenv import ensure_configured
from .vsi import gdal_path, is_virtual

STAC_TYPES = ("Feature", "FeatureCollection", "Catalog", "Collection")
RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".ntf")
VRT_FOLDER = "stac"


@dataclass(frozen=True)
class StacOptions:
    """How STAC items become scenes: the asset keys or band names, and where VRTs go."""

    assets: tuple[str, ...] = ()
    vrt_dir: str = VRT_FOLDER

    @classmethod
    def from_config(cls, cfg: Any) -> "StacOptions":
        """scenes.stac_assets, VRTs under output.dir."""
        return cls(tuple(cfg.scenes.stac_assets), os.path.join(cfg.output.dir, VRT_FOLDER))


def is_stac(path: str) -> bool:
    """True for a local JSON file holding a STAC Item, ItemCollection, Catalog or Collection."""
    if not path.lower().endswith(".json") or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(head, dict) or head.get("type") not in STAC_TYPES:
        return False
    if head["type"] == "FeatureCollection":
        features = head.get("features") or []
        return bool(features) and all(isinstance(x, dict) and "stac_version" in x
                                      for x in features)
    return "stac_version" in head


def _items(path: str) -> list[Any]:
    """Every item of the STAC file (an item, an item collection, or a catalog's tree)."""
    import pystac
    try:
        with open(path, encoding="utf-8") as f:
            kind = json.load(f).get("type")
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_file(path).items)
        else:
            obj = pystac.read_file(path)
            items = [obj] if isinstance(obj, pystac.Item) else list(
                obj.get_items(recursive=True))  # type: ignore[union-attr]
    except (OSError, ValueError, KeyError, TypeError, pystac.STACError,
            pystac.STACTypeError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: not a readable STAC file ({why}); check it with a STAC "
                         "validator (scenes.inputs)") from None
    if not items:
        raise InputError(f"{path}: STAC {kind} holds no items (scenes.inputs)")
    return items


def _bands(asset: Any) -> list[dict[str, Any]]:
    extra = asset.extra_fields
    return list(extra.get("eo:bands") or extra.get("bands") or [])


def _common_name(band: dict[str, Any]) -> Optional[str]:
    return band.get("common_name") or band.get("eo:common_name")


def _is_raster(asset: Any) -> bool:
    media = (asset.media_type or "").lower()
    if media:
        return media.startswith("image/") and "png" not in media and "jpeg" not in media
    return asset.href.lower().split("?")[0].endswith(RASTER_EXTENSIONS)


def _href(asset: Any, item: Any, stac_path: str) -> str:
    """The asset's href as a path GDAL opens (relative hrefs against the item or the file)."""
    href = asset.get_absolute_href() or asset.href
    if "://" not in href and not href.startswith("/"):
        base = item.get_self_href() or stac_path
        href = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base)), href))
    return gdal_path(href)


def _pick(item: Any, name: str, where: str) -> tuple[str, Any, int]:
    """(asset key, asset, 1-based band) that ``name`` (a key or band common name) picks."""
    if name in item.assets:
        return name, item.assets[name], 0
    for key, asset in item.assets.items():
        for i, band in enumerate(_bands(asset), start=1):
            if _common_name(band) == name:
                return key, asset, i
    names = sorted({n for a in item.assets.values() for n in map(_common_name, _bands(a)) if n})
    raise InputError(f"{where}: no asset key or band common name {name!r} (scenes.stac_assets); "
                     f"assets: {', '.join(item.assets) or 'none'}"
                     + (f"; band common names: {', '.join(names)}" if names else ""))


def _check_raster(key: str, asset: Any, href: str, where: str) -> None:
    if not _is_raster(asset):
        raise InputError(f"{where}: asset {key!r} is not a raster ({asset.media_type or asset.href});"
                         " name a raster asset in scenes.stac_assets")
    if not is_virtual(href) and not os.path.isfile(href):
        raise InputError(f"{where}: asset {key!r} file not found: {href}")


def _default_asset(item: Any, where: str) -> str:
    rasters = [k for k, a in item.assets.items() if _is_raster(a)
               and "thumbnail" not in (a.roles or []) and "overview" not in (a.roles or [])]
    if len(rasters) != 1:
        raise InputError(f"{where}: {len(rasters)} raster assets ({', '.join(rasters) or 'none'})"
                         "; set scenes.stac_assets to the asset keys or band common names to "
                         "map, e.g. [red, green, blue] or [visual]")
    return rasters[0]


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file holds it already (a scene's identity includes its mtime)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _stacked_vrt(item: Any, picks: Sequence[tuple[str, str, int]], vrt_dir: str,
                 where: str) -> str:
    """One VRT of the picked bands (single-band assets, or bands of one asset), in order."""
    ensure_configured()
    from osgeo import gdal
    hrefs = [h for _, h, _ in picks]
    mem = f"/vsimem/resflow-stac-{os.getpid()}-{id(item)}.vrt"
    try:
        if len(set(hrefs)) == 1:
            ds = gdal.BuildVRT(mem, hrefs[:1], bandList=[max(1, b) for _, _, b in picks])
        elif all(b <= 1 for _, _, b in picks):
            for key, href, _ in picks:
                n = gdal.Open(href).RasterCount
                if n != 1:
                    raise InputError(f"{where}: asset {key!r} has {n} bands; name its bands by "
                                     "common name, or one single-band asset per band "
                                     "(scenes.stac_assets)")
            ds = gdal.BuildVRT(mem, hrefs, separate=True)
        else:
            raise InputError(f"{where}: scenes.stac_assets mixes bands of a multi-band asset with "
                             "other assets; name single-band assets, or the bands of one asset")
        if ds is None or ds.RasterCount != len(picks):
            raise InputError(f"{where}: cannot stack assets {', '.join(k for k, _, _ in picks)} "
                             "into one scene (do they share one grid and CRS?)")
        ds = None
        f = gdal.VSIFOpenL(mem, "rb")
        gdal.VSIFSeekL(f, 0, 2)
        size = gdal.VSIFTellL(f)
        gdal.VSIFSeekL(f, 0, 0)
        text = gdal.VSIFReadL(1, size, f).decode("utf-8")
        gdal.VSIFCloseL(f)
    except RuntimeError as exc:
        raise InputError(f"{where}: cannot stack assets {', '.join(k for k, _, _ in picks)} "
                         f"({str(exc).strip().splitlines()[0]})") from None
    finally:
        gdal.Unlink(mem)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(item.id))[:120] or "item"
    path = Path(vrt_dir) / f"{stem}.vrt"
    try:
        _write_if_changed(path, text)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the VRT of STAC item {item.id!r} "
                         f"({exc.strerror or exc}); check output.dir") from None
    return str(path.resolve())


def stac_scenes(path: str, options: StacOptions) -> list[str]:
    """The scene path of every item in a STAC file, per ``options`` (see the module)."""
    out = []
    for item in _items(path):
        where = f"{path}: item {item.id!r}"
        names = list(options.assets) or [_default_asset(item, where)]
        picks: list[tuple[str, str, int]] = []
        for name in names:
            key, asset, band = _pick(item, name, where)
            href = _href(asset, item, path)
            _check_raster(key, asset, href, where)
            picks.append((key, href, band))
        whole = all(b == 0 for _, _, b in picks) and len(picks) == 1
        out.append(picks[0][1] if whole else _stacked_vrt(item, picks, options.vrt_dir, where))
    return out
