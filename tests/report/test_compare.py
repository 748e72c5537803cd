"""compare_reports: two output folders side by side, with the differences in key metrics."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from fake_outputs import RUNS, write_fake_run_folder
from report_pages import parse_page, png_size

from kvsim.report import compare_reports

CHARTS_FOR_COMPARE = {"with_attention": False, "with_hit_rate_curve": False, "with_profile": False,
                      "with_plan": False}


def _folders(tmp_path: Path, **options: bool) -> tuple[Path, Path]:
    runs_a = {"contiguous": RUNS["contiguous"], "paged+prefix": RUNS["paged+prefix"]}
    runs_b = {"paged+prefix": replace(RUNS["paged+prefix"], max_concurrent_requests=500, preemptions=3),
              "radix": RUNS["radix"]}
    options = {**CHARTS_FOR_COMPARE, **options}
    folder_a = write_fake_run_folder(tmp_path / "a", runs=runs_a, scenario_name="baseline", **options)
    folder_b = write_fake_run_folder(tmp_path / "b", runs=runs_b, scenario_name="more <i>memory</i>", **options)
    return folder_a, folder_b


@pytest.fixture(scope="module")
def compare_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The comparison page of two folders, rendered once for the tests of this module."""
    tmp_path = tmp_path_factory.mktemp("compare")
    folder_a, folder_b = _folders(tmp_path)
    return compare_reports(folder_a, folder_b, tmp_path / "out")


def _difference_row(page, label: str) -> list[str]:
    rows = [row for row in page.rows if row and row[0] == label]
    assert len(rows) == 1, f"expected one row {label!r}, found {len(rows)}"
    return rows[0]


def test_compare_page_and_images(compare_page: Path) -> None:
    assert compare_page.name == "compare.html"
    assert compare_page.parent.name == "out"
    page_path = compare_page
    page = parse_page(page_path)
    assert sorted(page.images) == sorted(f"{side}_{key}.png" for side in "ab"
                                         for key in ("fragmentation", "concurrency", "latency_cdf"))
    for src in page.images:
        png_size(page_path.parent / src)
    assert [path.name for path in page_path.parent.iterdir() if path.name.startswith(".")] == []


def test_compare_differences(compare_page: Path) -> None:
    page = parse_page(compare_page)
    # paged+prefix admits 412 in A and 500 in B: 500 / 412 − 1 = +21.4 %.
    assert _difference_row(page, "max concurrent requests") == ["max concurrent requests", "412", "500", "+21.4 %"]
    # 412 / 4 GPUs = 103, 500 / 4 = 125.
    assert _difference_row(page, "users per GPU")[1:3] == ["103", "125"]
    assert _difference_row(page, "preemptions")[1:] == ["0", "3", "new"]


def test_compare_marks_better_and_worse(compare_page: Path) -> None:
    text = compare_page.read_text(encoding="utf-8")
    assert '<td class="better">+21.4 %</td>' in text
    assert '<td class="worse">new</td>' in text


def test_compare_lists_unshared_runs(compare_page: Path) -> None:
    text = compare_page.read_text(encoding="utf-8")
    assert "Only in A: contiguous." in text
    assert "Only in B: radix." in text
    assert "more &lt;i&gt;memory&lt;/i&gt;" in text
    assert "<i>memory</i>" not in text


def test_compare_to_html_path(tmp_path: Path) -> None:
    # Without timeline and requests only the fragmentation charts are drawn, which keeps this test fast.
    folder_a, folder_b = _folders(tmp_path, with_timeline=False, with_requests=False)
    page_path = compare_reports(folder_a, folder_b, tmp_path / "diff.html")
    assert page_path == tmp_path / "diff.html"
    assert (tmp_path / "a_fragmentation.png").is_file()
