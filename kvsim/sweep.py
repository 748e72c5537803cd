"""Parameter sweeps: a grid of scenario variants, run in local processes or on Ray, and their table.

A sweep file names a base scenario and a grid of dotted settings:

    name: block-size-by-gpu
    base: ../plan-chat-h100.yaml        # relative to the sweep file
    seed: 0                             # optional; the base scenario's seed when unset
    grid:
      gpu.preset: [H100-SXM, A100-80GB]
      engine.block_size: [16, 32]

Every combination of grid values is one variant, simulated with every run (strategy × attention
variant) of its scenario as one task. A variant's id is a hash of its settings, and its result is
written to OUT/variants/<id>.json as soon as it finishes, so an interrupted sweep started again runs
only the variants that have no result yet. The combined table (sweep.csv, sweep.parquet) has one row
per variant and run, sorted by variant id, and no wall-clock columns, so a serial run, the local
process pool and Ray give the same table. sweep.html shows the trade-off charts and the table.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import jinja2
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvsim import __version__
from kvsim.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from kvsim.errors import UserError, parse_yaml, read_user_file
from kvsim.scenario import Scenario, load_scenario, validate_scenario

log = logging.getLogger(__name__)

Executor = Literal["serial", "local", "ray"]
EXECUTORS: tuple[str, ...] = ("serial", "local", "ray")

VARIANTS_DIR = "variants"
TABLE_CSV = "sweep.csv"
TABLE_PARQUET = "sweep.parquet"
REPORT_FILE = "sweep.html"
SWEEP_COPY_FILE = "sweep.yaml"
CHART_PREFIX = "sweep_"

VARIANT_ID_LENGTH = 12
"""Hex digits of a variant id: 48 bits, so two variants of one sweep collide with negligible odds."""

# Per-run summary fields copied into the table, in column order.
TABLE_METRICS: tuple[str, ...] = (
    "gpus", "requests_completed", "max_concurrent_requests", "users_per_gpu", "kv_capacity_tokens",
    "token_state_fraction", "prefix_hit_rate_tokens", "preemptions", "ttft_p99_s", "tpot_p99_s",
    "output_tokens_per_s", "goodput_requests_per_s", "slo_met",
)
_INTEGER_METRICS = ("gpus", "requests_completed", "max_concurrent_requests", "kv_capacity_tokens", "preemptions")


# ---------------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------------


class SweepFile(BaseModel):
    """A whole sweep file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(None, min_length=1,
                             description="Name of the sweep; the default output folder is reports/<name>/. "
                                         "The file name without its extension when unset.")
    description: str = Field("", description="What the sweep studies.")
    base: str = Field(min_length=1, description="Scenario file the grid varies, relative to the sweep file.")
    grid: dict[str, list[Any]] = Field(
        description="Dotted scenario settings, each with the list of values it takes, e.g. "
                    "engine.block_size: [8, 16, 32]. Every combination is one variant.")
    seed: int | None = Field(None, ge=0, description="Seed of every variant; the base scenario's seed when unset.")

    @field_validator("grid")
    @classmethod
    def _check_grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not grid:
            raise ValueError("the grid is empty; list at least one setting, e.g. engine.block_size: [16, 32]")
        for key, values in grid.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(f"grid key {key!r} is not a dotted setting name such as engine.block_size")
            if not values:
                raise ValueError(f"grid.{key} has no values; list at least one")
            texts = [_canonical_json(value) for value in values]
            repeated = sorted({text for text in texts if texts.count(text) > 1})
            if repeated:
                raise ValueError(f"grid.{key} repeats the value(s) {', '.join(repeated)}; list each value once")
        keys = sorted(grid)
        for first, second in itertools.pairwise(keys):
            if second.startswith(first + "."):
                raise ValueError(f"grid keys {first} and {second} overlap (one sets part of the other); keep one")
        return grid


@dataclass(frozen=True)
class Variant:
    """One grid point: its settings, in grid order, and the id derived from them."""

    id: str
    settings: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def settings_dict(self) -> dict[str, Any]:
        return dict(self.settings)

    def label(self) -> str:
        return ", ".join(f"{key}={_display_value(value)}" for key, value in self.settings)


