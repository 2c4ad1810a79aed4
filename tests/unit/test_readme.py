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
