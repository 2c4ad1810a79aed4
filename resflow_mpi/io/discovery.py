"""Which files are scenes: the one scene discovery behind ``scenes.inputs`` and manifests.

Both routes expand each listed item with :func:`expand` and then keep each scene once with
:func:`distinct`, so a folder, a glob or a list names the same scenes whichever route reads it:

- folders and globs take files with a scene extension (``SCENE_EXTENSIONS``), never resflow's
  outputs (``io.naming``: ``*.resflow-mask.tif``, ``*.resflow-buckets.tif``, ...), label files
  (the conventional ``*_mask.tif``, files named as labels, the ``labels.pattern`` label of another
  scene), sidecars (``.aux.xml``, ``.ovr``, ``.msk``) or anything below a resflow output folder;
- a file named explicitly is taken whatever its extension, unless it is a resflow output or a
  named label (one-line error);
- identity is the real path: ``../data/img/S.tif``, ``./../data/img/../img/S.tif`` and the same
  file through a symlinked folder are one scene, kept once with a note;
- a STAC file (Item, ItemCollection or static catalog, ``io.stac``) stands for its items' scenes;
- a VRT whose source files are all listed scenes (``a.vrt`` over ``a.tif``) is dropped with a
  note, so its pixels are not mapped (and counted) twice.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path
from typing import Collection, Optional, Sequence

from ..errors import InputError
from .gdalenv import ensure_configured
from .naming import inside_output_dir, is_label_name, is_output_name
from .stac import StacOptions, is_stac, stac_scenes
from .vsi import is_virtual

# What folders and globs take as scenes (a file named explicitly may have any extension).
SCENE_EXTENSIONS = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".ntf")
# A directory with one of these names was meant to be a file: say so instead of scanning it.
FILE_LIKE_SUFFIXES = SCENE_EXTENSIONS + (".json", ".txt")


def scene_key(path: str) -> str:
    """The identity of a scene file: its real path (symlinks, '.' and '..' resolved); a GDAL
    virtual path (/vsicurl/, /vsis3/, ...) as written."""
    return path if is_virtual(path) else os.path.realpath(path)


def pattern_label(image: str, pattern: str) -> str:
    """The label ``labels.pattern`` names beside ``image`` (e.g. ``{stem}_mask.tif``)."""
    stem = Path(image).stem
    return os.path.normpath(os.path.join(os.path.dirname(image), pattern.format(stem=stem)))


def note(notes: Optional[list[str]], line: str) -> None:
    """Append a note line to ``notes``, or print it to stderr when ``notes`` is None."""
    if notes is None:
        print(line, file=sys.stderr, flush=True)
    else:
        notes.append(line)


def _directory_named_like_a_file(path: str) -> InputError:
    return InputError(f"{path}: is a directory, not a scene file (its name looks like a file); "
                      f"list the scene files inside it, e.g. {os.path.join(path, '*.tif')}")


def _glob_base(pattern: str) -> str:
    """The longest leading directory of a glob pattern without wildcards."""
    base = pattern
    while glob.has_magic(base):
        base = os.path.dirname(base)
    return base or "."


def _where(where: str) -> str:
    return f" ({where})" if where else ""


def _scenes_among(hits: Sequence[str], top: str, item: str, where: str,
                  labels: Collection[str]) -> list[str]:
    """The hits of a folder scan or glob that are scenes (see the module's rules)."""
    kept = []
    for p in hits:
        name = os.path.basename(p)
        if os.path.isdir(p):
            if name.lower().endswith(FILE_LIKE_SUFFIXES):
                raise _directory_named_like_a_file(p)
            continue
        if (not name.lower().endswith(SCENE_EXTENSIONS) or is_label_name(name)
                or is_output_name(name) or scene_key(p) in labels or inside_output_dir(p, top)):
            continue
        kept.append(p)
    if not kept:
        raise InputError(f"{item}: no scene found{_where(where)} (scenes end in "
                         f"{', '.join(SCENE_EXTENSIONS)}; label files and resflow outputs are "
                         "never taken as scenes); check the path, or name the file itself")
    return kept


def expand(item: str, where: str = "", labels: Collection[str] = (),
           missing_ok: bool = False) -> list[str]:
    """One listed item (a path, glob or folder) -> the scene files it names, as found.

    Folders and globs come back sorted; a plain path comes back as given. ``labels``: real
    paths of label files (never scenes). ``missing_ok``: a plain path that does not exist is
    returned (the scene checks report it, so ``scenes.on_bad_scene: skip`` can skip it) instead
    of an InputError. ``where`` names the item's place in messages (e.g. a manifest key)."""
    if os.path.isdir(item):
        if os.path.basename(os.path.normpath(item)).lower().endswith(FILE_LIKE_SUFFIXES):
            raise _directory_named_like_a_file(item)
        hits = sorted(glob.glob(os.path.join(glob.escape(item), "*")))
        return _scenes_among(hits, item, item, where, labels)
    if glob.has_magic(item) and not item.startswith("/vsi"):  # a URL's '?' is no wildcard
        hits = sorted(glob.glob(item, recursive=True))
        if not hits:
            raise InputError(f"{item}: pattern matches no scene{_where(where)}")
        return _scenes_among(hits, _glob_base(item), item, where, labels)
    if is_output_name(os.path.basename(item)):
        raise InputError(f"{item}: is a resflow output, never a scene{_where(where)}; list the "
                         "scene it was made from")
    if scene_key(item) in labels:
        raise InputError(f"{item}: listed as a scene and as a label{_where(where)}; a label file "
                         "is never a scene")
    if not missing_ok and not item.startswith("/vsi") and not os.path.exists(item):
        raise InputError(f"{item}: scene file not found{_where(where)}")
    return [item]


def _vrt_sources(path: str) -> Optional[set[str]]:
    """Real paths of the files a VRT reads (None: not a readable VRT, or it reads none)."""
    if not path.lower().endswith(".vrt") or not os.path.isfile(path):
        return None
    ensure_configured()
    from osgeo import gdal
    try:
        ds = gdal.Open(path, gdal.GA_ReadOnly)
    except RuntimeError:
        return None  # the scene checks report an unreadable file
    files = (ds.GetFileList() or []) if ds is not None else []
    own = scene_key(path)
    sources = {scene_key(f) for f in files if not f.startswith("/vsi") and os.path.isfile(f)}
    sources.discard(own)
    return sources or None


def distinct(paths: Sequence[str], label_pattern: Optional[str] = None,
             notes: Optional[list[str]] = None) -> list[int]:
    """Indices of ``paths`` that are distinct scenes, in order; a note line for each one dropped.

    Dropped: the ``labels.pattern`` label of another listed scene (silently: it is a label),
    a file listed before under another name (same real path), and a VRT whose source files are
    all listed scenes. A VRT reading only some listed scenes is kept with a warning (its pixels
    of those scenes are mapped twice)."""
    labels: set[str] = set()
    if label_pattern:
        for p in paths:
            real = scene_key(p)
            label = scene_key(pattern_label(real, label_pattern))
            if label != real:
                labels.add(label)
    first: dict[str, str] = {}
    kept: list[int] = []
    for i, p in enumerate(paths):
        real = scene_key(p)
        if real in labels:
            continue
        if real in first:
            same = "listed twice" if p == first[real] else \
                f"the same file as {first[real]} ({real})"
            note(notes, f"note: {p} is {same}; mapped once")
            continue
        first[real] = p
        kept.append(i)
    out: list[int] = []
    read_by_vrt: dict[str, str] = {}  # source file -> the kept VRT that reads it
    for i in kept:
        sources = _vrt_sources(paths[i])
        if not sources:
            out.append(i)
            continue
        listed = sorted(sources & set(first))
        if len(listed) == len(sources):
            note(notes, f"note: {paths[i]} only reads {', '.join(listed)}, listed too; "
                        "mapped once, from the listed file")
            continue
        twice = sorted(set(listed) | {f"{s} (through {read_by_vrt[s]})" for s in sources
                                      if s in read_by_vrt})
        if twice:
            note(notes, f"warning: {paths[i]} reads {', '.join(twice)}, listed too: those pixels "
                        "are mapped (and counted) twice; list the VRT or its sources, not both")
        read_by_vrt.update({s: paths[i] for s in sources if s not in read_by_vrt})
        out.append(i)
    return out


def resolve_scene_inputs(inputs: Sequence[str], split: str = "all", exclude: Collection[str] = (),
                         label_pattern: Optional[str] = None,
                         notes: Optional[list[str]] = None,
                         stac: Optional[StacOptions] = None) -> list[str]:
    """``scenes.inputs`` (globs, folders, .txt lists, archive.json manifests, STAC files) ->
    scene paths.

    Paths come back real, each scene once, in listed order (globs and folders sorted), by
    :func:`expand` and :func:`distinct`. ``exclude``: label files (never scenes); ``split``
    filters archive.json entries (train, test or all); ``stac``: how STAC items become scenes
    (``io.stac``). A missing plain path is kept for the scene checks to report
    (``scenes.on_bad_scene``)."""
    labels = {scene_key(p) for p in exclude}
    listed: list[str] = []
    for item in inputs:
        if is_stac(item):
            listed += stac_scenes(item, stac or StacOptions())
        elif item.endswith(".json") and os.path.isfile(item):
            listed += archive_images(item, split)
        elif item.endswith(".txt") and os.path.isfile(item):
            for line in Path(item).read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    listed += expand(line.strip(), item, labels, missing_ok=True)
        else:
            listed += expand(item, "scenes.inputs", labels, missing_ok=True)
    return [scene_key(listed[i]) for i in distinct(listed, label_pattern, notes)]


def archive_images(path: str, split: str = "all") -> list[str]:
    """The image paths of an archive.json of ``resflow synth`` (entries of ``split``, or all)."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable archive manifest ({exc})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(
            e.get("image"), str) for e in entries):
        raise InputError(f"{path}: not an archive manifest (a JSON list of entries with an "
                         "'image'); a manifest with train:/predict: goes in scenes.manifest")
    base = os.path.dirname(os.path.abspath(path))
    return [os.path.join(base, e["image"]) for e in entries
            if split == "all" or e.get("split") == split]
