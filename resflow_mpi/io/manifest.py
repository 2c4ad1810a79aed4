"""Which scenes each command uses, with their labels: a manifest of plain files, or scenes.inputs.

A manifest (``scenes.manifest``, YAML or JSON) holds the scenes to train on and the scenes to
map, so one config serves ``resflow init``, ``run`` and ``evaluate``::

    train:                                  # resflow init
      - image: imagery/kampala_1.tif        # paths relative to the manifest
        label: osm/buildings.geojson        # raster or vector; null/absent: labels.file, then
        region: kampala                     #   labels.pattern beside the scene
      - image: imagery/chips/*.tif          # a glob or folder: label files never match
        label: osm/buildings.gpkg
        label_layer: buildings              # vector options, else those of the labels section
        where: "building = 'yes'"
        class_field: null
    predict:                                # resflow run; evaluate uses the labelled ones
      - imagery/kampala_2.tif               # an entry may be just the image path

An ``archive.json`` written by ``resflow synth`` is a manifest too: its ``train`` split is
``train``, its ``test`` split is ``predict``, and each scene's ``mask`` is its label.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from ..config import LabelsConfig, RunConfig
from ..errors import ConfigError, InputError
from .discovery import distinct, expand, note, pattern_label, resolve_scene_inputs, scene_key
from .labels import LabelSpec
from .stac import StacOptions, is_stac, stac_scenes

Purpose = Literal["train", "predict", "evaluate"]
SECTIONS = ("train", "predict")
ENTRY_KEYS = {"image": "Scene path, glob or folder (relative to the manifest).",
              "label": "Label file: raster on the scene grid or vector polygons (null: "
                       "labels.file, then labels.pattern beside the scene).",
              "region": "Region name in evaluation tables (default: the scene file name).",
              "label_layer": "Vector layer of the label (default: labels.layer).",
              "where": "OGR SQL filter on the label's features (default: labels.where).",
              "class_field": "Label attribute mapped by labels.values (default: "
                             "labels.class_field)."}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "resflow scene manifest",
    "type": "object",
    "additionalProperties": False,
    "properties": {name: {"type": "array", "items": {"$ref": "#/$defs/entry"}}
                   for name in SECTIONS},
    "$defs": {"entry": {"oneOf": [
        {"type": "string", "description": ENTRY_KEYS["image"]},
        {"type": "object", "additionalProperties": False, "required": ["image"],
         "properties": {k: ({"type": "string", "description": d} if k == "image" else
                            {"type": ["string", "null"], "description": d})
                        for k, d in ENTRY_KEYS.items()}}]}},
}


@dataclass(frozen=True)
class SceneEntry:
    """One scene a command uses: its image, its label (if any) and its region name."""

    path: str
    label: Optional[LabelSpec]
    region: str


def manifest_reference_markdown() -> str:
    """The manifest entry keys as a Markdown table (for the README)."""
    lines = ["| entry key | meaning |", "|---|---|"]
    lines += [f"| `{k}` | {d} |" for k, d in ENTRY_KEYS.items()]
    return "\n".join(lines) + "\n"


def _label_spec(image: str, labels: LabelsConfig, label: Optional[str] = None,
                options: Optional[Mapping[str, Optional[str]]] = None) -> Optional[LabelSpec]:
    """The label of a scene: the one given, else labels.file, else labels.pattern if it exists."""
    opts = options or {}
    if label is None and labels.file is not None:
        label = os.path.abspath(labels.file)
    if label is None:
        guess = pattern_label(image, labels.pattern)
        if not os.path.isfile(guess):
            return None
        label = guess
    return LabelSpec(path=label,
                     layer=opts.get("label_layer") or labels.layer,
                     where=opts.get("where") or labels.where,
                     class_field=opts.get("class_field") or labels.class_field)


def _archive_entries(items: list[Any], path: Path) -> dict[str, list[dict[str, Any]]]:
    """archive.json of `resflow synth`: split train -> train, test -> predict; mask -> label."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "predict": []}
    for i, e in enumerate(items):
        if not isinstance(e, Mapping) or not isinstance(e.get("image"), str):
            raise ConfigError(f"{path}: archive entry [{i}] needs an 'image' path")
        section = {"train": "train", "test": "predict"}.get(str(e.get("split")), None)
        if section is None:
            raise ConfigError(f"{path}: archive entry [{i}] has split {e.get('split')!r} "
                              "(expected train or test)")
        out[section].append({"image": e["image"], "label": e.get("mask"),
                             "region": e.get("region")})
    return out