@dataclass(frozen=True)
class Sweep:
    """A validated sweep: the sweep file, its base scenario and the variants of its grid."""

    spec: SweepFile
    path: Path
    base: Scenario
    base_sha256: str
    """Hash of the base scenario's validated settings; results of another base are not reused."""
    variants: tuple[Variant, ...]

    @property
    def name(self) -> str:
        return self.spec.name or self.path.stem

    @property
    def grid_keys(self) -> tuple[str, ...]:
        return tuple(self.spec.grid)


def variant_id(settings: Iterable[tuple[str, Any]]) -> str:
    """Return the stable id of a grid point: a hash of its settings, independent of the order of grid keys."""
    text = _canonical_json(sorted(settings, key=lambda item: item[0]))
    return hashlib.sha256(text.encode()).hexdigest()[:VARIANT_ID_LENGTH]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file and its base scenario; every problem is a UserError naming the field."""
    path = Path(path)
    spec = _read_sweep_file(path)
    base_path = (path.parent / spec.base).resolve()
    if not base_path.is_file():
        raise UserError(f"{path}: base: scenario file {spec.base!r} not found (looked for {base_path}); the path "
                        f"is relative to the sweep file's folder")
    base = load_scenario(base_path)
    if spec.seed is not None and "seed" in spec.grid:
        raise UserError(f"{path}: seed is set and grid.seed varies it too; remove one of them")

    for key, values in spec.grid.items():
        for value in values:
            _check_grid_value(path, base, key, value)

    default_seed = spec.seed if spec.seed is not None else base.spec.seed
    variants = []
    for combination in itertools.product(*spec.grid.values()):
        settings = tuple(zip(spec.grid, combination))
        seed = dict(settings).get("seed", default_seed)
        variants.append(Variant(id=variant_id(settings), settings=settings, seed=int(seed)))
    return Sweep(spec=spec, path=path.resolve(), base=base, base_sha256=_scenario_sha256(base), variants=tuple(variants))


def _read_sweep_file(path: Path) -> SweepFile:
    text = read_user_file(path, "sweep file", "check the path (shipped sweeps are in scenarios/sweeps/)")
    data = parse_yaml(text, path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: a sweep file must be a YAML mapping with base: and grid:, "
                        f"not {'an empty file' if data is None else 'a ' + type(data).__name__}")
    try:
        return SweepFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: {_describe_sweep_error(exc)}") from None


def _describe_sweep_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"unknown key {location!r}; a sweep file has name, description, base, grid and seed"
    if error["type"] == "missing":
        return f"{location}: required field is missing"
    if error["type"] == "list_type" and error["loc"][0] == "grid" and len(error["loc"]) == 2:
        key = error["loc"][1]
        return f"{location}: expected a list of values, got {value!r}; write e.g. {key}: [{_display_value(value)}]"
    message = error["msg"].removeprefix("Value error, ")
    suffix = f" (got {value!r})" if value is not None and not isinstance(value, (dict, list)) else ""
    return f"{location}: {message}{suffix}"


def _check_grid_value(path: Path, base: Scenario, key: str, value: Any) -> None:
    # Each value is checked on its own, with every other setting as in the base scenario. So a value
    # that is valid only together with another grid value (a tp that divides the heads of only one of
    # the grid's models) is rejected here.
    try:
        base.with_changes({key: value})
    except UserError as exc:
        detail = str(exc)
        prefix = f"{base.path}: "
        detail = detail.removeprefix(prefix)
        raise UserError(f"{path}: grid.{key}: value {_display_value(value)} is invalid for the base scenario: "
                        f"{detail}") from None


def _scenario_sha256(scenario: Scenario) -> str:
    data = scenario.spec.model_dump(mode="json", exclude_unset=True)
    return hashlib.sha256(_canonical_json(data).encode()).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _display_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str)


# ---------------------------------------------------------------------------------------------------
# One variant: the task every executor runs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantTask:
    """Everything a worker needs to simulate one variant; plain data, so it pickles for processes and Ray."""

    variant_id: str
    settings: tuple[tuple[str, Any], ...]
    seed: int
    base_data: dict[str, Any]
    """The base scenario's validated settings, so a worker never rereads a file that may have changed."""
    base_path: str
    """Path of the base scenario; trace files and model configs resolve against its folder."""
    base_sha256: str


