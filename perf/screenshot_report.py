#!/usr/bin/env python3
"""Screenshot a run's report.html with headless Chromium and check the picture is not blank.

Usage: perf/screenshot_report.py OUT_DIR [--png PATH]     (default PATH: OUT_DIR/report.png)
Exit status: 0 screenshot written and not blank, 1 screenshot missing or blank, 2 nothing to
screenshot or no Chromium.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

CHROMIUM = Path("/usr/bin/chromium")
WINDOW_SIZE = "1280,4800"  # tall enough for a scene section with three quicklooks
TIMEOUT_S = 180
INSTALL_HINT = ("install it with `apt-get install -y chromium` (Debian) or "
                "`launch/install.sh --with-chromium`")


def find_chromium() -> Optional[Path]:
    """Debian's Chromium binary, or one named chromium on PATH."""
    if CHROMIUM.is_file():
        return CHROMIUM
    found = shutil.which("chromium")
    return Path(found) if found else None


def chromium_command(chromium: Path, html: Path, png: Path, profile_dir: Path) -> list[str]:
    """Headless, offline, throw-away-profile Chromium invocation that writes one screenshot."""
    return [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile_dir}", f"--window-size={WINDOW_SIZE}",
            f"--screenshot={png}", html.resolve().as_uri()]


def png_is_blank(png: Path) -> bool:
    """True when every pixel of the PNG has the same value (pixel variance 0)."""
    from matplotlib.image import imread
    pixels = imread(str(png))
    return pixels.size == 0 or float(pixels.var()) == 0.0


def screenshot(out_dir: Path, png: Optional[Path] = None) -> int:
    """Take the screenshot; print its path (or why not) and return the exit status."""
    html = out_dir / "report.html"
    if not html.is_file():
        print(f"error: {html}: not found; write it with `resflow run` (output.quicklooks on) "
              "or resflow_mpi.report.write_html_report", file=sys.stderr)
        return 2
    chromium = find_chromium()
    if chromium is None:
        print(f"error: {CHROMIUM}: Chromium not found; {INSTALL_HINT}", file=sys.stderr)
        return 2
    png = (png or out_dir / "report.png").resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="resflow-chromium-") as profile_dir:
        try:
            proc = subprocess.run(chromium_command(chromium, html, png, Path(profile_dir)),
                                  capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"error: {chromium} did not finish within {TIMEOUT_S} s", file=sys.stderr)
            return 1
    if not png.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        print(f"error: {png}: Chromium (exit {proc.returncode}) wrote no screenshot\n{tail}",
              file=sys.stderr)
        return 1
    if png_is_blank(png):
        print(f"error: {png}: screenshot is blank (one colour)", file=sys.stderr)
        return 1
    print(png)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path, help="a run's output directory holding report.html")
    p.add_argument("--png", type=Path, default=None, help="screenshot path (default: OUT_DIR/report.png)")
    args = p.parse_args(argv)
    return screenshot(args.out_dir, args.png)


if __name__ == "__main__":
    sys.exit(main())
