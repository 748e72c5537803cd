"""The `kvsim plan` and `kvsim sweep` commands: parse options, call kvsim.planning and kvsim.sweep, print.

The functions are plain typer commands; the `kvsim` app registers them with
`app.command("plan")(plan_command)` and `app.command("sweep")(sweep_command)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from kvsim.errors import UserError, prepare_output_folder

# Rich falls back to 80 columns when output is not a terminal; the tables here need more.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def _load_profile(profile: Path | None) -> Any:
    if profile is None:
        return None
    from kvsim.profile import load_profile

    return load_profile(profile)


def _safe_folder_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-.")
    return cleaned or "sweep"


# ---------------------------------------------------------------------- plan


def plan_command(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file with slo: bounds (and a plan: section for a target load).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder to write plan.json into; its summary.json gets the plan and "
                                                     "report.html is rendered again (the scenario is run there first "
                                                     "when the folder has no results).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of every probe (default: the scenario's).")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="Calibration profile JSON for step times (default: roofline).")] = None,
) -> None:
    """Find the highest load each run sustains on one replica under the scenario's SLOs, and the GPUs a target needs."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from kvsim.planning import format_load, plan_scenario, write_plan
    from kvsim.scenario import load_scenario

    loaded = load_scenario(scenario)
    profile_data = _load_profile(profile)
    if out is not None:
        prepare_output_folder(out)
    show_progress = not json_output and sys.stderr.isatty()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err_console,
                  disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"planning {loaded.name}", total=None)

        def on_probe(run_key: str, load: float, point: Any) -> None:
            if point is None:
                progress.update(task, description=f"{run_key}: simulating {format_load(load)}")

        plan = plan_scenario(loaded, seed=seed, profile=profile_data, on_probe=on_probe)
        if out is not None:
            progress.update(task, description=f"writing {out}")
            write_plan(plan, loaded, out, seed=seed, profile=profile_data, profile_path=profile)

    if json_output:
        console.print_json(json.dumps(plan.to_dict()))
        return
    _print_plan(plan)
    if out is not None:
        console.print(f"plan in {out / 'plan.json'}; open {out / 'report.html'}", highlight=False)


def _print_plan(plan: Any) -> None:
    from kvsim.planning import format_load

    unit = plan.axis.unit
    slo_text = ", ".join(f"{_slo_label(key)} ≤ {value * 1000:,.0f} ms"
                         for key, value in plan.slo.items() if key != "percentile")
    target_text = ""
    if plan.target_load is not None:
        target_unit = "users" if plan.axis.integer else "requests/s"
        target_text = f"; target {format_load(plan.target_load)} {target_unit}"
    table = Table(title=f"{plan.scenario}: {plan.model} on {plan.gpu} × {plan.tp} per replica; SLO {slo_text}"
                        f"{target_text}")
    columns = [f"max load ({unit})", "TTFT p99", "TPOT p99", "out tok/s", "probes"]
    if plan.target_load is not None:
        columns += ["replicas", "GPUs"]
    if plan.gpu_hour_cost_usd is not None:
        columns += ["$ / M out tok"]
        if plan.target_load is not None:
            columns += ["$ / hour"]
    table.add_column("run")
    for column in columns:
        table.add_column(column, justify="right")
    notes = []
    for run in plan.runs:
        point = run.max_load_point
        cells = [format_load(run.max_load) + (" ≥" if run.status in ("unbounded", "at_max_load") else ""),
                 _fmt_duration(None if point is None else point.ttft_p99_s),
                 _fmt_duration(None if point is None else point.tpot_p99_s),
                 "—" if point is None else f"{point.output_tokens_per_s:,.0f}",
                 f"{len(run.points)}"]
        if plan.target_load is not None:
            cells += ["—" if run.replicas_needed is None else f"{run.replicas_needed:,}",
                      "—" if run.gpus_needed is None else f"{run.gpus_needed:,}"]
        if plan.gpu_hour_cost_usd is not None:
            cells.append(_fmt_usd(run.cost_per_million_output_tokens_usd, decimals=3))
            if plan.target_load is not None:
                cells.append(_fmt_usd(run.cost_per_hour_usd, decimals=2))
        table.add_row(run.run, *cells)
        if run.status != "found":
            notes.append(f"{run.run}: {run.describe(unit)}")
    console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    console.print(f"Each load probed on one replica, seed {plan.seed}, to within {plan.tolerance:.0%}.",
                  highlight=False)