def make_tasks(sweep: Sweep, variants: Iterable[Variant]) -> list[VariantTask]:
    base_data = sweep.base.spec.model_dump(mode="python", exclude_unset=True, by_alias=True)
    return [VariantTask(variant_id=variant.id, settings=variant.settings, seed=variant.seed, base_data=base_data,
                        base_path=str(sweep.base.path), base_sha256=sweep.base_sha256)
            for variant in variants]


def run_variant(task: VariantTask) -> dict[str, Any]:
    """Simulate every run of one variant and return its record (the JSON of OUT/variants/<id>.json).

    A UserError (settings that cannot run together, a model that does not fit the GPU) becomes a
    record with `error` set, since the same settings would fail again. Other exceptions propagate
    and stop the sweep.
    """
    from kvsim.simulation import simulate

    started = time.perf_counter()
    record: dict[str, Any] = {
        "variant_id": task.variant_id,
        "settings": dict(task.settings),
        "seed": task.seed,
        "base": task.base_path,
        "base_sha256": task.base_sha256,
        "kvsim_version": __version__,
        "error": None,
        "scenario": None,
        "runs": {},
    }
    try:
        base_path = Path(task.base_path)
        base = Scenario(validate_scenario(task.base_data, source=task.base_path), path=base_path)
        scenario = base.with_changes(dict(task.settings)) if task.settings else base
        summary = simulate(scenario, seed=task.seed).summary()
    except UserError as exc:
        record["error"] = str(exc)
    else:
        described = summary["scenario"]
        record["scenario"] = {key: described[key] for key in ("name", "model", "gpu", "tp", "replicas")}
        record["runs"] = summary["strategies"]
    record["wall_time_s"] = time.perf_counter() - started
    record["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


# ---------------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------------


def default_workers() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def execute_serial(tasks: Sequence[VariantTask], on_record: Callable[[dict[str, Any]], None]) -> None:
    for task in tasks:
        on_record(run_variant(task))


def execute_local(tasks: Sequence[VariantTask], on_record: Callable[[dict[str, Any]], None], *, workers: int) -> None:
    """Run tasks in a pool of `workers` processes; `on_record` runs in this process as each one finishes.

    Workers are started with spawn, so a script that calls this must guard its entry point with
    `if __name__ == "__main__":`, as multiprocessing requires.
    """
    if not tasks:
        return
    # Spawn, not fork: forking copies the locks of the parent's other threads (the progress bar's
    # refresh thread) in whatever state they are, so Python 3.12 warns about it and 3.14 no longer
    # forks by default on Linux.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context)
    try:
        pending = {pool.submit(run_variant, task) for task in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_record(future.result())
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def execute_ray(tasks: Sequence[VariantTask], on_record: Callable[[dict[str, Any]], None], *,
                address: str | None, workers: int | None) -> None:
    """Run tasks as Ray tasks of one CPU each, at most `workers` at a time when given.

    Connects to the cluster at `address` ("auto", "ray://host:10001"), or starts a local Ray and
    stops it afterwards. A Ray already initialised in this process is used as it is and left running.

    NOTE: workers of a remote cluster need kvsim installed and the base scenario's folder (trace files,
    model configs) at the same path. Also, as of Ray 2.60 a local Ray's core services (GCS, raylet)
    listen on all network interfaces, with no option to limit them to loopback.
    """
    if not tasks:
        return
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray, which is not installed; install it with: "
                        "pip install 'kvsim[distributed]'") from None

    started_here = False
    if not ray.is_initialized():
        if address:
            try:
                ray.init(address=address, log_to_driver=False)
            except ConnectionError as exc:
                raise UserError(f"--address: cannot connect to the Ray cluster at {address!r} ({exc}); check that it "
                                f"is running (`ray status`) or leave out --address to start a local Ray") from None
        else:
            # A local Ray addresses its processes over loopback only.
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
        started_here = True
    max_in_flight = workers or len(tasks)
    remote_run_variant = ray.remote(num_cpus=1)(run_variant)
    queued = list(tasks)
    in_flight: list[Any] = []
    try:
        while queued or in_flight:
            while queued and len(in_flight) < max_in_flight:
                in_flight.append(remote_run_variant.remote(queued.pop(0)))
            done, in_flight = ray.wait(in_flight, num_returns=1)
            for reference in done:
                on_record(ray.get(reference))
    except BaseException:
        for reference in in_flight:
            ray.cancel(reference)
        raise
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# Running a sweep, with resume
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepOutcome:
    """Variants that `run_sweep` ran and reused, and the files it wrote."""

    out_dir: Path
    table: pd.DataFrame
    records: tuple[dict[str, Any], ...]
    """One record per variant, sorted by variant id."""
    ran: tuple[str, ...]
    """Ids of the variants simulated by this call."""
    reused: tuple[str, ...]
    """Ids of the variants whose results were already in OUT/variants/."""
    failed: tuple[str, ...]
    """Ids of the variants whose record carries an error."""
    written: tuple[Path, ...]


def run_sweep(sweep: Sweep, out_dir: Path, *, executor: Executor = "local", workers: int | None = None,
              address: str | None = None, report: bool = True,
              on_record: Callable[[dict[str, Any]], None] | None = None,
              on_start: Callable[[int, int], None] | None = None) -> SweepOutcome:
    """Simulate the variants that have no result in `out_dir` yet, then write the table and the report.

    `on_start(num_to_run, num_reused)` is called once before the first task, and `on_record(record)`
    after each variant's result is written.
    """
    if executor not in EXECUTORS:
        raise UserError(f"--executor: unknown executor {executor!r}; use local or ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers: must be at least 1, got {workers}")
    out_dir = Path(out_dir)
    variants_dir = out_dir / VARIANTS_DIR
    variants_dir.mkdir(parents=True, exist_ok=True)

    records: dict[str, dict[str, Any]] = {}
    missing: list[Variant] = []
    for variant in sweep.variants:
        record = _read_reusable_record(variants_dir / f"{variant.id}.json", sweep, variant)
        if record is None:
            missing.append(variant)
        else:
            records[variant.id] = record
    reused = tuple(sorted(records))
    if on_start:
        on_start(len(missing), len(reused))
    log.info("sweep %s: %d variants, %d already done, %d to run with the %s executor", sweep.name,
             len(sweep.variants), len(reused), len(missing), executor)

    def store(record: dict[str, Any]) -> None:
        atomic_write_text(variants_dir / f"{record['variant_id']}.json",
                          json.dumps(record, indent=2, allow_nan=False) + "\n")
        records[record["variant_id"]] = record
        if record["error"]:
            log.warning("variant %s (%s) failed: %s", record["variant_id"],
                        _settings_text(record["settings"]), record["error"])
        if on_record:
            on_record(record)

    tasks = make_tasks(sweep, missing)
    if executor == "ray":
        execute_ray(tasks, store, address=address, workers=workers)
    elif executor == "local" and (workers or default_workers()) > 1 and len(tasks) > 1:
        execute_local(tasks, store, workers=workers or default_workers())
    else:
        execute_serial(tasks, store)

    ordered = tuple(records[record_id] for record_id in sorted(records))
    table = sweep_table(sweep, ordered)
    written = list(write_table(table, out_dir))
    written.append(atomic_write_text(out_dir / SWEEP_COPY_FILE, sweep.path.read_text(encoding="utf-8")))
    if report:
        written.append(render_sweep_report(sweep, table, out_dir))
    return SweepOutcome(out_dir=out_dir, table=table, records=ordered,
                        ran=tuple(sorted(variant.id for variant in missing)), reused=reused,
                        failed=tuple(record["variant_id"] for record in ordered if record["error"]),
                        written=tuple(written))


def _read_reusable_record(path: Path, sweep: Sweep, variant: Variant) -> dict[str, Any] | None:
    """Return the stored record of `variant`, or None when it is absent or was made from other inputs."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        log.warning("%s is unreadable (%s); running the variant again", path, exc)
        return None
    expected = {
        "variant_id": variant.id,
        "settings": json.loads(_canonical_json(variant.settings_dict)),
        "seed": variant.seed,
        "base_sha256": sweep.base_sha256,
        "kvsim_version": __version__,
    }
    stale = [key for key, value in expected.items()
             if not isinstance(record, dict) or json.loads(_canonical_json(record.get(key))) != value]
    if stale:
        log.warning("%s was made with another %s; running the variant again", path, ", ".join(stale))
        return None
    return record


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_display_value(value)}" for key, value in settings.items())


# ---------------------------------------------------------------------------------------------------
# The combined table
# ---------------------------------------------------------------------------------------------------


def sweep_table(sweep: Sweep, records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Build the combined table: one row per variant and run, sorted by variant id, without wall-clock columns.

    A variant whose record carries an error has one row with `run` empty and `error` set. Grid values
    that are lists or mappings (strategies: [paged]) are written as JSON text.
    """
    rows = []
    for record in sorted(records, key=lambda item: item["variant_id"]):
        settings = record["settings"]
        common = {"variant_id": record["variant_id"], **{key: settings.get(key) for key in sweep.grid_keys}}
        scenario = record.get("scenario") or {}
        if record["error"]:
            rows.append({**common, "run": None, "error": record["error"]})
            continue
        for run_key, summary in record["runs"].items():
            rows.append({
                **common,
                "run": run_key,
                "strategy": summary.get("strategy"),
                "attention_variant": summary.get("variant"),
                "model_name": scenario.get("model"),
                "gpu_name": scenario.get("gpu"),
                **{metric: _metric(summary, metric) for metric in TABLE_METRICS},
                "error": None,
            })
    columns = ["variant_id", *sweep.grid_keys, "run", "strategy", "attention_variant", "model_name", "gpu_name",
               *TABLE_METRICS, "error"]
    frame = pd.DataFrame(rows, columns=columns)
    for key in sweep.grid_keys:
        frame[key] = _grid_column(frame[key])
    for metric in TABLE_METRICS:
        if metric in _INTEGER_METRICS:
            frame[metric] = frame[metric].astype("Int64")
        elif metric == "slo_met":
            frame[metric] = frame[metric].astype("boolean")
        else:
            frame[metric] = pd.to_numeric(frame[metric], errors="coerce").astype("float64")
    for column in ("run", "strategy", "attention_variant", "model_name", "gpu_name", "error"):
        frame[column] = frame[column].astype("string")
    return frame.reset_index(drop=True)


def _metric(summary: dict[str, Any], metric: str) -> Any:
    if metric == "ttft_p99_s":
        return (summary.get("ttft_s") or {}).get("p99")
    if metric == "tpot_p99_s":
        return (summary.get("tpot_s") or {}).get("p99")
    return summary.get(metric)


def _grid_column(values: pd.Series) -> pd.Series:
    """Give a grid column one type (numbers, booleans or text), so CSV and Parquet agree."""
    present = [value for value in values if value is not None]
    if present and all(isinstance(value, bool) for value in present):
        return values.astype("boolean")
    if present and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in present):
        if all(isinstance(value, int) for value in present):
            return values.astype("Int64")
        return values.astype("float64")
    return values.map(lambda value: None if value is None else _display_value(value)).astype("string")


