"""Run the README's "Map your own imagery" recipe exactly as written, in a fresh folder.

    python tests/data/run_readme_recipe.py WORKDIR [--readme README.md]

Code blocks of the section run in document order: a ```yaml block whose first line is
``# <path>`` is written to that path, a ```bash block runs in one bash (-e) from WORKDIR, with
``time`` in front of each line that starts with ``resflow`` or ``mpirun``. Prints the times and,
at the end, the evaluation table (my-area/eval/evaluation.md).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

SECTION = "## Map your own imagery"


def blocks(readme: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the section."""
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    text = readme[start:end if end >= 0 else len(readme)]
    return re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir", type=Path)
    p.add_argument("--readme", type=Path, default=Path(__file__).resolve().parents[2] / "README.md")
    args = p.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for lang, text in blocks(args.readme.read_text()):
        if lang == "yaml":
            first = text.splitlines()[0]
            if not first.startswith("# "):
                continue
            path = work / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", flush=True)
        elif lang == "bash":
            script = "TIMEFORMAT='  -> %R s'\nset -e\n" + "\n".join(
                f"echo '$ {line.strip()}'; time {line}" if re.match(r"\s*(resflow|mpirun) ", line)
                else line for line in text.splitlines())
            proc = subprocess.run(["bash", "-c", script], cwd=work)
            if proc.returncode != 0:
                print(f"recipe block failed ({proc.returncode})", file=sys.stderr)
                return proc.returncode
    table = work / "my-area" / "eval" / "evaluation.md"
    if table.exists():
        print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
