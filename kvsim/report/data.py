"""Read the files `kvsim run` writes into an output folder, as the report needs them.

summary.json is required. Every other file is optional, and a file may lack optional columns. The
report then leaves out the charts that need the missing data and prints the reason in their place.
A file that exists but lacks a column that every use of it needs raises `UserError`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from kvsim.errors import UserError

SUMMARY_FILE = "summary.json"
REQUESTS_FILE = "requests.csv"
TIMELINE_FILE = "timeline.csv"
ATTENTION_FILE = "attention.csv"
HIT_RATE_BY_CAPACITY_FILE = "hit_rate_by_capacity.csv"
PROFILE_FILE = "profile.json"
SCENARIO_FILE = "scenario.yaml"

MEMORY_FRACTION_COLUMNS = (
    "token_state_fraction",
    "reserved_fraction",
    "internal_fragmentation_fraction",
    "external_fragmentation_fraction",
    "cached_free_fraction",
    "free_fraction",
)

_REQUIRED_COLUMNS = {
    REQUESTS_FILE: ("run",),
    TIMELINE_FILE: ("run", "time_s"),
    ATTENTION_FILE: ("variant",),
    HIT_RATE_BY_CAPACITY_FILE: ("capacity_blocks", "policy"),
}


@dataclass(frozen=True)
class RunFolder:
    """The contents of one output folder of `kvsim run`; optional files are None when absent."""

    path: Path
    summary: dict[str, Any]
    run_keys: tuple[str, ...]
    """Run keys in the order of summary.json's `strategies`; charts and tables keep this order."""
    requests: pd.DataFrame | None
    timeline: pd.DataFrame | None
    attention: pd.DataFrame | None
    hit_rate_by_capacity: pd.DataFrame | None
    profile: dict[str, Any] | None
    scenario_text: str | None

    @property
    def scenario(self) -> dict[str, Any]:
        scenario = self.summary.get("scenario")
        return scenario if isinstance(scenario, dict) else {}

    @property
    def scenario_name(self) -> str:
        return str(self.scenario.get("name") or self.path.name)

    def strategy(self, run: str) -> dict[str, Any]:
        """Return the summary entry of `run`."""
        return self.summary["strategies"][run]

    @property
    def num_gpus(self) -> int:
        """GPUs the scenario runs on: TP degree × replicas (each absent value counts as 1)."""
        return positive_int(self.scenario.get("tp"), 1) * positive_int(self.scenario.get("replicas"), 1)

    @property
    def slo(self) -> dict[str, Any]:
        slo = self.scenario.get("slo")
        return slo if isinstance(slo, dict) else {}