def numeric_grid_keys(sweep: Sweep) -> tuple[str, ...]:
    """Grid keys whose values are all numbers (not booleans), the axes of the line charts."""
    return tuple(key for key, values in sweep.spec.grid.items()
                 if all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values))


def write_table(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """Write sweep.csv, and sweep.parquet when pyarrow is installed, each atomically."""
    written = [atomic_write_text(out_dir / TABLE_CSV, table.to_csv(index=False))]
    try:
        import pyarrow  # noqa: F401 - only checks that Parquet can be written
    except ImportError:
        log.warning("pyarrow is not installed, so %s is not written; install it with: pip install pyarrow",
                    TABLE_PARQUET)
        return written
    with atomic_path(out_dir / TABLE_PARQUET) as temp:
        table.to_parquet(temp, index=False, engine="pyarrow")
    written.append(out_dir / TABLE_PARQUET)
    return written


# ---------------------------------------------------------------------------------------------------
# The sweep report: charts and the HTML page
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepChart:
    """One chart of the sweep report: PNG bytes, or the reason it was left out."""

    key: str
    title: str
    caption: str
    png: bytes | None = None
    note: str | None = None

    @property
    def src(self) -> str | None:
        return None if self.png is None else f"{CHART_PREFIX}{self.key}.png"


MAX_SERIES_PER_CHART = 10
"""Lines drawn per line chart; the series with the most users per GPU are kept."""
MAX_RANKING_BARS = 30

_CHART_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "savefig.facecolor": "white",
}
_DPI = 110


