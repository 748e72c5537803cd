"""scripts/screenshot.py renders a report to a PNG in headless Chromium; skipped without Chromium."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from report_pages import png_size

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "screenshot.py"
sys.path.insert(0, str(SCRIPT.parent))

from screenshot import find_chromium  # noqa: E402

needs_chromium = pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed")


@needs_chromium
def test_screenshot_of_report(full_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    result = subprocess.run([sys.executable, str(SCRIPT), str(full_folder / "report.html"), str(out),
                             "--width", "1200", "--height", "1600"],
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert png_size(out) == (1200, 1600)
    assert out.stat().st_size > 50_000


def test_missing_html_exits_2(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "absent.html"), str(tmp_path / "x.png")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "not found" in result.stderr