def positive_int(value: Any, default: int) -> int:
    """`value` as an int ≥ 1, or `default` when it is absent or not a positive number."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        return default
    return number if number >= 1 else default


def finite_float(value: Any) -> float | None:
    """`value` as a finite float, or None when it is absent, not a number, NaN or infinite."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_run_folder(out_dir: Path) -> RunFolder:
    """Read an output folder; raise UserError when summary.json is missing or malformed."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UserError(f"report folder {out_dir} does not exist; pass the --out folder of `kvsim run`")
    summary = _read_summary(out_dir / SUMMARY_FILE)
    run_keys = tuple(summary["strategies"])

    scenario_path = out_dir / SCENARIO_FILE
    return RunFolder(
        path=out_dir,
        summary=summary,
        run_keys=run_keys,
        requests=_read_csv(out_dir / REQUESTS_FILE),
        timeline=_read_csv(out_dir / TIMELINE_FILE),
        attention=_read_csv(out_dir / ATTENTION_FILE),
        hit_rate_by_capacity=_read_csv(out_dir / HIT_RATE_BY_CAPACITY_FILE),
        profile=_read_profile(out_dir / PROFILE_FILE),
        scenario_text=scenario_path.read_text(encoding="utf-8") if scenario_path.is_file() else None,
    )


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(
            f"{path} not found; a report needs the summary.json that `kvsim run SCENARIO.yaml --out "
            f"{path.parent}` writes"
        )
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            f"run `kvsim run` again to rewrite it"
        ) from error
    strategies = summary.get("strategies") if isinstance(summary, dict) else None
    if not isinstance(strategies, dict) or not strategies:
        raise UserError(
            f"{path} has no runs under `strategies`; expected one entry per KV-cache strategy, "
            f"as `kvsim run` writes"
        )
    for run, entry in strategies.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: strategies[{run!r}] is {type(entry).__name__}, expected an object")
    return summary


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        frame = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        # A file with not even a header line carries no data; treat it as absent.
        return None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not a valid CSV file ({error}); run `kvsim run` again to rewrite it") from error
    missing = [column for column in _REQUIRED_COLUMNS.get(path.name, ()) if column not in frame.columns]
    if missing:
        raise UserError(
            f"{path} lacks the column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns))}. "
            f"Rewrite it with the columns listed in docs/outputs.md"
        )
    if "run" in frame.columns:
        frame["run"] = frame["run"].astype(str)
    return frame


def _read_profile(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            f"copy the profile that `kvsim calibrate --out` wrote"
        ) from error
    if not isinstance(profile, dict):
        raise UserError(f"{path} contains a JSON {type(profile).__name__}, expected an object; copy the profile "
                        f"that `kvsim calibrate --out` wrote")
    return profile


# ---------------------------------------------------------------------------------------------
# Timeline
# ---------------------------------------------------------------------------------------------

# Combination of replicas into one run-wide value: counts add up, shares and rates are averaged.
_SUM_COLUMNS = ("running", "waiting", "preemptions")
_MEAN_COLUMNS = (*MEMORY_FRACTION_COLUMNS, "prefix_hit_rate_tokens")
# Value of a replica before its first sample, when its cache is empty: every slot is free and no
# lookup has happened yet.
_VALUE_BEFORE_FIRST_SAMPLE = {"free_fraction": 1.0, "prefix_hit_rate_tokens": np.nan}


def run_timeline(timeline: pd.DataFrame, run: str) -> pd.DataFrame:
    """Combine the replicas of `run` into one timeline, with a row at every time any replica was sampled.

    timeline.csv samples each replica at its own events, so the replicas' rows are first held
    (each value stays until that replica's next sample) onto the union of their sample times. Then
    counts (running, waiting, cumulative preemptions) are summed, and shares of memory and the
    cumulative hit rate are averaged across replicas.

    NOTE: the plain mean weights every replica equally. That is exact for the memory shares because
    all replicas of a run have the same capacity, but only approximate for the hit rate, which should
    be weighted by the prompt tokens each replica looked up.
    """
    rows = timeline[timeline["run"] == run]
    if rows.empty:
        return pd.DataFrame(columns=["time_s"])
    columns = [column for column in (*_SUM_COLUMNS, *_MEAN_COLUMNS) if column in rows.columns]
    if "replica" not in rows.columns:
        rows = rows.assign(replica=0)

    times = np.unique(rows["time_s"].to_numpy(dtype=float))
    totals = {column: np.zeros(times.shape[0]) for column in columns}
    counts = {column: np.zeros(times.shape[0]) for column in columns}
    for _, replica_rows in rows.groupby("replica", sort=True):
        replica_rows = replica_rows.sort_values("time_s", kind="stable")
        replica_times = replica_rows["time_s"].to_numpy(dtype=float)
        # Index of the last sample at or before each union time; -1 before the replica's first sample.
        index = np.searchsorted(replica_times, times, side="right") - 1
        before_first = index < 0
        index = np.clip(index, 0, None)
        for column in columns:
            values = replica_rows[column].to_numpy(dtype=float)[index]
            values[before_first] = _VALUE_BEFORE_FIRST_SAMPLE.get(column, 0.0)
            known = ~np.isnan(values)
            totals[column] += np.where(known, values, 0.0)
            counts[column] += known

    frame = pd.DataFrame({"time_s": times})
    for column in columns:
        if column in _MEAN_COLUMNS:
            with np.errstate(invalid="ignore", divide="ignore"):
                frame[column] = np.where(counts[column] > 0, totals[column] / counts[column], np.nan)
        else:
            frame[column] = totals[column]
    return frame


def downsample_timeline(frame: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """Reduce a run-wide timeline to at most `max_points` rows, for plotting.

    Rows are grouped into equal time bins. Each bin keeps the peak of the counts (so a short burst of
    queued requests still shows), the mean of the memory shares, and the last cumulative value.
    """
    if len(frame) <= max_points:
        return frame
    times = frame["time_s"].to_numpy(dtype=float)
    edges = np.linspace(times[0], times[-1], max_points + 1)
    bins = np.clip(np.searchsorted(edges, times, side="right") - 1, 0, max_points - 1)

    aggregations: dict[str, str] = {"time_s": "first"}
    for column in frame.columns:
        if column in ("running", "waiting"):
            aggregations[column] = "max"
        elif column in MEMORY_FRACTION_COLUMNS:
            aggregations[column] = "mean"
        elif column != "time_s":
            aggregations[column] = "last"
    return frame.groupby(bins, sort=True).agg(aggregations).reset_index(drop=True)
