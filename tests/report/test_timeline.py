"""Combining replicas of a run's timeline, and downsampling it for plotting, checked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kvsim.report.data import downsample_timeline, run_timeline


def _two_replicas() -> pd.DataFrame:
    return pd.DataFrame({
        "run": ["paged"] * 4 + ["other"],
        "replica": [0, 0, 1, 1, 0],
        "time_s": [0.0, 2.0, 1.0, 3.0, 0.5],
        "running": [2, 4, 1, 3, 99],
        "waiting": [0, 1, 5, 0, 99],
        "token_state_fraction": [0.2, 0.4, 0.1, 0.3, 0.9],
        "free_fraction": [0.8, 0.6, 0.9, 0.7, 0.1],
        "prefix_hit_rate_tokens": [0.1, 0.2, 0.3, 0.5, 0.9],
        "preemptions": [0, 1, 0, 2, 99],
    })


def test_replicas_held_onto_union_of_times() -> None:
    frame = run_timeline(_two_replicas(), "paged")
    assert frame["time_s"].tolist() == [0.0, 1.0, 2.0, 3.0]
    # Counts add up; replica 1 has no sample before t = 1 s, so it counts 0 there.
    assert frame["running"].tolist() == [2, 3, 5, 7]
    assert frame["waiting"].tolist() == [0, 5, 6, 1]
    assert frame["preemptions"].tolist() == [0, 0, 1, 3]


def test_memory_shares_are_averaged() -> None:
    frame = run_timeline(_two_replicas(), "paged")
    # Before its first sample replica 1 is empty: token states 0, free 1.
    assert frame["token_state_fraction"].tolist() == pytest.approx([0.1, 0.15, 0.25, 0.35])
    assert frame["free_fraction"].tolist() == pytest.approx([0.9, 0.85, 0.75, 0.65])


def test_hit_rate_ignores_unsampled_replica() -> None:
    frame = run_timeline(_two_replicas(), "paged")
    # At t = 0 only replica 0 has a hit rate; afterwards both count.
    assert frame["prefix_hit_rate_tokens"].tolist() == pytest.approx([0.1, 0.2, 0.25, 0.35])


def test_unknown_run_is_empty() -> None:
    assert run_timeline(_two_replicas(), "radix").empty


def test_downsample_keeps_peaks() -> None:
    frame = pd.DataFrame({
        "time_s": np.arange(10, dtype=float),
        "running": [0, 5, 1, 1, 9, 2, 3, 3, 4, 8],
        "token_state_fraction": [0.0, 0.2, 0.4, 0.4, 0.1, 0.3, 0.5, 0.7, 0.2, 0.2],
        "preemptions": [0, 0, 1, 1, 2, 2, 2, 3, 3, 4],
    })
    small = downsample_timeline(frame, 5)
    # Five bins of 1.8 s: {0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}.
    assert small["time_s"].tolist() == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert small["running"].tolist() == [5, 1, 9, 3, 8]
    assert small["token_state_fraction"].tolist() == pytest.approx([0.1, 0.4, 0.2, 0.6, 0.2])
    assert small["preemptions"].tolist() == [0, 1, 2, 3, 4]


def test_downsample_short_timeline_unchanged() -> None:
    frame = pd.DataFrame({"time_s": [0.0, 1.0], "running": [1, 2]})
    assert downsample_timeline(frame, 5) is frame