def _fmt_duration(value: float | None) -> str:
    from kvsim.report.formatting import format_duration_s

    return format_duration_s(value)


def _fmt_usd(value: float | None, *, decimals: int) -> str:
    return "—" if value is None else f"{value:,.{decimals}f}"


def _slo_label(key: str) -> str:
    """"ttft_p99_s" → "TTFT p99", "e2e_latency_p90_s" → "E2E latency p90"."""
    metric, percentile = key.removesuffix("_s").rsplit("_", 1)
    names = {"ttft": "TTFT", "tpot": "TPOT", "e2e_latency": "E2E latency"}
    return f"{names.get(metric, metric)} {percentile}"


# ---------------------------------------------------------------------- sweep


def sweep_command(
    sweep_file: Annotated[Path, typer.Argument(metavar="SWEEP", help="Sweep YAML file: base: scenario and grid: of settings.")],
    executor: Annotated[str, typer.Option(help="local: a pool of processes on this machine (--workers 1 runs in "
                                               "this process); ray: Ray tasks.")] = "local",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (auto, ray://HOST:10001); a local Ray "
                                                        "is started when omitted.")] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Variants simulated at once (default: the CPUs "
                                                               "available).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default reports/<sweep name>/); variants "
                                                     "already there are not run again.")] = None,
) -> None:
    """Simulate every variant of a grid of scenario settings and write sweep.csv, sweep.parquet and sweep.html."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from kvsim.sweep import load_sweep, run_sweep

    if executor not in ("local", "ray"):
        raise UserError(f"--executor: unknown executor {executor!r}; use local or ray")
    if address is not None and executor != "ray":
        raise UserError(f"--address {address} applies to --executor ray only; add --executor ray or leave out --address")
    loaded = load_sweep(sweep_file)
    out_dir = out if out is not None else Path("reports") / _safe_folder_name(loaded.name)
    prepare_output_folder(out_dir)

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task(f"sweep {loaded.name}", total=len(loaded.variants))

        def on_start(num_to_run: int, num_reused: int) -> None:
            progress.update(task, completed=num_reused)

        def on_record(record: dict[str, Any]) -> None:
            progress.advance(task)

        outcome = run_sweep(loaded, out_dir, executor=executor, workers=workers, address=address,
                            on_start=on_start, on_record=on_record)
    _print_sweep(loaded, outcome)


def _print_sweep(sweep: Any, outcome: Any) -> None:
    table = Table(title=f"sweep {sweep.name}: {len(sweep.variants)} variants of {sweep.spec.base}")
    columns = ["variant_id", *sweep.grid_keys, "run", "users_per_gpu", "ttft_p99_s", "tpot_p99_s", "slo_met"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("variant_id", "run") else "right")
    for row in outcome.table.astype(object).where(outcome.table.notna(), None).to_dict("records"):
        if row["error"]:
            table.add_row(row["variant_id"], *[_cell(row[key]) for key in sweep.grid_keys],
                          f"failed: {row['error']}", "", "", "", "")
            continue
        table.add_row(row["variant_id"], *[_cell(row[key]) for key in sweep.grid_keys], row["run"],
                      "—" if row["users_per_gpu"] is None else f"{row['users_per_gpu']:,.1f}",
                      _fmt_duration(row["ttft_p99_s"]), _fmt_duration(row["tpot_p99_s"]),
                      _slo_text(row["slo_met"]))
    console.print(table)
    console.print(f"ran {len(outcome.ran)} variants, reused {len(outcome.reused)} from "
                  f"{outcome.out_dir / 'variants'}/, {len(outcome.failed)} failed; "
                  f"table in {outcome.out_dir / 'sweep.csv'}; open {outcome.out_dir / 'sweep.html'}",
                  highlight=False)


def _slo_text(met: bool | None) -> str:
    if met is None:
        return "—"
    return "met" if met else "missed"


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}"
    return str(value)


__all__ = ["plan_command", "sweep_command"]