def sweep_charts(sweep: Sweep, table: pd.DataFrame) -> list[SweepChart]:
    """Draw the report's charts: users per GPU against each numeric grid axis, the ranking and the trade-off."""
    import matplotlib

    from kvsim.report.plots import run_colors

    ok_rows = table[table["error"].isna()]
    colors = run_colors(ok_rows["run"].dropna().astype(str))
    charts = []
    with matplotlib.rc_context(_CHART_STYLE):
        for key in numeric_grid_keys(sweep):
            charts.append(_users_against_axis(sweep, ok_rows, key, colors))
        charts.append(_ranking(sweep, ok_rows, colors))
        charts.append(_tradeoff(ok_rows, colors))
    return charts


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _chart_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _users_against_axis(sweep: Sweep, rows: pd.DataFrame, key: str, colors: dict[str, str]) -> SweepChart:
    chart_key = f"users_per_gpu_by_{_chart_key(key)}"
    title = f"Users per GPU against {key}"
    if rows.empty:
        return SweepChart(chart_key, title, "", note="no variant finished, so there is nothing to draw")
    others = [other for other in sweep.grid_keys if other != key]
    # A series is one run at one setting of every other grid axis; its points vary `key` alone.
    series = []
    group_keys = ["run", *others]
    for group, frame in rows.groupby(group_keys, sort=True, dropna=False):
        group = group if isinstance(group, tuple) else (group,)
        run = str(group[0])
        label = run + "".join(f", {other}={_cell_text(value)}" for other, value in zip(others, group[1:]))
        frame = frame.sort_values(key)
        series.append((run, label, frame[key].to_numpy(dtype=float), frame["users_per_gpu"].to_numpy(dtype=float)))
    series.sort(key=lambda item: -np.nanmean(item[3]) if np.isfinite(item[3]).any() else math.inf)
    left_out = max(0, len(series) - MAX_SERIES_PER_CHART)
    series = series[:MAX_SERIES_PER_CHART]

    figure = _new_figure(9.0, 3.8)
    axis = figure.subplots()
    markers = "osD^vP*X"
    line_styles = ("-", "--", ":", "-.")
    seen_per_run: dict[str, int] = {}
    for run, label, x_values, y_values in series:
        index = seen_per_run.get(run, 0)
        seen_per_run[run] = index + 1
        axis.plot(x_values, y_values, color=colors.get(run, "#444444"), marker=markers[index % len(markers)],
                  linestyle=line_styles[index % len(line_styles)], label=label)
    values = np.array(sorted(set(rows[key].dropna().astype(float))))
    if values.size > 1 and values.min() > 0 and values.max() / values.min() >= 8:
        axis.set_xscale("log", base=2)
    axis.set_xticks(values, [_cell_text(value) for value in values])
    axis.set_xlabel(key)
    axis.set_ylabel("users per GPU (max concurrent requests / GPUs)")
    axis.set_ylim(bottom=0)
    figure.legend(loc="outside right upper")
    caption = (f"Max concurrent requests per GPU as {key} changes, one line per run and setting of the other "
               f"grid axes.")
    if left_out:
        caption += f" {left_out} series with fewer users per GPU are not drawn; the table has every value."
    return SweepChart(chart_key, title, caption, png=_png(figure))