def _read(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: scene manifest not found (scenes.manifest)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read scene manifest ({exc})") from None
    try:
        return json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else \
            (f" at line {exc.lineno}" if hasattr(exc, "lineno") else "")
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise ConfigError(f"{path}: scene manifest is not valid {kind}{at}") from None


def _check_entry(raw: Any, where: str) -> dict[str, Any]:
    if isinstance(raw, str):
        return {"image": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected an image path or a mapping with 'image', got "
                          f"{type(raw).__name__}")
    for key in raw:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' (valid keys: "
                              f"{', '.join(ENTRY_KEYS)})")
    if "image" not in raw or raw["image"] is None:
        raise ConfigError(f"{where}: 'image' is required (the scene's path)")
    for key, value in raw.items():
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}' expected a string, got {value!r}")
    return dict(raw)


def load_manifest(path: str | Path, labels: LabelsConfig, notes: Optional[list[str]] = None,
                  stac: Optional[StacOptions] = None) -> dict[str, list[SceneEntry]]:
    """Parse and check a manifest (or archive.json): {'train': [...], 'predict': [...]}.

    Paths are relative to the manifest; images must exist, and so must labels named in it. An
    image that is a STAC file stands for its items' scenes (``stac``: see ``io.stac``).
    Images are found by ``io.discovery`` (the rules of scenes.inputs) and come back as real
    paths, each scene once per section (a note for each duplicate, to ``notes`` or stderr); a
    scene listed twice in a section with another region or label is an InputError."""
    mpath = Path(path)
    raw = _read(mpath)
    base = mpath.resolve().parent
    if isinstance(raw, list):
        sections = _archive_entries(raw, mpath)
    elif isinstance(raw, Mapping):
        for key in raw:
            if key not in SECTIONS:
                raise ConfigError(f"{mpath}: unknown section '{key}' (valid: train, predict)")
        sections = {}
        for name in SECTIONS:
            items = raw.get(name) or []
            if not isinstance(items, list):
                raise ConfigError(f"{mpath}: '{name}' must be a list of scenes, got "
                                  f"{type(items).__name__}")
            sections[name] = [_check_entry(e, f"{mpath}: key '{name}[{i}]'")
                              for i, e in enumerate(items)]
    else:
        raise ConfigError(f"{mpath}: a scene manifest is a mapping with train: and predict: "
                          f"lists, got {type(raw).__name__}")
    if not any(sections.values()):
        raise ConfigError(f"{mpath}: the scene manifest lists no scenes (train: / predict:)")

    def resolve(p: str) -> str:
        if p.startswith("/vsi"):  # a GDAL virtual path (URL, archive member) as written
            return p
        return os.path.normpath(p if os.path.isabs(p) else os.path.join(base, p))

    named_labels = {scene_key(resolve(e["label"])) for items in sections.values() for e in items
                    if e.get("label")}
    if labels.file is not None:
        named_labels.add(scene_key(labels.file))
    out: dict[str, list[SceneEntry]] = {}
    for name, items in sections.items():
        found: list[tuple[str, SceneEntry, str]] = []  # (path as listed, entry, manifest key)
        for i, e in enumerate(items):
            where = f"manifest {mpath}, {name}[{i}]"
            label = resolve(e["label"]) if e.get("label") else None
            if label is not None and not label.startswith("/vsi") and not os.path.exists(label):
                raise InputError(f"{label}: label file not found ({where}.label)")
            image_item = resolve(e["image"])
            images = (stac_scenes(image_item, stac or StacOptions()) if is_stac(image_item)
                      else expand(image_item, f"{where}.image", named_labels))
            for image in images:
                real = scene_key(image)
                found.append((image, SceneEntry(path=real,
                                                label=_label_spec(real, labels, label, e),
                                                region=e.get("region") or Path(real).stem), where))
        _check_one_meaning(found)
        out[name] = [found[k][1] for k in distinct([f[0] for f in found], labels.pattern, notes)]
    return out


