#!/usr/bin/env python3
"""Render an HTML file in headless Chromium and save a PNG of the page.

Usage: python scripts/screenshot.py REPORT.html OUT.png [--width 1400] [--height 2400]

Chromium runs with a fresh profile folder and with every background network feature turned off, so
it loads nothing but the local file and the images beside it. Exits with code 2 when Chromium or the
HTML file is missing, and 1 when Chromium fails or writes no image.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
TIMEOUT_S = 120


def find_chromium() -> str | None:
    """Return the path of a Chromium executable, or None when none is installed."""
    for candidate in CHROMIUM_CANDIDATES:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def screenshot(html_path: Path, png_path: Path, width: int = 1400, height: int = 2400,
               chromium: str | None = None) -> Path:
    """Save a `width` × `height` PNG of `html_path` to `png_path` and return `png_path`.

    Raises FileNotFoundError when the HTML file or Chromium is missing, and RuntimeError when
    Chromium exits with an error or writes no image.
    """
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"HTML file {html_path} not found")
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("Chromium not found; install it (Debian: apt-get install chromium)")

    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="kvsim-chromium-") as profile_dir:
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--hide-scrollbars", f"--user-data-dir={profile_dir}", f"--screenshot={png_path}",
            f"--window-size={width},{height}", html_path.as_uri(),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    if result.returncode != 0 or not png_path.is_file():
        raise RuntimeError(f"Chromium failed with exit code {result.returncode} and wrote no screenshot:\n"
                           f"{result.stderr.strip()[-2000:]}")
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Save a PNG screenshot of an HTML file with headless Chromium.")
    parser.add_argument("html", type=Path, help="the HTML file to render")
    parser.add_argument("out", type=Path, help="the PNG file to write")
    parser.add_argument("--width", type=int, default=1400, help="viewport width in pixels (default 1400)")
    parser.add_argument("--height", type=int, default=2400, help="viewport height in pixels (default 2400)")
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.html, args.out, args.width, args.height)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
