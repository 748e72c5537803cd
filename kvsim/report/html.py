"""The HTML capacity report of one output folder, and the side-by-side comparison of two.

Every chart is drawn to PNG bytes in memory first, then the PNGs are written and the page last, each
atomically. A failure while drawing therefore leaves the folder exactly as it was, and a page is never
written before the images it links to. Images are referenced by relative file names, so the folder
can be served or mailed as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from kvsim import __version__
from kvsim.atomic import atomic_write_bytes, atomic_write_text
from kvsim.report import formatting
from kvsim.report.data import PROFILE_FILE, RunFolder, finite_float, load_run_folder, positive_int
from kvsim.report.plots import (
    HALF_FIGURE_WIDTH_IN,
    Chart,
    PlotInputs,
    attention_variants,
    calibration_fit,
    concurrency_and_queue,
    fragmentation_bars,
    hit_rate_by_capacity,
    latency_cdfs,
    memory_composition,
    memory_shares,
    plan_curves,
    prefix_hit_rate_over_time,
    preemptions_over_time,
    run_colors,
)
from kvsim.report.verdict import Verdict, build_verdict, sustained_concurrency

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"

# The report's sections in page order, each with the charts it shows.
_REPORT_SECTIONS: tuple[tuple[str, str, tuple[Callable[[PlotInputs], Chart], ...]], ...] = (
    ("memory", "Memory", (fragmentation_bars, memory_composition)),
    ("prefix-cache", "Prefix cache", (prefix_hit_rate_over_time, hit_rate_by_capacity)),
    ("load", "Load", (concurrency_and_queue, preemptions_over_time)),
    ("latency", "Latency", (latency_cdfs,)),
    ("attention", "Attention variants", (attention_variants,)),
    ("calibration", "Calibration", (calibration_fit,)),
    ("plan", "Capacity plan", (plan_curves,)),
)
_COMPARE_CHARTS: tuple[Callable[[PlotInputs], Chart], ...] = (fragmentation_bars, concurrency_and_queue, latency_cdfs)

# Every PNG name a report may write; a name this render leaves out is deleted so no stale chart remains.
_REPORT_CHART_KEYS = ("fragmentation", "memory_composition", "prefix_hit_rate", "hit_rate_by_capacity",
                      "concurrency", "preemptions", "latency_cdf", "attention", "calibration", "plan")


@dataclass(frozen=True)
class ChartView:
    """A chart as the template shows it: an image file, or the note that replaces it."""

    key: str
    title: str
    caption: str
    src: str | None
    note: str | None


@dataclass(frozen=True)
class SectionView:
    id: str
    title: str
    charts: tuple[ChartView, ...]


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        # Scenario names, run keys and file contents are user text: escape everything by default.
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(
        count=formatting.format_count,
        number=formatting.format_number,
        percent=formatting.format_percent,
        duration=formatting.format_duration_s,
        bytes=formatting.format_bytes,
        ratio=formatting.format_ratio,
    )
    return environment


def _render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)


# ---------------------------------------------------------------------------------------------
# Page content
# ---------------------------------------------------------------------------------------------


def _scalar_items(mapping: Any, skip: Iterable[str] = ()) -> str:
    if not isinstance(mapping, dict):
        return ""
    skipped = set(skip)
    return ", ".join(f"{key} {value}" for key, value in mapping.items()
                     if key not in skipped and isinstance(value, (str, int, float, bool)))


def _latency_model_text(folder: RunFolder) -> str:
    described = folder.summary.get("latency_model")
    described = described if isinstance(described, dict) else {}
    name = str(described.get("latency_model") or described.get("name") or "")
    profile_path = described.get("profile") or described.get("profile_path")

    if folder.profile is not None or profile_path or name == "calibrated":
        file_name = Path(str(profile_path)).name if profile_path else PROFILE_FILE
        profile = folder.profile or {}
        device = profile.get("device")
        if isinstance(device, dict):
            device = device.get("name")
        details = [f"device {device}" if device else "",
                   f"dtype {profile['dtype']}" if profile.get("dtype") else "",
                   f"measured {profile.get('created_at') or profile.get('date')}"
                   if profile.get("created_at") or profile.get("date") else ""]
        details = [detail for detail in details if detail]
        return f"calibrated from {file_name}" + (f" ({', '.join(details)})" if details else "")

    parameters = _scalar_items(described, skip=("latency_model", "name", "gpu", "tp"))
    return (name or "unknown") + (f" ({parameters})" if parameters else "")


def provenance(folder: RunFolder) -> list[tuple[str, str]]:
    """List the facts a reader needs to reproduce or trust the report, as (label, value) pairs."""
    scenario = folder.scenario
    tp = positive_int(scenario.get("tp"), 1)
    replicas = positive_int(scenario.get("replicas"), 1)
    window = folder.summary.get("window") if isinstance(folder.summary.get("window"), dict) else {}
    start_s, end_s = finite_float(window.get("start_s")), finite_float(window.get("end_s"))

    items = [
        ("Scenario", f"{folder.scenario_name}" + (f" ({scenario['path']})" if scenario.get("path") else "")),
        ("Model", str(scenario.get("model") or "—")),
        ("GPU", f"{scenario.get('gpu') or '—'}, {folder.num_gpus} in all (TP {tp} × {replicas} "
                f"{'replica' if replicas == 1 else 'replicas'})"),
        ("Latency model", _latency_model_text(folder)),
        ("Engine", _scalar_items(scenario.get("engine")) or "—"),
        ("Seed", str(scenario.get("seed", "—"))),
        ("Simulated", f"{formatting.format_duration_s(start_s)} to {formatting.format_duration_s(end_s)}"
                      if start_s is not None and end_s is not None else "—"),
        ("Simulated with", f"kvsim {folder.summary.get('kvsim_version', '—')} on "
                           f"{folder.summary.get('created_at', 'an unrecorded date')}"),
        ("Report by", f"kvsim {__version__}"),
    ]
    return items


def _chart_views(charts: Iterable[Chart], prefix: str = "") -> tuple[ChartView, ...]:
    return tuple(ChartView(key=chart.key, title=chart.title, caption=chart.caption,
                           src=f"{prefix}{chart.key}.png" if chart.png is not None else None, note=chart.note)
                 for chart in charts)


def _write_charts(out_dir: Path, charts: Iterable[Chart], prefix: str, known_keys: Iterable[str]) -> None:
    written = set()
    for chart in charts:
        if chart.png is not None:
            atomic_write_bytes(out_dir / f"{prefix}{chart.key}.png", chart.png)
            written.add(chart.key)
    for key in known_keys:
        if key not in written:
            (out_dir / f"{prefix}{key}.png").unlink(missing_ok=True)


def _memory_rows(folder: RunFolder) -> list[dict[str, Any]]:
    return [{"run": run, **memory_shares(folder.strategy(run))} for run in folder.run_keys]


def _report_context(folder: RunFolder, verdict: Verdict, colors: dict[str, str]) -> dict[str, Any]:
    return {
        "folder": folder,
        "scenario_name": folder.scenario_name,
        "verdict": verdict,
        "colors": colors,
        "provenance": provenance(folder),
        "strategies": {run: folder.strategy(run) for run in folder.run_keys},
        "memory_rows": _memory_rows(folder),
        "show_gpus_needed": any(row.gpus_needed is not None for row in verdict.rows),
        "prefix_reuse": _prefix_reuse_note(folder),
        "rejections": _rejections_note(folder),
    }


def _rejections_note(folder: RunFolder) -> str | None:
    """Name the runs that rejected requests, which the latency and throughput figures leave out."""
    counts = {run: positive_int(folder.strategy(run).get("requests_rejected"), 0) for run in folder.run_keys}
    counts = {run: count for run, count in counts.items() if count}
    if not counts:
        return None
    listed = ", ".join(f"{run}: {count:,}" for run, count in counts.items())
    return (f"Requests rejected ({listed}). A prompt of max_model_len tokens or more leaves no room to generate, "
            f"and a prompt larger than the KV cache never fits; the figures here leave these requests out.")


def _prefix_reuse_note(folder: RunFolder) -> str | None:
    """Compare the runs' prefix hit rates with what a cache that never evicts would reach."""
    reuse = folder.summary.get("workload_prefix_reuse")
    if not isinstance(reuse, dict) or finite_float(reuse.get("unbounded_hit_rate_tokens")) is None:
        return None
    rates = [finite_float(folder.strategy(run).get("prefix_hit_rate_tokens")) for run in folder.run_keys]
    rates = [rate for rate in rates if rate]
    text = (f"A prefix cache that never evicts would serve {reuse['unbounded_hit_rate_tokens']:.1%} of prompt "
            f"tokens (the prompts replayed in order, {reuse.get('block_tokens', '?')}-token blocks).")
    if rates:
        capacities = [finite_float(folder.strategy(run).get("kv_capacity_tokens")) for run in folder.run_keys]
        capacity = max((c for c in capacities if c), default=None)
        low, high = min(rates), max(rates)
        span = f"{high:.1%}" if abs(high - low) < 0.0005 else f"{low:.1%}–{high:.1%}"
        text += (f" The simulated runs with prefix caching hit {span}: their KV cache"
                 + (f" ({capacity:,.0f} tokens in all)" if capacity else "")
                 + " also holds the running requests, so cached blocks are evicted before they are reused.")
    return text


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def render_report(out_dir: Path) -> Path:
    """Write report.html and its PNGs into `out_dir` from the files `kvsim run` wrote there.

    Returns the path of report.html. Raises UserError when summary.json is missing or malformed.
    """
    out_dir = Path(out_dir)
    folder = load_run_folder(out_dir)
    colors = run_colors(folder.run_keys)
    verdict = build_verdict(folder)
    inputs = PlotInputs.build(folder, colors)

    charts_by_section = [(section_id, title, [draw(inputs) for draw in draws])
                         for section_id, title, draws in _REPORT_SECTIONS]
    sections = tuple(SectionView(id=section_id, title=title, charts=_chart_views(charts))
                     for section_id, title, charts in charts_by_section)
    html = _render_template("report.html.j2", sections=sections, **_report_context(folder, verdict, colors))

    all_charts = [chart for _, _, charts in charts_by_section for chart in charts]
    _write_charts(out_dir, all_charts, prefix="", known_keys=_REPORT_CHART_KEYS)
    report_path = atomic_write_text(out_dir / REPORT_FILE, html)
    omitted = [chart.key for chart in all_charts if chart.png is None]
    logger.info("wrote %s with %d charts (left out: %s)", report_path, len(all_charts) - len(omitted),
                ", ".join(omitted) or "none")
    return report_path


