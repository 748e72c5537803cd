"""The report's charts, drawn with matplotlib's object-oriented API on the Agg canvas.

Figures are built as `matplotlib.figure.Figure` objects with an explicit `FigureCanvasAgg`, never
through pyplot, so rendering needs no display and leaves the caller's matplotlib backend alone.
Each chart function returns a `Chart`: PNG bytes, or the one-line reason the chart was left out.
A run keeps one colour in every chart and table of a report (see `run_colors`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import PercentFormatter

from kvsim.report.data import (
    MEMORY_FRACTION_COLUMNS,
    RunFolder,
    downsample_timeline,
    finite_float,
    run_timeline,
)
from kvsim.report.formatting import KiB, format_number
from kvsim.report.verdict import slo_targets

DPI = 110
FIGURE_WIDTH_IN = 10.0
HALF_FIGURE_WIDTH_IN = 6.4
MAX_TIMELINE_POINTS = 1500
"""Points per run in a time chart; 1,500 is about one per horizontal pixel of a 10-inch figure."""
MAX_CDF_POINTS = 400
TIME_LABEL = "simulated time (s)"

# Colour-blind-safe qualitative palette (Okabe and Ito, "Color Universal Design", 2008), then
# matplotlib's tab10 for reports with more runs than it has colours.
_RUN_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_EXTRA_PALETTE = tuple(matplotlib.colormaps["tab10"].colors)

# The memory components, bottom to top of a stack, as (summary/timeline column, legend label, colour).
# Warm colours mark waste, so the fragmentation charts read at a glance.
MEMORY_COMPONENTS = (
    ("token_state_fraction", "token states", "#3A5A8C"),
    ("reserved_fraction", "reserved", "#8FB3D9"),
    ("internal_fragmentation_fraction", "internal fragmentation", "#F28E2B"),
    ("external_fragmentation_fraction", "external fragmentation", "#C0392B"),
    ("cached_free_fraction", "cached, free", "#8CC084"),
    ("free_fraction", "free", "#E4E4E4"),
)

_SLO_LINE = {"color": "#555555", "linestyle": "--", "linewidth": 1.0}
_P99_LINE = {"color": "#999999", "linestyle": ":", "linewidth": 1.0}

_SERIES_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C")
_NEUTRAL_BAR_COLOR = "#4C72B0"

_STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "lines.linewidth": 1.6,
    "savefig.facecolor": "white",
}


@dataclass(frozen=True)
class Chart:
    """One chart of a report: a PNG, or the reason it was left out (`note`)."""

    key: str
    """File stem of the PNG, such as "memory_composition"."""
    title: str
    caption: str = ""
    png: bytes | None = field(default=None, repr=False)
    note: str | None = None


@dataclass(frozen=True)
class PlotInputs:
    """Inputs of every chart function: the folder, run colours and the run-wide timelines."""

    folder: RunFolder
    colors: dict[str, str]
    timelines: dict[str, pd.DataFrame]
    """Per run, the replicas combined and downsampled for plotting; empty when the run has no rows."""
    figure_width_in: float = FIGURE_WIDTH_IN
    """Figure width in inches; narrower figures keep their text legible when a page shows two side by side."""

    @classmethod
    def build(cls, folder: RunFolder, colors: dict[str, str], figure_width_in: float = FIGURE_WIDTH_IN) -> PlotInputs:
        """Combine and downsample each run's timeline once, for all the charts of a page."""
        timelines = {}
        for run in folder.run_keys:
            if folder.timeline is None:
                timelines[run] = pd.DataFrame(columns=["time_s"])
            else:
                timelines[run] = downsample_timeline(run_timeline(folder.timeline, run), MAX_TIMELINE_POINTS)
        return cls(folder=folder, colors=colors, timelines=timelines, figure_width_in=figure_width_in)


def run_colors(run_keys: Iterable[str]) -> dict[str, str]:
    """One colour per run, in order; pass the union of runs when two reports must agree."""
    palette = _RUN_PALETTE + _EXTRA_PALETTE
    return {run: palette[index % len(palette)] for index, run in enumerate(dict.fromkeys(run_keys))}


# ---------------------------------------------------------------------------------------------
# Shared drawing helpers
# ---------------------------------------------------------------------------------------------


def _styled(function: Callable[..., Chart]) -> Callable[..., Chart]:
    # rcParams are read when artists (ticks included, which are made lazily at draw time) are
    # created, so both drawing and saving run inside the style context.
    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Chart:
        with matplotlib.rc_context(_STYLE):
            return function(*args, **kwargs)

    return wrapper