def _check_one_meaning(found: Sequence[tuple[str, SceneEntry, str]]) -> None:
    """A scene listed twice in one section must mean the same both times (region, label)."""
    first: dict[str, tuple[SceneEntry, str]] = {}
    for _, entry, where in found:
        other, other_where = first.setdefault(entry.path, (entry, where))
        if other == entry:
            continue

        def meaning(e: SceneEntry) -> str:
            parts = [f"region {e.region!r}"] if other.region != entry.region else []
            if other.label != entry.label:
                parts.append("no label" if e.label is None else f"label {e.label.path}")
            return ", ".join(parts)
        raise InputError(f"{entry.path}: listed twice with different meanings ({other_where}: "
                         f"{meaning(other)}; {where}: {meaning(entry)}); list each scene once")


def _inputs_entries(cfg: RunConfig, split: str, notes: Optional[list[str]] = None
                    ) -> list[SceneEntry]:
    """scenes.inputs (globs, folders, lists, archive.json) -> entries; split filters archives.

    The scenes come from ``discovery.resolve_scene_inputs`` (the rules manifests follow too);
    an archive's entries keep their labels and regions."""
    wanted = {"all": ("train", "predict"), "train": ("train",), "test": ("predict",)}[split]
    from_archives: dict[str, SceneEntry] = {}
    for item in cfg.scenes.inputs:
        if item.endswith(".json") and os.path.isfile(item) and isinstance(_read(Path(item)), list):
            m = load_manifest(item, cfg.labels, notes=[])  # its duplicates are noted below
            for name in wanted:
                for e in m[name]:
                    from_archives.setdefault(e.path, e)
    exclude = [e.label.path for e in from_archives.values() if e.label is not None]
    if cfg.labels.file is not None:
        exclude.append(cfg.labels.file)
    paths = resolve_scene_inputs(cfg.scenes.inputs, split, exclude, cfg.labels.pattern, notes,
                                 StacOptions.from_config(cfg))
    return [from_archives.get(p) or SceneEntry(p, _label_spec(p, cfg.labels), Path(p).stem)
            for p in paths]


def scenes_for(cfg: RunConfig, purpose: Purpose,
               notes: Optional[list[str]] = None) -> list[SceneEntry]:
    """The scenes a command uses: init 'train', run 'predict', evaluate 'evaluate' (the predict
    scenes; pass them to :func:`require_labels`). From scenes.manifest when set, else from
    scenes.inputs (archive.json splits: train for init, scenes.split for run, test for evaluate
    when scenes.split is all). Notes (duplicates dropped, scenes to evaluate that are also
    training scenes) go to ``notes``, or to stderr when None."""
    if cfg.scenes.manifest is not None:
        m = load_manifest(cfg.scenes.manifest, cfg.labels, notes, StacOptions.from_config(cfg))
        if purpose == "evaluate":
            trained = {e.path for e in m["train"]}
            for e in m["predict"]:
                if e.path in trained:
                    note(notes, f"warning: {e.path} is listed under both train: and predict: of "
                                f"{cfg.scenes.manifest}; its scores (region {e.region}) are not "
                                "held-out, init trained on it")
        return m["train"] if purpose == "train" else m["predict"]
    split = cfg.scenes.split
    if purpose == "train":
        split = "train"
    elif purpose == "evaluate" and split == "all":
        split = "test"
    return _inputs_entries(cfg, split, notes)


def require_labels(entries: Sequence[SceneEntry], cfg: RunConfig) -> list[SceneEntry]:
    """The labelled entries; InputError (one line, before any work) when none has a label."""
    source = (f"scenes.manifest ({cfg.scenes.manifest})" if cfg.scenes.manifest
              else "scenes.inputs")
    if not entries:
        raise InputError(f"{source}: no scenes to evaluate (evaluate uses the predict scenes of "
                         "the manifest, or the test split of an archive)")
    labelled = [e for e in entries if e.label is not None]
    if not labelled:
        first = entries[0].path
        guess = pattern_label(first, cfg.labels.pattern)
        raise InputError(f"{source}: none of the {len(entries)} scene(s) to evaluate has a label "
                         f"(e.g. {first}: no label given and no {guess}); evaluate needs ground "
                         "truth: give each scene a label in the manifest, or set labels.file or "
                         "labels.pattern")
    return labelled


def write_schema(path: str | Path) -> None:
    """Write the manifest's JSON schema (for editors and validators)."""
    Path(path).write_text(json.dumps(MANIFEST_SCHEMA, indent=1) + "\n", encoding="utf-8")