# Metrics of the comparison table: (label, how to read it from a summary entry, formatter, higher is better).
_COMPARED_METRICS: tuple[tuple[str, Callable[[dict[str, Any], RunFolder], Any], str, bool | None], ...] = (
    ("concurrent requests under load", lambda entry, _: sustained_concurrency(entry), "number", True),
    ("max concurrent requests", lambda entry, _: entry.get("max_concurrent_requests"), "count", True),
    ("users per GPU", lambda entry, folder: _users_per_gpu(entry, folder), "number", True),
    ("KV capacity (tokens, all replicas)", lambda entry, _: entry.get("kv_capacity_tokens"), "count", True),
    ("output tokens/s", lambda entry, _: entry.get("output_tokens_per_s"), "number", True),
    ("goodput (requests/s)", lambda entry, _: entry.get("goodput_requests_per_s"), "number", True),
    ("prefix hit rate (tokens)", lambda entry, _: entry.get("prefix_hit_rate_tokens"), "percent", True),
    ("token states", lambda entry, _: entry.get("token_state_fraction"), "percent", True),
    ("internal fragmentation", lambda entry, _: entry.get("internal_fragmentation_fraction"), "percent", False),
    ("external fragmentation", lambda entry, _: entry.get("external_fragmentation_fraction"), "percent", False),
    ("preemptions", lambda entry, _: entry.get("preemptions"), "count", False),
    ("TTFT p99", lambda entry, _: _percentile(entry, "ttft_s", "p99"), "duration", False),
    ("TPOT p99", lambda entry, _: _percentile(entry, "tpot_s", "p99"), "duration", False),
    ("E2E latency p99", lambda entry, _: _percentile(entry, "e2e_latency_s", "p99"), "duration", False),
)

