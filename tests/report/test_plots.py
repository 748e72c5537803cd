"""Chart functions one at a time: what they draw, and the notes when they draw nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fake_outputs import RUNS, profile_point, write_fake_run_folder
from report_pages import PNG_SIGNATURE

from kvsim.profile import Point
from kvsim.report import formatting
from kvsim.report.data import load_run_folder
from kvsim.report.plots import (
    PlotInputs,
    calibration_fit,
    calibration_frame,
    hit_rate_by_capacity,
    memory_shares,
    plan_curves,
    preemptions_over_time,
    run_colors,
)

NO_CHARTS = {"with_timeline": False, "with_requests": False, "with_attention": False,
             "with_hit_rate_curve": False, "with_profile": False, "with_plan": False}


def _inputs(folder: Path) -> PlotInputs:
    loaded = load_run_folder(folder)
    return PlotInputs.build(loaded, run_colors(loaded.run_keys))


# ---------------------------------------------------------------------------------------------
# Calibration profile
# ---------------------------------------------------------------------------------------------


def test_profile_schema_points() -> None:
    points = [
        profile_point("decode_attention", "paged", {"batch": 8, "context_tokens": 1024}, 0.02, 0.021),
        profile_point("decode_attention", "paged", {"batch": 8, "context_tokens": 2048}, 0.03, 0.029,
                      held_out=True),
        profile_point("gemm", "torch", {"tokens": 64}, 0.001, 0.001),
    ]
    for point in points:
        Point.model_validate(point)
    frame = calibration_frame({"points": points})
    assert frame["series"].tolist() == ["decode_attention, batch 8", "decode_attention, batch 8"]
    assert frame["context_tokens"].tolist() == [1024, 2048]
    assert frame["measured_s"].tolist() == pytest.approx([0.02, 0.03])
    assert frame["fitted_s"].tolist() == pytest.approx([0.021, 0.029])
    assert frame["held_out"].tolist() == [False, True]
    assert frame["path"].tolist() == ["paged", "paged"]


def test_profile_other_point_names() -> None:
    profile = {"points": [
        {"phase": "decode", "batch_size": 8, "context_tokens": 1024, "measured_s": 0.02, "fitted_s": 0.021},
        {"phase": "prefill", "context_len": 4096, "latency_ms": 35.0},
        {"phase": "decode", "measured_s": 0.03},  # no context length: skipped
    ]}
    frame = calibration_frame(profile)
    assert frame["series"].tolist() == ["decode, batch 8", "prefill"]
    assert frame["context_tokens"].tolist() == [1024, 4096]
    assert frame["measured_s"].tolist() == pytest.approx([0.02, 0.035])
    assert frame["fitted_s"].iloc[0] == pytest.approx(0.021)
    assert pd.isna(frame["fitted_s"].iloc[1])


def test_profile_columnar_points_under_fit() -> None:
    profile = {"fit": {"points": {"seq_len": [128, 256], "time_s": [0.01, 0.012], "predicted_s": [0.011, 0.012]}}}
    frame = calibration_frame(profile)
    assert frame["context_tokens"].tolist() == [128, 256]
    assert frame["measured_s"].tolist() == pytest.approx([0.01, 0.012])
    assert frame["fitted_s"].tolist() == pytest.approx([0.011, 0.012])
    assert frame["series"].tolist() == ["all points", "all points"]


def test_profile_without_points_noted(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, **NO_CHARTS)
    (folder / "profile.json").write_text(json.dumps({"device": "H100", "coefficients": [1, 2]}))
    chart = calibration_fit(_inputs(folder))
    assert chart.png is None
    assert "no points with a context length" in chart.note


def test_profile_fit_drawn(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, **{**NO_CHARTS, "with_profile": True})
    chart = calibration_fit(_inputs(folder))
    assert chart.png.startswith(PNG_SIGNATURE)
    assert "Device: NVIDIA H100 80GB HBM3." in chart.caption
    assert "median 4.0 %, p90 9.0 %" in chart.caption


# ---------------------------------------------------------------------------------------------
# Optional inputs
# ---------------------------------------------------------------------------------------------


def test_hit_rate_curve_header_only(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, **NO_CHARTS)
    (folder / "hit_rate_by_capacity.csv").write_text("capacity_blocks,policy,hit_rate_blocks,hit_rate_tokens\n")
    chart = hit_rate_by_capacity(_inputs(folder))
    assert chart.png is None
    assert "no hit rates" in chart.note


def test_hit_rate_curve_tokens_only(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, **NO_CHARTS)
    (folder / "hit_rate_by_capacity.csv").write_text("capacity_blocks,policy,hit_rate_tokens\n16,lru,0.1\n64,lru,0.3\n")
    chart = hit_rate_by_capacity(_inputs(folder))
    assert chart.png.startswith(PNG_SIGNATURE)


def test_no_preemptions_noted(tmp_path: Path) -> None:
    runs = {"paged": RUNS["paged"], "radix": RUNS["radix"]}
    folder = write_fake_run_folder(tmp_path, runs=runs, **{**NO_CHARTS, "with_timeline": True})
    chart = preemptions_over_time(_inputs(folder))
    assert chart.png is None
    assert chart.note.startswith("No run preempted a request")


def test_plan_without_points_noted(tmp_path: Path) -> None:
    folder = write_fake_run_folder(tmp_path, **NO_CHARTS)
    summary = json.loads((folder / "summary.json").read_text())
    summary["plan"] = {"slo": {}, "runs": {"paged": {"points": [{"ttft_p99_s": 1.0}]}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    chart = plan_curves(_inputs(folder))
    assert chart.png is None
    assert "no points with a load" in chart.note


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def test_run_colors_distinct_and_stable() -> None:
    first = run_colors(["contiguous", "paged", "radix"])
    union = run_colors(["contiguous", "paged", "radix", "paged+prefix"])
    assert len(set(first.values())) == 3
    assert {run: union[run] for run in first} == first


def test_memory_shares_fill_free() -> None:
    shares = memory_shares({"token_state_fraction": 0.5, "reserved_fraction": 0.2})
    assert shares["free_fraction"] == pytest.approx(0.3)
    assert shares["cached_free_fraction"] == 0.0


@pytest.mark.parametrize(("value", "text"), [
    (0.0423, "42.3 ms"), (1.5, "1.5 s"), (130.0, "130 s"), (0.00005, "50 µs"), (None, "—"),
])
def test_format_duration(value, text) -> None:
    assert formatting.format_duration_s(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (1834560, "1,834,560"), (412.0, "412"), (float("nan"), "—"),
])
def test_format_count(value, text) -> None:
    assert formatting.format_count(value) == text


@pytest.mark.parametrize(("value", "text"), [
    (95.25, "95.2"), (103.0, "103"), (0.5, "0.5"), (12345.6, "12,346"),
])
def test_format_number(value, text) -> None:
    assert formatting.format_number(value) == text


def test_format_bytes() -> None:
    # 80 layers × 2 × 8 KV heads × 128 × 2 B = 327,680 B = 320 KiB.
    assert formatting.format_bytes(327680) == "320 KiB"
    assert formatting.format_bytes(2621440) == "2.5 MiB"
