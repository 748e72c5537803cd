"""render_report on fake output folders: images, escaping, sections, verdict, omitted charts."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from fake_outputs import RUNS, TP, REPLICAS, VARIANT_RUNS, FakeRun, write_fake_run_folder
from report_pages import parse_page, png_size

from kvsim.errors import UserError
from kvsim.report import render_report
from kvsim.report import html as report_html

REPORT_SECTIONS = ("verdict", "provenance", "memory", "prefix-cache", "load", "latency", "attention",
                   "calibration", "plan")
# Options of write_fake_run_folder for tests of the tables alone: the charts they skip keep the tests fast.
TABLES_ONLY = {"with_timeline": False, "with_requests": False, "with_attention": False,
               "with_hit_rate_curve": False, "with_profile": False, "with_plan": False}
CHART_SECTIONS = ("memory", "prefix-cache", "load", "latency", "attention", "calibration", "plan")


def _row_of(page, run: str) -> list[str]:
    rows = [row for row in page.rows if row and row[0] == run]
    assert rows, f"no table row for {run}"
    return rows[0]


# ---------------------------------------------------------------------------------------------
# Full folder
# ---------------------------------------------------------------------------------------------


def test_every_image_is_a_valid_png(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    assert len(page.images) == 10
    for src in page.images:
        assert "/" not in src, f"{src} is not a file beside the page"
        path = full_folder / src
        assert path.is_file(), f"{src} is linked but missing"
        width, height = png_size(path)
        assert width >= 800, f"{src} is only {width} px wide"
        assert height >= 250, f"{src} is only {height} px high"
        assert path.stat().st_size > 10_000, f"{src} is suspiciously small"


def test_scenario_name_is_escaped(full_folder: Path) -> None:
    text = (full_folder / "report.html").read_text(encoding="utf-8")
    assert "<b>bold</b>" not in text
    assert "Chat &lt;b&gt;bold&lt;/b&gt; &amp; co" in text


def test_every_section_has_data(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    for section in REPORT_SECTIONS:
        assert section in page.section_text, f"section {section} is missing"
    for section in CHART_SECTIONS:
        assert page.section_images[section], f"section {section} has no chart"
    assert page.notes == {}, f"charts left out of the full report: {page.notes}"


def test_verdict_comes_first(full_folder: Path) -> None:
    text = (full_folder / "report.html").read_text(encoding="utf-8")
    assert text.index('id="verdict"') < text.index('id="provenance"') < text.index("<img")


def test_headline_names_best_run(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    # radix admits 420 but misses the TPOT SLO, so paged+prefix (412 users on TP 2 × 2 replicas) wins.
    users_per_gpu = 412 / (TP * REPLICAS)
    assert users_per_gpu == 103
    assert page.headline.startswith("paged+prefix serves the most users within the SLOs")
    assert "103 users per GPU" in page.headline
    assert "412 concurrent requests on 4 H100-SXM GPUs" in page.headline
    # contiguous admits 96: 412 / 96 = 4.29.
    assert "4.3× the users of contiguous" in page.headline
    assert "needs 8 GPUs" in page.headline
    assert "Missing the SLOs: contiguous, radix." in page.headline


def test_verdict_table_rows(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    assert page.best_rows == [_row_of(page, "paged+prefix")]
    best = page.best_rows[0]
    # The fake summary has no saturated concurrency, so users are the peak (412 on 4 GPUs).
    assert best[1:5] == ["412", "103", "412", "917,280"]
    assert best[-2:] == ["met", "8"]
    radix = _row_of(page, "radix")
    assert radix[1:4] == ["420", "105", "420"]
    # TTFT p99 850 ms, TPOT p99 120 ms against the 100 ms limit.
    assert radix[5:8] == ["850 ms", "120 ms", "missed"]


def test_percentile_table_values(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    # The fake summary writes p50 = 0.3, p90 = 0.6, mean = 0.35 of each p99.
    rows = [row for row in page.rows if row and row[0] == "paged+prefix" and len(row) == 17]
    assert len(rows) == 1
    ttft = rows[0][1:5]
    tpot = rows[0][5:9]
    assert ttft == ["270 ms", "540 ms", "900 ms", "315 ms"]
    assert tpot == ["15 ms", "30 ms", "50 ms", "17.5 ms"]


def test_memory_table_values(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    rows = [row for row in page.rows if row and row[0] == "contiguous" and len(row) == 7]
    assert len(rows) == 1
    # Free is what the other shares leave: 1 − 0.24 − 0.38 − 0.21 − 0.12 − 0 = 0.05.
    assert rows[0][1:] == ["24.0 %", "38.0 %", "21.0 %", "12.0 %", "0.0 %", "5.0 %"]


def test_provenance_lists_sources(full_folder: Path) -> None:
    page = parse_page(full_folder / "report.html")
    text = page.section_text["provenance"]
    assert "Llama-3.1-70B" in text
    assert "H100-SXM, 4 in all (TP 2 × 2 replicas)" in text
    assert "calibrated from h100.json (device NVIDIA H100 80GB HBM3, dtype bf16" in text
    assert "kvsim 0.1.0 on 2026-12-04T20:15:00+00:00" in text
    assert "block_size 16" in text


def test_runs_keep_one_colour(full_folder: Path) -> None:
    text = (full_folder / "report.html").read_text(encoding="utf-8")
    from kvsim.report.plots import run_colors

    colors = run_colors(RUNS)
    assert len(set(colors.values())) == len(RUNS)
    for color in colors.values():
        assert f"background: {color}" in text


# ---------------------------------------------------------------------------------------------
# Absent data
# ---------------------------------------------------------------------------------------------


def test_absent_data_is_noted(bare_folder: Path) -> None:
    page = parse_page(render_report(bare_folder))
    expected_notes = {
        "memory_composition": "timeline.csv is absent",
        "prefix_hit_rate": "timeline.csv is absent",
        "hit_rate_by_capacity": "hit_rate_by_capacity.csv is absent",
        "concurrency": "timeline.csv is absent",
        "preemptions": "timeline.csv is absent",
        "latency_cdf": "requests.csv is absent",
        "attention": "attention.csv is absent",
        "calibration": "roofline",
        "plan": "no plan",
    }
    assert set(page.notes) == set(expected_notes)
    for key, fragment in expected_notes.items():
        assert fragment in page.notes[key], f"note of {key}: {page.notes[key]!r}"
    assert page.images == ["fragmentation.png"]
    assert sorted(path.name for path in bare_folder.glob("*.png")) == ["fragmentation.png"]


def test_no_slo_headline(bare_folder: Path) -> None:
    page = parse_page(render_report(bare_folder))
    # Without SLOs every run competes: paged admits 380 on 4 GPUs, 95 per GPU.
    assert page.headline.startswith("paged serves the most users (the scenario sets no SLO): 95 users per GPU")


def test_no_prefix_hits_noted(tmp_path: Path) -> None:
    runs = {"contiguous": RUNS["contiguous"], "paged": RUNS["paged"]}
    folder = write_fake_run_folder(tmp_path, runs=runs, **{**TABLES_ONLY, "with_timeline": True})
    page = parse_page(render_report(folder))
    assert "No run has prefix cache hits" in page.notes["prefix_hit_rate"]
    assert not (folder / "prefix_hit_rate.png").exists()
    assert "memory_composition.png" in page.images


def test_no_run_meets_slo(tmp_path: Path) -> None:
    runs = {"contiguous": RUNS["contiguous"], "radix": RUNS["radix"]}
    folder = write_fake_run_folder(tmp_path, runs=runs, **TABLES_ONLY)
    page = parse_page(render_report(folder))
    assert page.headline.startswith("No run meets the SLOs (TTFT p99 ≤ 2 s, TPOT p99 ≤ 100 ms).")
    assert "radix reaches the most users while missing them: 105 users per GPU" in page.headline
    assert page.best_rows == []


def test_empty_summary_entries(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"strategies": {"paged": {}, "radix": {}}}')
    page = parse_page(render_report(tmp_path))
    assert page.headline == "The summary records no maximum concurrency for any run, so users per GPU are unknown."
    assert page.images == []
    assert "no memory shares" in page.notes["fragmentation"]
    assert _row_of(page, "paged")[1:5] == ["—", "—", "—", "—"]


def test_stale_charts_are_removed(tmp_path: Path, full_folder: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(full_folder, folder)
    (folder / "timeline.csv").unlink()
    render_report(folder)
    for name in ("memory_composition.png", "prefix_hit_rate.png", "concurrency.png", "preemptions.png"):
        assert not (folder / name).exists(), f"stale {name} left behind"
    assert (folder / "latency_cdf.png").exists()


def test_variant_run_keys(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, runs=VARIANT_RUNS)
    page = parse_page(render_report(folder))
    # MLA caches 1,448 users on 4 GPUs: 362 per GPU.
    assert page.headline.startswith("MLA-512/paged+prefix serves the most users within the SLOs")
    assert "362 users per GPU" in page.headline
    assert _row_of(page, "MLA-512/paged+prefix")[1] == "1,448"
    for src in page.images:
        png_size(folder / src)


def test_slo_met_worked_out_when_absent(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, runs={"paged": RUNS["paged"], "radix": RUNS["radix"]}, **TABLES_ONLY)
    summary = json.loads((folder / "summary.json").read_text())
    for entry in summary["strategies"].values():
        del entry["slo_met"]
    (folder / "summary.json").write_text(json.dumps(summary))
    page = parse_page(render_report(folder))
    # radix's TPOT p99 of 120 ms is over the 100 ms limit; paged's 52 ms and 1.1 s TTFT are within.
    assert _row_of(page, "radix")[7] == "missed"
    assert _row_of(page, "paged")[7] == "met"
    assert page.headline.startswith("paged serves the most users within the SLOs")


# ---------------------------------------------------------------------------------------------
# Errors and atomicity
# ---------------------------------------------------------------------------------------------


def test_missing_summary_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"summary.json not found"):
        render_report(tmp_path)


def test_malformed_summary_raises(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"strategies": {')
    with pytest.raises(UserError, match=r"not valid JSON \(line 1"):
        render_report(tmp_path)


def test_summary_without_runs_raises(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"strategies": {}}')
    with pytest.raises(UserError, match="no runs under `strategies`"):
        render_report(tmp_path)


def test_timeline_without_time_raises(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, with_requests=False)
    (folder / "timeline.csv").write_text("run,running\npaged,3\n")
    with pytest.raises(UserError, match="timeline.csv lacks the column.s. time_s"):
        render_report(folder)


def test_failed_render_changes_nothing(tmp_path: Path, full_folder: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(full_folder, folder)
    before = {path.name: path.read_bytes() for path in folder.iterdir()}

    def broken_chart(inputs):
        raise RuntimeError("chart failed")

    # The broken chart comes last, so every other chart is drawn before the failure.
    sections = report_html._REPORT_SECTIONS + (("broken", "Broken", (broken_chart,)),)
    monkeypatch.setattr(report_html, "_REPORT_SECTIONS", sections)
    with pytest.raises(RuntimeError, match="chart failed"):
        render_report(folder)
    after = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert after == before


def test_render_leaves_no_temp_files(full_folder: Path) -> None:
    assert [path.name for path in full_folder.iterdir() if path.name.startswith(".")] == []


def test_one_replica_gpu_count(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, runs={"paged": FakeRun(
        50, 1000, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 0.5, 0.02, True, 1)}, **TABLES_ONLY)
    summary = json.loads((folder / "summary.json").read_text())
    summary["scenario"]["tp"] = 1
    summary["scenario"]["replicas"] = 1
    (folder / "summary.json").write_text(json.dumps(summary))
    page = parse_page(render_report(folder))
    assert "50 users per GPU (50 concurrent requests on 1 H100-SXM GPU, TP 1 × 1 replica)" in page.headline