def _new_figure(inputs: PlotInputs, height_in: float) -> Figure:
    figure = Figure(figsize=(inputs.figure_width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _finish(key: str, title: str, caption: str, figure: Figure) -> Chart:
    return Chart(key=key, title=title, caption=caption, png=_png(figure))


def _omit(key: str, title: str, note: str) -> Chart:
    return Chart(key=key, title=title, note=note)


def _legend_on_top(figure: Figure, handles: list[Any], labels: list[str] | None = None) -> None:
    # Above the axes, outside them, so a legend never covers data.
    if labels is None:
        labels = [handle.get_label() for handle in handles]
    figure.legend(handles, labels, loc="outside upper center", ncol=_legend_columns(figure, labels))


def _legend_columns(figure: Figure, labels: list[str]) -> int:
    # All entries in one row when they fit the figure's width, otherwise as many columns as the
    # longest label allows. Widths are estimated from character counts at the legend font size.
    font_pt = float(_STYLE["legend.fontsize"])
    available_pt = figure.get_figwidth() * 72 * 0.95
    entry_widths_pt = [len(label) * 0.6 * font_pt + 4 * font_pt for label in labels]
    if sum(entry_widths_pt) <= available_pt:
        return max(len(labels), 1)
    return max(1, min(len(labels), int(available_pt // max(entry_widths_pt))))


def _run_handles(runs: Iterable[str], colors: dict[str, str]) -> list[Line2D]:
    return [Line2D([], [], color=colors[run], label=run) for run in runs]


def _use_log_scale(values: np.ndarray, min_ratio: float) -> bool:
    positive = values[values > 0]
    return positive.size > 1 and positive.size == values.size and positive.max() / positive.min() >= min_ratio


def _percent_top(max_percent: float) -> float:
    """Round `max_percent` up to an axis limit: a multiple of 10 at least 10 % above it, at most 100."""
    return float(min(100, max(10, math.ceil(max_percent * 1.1 / 10) * 10)))


def _percent_axis(axis: Axes, top: float = 100.0) -> None:
    axis.set_ylim(0, top)
    axis.yaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))


def _runs_with_column(inputs: PlotInputs, column: str) -> list[str]:
    return [run for run in inputs.folder.run_keys
            if column in inputs.timelines[run].columns and inputs.timelines[run][column].notna().any()]


def _label_bars(axis: Axes, bars: Any, labels: list[str]) -> None:
    for bar, label in zip(bars, labels):
        axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                      textcoords="offset points", ha="center", va="bottom", fontsize=8)


def _text_color_on(hex_color: str) -> str:
    red, green, blue = to_rgb(hex_color)
    # Luma with the ITU-R BT.709 weights on sRGB values, close enough to pick dark text on light
    # fills and white text on dark ones.
    return "black" if 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.55 else "white"


def memory_shares(values: dict[str, Any]) -> dict[str, float]:
    """Read the six memory shares of a summary entry; absent shares are 0 and free fills the rest up to 1."""
    shares = {column: finite_float(values.get(column)) or 0.0 for column in MEMORY_FRACTION_COLUMNS}
    if finite_float(values.get("free_fraction")) is None:
        used = sum(value for column, value in shares.items() if column != "free_fraction")
        shares["free_fraction"] = max(1.0 - used, 0.0)
    return shares


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


@_styled
def memory_composition(inputs: PlotInputs) -> Chart:
    """Draw stacked shares of KV memory over time, one panel per run."""
    key, title = "memory_composition", "KV memory over time"
    if inputs.folder.timeline is None:
        return _omit(key, title, "timeline.csv is absent, so memory over time is not shown.")
    fraction_columns = [column for column, _, _ in MEMORY_COMPONENTS[:-1]]
    runs = [run for run in inputs.folder.run_keys
            if any(column in inputs.timelines[run].columns for column in fraction_columns)
            and len(inputs.timelines[run]) > 0]
    if not runs:
        return _omit(key, title, "timeline.csv has no memory-share columns, so memory over time is not shown.")

    figure = _new_figure(inputs, 0.6 + 1.45 * len(runs))
    axes = figure.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for axis, run in zip(axes, runs):
        timeline = inputs.timelines[run]
        times = timeline["time_s"].to_numpy(dtype=float)
        shares = [timeline[column].to_numpy(dtype=float) if column in timeline.columns else np.zeros_like(times)
                  for column, _, _ in MEMORY_COMPONENTS[:-1]]
        shares = [np.nan_to_num(share) for share in shares]
        # Free is what the other shares leave, so the stack always reaches 100 %.
        shares.append(np.clip(1.0 - np.sum(shares, axis=0), 0.0, None))

        bottom = np.zeros_like(times)
        for share, (_, _, color) in zip(shares, MEMORY_COMPONENTS):
            top = bottom + share * 100
            axis.fill_between(times, bottom, top, step="post", color=color, linewidth=0)
            bottom = top
        _percent_axis(axis)
        axis.set_xlim(times[0], times[-1] if times[-1] > times[0] else times[0] + 1)
        axis.set_title(run, loc="left", color=inputs.colors[run], fontweight="bold")
        axis.set_ylabel("KV memory")
        axis.grid(False)
    axes[-1].set_xlabel(TIME_LABEL)
    _legend_on_top(figure, [Patch(color=color, label=label) for _, label, color in MEMORY_COMPONENTS])
    caption = ("Share of each run's KV-cache memory by state over time, averaged across replicas. "
               "Token states hold KV of running requests; reserved slots will be filled before the request "
               "finishes; internal fragmentation is allocated but never filled; external fragmentation is free "
               "but in holes too small for the next request.")
    return _finish(key, title, caption, figure)



@_styled
def fragmentation_bars(inputs: PlotInputs) -> Chart:
    """Draw the time-averaged memory shares of each run as one stacked bar, labelled in percent.

    Drawn after Fig. 2 of Kwon et al., "Efficient Memory Management for Large Language Model Serving
    with PagedAttention" (SOSP 2023), which splits KV memory into token states, reservation, internal
    and external fragmentation. Here the bar spans all of the KV memory, so cached and free slots show too.
    """
    key, title = "fragmentation", "Where the KV memory goes"
    folder = inputs.folder
    runs = [run for run in folder.run_keys
            if any(finite_float(folder.strategy(run).get(column)) is not None
                   for column, _, _ in MEMORY_COMPONENTS[:-1])]
    if not runs:
        return _omit(key, title, "summary.json has no memory shares, so the fragmentation chart is not shown.")

    figure = _new_figure(inputs, 1.1 + 0.5 * len(runs))
    axis = figure.subplots()
    positions = np.arange(len(runs))[::-1]
    left = np.zeros(len(runs))
    for column, label, color in MEMORY_COMPONENTS:
        widths = np.array([memory_shares(folder.strategy(run))[column] * 100 for run in runs])
        bars = axis.barh(positions, widths, left=left, color=color, height=0.62, label=label,
                         edgecolor="white", linewidth=0.6)
        for bar, width in zip(bars, widths):
            # Segments under 4 % are too narrow for a label; the table below the chart has every value.
            if width >= 4:
                text = f"{width:.0f}%" if width >= 10 else f"{width:.1f}%"
                axis.text(bar.get_x() + width / 2, bar.get_y() + bar.get_height() / 2, text,
                          ha="center", va="center", fontsize=8, color=_text_color_on(color))
        left += widths
    axis.set_yticks(positions, runs)
    for tick_label, run in zip(axis.get_yticklabels(), runs):
        tick_label.set_color(inputs.colors[run])
        tick_label.set_fontweight("bold")
    axis.set_xlim(0, 100)
    axis.xaxis.set_major_formatter(PercentFormatter(xmax=100, decimals=0))
    axis.set_xlabel("share of KV-cache memory, time-averaged over the busy period")
    axis.grid(axis="y", visible=False)
    axis.set_axisbelow(True)
    _legend_on_top(figure, [Patch(color=color, label=label) for _, label, color in MEMORY_COMPONENTS])
    caption = ("Time-averaged shares of each run's KV-cache memory from the first arrival to the last finish, "
               "in the manner of Fig. 2 of the PagedAttention paper (Kwon et al., SOSP 2023).")
    return _finish(key, title, caption, figure)


# ---------------------------------------------------------------------------------------------
# Prefix cache
# ---------------------------------------------------------------------------------------------


@_styled
def prefix_hit_rate_over_time(inputs: PlotInputs) -> Chart:
    """Draw the cumulative prefix-cache hit rate (share of prompt tokens) over time, per run with hits."""
    key, title = "prefix_hit_rate", "Prefix cache hit rate over time"
    if inputs.folder.timeline is None:
        return _omit(key, title, "timeline.csv is absent, so the hit rate over time is not shown.")
    runs = [run for run in _runs_with_column(inputs, "prefix_hit_rate_tokens")
            if np.nanmax(inputs.timelines[run]["prefix_hit_rate_tokens"].to_numpy(dtype=float)) > 0]
    if not runs:
        return _omit(key, title, "No run has prefix cache hits, so the hit rate over time is not shown.")

    figure = _new_figure(inputs, 3.4)
    axis = figure.subplots()
    for run in runs:
        timeline = inputs.timelines[run]
        axis.step(timeline["time_s"], timeline["prefix_hit_rate_tokens"] * 100, where="post",
                  color=inputs.colors[run], label=run)
    highest = max(np.nanmax(inputs.timelines[run]["prefix_hit_rate_tokens"].to_numpy(dtype=float)) for run in runs)
    _percent_axis(axis, top=_percent_top(highest * 100))
    axis.set_xlabel(TIME_LABEL)
    axis.set_ylabel("hit rate, cumulative\n(% of prompt tokens)")
    axis.set_xlim(left=0)
    _legend_on_top(figure, _run_handles(runs, inputs.colors))
    left_out = [run for run in inputs.folder.run_keys if run not in runs]
    caption = "Share of prompt tokens served from the prefix cache since the start, averaged across replicas."
    if left_out:
        caption += f" Runs without prefix hits are not drawn: {', '.join(left_out)}."
    return _finish(key, title, caption, figure)


@_styled
def hit_rate_by_capacity(inputs: PlotInputs) -> Chart:
    """Draw the prefix hit rate against cache capacity per eviction policy, from hit_rate_by_capacity.csv."""
    key, title = "hit_rate_by_capacity", "Hit rate against cache capacity"
    curve = inputs.folder.hit_rate_by_capacity
    if curve is None:
        return _omit(key, title, "hit_rate_by_capacity.csv is absent (a scenario writes it when it sets "
                                 "simulation.hit_rate_capacities_blocks), so hit rate against capacity is not shown.")
    panels = [(column, label) for column, label in (("hit_rate_tokens", "of prompt tokens"),
                                                   ("hit_rate_blocks", "of blocks"))
              if column in curve.columns and curve[column].notna().any()]
    if not panels or curve.empty:
        return _omit(key, title, "hit_rate_by_capacity.csv has no hit rates, so the chart is not shown.")

    figure = _new_figure(inputs, 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    policies = list(dict.fromkeys(curve["policy"].astype(str)))
    colors = {policy: _SERIES_PALETTE[index % len(_SERIES_PALETTE)] for index, policy in enumerate(policies)}
    capacities = curve["capacity_blocks"].to_numpy(dtype=float)
    for axis, (column, label) in zip(axes, panels):
        for policy in policies:
            rows = curve[curve["policy"].astype(str) == policy].sort_values("capacity_blocks")
            axis.plot(rows["capacity_blocks"], rows[column] * 100, marker="o", markersize=3.5,
                      color=colors[policy], label=policy)
        if _use_log_scale(capacities, 20):
            axis.set_xscale("log")
        _percent_axis(axis, top=_percent_top(float(np.nanmax(curve[column].to_numpy(dtype=float))) * 100))
        if "block_tokens" in curve.columns and curve["block_tokens"].notna().any():
            axis.set_xlabel(f"prefix cache capacity ({int(curve['block_tokens'].iloc[0])}-token blocks)")
        else:
            axis.set_xlabel("prefix cache capacity (blocks)")
        axis.set_ylabel(f"hit rate ({label})")
    _legend_on_top(figure, [Line2D([], [], color=colors[policy], marker="o", markersize=3.5, label=policy)
                            for policy in policies])
    caption = "Prefix cache hit rate of the workload's prompts at each cache capacity, per eviction policy."
    return _finish(key, title, caption, figure)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------


@_styled
def concurrency_and_queue(inputs: PlotInputs) -> Chart:
    """Draw running and waiting requests over time, summed over replicas."""
    key, title = "concurrency", "Concurrency and queue length"
    if inputs.folder.timeline is None:
        return _omit(key, title, "timeline.csv is absent, so concurrency over time is not shown.")
    panels = [(column, label) for column, label in (("running", "running requests"),
                                                   ("waiting", "waiting requests"))
              if _runs_with_column(inputs, column)]
    if not panels:
        return _omit(key, title, "timeline.csv has no running or waiting counts, so concurrency is not shown.")

    figure = _new_figure(inputs, 1.0 + 2.0 * len(panels))
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    drawn: list[str] = []
    for axis, (column, label) in zip(axes, panels):
        for run in _runs_with_column(inputs, column):
            timeline = inputs.timelines[run]
            axis.step(timeline["time_s"], timeline[column], where="post", color=inputs.colors[run], label=run)
            drawn.append(run)
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.set_xlim(left=0)
    axes[-1].set_xlabel(TIME_LABEL)
    _legend_on_top(figure, _run_handles(dict.fromkeys(drawn), inputs.colors))
    caption = ("Requests running (admitted, holding KV memory) and waiting in the queue, summed over replicas. "
               "Where the timeline is denser than the plot, each point shows the peak of its interval.")
    return _finish(key, title, caption, figure)


@_styled
def preemptions_over_time(inputs: PlotInputs) -> Chart:
    """Draw cumulative preemptions over time, summed over replicas."""
    key, title = "preemptions", "Preemptions over time"
    if inputs.folder.timeline is None:
        return _omit(key, title, "timeline.csv is absent, so preemptions over time are not shown.")
    runs = _runs_with_column(inputs, "preemptions")
    if not runs:
        return _omit(key, title, "timeline.csv has no preemption counts, so preemptions are not shown.")
    if all(np.nanmax(inputs.timelines[run]["preemptions"].to_numpy(dtype=float)) <= 0 for run in runs):
        return _omit(key, title, "No run preempted a request, so the preemption chart is not shown.")

    figure = _new_figure(inputs, 3.2)
    axis = figure.subplots()
    for run in runs:
        timeline = inputs.timelines[run]
        axis.step(timeline["time_s"], timeline["preemptions"], where="post", color=inputs.colors[run], label=run)
    axis.set_xlabel(TIME_LABEL)
    axis.set_ylabel("preemptions, cumulative")
    axis.set_ylim(bottom=0)
    axis.set_xlim(left=0)
    _legend_on_top(figure, _run_handles(runs, inputs.colors))
    caption = ("Requests preempted since the start, summed over replicas: a running request loses its KV "
               "memory when a decode step finds no free block, and is recomputed or swapped back later.")
    return _finish(key, title, caption, figure)


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------

_LATENCY_PANELS = (
    ("ttft_s", "TTFT (s)", "ttft"),
    ("tpot_s", "TPOT (s)", "tpot"),
    ("e2e_latency_s", "E2E latency (s)", "e2e_latency"),
)


def _cdf_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute (x, share of requests ≤ x in %) of an empirical CDF, at most MAX_CDF_POINTS + 1 points."""
    values = np.sort(values)
    if values.size <= MAX_CDF_POINTS:
        return values, np.arange(1, values.size + 1) / values.size * 100
    shares = np.linspace(0, 1, MAX_CDF_POINTS + 1)
    return np.quantile(values, shares), shares * 100


@_styled
def latency_cdfs(inputs: PlotInputs) -> Chart:
    """Draw CDFs of TTFT, TPOT and E2E latency per run, with the SLO limits marked."""
    key, title = "latency_cdf", "Latency distributions"
    requests = inputs.folder.requests
    if requests is None:
        return _omit(key, title, "requests.csv is absent, so latency distributions are not shown.")
    panels = [panel for panel in _LATENCY_PANELS
              if panel[0] in requests.columns and requests[panel[0]].notna().any()]
    if not panels:
        return _omit(key, title, "requests.csv has no finished requests with latencies, so no CDF is shown.")

    # Limits at p99 (or any percentile) of each metric: drawn as a vertical line.
    limits = {target.summary_key: target for target in slo_targets(inputs.folder.slo)
              if target.statistic.startswith("p")}
    figure = _new_figure(inputs, 3.3)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    drawn: list[str] = []
    has_slo = False
    for axis, (column, label, _) in zip(axes, panels):
        all_values = []
        for run in inputs.folder.run_keys:
            values = requests.loc[requests["run"] == run, column].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            x, y = _cdf_points(values)
            axis.step(x, y, where="post", color=inputs.colors[run], label=run)
            all_values.append(values)
            drawn.append(run)
        if all_values and _use_log_scale(np.concatenate(all_values), 50):
            axis.set_xscale("log")
        target = limits.get(column)
        if target is not None:
            axis.axvline(target.limit_s, **_SLO_LINE)
            has_slo = True
        axis.axhline(99, **_P99_LINE)
        _percent_axis(axis, top=101)
        axis.set_xlabel(label)
    axes[0].set_ylabel("requests ≤ x")
    handles = _run_handles(dict.fromkeys(drawn), inputs.colors) + [Line2D([], [], label="p99", **_P99_LINE)]
    if has_slo:
        handles.append(Line2D([], [], label="SLO limit", **_SLO_LINE))
    _legend_on_top(figure, handles)
    caption = ("Share of finished requests whose latency is at most x. The dotted line marks the 99th percentile; "
               "dashed lines are the scenario's SLO limits. TPOT leaves out requests with a single output token.")
    return _finish(key, title, caption, figure)


# ---------------------------------------------------------------------------------------------
# Attention variants
# ---------------------------------------------------------------------------------------------


def _variant_label(row: pd.Series) -> str:
    variant = str(row.get("variant", ""))
    kind = row.get("attention_kind")
    if isinstance(kind, str) and kind and kind.lower() not in variant.lower():
        return f"{variant}\n({kind})"
    return variant


@_styled
def attention_variants(inputs: PlotInputs) -> Chart:
    """Draw KV bytes per token and users per GPU for each attention kind of the scenario's model."""
    key, title = "attention", "Attention variants"
    attention = inputs.folder.attention
    if attention is None or attention.empty:
        return _omit(key, title, "attention.csv is absent, so attention variants are not compared.")
    users = attention["users_per_gpu"] if "users_per_gpu" in attention.columns else None
    if users is None and "max_concurrency" in attention.columns:
        users = attention["max_concurrency"] / inputs.folder.num_gpus
    panels = []
    if "kv_bytes_per_token" in attention.columns and attention["kv_bytes_per_token"].notna().any():
        panels.append(("KV cache per token (KiB)", attention["kv_bytes_per_token"].to_numpy(dtype=float) / KiB))
    if users is not None and users.notna().any():
        panels.append(("users per GPU", users.to_numpy(dtype=float)))
    if not panels:
        return _omit(key, title, "attention.csv has neither bytes per token nor users per GPU, so it is not shown.")

    labels = [_variant_label(row) for _, row in attention.iterrows()]
    figure = _new_figure(inputs, 3.3)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (label, values) in zip(axes, panels):
        bars = axis.bar(np.arange(len(labels)), np.nan_to_num(values), color=_NEUTRAL_BAR_COLOR, width=0.6)
        _label_bars(axis, bars, [format_number(value) for value in values])
        axis.set_xticks(np.arange(len(labels)), labels)
        axis.set_ylabel(label)
        axis.grid(axis="x", visible=False)
        axis.margins(y=0.15)
    model = inputs.folder.scenario.get("model") or "the scenario's model"
    caption = (f"{model} with each attention kind, on the scenario's GPU and TP degree: KV bytes per token across "
               f"all layers and ranks, and the requests of the scenario's mean length that fit per GPU.")
    return _finish(key, title, caption, figure)


# ---------------------------------------------------------------------------------------------
# Calibration profile
# ---------------------------------------------------------------------------------------------

# kvsim.profile.Point stores each timed kernel call as {op, path, params: {batch, context_tokens, ...},
# time_s, fitted_time_s, held_out}. The report reads the file as plain JSON and also accepts a few
# other likely names, so a profile from an older or newer schema still plots. Points that match
# none of the names are skipped, never guessed.
_CONTEXT_KEYS = ("context_tokens", "context_len", "context_length", "seq_len", "kv_len", "context")
_MEASURED_KEYS = (("time_s", 1.0), ("measured_s", 1.0), ("latency_s", 1.0), ("step_time_s", 1.0),
                  ("measured_ms", 1e-3), ("latency_ms", 1e-3), ("step_time_ms", 1e-3), ("time_ms", 1e-3))
_FITTED_KEYS = (("fitted_time_s", 1.0), ("fitted_s", 1.0), ("predicted_s", 1.0), ("fit_s", 1.0),
                ("fitted_ms", 1e-3), ("predicted_ms", 1e-3))
_SERIES_KEYS = ("op", "kind", "phase", "operation", "kernel", "series", "attention_kind")
_BATCH_KEYS = ("batch", "batch_size", "num_seqs")
MAX_CALIBRATION_SERIES = 6


def _first_value(fields: dict[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if fields.get(key) is not None:
            return fields[key]
    return None


def _scaled_value(fields: dict[str, Any], keys: Iterable[tuple[str, float]]) -> float | None:
    for key, scale in keys:
        value = finite_float(fields.get(key))
        if value is not None:
            return value * scale
    return None


def _profile_points(profile: dict[str, Any]) -> list[dict[str, Any]]:
    fit = profile.get("fit") if isinstance(profile.get("fit"), dict) else {}
    for candidate in (profile.get("points"), fit.get("points"), profile.get("measurements")):
        if isinstance(candidate, list):
            return [point for point in candidate if isinstance(point, dict)]
        if isinstance(candidate, dict):
            # Columnar form: {"context_tokens": [...], "measured_s": [...]}.
            lengths = {len(values) for values in candidate.values() if isinstance(values, list)}
            if len(lengths) == 1:
                (length,) = lengths
                return [{name: values[index] for name, values in candidate.items() if isinstance(values, list)}
                        for index in range(length)]
    return []


def calibration_frame(profile: dict[str, Any]) -> pd.DataFrame:
    """Collect the profile's timed calls that have a context length, one row each.

    Columns: series (operation and batch), context_tokens, measured_s, fitted_s (NaN when the
    point has no fitted time), held_out, and path (the kernel path, "" when not recorded).
    """
    rows = []
    for point in _profile_points(profile):
        # Shape fields sit under `params` in kvsim.profile, and at the top level in simpler files.
        params = point.get("params") if isinstance(point.get("params"), dict) else {}
        fields = {**params, **{key: value for key, value in point.items() if key != "params"}}
        context = finite_float(_first_value(fields, _CONTEXT_KEYS))
        measured_s = _scaled_value(fields, _MEASURED_KEYS)
        if context is None or measured_s is None:
            continue
        fitted_s = _scaled_value(fields, _FITTED_KEYS)
        operation = _first_value(fields, _SERIES_KEYS)
        batch = _first_value(fields, _BATCH_KEYS)
        parts = [str(operation)] if operation not in (None, "") else []
        if batch is not None:
            parts.append(f"batch {batch}")
        rows.append({"series": ", ".join(parts) or "all points", "context_tokens": context,
                     "measured_s": measured_s, "fitted_s": np.nan if fitted_s is None else fitted_s,
                     "held_out": fields.get("held_out") is True, "path": str(fields.get("path") or "")})
    return pd.DataFrame(rows, columns=["series", "context_tokens", "measured_s", "fitted_s", "held_out", "path"])


@_styled
def calibration_fit(inputs: PlotInputs) -> Chart:
    """Draw measured and fitted step latency against context length, from profile.json."""
    key, title = "calibration", "Calibration fit"
    profile = inputs.folder.profile
    if profile is None:
        return _omit(key, title, "No calibration profile (profile.json) in this folder: step times come from "
                                 "the roofline model.")
    points = calibration_frame(profile)
    if points.empty:
        return _omit(key, title, "profile.json has no points with a context length and a measured latency, "
                                 "so the fit is not drawn.")

    # A profile times several kernel paths per operation but fits only one of them. Where fitted
    # times exist, the chart keeps the fitted paths' points, so measured and fitted values compare.
    has_fit = bool(points["fitted_s"].notna().any())
    if has_fit:
        fitted_paths = set(zip(points["series"], points["path"])) & set(
            zip(points.loc[points["fitted_s"].notna(), "series"], points.loc[points["fitted_s"].notna(), "path"]))
        points = points[[pair in fitted_paths for pair in zip(points["series"], points["path"])]]
    elif points["path"].ne("").any():
        points = points.assign(series=points["series"] + " (" + points["path"] + ")")

    counts = points["series"].value_counts()
    drawn_series = list(counts.index[:MAX_CALIBRATION_SERIES])
    figure = _new_figure(inputs, 3.6)
    axis = figure.subplots()
    for index, series in enumerate(drawn_series):
        rows = points[points["series"] == series].sort_values("context_tokens")
        color = _SERIES_PALETTE[index % len(_SERIES_PALETTE)]
        fitted_rows = rows[~rows["held_out"]]
        held_out_rows = rows[rows["held_out"]]
        axis.scatter(fitted_rows["context_tokens"], fitted_rows["measured_s"] * 1e3, s=16, color=color, zorder=3)
        axis.scatter(held_out_rows["context_tokens"], held_out_rows["measured_s"] * 1e3, s=16,
                     facecolors="white", edgecolors=color, zorder=3)
        fitted = rows.dropna(subset=["fitted_s"]).groupby("context_tokens", sort=True)["fitted_s"].mean()
        if not fitted.empty:
            axis.plot(fitted.index, fitted.to_numpy() * 1e3, color=color, linewidth=1.2)
    if _use_log_scale(points["context_tokens"].to_numpy(dtype=float), 20):
        axis.set_xscale("log")
    if _use_log_scale(points["measured_s"].to_numpy(dtype=float), 20):
        axis.set_yscale("log")
    axis.set_xlabel("context length (tokens)")
    axis.set_ylabel("time per call (ms)")

    handles = [Line2D([], [], color=_SERIES_PALETTE[index % len(_SERIES_PALETTE)], marker="o", linestyle="",
                      markersize=4, label=series) for index, series in enumerate(drawn_series)]
    handles.append(Line2D([], [], color="#555555", marker="o", linestyle="", markersize=4, label="measured"))
    if points["held_out"].any():
        handles.append(Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="",
                              markersize=4, label="held out of the fit"))
    if has_fit:
        handles.append(Line2D([], [], color="#555555", label="fitted"))
    _legend_on_top(figure, handles)
    return _finish(key, title, _calibration_caption(profile, len(counts) - len(drawn_series)), figure)


def _calibration_caption(profile: dict[str, Any], num_series_left_out: int) -> str:
    caption = "Time of each kernel call measured on the device (dots) and predicted by the fitted terms (lines)."
    device = profile.get("device")
    if isinstance(device, dict):
        device = device.get("name")
    if device:
        caption += f" Device: {device}."
    fit = profile.get("fit") if isinstance(profile.get("fit"), dict) else {}
    median_error = finite_float(fit.get("median_abs_pct_error"))
    p90_error = finite_float(fit.get("p90_abs_pct_error"))
    if median_error is not None and p90_error is not None:
        caption += (f" Error on held-out points: median {median_error * 100:.1f} %, "
                    f"p90 {p90_error * 100:.1f} %.")
    if num_series_left_out > 0:
        caption += f" {num_series_left_out} smaller series are not drawn."
    return caption


# ---------------------------------------------------------------------------------------------
# Capacity plan
# ---------------------------------------------------------------------------------------------

_PLAN_PANELS = (("ttft_p99_s", "TTFT p99 (s)"), ("tpot_p99_s", "TPOT p99 (s)"))


def _plan_points(plan: dict[str, Any], run: str) -> pd.DataFrame:
    runs = plan.get("runs") if isinstance(plan.get("runs"), dict) else {}
    entry = runs.get(run)
    points = entry.get("points") if isinstance(entry, dict) else None
    if not isinstance(points, list):
        return pd.DataFrame(columns=["load", *(column for column, _ in _PLAN_PANELS), "slo_met"])
    rows = [{"load": finite_float(point.get("load")),
             **{column: finite_float(point.get(column)) for column, _ in _PLAN_PANELS},
             "slo_met": point.get("slo_met") if isinstance(point.get("slo_met"), bool) else None}
            for point in points if isinstance(point, dict) and finite_float(point.get("load")) is not None]
    return pd.DataFrame(rows, columns=["load", *(column for column, _ in _PLAN_PANELS), "slo_met"])


@_styled
def plan_curves(inputs: PlotInputs) -> Chart:
    """Draw p99 TTFT and TPOT against offered load per run, from summary.json's `plan`, with the SLO lines."""
    key, title = "plan", "Latency against load"
    plan = inputs.folder.summary.get("plan")
    if not isinstance(plan, dict):
        return _omit(key, title, "summary.json has no plan (`kvsim plan` adds one), so latency against load "
                                 "is not shown.")
    frames = {run: _plan_points(plan, run) for run in inputs.folder.run_keys}
    frames = {run: frame for run, frame in frames.items() if not frame.empty}
    panels = [(column, label) for column, label in _PLAN_PANELS
              if any(frame[column].notna().any() for frame in frames.values())]
    if not panels:
        return _omit(key, title, "The plan in summary.json has no points with a load and a p99 latency, "
                                 "so latency against load is not shown.")

    slo = plan.get("slo") if isinstance(plan.get("slo"), dict) else inputs.folder.slo
    figure = _new_figure(inputs, 3.4)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (column, label) in zip(axes, panels):
        for run, frame in frames.items():
            frame = frame.dropna(subset=[column]).sort_values("load")
            color = inputs.colors[run]
            axis.plot(frame["load"], frame[column], color=color, linewidth=1.3)
            met = frame["slo_met"].map(lambda value: value is not False).to_numpy(dtype=bool)
            axis.scatter(frame["load"][met], frame[column][met], s=22, color=color, zorder=3)
            axis.scatter(frame["load"][~met], frame[column][~met], s=22, facecolors="white", edgecolors=color,
                         zorder=3)
        limit = finite_float(slo.get(column))
        if limit is not None:
            axis.axhline(limit, **_SLO_LINE)
        values = np.concatenate([frame[column].dropna().to_numpy(dtype=float) for frame in frames.values()])
        if _use_log_scale(values, 50):
            axis.set_yscale("log")
        else:
            axis.set_ylim(bottom=0)
        # NOTE: the plan does not yet state the unit of its load axis; `load_unit` is shown when present.
        unit = plan.get("load_unit")
        axis.set_xlabel(f"offered load ({unit})" if unit else "offered load")
        axis.set_ylabel(label)
    handles = _run_handles(frames, inputs.colors) + [
        Line2D([], [], color="#555555", marker="o", linestyle="", label="SLO met"),
        Line2D([], [], color="#555555", marker="o", markerfacecolor="white", linestyle="", label="SLO missed"),
        Line2D([], [], label="SLO limit", **_SLO_LINE),
    ]
    _legend_on_top(figure, handles)
    caption = ("p99 latency of each run as the offered load grows; filled points meet every SLO, "
               "hollow ones miss at least one. Dashed lines are the SLO limits.")
    return _finish(key, title, caption, figure)