_FORMATTERS = {
    "count": formatting.format_count,
    "number": formatting.format_number,
    "percent": formatting.format_percent,
    "duration": formatting.format_duration_s,
}


def _users_per_gpu(entry: dict[str, Any], folder: RunFolder) -> float | None:
    concurrent = sustained_concurrency(entry)
    return None if concurrent is None else concurrent / folder.num_gpus


def _percentile(entry: dict[str, Any], key: str, statistic: str) -> Any:
    stats = entry.get(key)
    return stats.get(statistic) if isinstance(stats, dict) else None


@dataclass(frozen=True)
class MetricDifference:
    """One line of the comparison table."""

    label: str
    a_text: str
    b_text: str
    change_text: str
    verdict: str
    """"better", "worse" or "same" for B against A; "" when a value is missing."""


def _difference(label: str, a_value: Any, b_value: Any, kind: str, higher_is_better: bool | None) -> MetricDifference:
    formatter = _FORMATTERS[kind]
    a_number, b_number = finite_float(a_value), finite_float(b_value)
    if a_number is None or b_number is None:
        return MetricDifference(label, formatter(a_value), formatter(b_value), "—", "")

    delta = b_number - a_number
    if kind == "percent":
        change = f"{delta * 100:+.1f} pp"
    elif a_number != 0:
        change = f"{delta / abs(a_number) * 100:+.1f} %"
    else:
        change = "new" if delta else "±0 %"
    if delta == 0 or higher_is_better is None:
        verdict = "same" if delta == 0 else ""
    else:
        verdict = "better" if (delta > 0) == higher_is_better else "worse"
    return MetricDifference(label, formatter(a_number), formatter(b_number), change, verdict)