def _ranking(sweep: Sweep, rows: pd.DataFrame, colors: dict[str, str]) -> SweepChart:
    key, title = "ranking", "Users per GPU by variant"
    if rows.empty:
        return SweepChart(key, title, "", note="no variant finished, so there is nothing to draw")
    ranked = rows.sort_values(["users_per_gpu", "variant_id", "run"], ascending=[False, True, True],
                              na_position="last")
    left_out = max(0, len(ranked) - MAX_RANKING_BARS)
    ranked = ranked.head(MAX_RANKING_BARS)
    labels = [f"{row['run']} | " + ", ".join(f"{grid_key}={_cell_text(row[grid_key])}" for grid_key in sweep.grid_keys
                                             if grid_key != "strategies")
              for _, row in ranked.iterrows()]
    figure = _new_figure(9.0, 0.9 + 0.28 * len(ranked))
    axis = figure.subplots()
    positions = np.arange(len(ranked))[::-1]
    values = ranked["users_per_gpu"].to_numpy(dtype=float)
    bar_colors = [colors.get(str(run), "#444444") for run in ranked["run"]]
    hatches = ["" if met is True else "//" for met in ranked["slo_met"].astype(object)]
    bars = axis.barh(positions, np.nan_to_num(values), color=bar_colors, height=0.7)
    for bar, hatch in zip(bars, hatches):
        bar.set_hatch(hatch)
        bar.set_edgecolor("white")
    axis.set_yticks(positions, labels, fontsize=7.5)
    axis.set_xlabel("users per GPU")
    axis.grid(axis="y", visible=False)
    caption = ("Every variant and run, most users per GPU first; hatched bars miss an SLO (or the scenario has "
               "none).")
    if left_out:
        caption += f" {left_out} more rows are in the table below."
    return SweepChart(key, title, caption, png=_png(figure))


