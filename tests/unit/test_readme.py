"""README: the configuration reference matches the schema; CI runs the README's test command."""
from __future__ import annotations

from pathlib import Path

from resflow_mpi.config import config_reference_markdown

REPO = Path(__file__).resolve().parents[2]


def test_config_reference_matches_schema() -> None:
    text = (REPO / "README.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    assert start in text and end in text
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block == config_reference_markdown()


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "./launch/test.sh" in readme and "./launch/test.sh" in ci
    assert "./launch/demo.sh" in readme


def test_the_recipe_manifest_matches_the_scenes_its_step_0_makes() -> None:
    """Every `predict:` glob of the "Map your own imagery" manifest names held-out scenes that
    `resflow synth --preset demo` writes (step 0 copies them into imagery/new/)."""
    import fnmatch
    import sys

    import yaml

    from resflow_mpi.scenegen import archive_specs
    sys.path.insert(0, str(REPO / "tests" / "data"))
    try:
        from run_readme_recipe import blocks
    finally:
        sys.path.remove(str(REPO / "tests" / "data"))
    manifest = next(text for lang, text in blocks((REPO / "README.md").read_text())
                    if lang == "yaml" and text.startswith("# my-area/manifest.yaml"))
    entries = yaml.safe_load(manifest)["predict"]
    held_out = [f"{s.name}.tif" for s in archive_specs("demo") if s.name.startswith("heldout-")]
    for e in entries:
        pattern = Path(e["image"]).name
        matched = fnmatch.filter(held_out, pattern)
        assert matched, f"{e['image']} matches none of {held_out}"
        assert all(m.startswith(e["region"]) for m in matched)
    assert sum(len(fnmatch.filter(held_out, Path(e["image"]).name)) for e in entries) \
        == len(held_out)