def compare_differences(folder_a: RunFolder, folder_b: RunFolder) -> dict[str, list[MetricDifference]]:
    """Per run present in both folders, the key metrics of A and B and how B differs."""
    shared = [run for run in folder_a.run_keys if run in folder_b.run_keys]
    differences = {}
    for run in shared:
        entry_a, entry_b = folder_a.strategy(run), folder_b.strategy(run)
        differences[run] = [_difference(label, read(entry_a, folder_a), read(entry_b, folder_b), kind, better)
                            for label, read, kind, better in _COMPARED_METRICS]
    return differences


def _compare_paths(out: Path) -> tuple[Path, Path]:
    # `out` names the page itself when it ends in .html; otherwise it is the folder for compare.html.
    if out.suffix.lower() in (".html", ".htm"):
        return out.parent, out
    return out, out / COMPARE_FILE


def compare_reports(dir_a: Path, dir_b: Path, out: Path) -> Path:
    """Write a side-by-side HTML page of two output folders of `kvsim run` and return its path.

    `out` is either the page's path (ending in .html) or a folder, which gets compare.html. Its PNGs
    go beside the page with the prefixes a_ and b_. The folder is created when missing.
    """
    folder_a, folder_b = load_run_folder(Path(dir_a)), load_run_folder(Path(dir_b))
    out_dir, page_path = _compare_paths(Path(out))
    colors = run_colors([*folder_a.run_keys, *folder_b.run_keys])

    sides = []
    charts_to_write = []
    for prefix, label, folder in (("a_", "A", folder_a), ("b_", "B", folder_b)):
        inputs = PlotInputs.build(folder, colors, figure_width_in=HALF_FIGURE_WIDTH_IN)
        charts = [draw(inputs) for draw in _COMPARE_CHARTS]
        charts_to_write.append((prefix, charts))
        sides.append({"label": label, "prefix": prefix, **_report_context(folder, build_verdict(folder), colors),
                      "charts": _chart_views(charts, prefix)})

    html = _render_template(
        "compare.html.j2",
        sides=sides,
        colors=colors,
        differences=compare_differences(folder_a, folder_b),
        only_a=[run for run in folder_a.run_keys if run not in folder_b.run_keys],
        only_b=[run for run in folder_b.run_keys if run not in folder_a.run_keys],
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    compare_keys = [chart.key for chart in charts_to_write[0][1]]
    for prefix, charts in charts_to_write:
        _write_charts(out_dir, charts, prefix=prefix, known_keys=compare_keys)
    atomic_write_text(page_path, html)
    logger.info("wrote %s comparing %s with %s", page_path, folder_a.path, folder_b.path)
    return page_path