def _tradeoff(rows: pd.DataFrame, colors: dict[str, str]) -> SweepChart:
    key, title = "tradeoff", "Users per GPU against TTFT p99"
    rows = rows.dropna(subset=["users_per_gpu", "ttft_p99_s"])
    if rows.empty:
        return SweepChart(key, title, "", note="no finished run has a TTFT p99, so the trade-off is not drawn")
    figure = _new_figure(7.5, 4.0)
    axis = figure.subplots()
    for run, frame in rows.groupby("run", sort=False):
        color = colors.get(str(run), "#444444")
        met = frame["slo_met"].astype(object).map(lambda value: value is True).to_numpy(dtype=bool)
        axis.scatter(frame["users_per_gpu"][met], frame["ttft_p99_s"][met], color=color, s=28, label=str(run))
        axis.scatter(frame["users_per_gpu"][~met], frame["ttft_p99_s"][~met], facecolors="white", edgecolors=color,
                     s=28, label=None if met.any() else str(run))
    ttft = rows["ttft_p99_s"].to_numpy(dtype=float)
    if ttft.min() > 0 and ttft.max() / ttft.min() >= 50:
        axis.set_yscale("log")
    axis.set_xlabel("users per GPU")
    axis.set_ylabel("TTFT p99 (s)")
    figure.legend(loc="outside right upper")
    caption = ("Each point is one variant and run. Filled points meet every SLO of the scenario; hollow ones "
               "miss at least one, or the scenario sets none. Up and to the left is worse.")
    return SweepChart(key, title, caption, png=_png(figure))


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}"
    return str(value)


_SWEEP_TEMPLATE = """\
{% extends "_base.html.j2" %}
{% block title %}kvsim sweep: {{ name }}{% endblock %}
{% block body %}
<header>
  <h1>Sweep: {{ name }}</h1>
  <p class="subtitle">{{ variants }} variants of {{ base }}{% if description %}: {{ description }}{% endif %}</p>
</header>
<section id="grid">
  <h2>Grid</h2>
  <dl class="provenance">
    {% for key, values in grid %}<dt>{{ key }}</dt><dd>{{ values }}</dd>{% endfor %}
    <dt>seed</dt><dd>{{ seed }}</dd>
    <dt>simulated with</dt><dd>kvsim {{ version }}</dd>
  </dl>
  {% if failed %}<p class="note">{{ failed }} variant(s) failed; their error is in the table.</p>{% endif %}
</section>
<section id="charts">
  <h2>Trade-offs</h2>
  {% for chart in charts %}
  {% if chart.src %}
  <figure id="chart-{{ chart.key }}">
    <img src="{{ chart.src }}" alt="{{ chart.title }}">
    <figcaption><strong>{{ chart.title }}.</strong> {{ chart.caption }}</figcaption>
  </figure>
  {% else %}
  <p class="note">{{ chart.title }}: {{ chart.note }}</p>
  {% endif %}
  {% endfor %}
</section>
<section id="table">
  <h2>Table</h2>
  <p class="note">The same rows as {{ csv }}: one per variant and run, sorted by variant id.</p>
  <div class="table-scroll">
  <table>
    <thead><tr>{% for column in columns %}<th>{{ column }}</th>{% endfor %}</tr></thead>
    <tbody>
    {% for row in rows %}
      <tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
    {% endfor %}
    </tbody>
  </table>
  </div>
</section>
<footer>Generated by kvsim from the files in this folder; run <code>kvsim sweep</code> again to refresh it.</footer>
{% endblock %}
"""


def _template_environment() -> jinja2.Environment:
    from kvsim import report

    # The page extends the capacity report's base layout, so both pages look alike.
    loader = jinja2.ChoiceLoader([
        jinja2.DictLoader({"sweep.html.j2": _SWEEP_TEMPLATE}),
        jinja2.FileSystemLoader(Path(report.__file__).parent / "templates"),
    ])
    # Grid values, run keys and error messages are user text: escape everything.
    return jinja2.Environment(loader=loader, autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


def _table_cells(table: pd.DataFrame) -> list[list[str]]:
    from kvsim.report.formatting import format_count, format_duration_s, format_number, format_percent

    formatters: dict[str, Callable[[Any], str]] = {
        metric: format_count for metric in _INTEGER_METRICS}
    formatters.update({"users_per_gpu": format_number, "output_tokens_per_s": format_number,
                       "goodput_requests_per_s": format_number, "token_state_fraction": format_percent,
                       "prefix_hit_rate_tokens": format_percent, "ttft_p99_s": format_duration_s,
                       "tpot_p99_s": format_duration_s})
    rows = []
    for record in table.astype(object).where(table.notna(), None).to_dict("records"):
        cells = []
        for column in table.columns:
            value = record[column]
            if column == "slo_met":
                cells.append(_slo_text(value))
            elif column in formatters:
                cells.append(formatters[column](value))
            else:
                cells.append(_cell_text(value))
        rows.append(cells)
    return rows


def _slo_text(met: bool | None) -> str:
    if met is None:
        return "—"
    return "met" if met else "missed"


def render_sweep_report(sweep: Sweep, table: pd.DataFrame, out_dir: Path) -> Path:
    """Write sweep.html and its PNGs into `out_dir`: charts first, then the page, each atomically.

    PNGs of an earlier render that this one does not draw are deleted, so no stale chart remains.
    """
    out_dir = Path(out_dir)
    charts = sweep_charts(sweep, table)
    html = _template_environment().get_template("sweep.html.j2").render(
        name=sweep.name,
        description=sweep.spec.description,
        base=sweep.spec.base,
        variants=len(sweep.variants),
        grid=[(key, ", ".join(_display_value(value) for value in values)) for key, values in sweep.spec.grid.items()],
        seed=sweep.spec.seed if sweep.spec.seed is not None else f"{sweep.base.spec.seed} (from the base scenario)",
        version=__version__,
        failed=int(table.loc[table["error"].notna(), "variant_id"].nunique()),
        charts=charts,
        csv=TABLE_CSV,
        columns=list(table.columns),
        rows=_table_cells(table),
    )
    written = set()
    for chart in charts:
        if chart.png is not None:
            atomic_write_bytes(out_dir / chart.src, chart.png)
            written.add(chart.src)
    for stale in out_dir.glob(f"{CHART_PREFIX}*.png"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)
    return atomic_write_text(out_dir / REPORT_FILE, html)


__all__ = [
    "EXECUTORS", "Sweep", "SweepChart", "SweepFile", "SweepOutcome", "Variant", "VariantTask", "default_workers",
    "execute_local", "execute_ray", "execute_serial", "load_sweep", "make_tasks", "numeric_grid_keys",
    "render_sweep_report", "run_sweep", "run_variant", "sweep_charts", "sweep_table", "variant_id", "write_table",
]
