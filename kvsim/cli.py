"""The `kvsim` command line: parse options, call the library, print or write results."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kvsim.cli_planning import plan_command, sweep_command
from kvsim.errors import UserError, prepare_output_folder

app = typer.Typer(
    name="kvsim",
    help="Capacity planner for LLM inference: how many users fit on how many GPUs, and which KV-cache "
         "strategy gets them there.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
trace_app = typer.Typer(help="Statistics and prefix hit rates of request traces.", no_args_is_help=True)
app.add_typer(trace_app, name="trace")



def _console_width(stream) -> int | None:
    # Rich falls back to 80 columns when output is not a terminal; tables here need more, unless the
    # user sets COLUMNS.
    return None if stream.isatty() or "COLUMNS" in os.environ else 140


console = Console(width=_console_width(sys.stdout))
err_console = Console(stderr=True, width=_console_width(sys.stderr))

GB = 1000**3
GiB = 1024**3


def main() -> None:
    """Console-script entry point: user errors print one message and exit with code 2, no traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as exc:
        # Printed as plain text: a message may quote brackets, such as pip's `kvsim[calibrate]`.
        err_console.print(Text.assemble(("error:", "bold red"), f" {exc}"), highlight=False, soft_wrap=True)
        sys.exit(2)


def _format_bytes(value: float) -> str:
    """Both decimal and binary units, since datasheets use GB and tools such as nvidia-smi use GiB."""
    if value >= 0.1 * GB:
        return f"{value / GB:,.2f} GB ({value / GiB:,.2f} GiB)"
    if value >= 1024:
        return f"{value / 1000:,.1f} kB ({value / 1024:,.1f} KiB)"
    return f"{value:,.0f} B"


# ---------------------------------------------------------------------- memory


def _resolve_model(model: str | None, config: Path | None, weight_dtype: str | None, kv_dtype: str | None):
    from kvsim.models import ModelSpec, load_preset, normalize_dtype

    if (model is None) == (config is None):
        raise UserError("give exactly one of --model NAME (a preset; see --list-models) or --config PATH "
                        "(a Hugging Face config.json)")
    spec = load_preset(model) if model is not None else ModelSpec.from_hf_config(config)
    changes = {}
    if weight_dtype:
        changes["weight_dtype"] = normalize_dtype(weight_dtype, "--weight-dtype")
    if kv_dtype:
        changes["kv_dtype"] = normalize_dtype(kv_dtype, "--kv-dtype")
    return spec.with_changes(**changes) if changes else spec


def memory_report(spec, *, seq_len: int, users: int, gpu_name: str | None, tp: int, block_size: int,
                  gpu_memory_utilization: float, max_num_batched_tokens: int, max_num_seqs: int,
                  activation_peak_gib: float | None, runtime_overhead_gib: float | None) -> dict[str, Any]:
    """Compute the figures `kvsim memory` prints for one model."""
    from kvsim.capacity import plan_capacity
    from kvsim.hardware import load_gpu

    spec.check_tp(tp)
    report: dict[str, Any] = {
        "model": spec.name,
        "attention_kind": spec.attention_kind.value,
        "kv_dtype": spec.kv_dtype,
        "weight_dtype": spec.weight_dtype,
        "num_params": spec.num_params,
        "seq_len": seq_len,
        "users": users,
        "kv_bytes_per_token": spec.kv_bytes_per_token,
        "kv_bytes_per_token_per_layer": spec.kv_bytes_per_token_per_layer,
        "kv_bytes_per_request": spec.kv_bytes_per_token * seq_len,
        "kv_bytes_total": spec.kv_bytes_per_token * seq_len * users,
        "weight_bytes": spec.weight_bytes,
        "weight_bytes_per_gpu": spec.weight_bytes_per_rank(tp),
        "tp": tp,
    }
    if gpu_name is not None:
        gpu = load_gpu(gpu_name)
        plan = plan_capacity(
            spec, gpu, tp=tp, block_size=block_size, gpu_memory_utilization=gpu_memory_utilization,
            max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            activation_peak_bytes=None if activation_peak_gib is None else int(activation_peak_gib * GiB),
            runtime_overhead_bytes=None if runtime_overhead_gib is None else int(runtime_overhead_gib * GiB),
        )
        report.update({
            "gpu": gpu.name,
            "gpu_memory_bytes": gpu.memory_bytes,
            "gpu_memory_utilization": gpu_memory_utilization,
            "kv_bytes_per_token_per_gpu": plan.kv_bytes_per_token_per_rank,
            "activation_peak_bytes": plan.activation_peak_bytes,
            "runtime_overhead_bytes": plan.runtime_overhead_bytes,
            "kv_cache_bytes_per_gpu": plan.kv_bytes_per_rank,
            "kv_capacity_blocks": plan.num_blocks,
            "block_size": block_size,
            "kv_capacity_tokens": plan.kv_capacity_tokens,
            "max_concurrency": plan.max_concurrency(seq_len),
            "gpus_for_users": _gpus_for_users(plan, seq_len, users, tp),
        })
    return report


def _gpus_for_users(plan, seq_len: int, users: int, tp: int) -> int | None:
    per_replica = plan.kv_capacity_tokens // seq_len
    if per_replica <= 0:
        return None
    replicas = -(-users // per_replica)
    return replicas * tp


@app.command()
def memory(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model preset name (see --list-models).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Path of a Hugging Face config.json.")] = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per request (prompt + output).")] = 4096,
    users: Annotated[int, typer.Option(min=1, help="Concurrent requests to size the total for.")] = 1,
    kv_dtype: Annotated[Optional[str], typer.Option(help="KV-cache dtype: fp32, fp16, bf16, fp8, int8, int4.")] = None,
    weight_dtype: Annotated[Optional[str], typer.Option(help="Weight dtype: fp32, fp16, bf16, fp8, int8, int4.")] = None,
    gpu: Annotated[Optional[str], typer.Option(help="GPU preset (see --list-gpus); adds capacity and concurrency.")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option(min=0.01, max=1.0, help="Share of GPU memory the engine may use.")] = 0.9,
    tp: Annotated[int, typer.Option(min=1, help="Tensor-parallel degree (GPUs per replica).")] = 1,
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per KV block.")] = 16,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="Token budget of one step; sizes the activation peak.")] = 8192,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Max sequences per batch; sizes the sampler's logits.")] = 256,
    activation_peak_gib: Annotated[Optional[float], typer.Option(min=0, help="Override the activation peak estimate, GiB per GPU.")] = None,
    runtime_overhead_gib: Annotated[Optional[float], typer.Option(min=0, help="Override the runtime reserve, GiB per GPU (default 0.75).")] = None,
    compare_attention: Annotated[bool, typer.Option("--compare-attention", help="Show the model as MHA, GQA, MQA and MLA side by side.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
    list_models: Annotated[bool, typer.Option("--list-models", help="List model presets and exit.")] = False,
    list_gpus: Annotated[bool, typer.Option("--list-gpus", help="List GPU presets and exit.")] = False,
) -> None:
    """KV-cache bytes per token, per request and for N users, and how many requests fit a GPU."""
    from kvsim.hardware import GPU_PRESETS
    from kvsim.models import preset_names

    if list_models:
        for name in preset_names():
            console.print(name)
        return
    if list_gpus:
        for name, spec in GPU_PRESETS.items():
            console.print(f"{name:<10} {spec.memory_bytes / GiB:>5.0f} GiB  {spec.source}", highlight=False)
        return
    spec = _resolve_model(model, config, weight_dtype, kv_dtype)
    options = dict(seq_len=seq_len, users=users, gpu_name=gpu, tp=tp, block_size=block_size,
                   gpu_memory_utilization=gpu_memory_utilization, max_num_batched_tokens=max_num_batched_tokens,
                   max_num_seqs=max_num_seqs, activation_peak_gib=activation_peak_gib,
                   runtime_overhead_gib=runtime_overhead_gib)
    report = memory_report(spec, **options)
    variants = []
    if compare_attention:
        for kind in ("MHA", "GQA", "MQA", "MLA"):
            variant = spec.as_attention(kind)
            try:
                variants.append(memory_report(variant, **options))
            except UserError as exc:
                variants.append({"model": variant.name, "attention_kind": kind, "error": str(exc)})
    if json_output:
        payload = dict(report)
        if compare_attention:
            payload["attention_variants"] = variants
        console.print_json(json.dumps(payload))
        return
    _print_memory(report)
    if compare_attention:
        _print_attention_comparison(report, variants)


def _print_memory(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['model']} ({report['attention_kind']}, KV {report['kv_dtype']})", show_header=False)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{report['num_params'] / 1e9:,.2f} B")
    table.add_row("weights", _format_bytes(report["weight_bytes"]))
    table.add_row("KV per token", f"{report['kv_bytes_per_token']:,} B ({report['kv_bytes_per_token'] / 1024:,.1f} KiB)")
    table.add_row(f"KV per request ({report['seq_len']:,} tokens)", _format_bytes(report["kv_bytes_per_request"]))
    table.add_row(f"KV for {report['users']:,} user{'s' if report['users'] != 1 else ''}", _format_bytes(report["kv_bytes_total"]))
    if "gpu" in report:
        tp = report["tp"]
        table.add_row("GPUs (TP)", f"{report['gpu']} × {tp}")
        table.add_row("gpu_memory_utilization", f"{report['gpu_memory_utilization']}")
        table.add_row("weights per GPU", _format_bytes(report["weight_bytes_per_gpu"]))
        table.add_row("activation peak per GPU", _format_bytes(report["activation_peak_bytes"]))
        table.add_row("runtime reserve per GPU", _format_bytes(report["runtime_overhead_bytes"]))
        table.add_row("KV cache per GPU", _format_bytes(report["kv_cache_bytes_per_gpu"]))
        table.add_row("KV capacity", f"{report['kv_capacity_tokens']:,} tokens = {report['kv_capacity_blocks']:,} "
                                     f"blocks of {report['block_size']}")
        table.add_row(f"max concurrency at {report['seq_len']:,} tokens", f"{report['max_concurrency']:.2f}×")
        gpus = report["gpus_for_users"]
        table.add_row(f"GPUs for {report['users']:,} user{'s' if report['users'] != 1 else ''}", "does not fit" if gpus is None else f"{gpus:,}")
    console.print(table)


def _print_attention_comparison(report: dict[str, Any], variants: list[dict[str, Any]]) -> None:
    table = Table(title="Same model, other attention designs")
    for column in ("attention", "KV per token", f"KV per request ({report['seq_len']:,} tok)", "KV capacity (tokens)",
                   "max concurrency"):
        table.add_column(column, justify="right")
    for entry in [report, *variants]:
        if "error" in entry:
            table.add_row(entry["model"], entry["error"], "", "", "")
            continue
        table.add_row(
            entry["model"],
            f"{entry['kv_bytes_per_token']:,} B",
            _format_bytes(entry["kv_bytes_per_request"]),
            f"{entry['kv_capacity_tokens']:,}" if "kv_capacity_tokens" in entry else "—",
            f"{entry['max_concurrency']:.1f}×" if "max_concurrency" in entry else "—",
        )
    console.print(table)


# ---------------------------------------------------------------------- run


def _load_profile(profile: Path | None):
    if profile is None:
        return None
    from kvsim.profile import load_profile

    return load_profile(profile)


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="Scenario YAML file.")],
    out: Annotated[Optional[Path], typer.Option(help="Output folder (default reports/<scenario name>/).")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="Calibration profile JSON for step times (default: roofline).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for every random stream (default: the scenario's).")] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Write data files only, no HTML or PNG.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print summary.json to standard output.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log kvsim's decisions at info level too.")] = False,
) -> None:
    """Simulate every strategy the scenario lists and write summary.json, CSVs and report.html."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from kvsim.scenario import load_scenario
    from kvsim.simulation import simulate, write_results

    if verbose:
        logging.getLogger("kvsim").setLevel(logging.INFO)
    loaded = load_scenario(scenario)
    profile_data = _load_profile(profile)
    out_dir = out if out is not None else Path("reports") / _safe_folder_name(loaded.name)
    runs = loaded.runs()
    for _, model in loaded.variant_models():
        loaded.capacity(model)  # a model that does not fit stops here, before any folder is created
    prepare_output_folder(out_dir)
    _warn_profile_device(profile_data, loaded)

    show_progress = not json_output and sys.stderr.isatty()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), console=err_console, disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"simulating {loaded.name}", total=len(runs))

        def on_run(current, result):
            if result is None:
                progress.update(task, description=f"simulating {current.key}")
            else:
                progress.advance(task)

        result = simulate(loaded, seed=seed, profile=profile_data, profile_path=profile, on_run=on_run)
    try:
        write_results(result, out_dir)
        if not no_report:
            from kvsim.report import render_report

            render_report(out_dir)
    except OSError as exc:
        raise UserError(f"--out: cannot write results to {out_dir} ({exc.strerror or exc}); "
                        f"choose a folder you can write to")
    summary = json.loads((out_dir / "summary.json").read_text())
    if json_output:
        console.print_json(json.dumps(summary))
        return
    _print_capacity_lines(result)
    _print_run_summary(summary, out_dir, no_report)
    _warn_rejected(summary, result.scenario.max_model_len)


def _safe_folder_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in name).strip("-.")
    return cleaned or "scenario"


def _format_latency(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 10:
        return f"{value:,.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{value * 1000:,.0f} ms"


def _print_capacity_lines(result) -> None:
    """Print one line per attention variant, in the form vLLM logs its KV-cache size at start-up."""
    max_model_len = result.scenario.max_model_len
    printed = set()
    for run_result in result.runs:
        variant = run_result.run.variant
        if variant in printed:
            continue
        printed.add(variant)
        tokens = run_result.capacity.kv_capacity_tokens
        label = "" if variant == "base" else f"{variant}: "
        console.print(f"{label}KV cache {tokens:,} tokens per replica; maximum concurrency for "
                      f"{max_model_len:,} tokens per request: {tokens / max_model_len:.2f}x", highlight=False)


def _warn_profile_device(profile, scenario) -> None:
    if profile is None:
        return
    device_type = getattr(profile, "device_type", None)
    if device_type == "cpu":
        err_console.print(Text.assemble(
            ("warning:", "yellow"),
            f" step times come from a profile measured on {getattr(profile, 'device', 'a CPU')} (a CPU), not on "
            f"{scenario.gpu.name}: latencies and throughput describe that CPU; memory, hits and preemption "
            f"counts do not depend on it"), highlight=False, soft_wrap=True)


def _warn_rejected(summary: dict[str, Any], max_model_len: int) -> None:
    counts = {key: entry.get("requests_rejected") or 0 for key, entry in summary["strategies"].items()}
    counts = {key: count for key, count in counts.items() if count}
    if not counts:
        return
    listed = ", ".join(f"{key} {count:,}" for key, count in counts.items())
    err_console.print(Text.assemble(
        ("warning:", "yellow"),
        f" requests rejected ({listed}): a prompt of max_model_len ({max_model_len:,}) tokens or more leaves no "
        f"room to generate, and a prompt larger than the KV cache never fits; raise engine.max_model_len or give "
        f"the KV cache more memory"), highlight=False, soft_wrap=True)


def _slo_label(slo_met: bool | None) -> str:
    if slo_met is None:
        return "—"
    return "met" if slo_met else "missed"


def _print_run_summary(summary: dict[str, Any], out_dir: Path, no_report: bool) -> None:
    scenario = summary["scenario"]
    gpus = scenario["tp"] * scenario["replicas"]
    table = Table(title=f"{scenario['name']}: {scenario['model']} on {gpus} × {scenario['gpu']} "
                        f"(step times: {summary['latency_model'].get('latency_model')})")
    table.add_column("run", no_wrap=True)
    for column in ("users under load", "peak batch", "token states", "prefix hit", "prefill computed",
                   "preempt.", "TTFT p99", "TPOT p99", "output tok/s", "SLO"):
        table.add_column(column, justify="right")
    for key, entry in summary["strategies"].items():
        slo = entry.get("slo_met")
        users = entry.get("saturated_concurrent_requests")
        table.add_row(
            key,
            "—" if users is None else f"{users:,.0f}",
            f"{entry['max_concurrent_requests']:,}",
            f"{entry['token_state_fraction']:.1%}",
            f"{entry['prefix_hit_rate_tokens']:.1%}",
            f"{entry['prefill_tokens_computed']:,}",
            f"{entry['preemptions']:,}",
            _format_latency(entry["ttft_s"]["p99"]),
            _format_latency(entry["tpot_s"]["p99"]),
            f"{entry['output_tokens_per_s']:,.0f}",
            _slo_label(slo),
        )
    console.print(table)
    console.print("users under load: requests in the batch, averaged over the time others queued; "
                  "token states: share of KV memory holding tokens, time-averaged", style="dim", highlight=False)
    target = out_dir / ("summary.json" if no_report else "report.html")
    console.print(f"results in {out_dir}/ — open {target}", highlight=False)


# ---------------------------------------------------------------------- report, compare


@app.command()
def report(out_dir: Annotated[Path, typer.Argument(help="A folder written by `kvsim run`.")]) -> None:
    """Render report.html and its charts again from a results folder, without simulating."""
    from kvsim.report import render_report

    _require_results(out_dir)
    path = render_report(out_dir)
    console.print(f"wrote {path}", highlight=False)


@app.command()
def compare(
    first: Annotated[Path, typer.Argument(help="A results folder.")],
    second: Annotated[Path, typer.Argument(help="Another results folder.")],
    out: Annotated[Optional[Path], typer.Option(help="Output HTML file (default: reports/compare-FIRST-vs-SECOND/compare.html).")] = None,
) -> None:
    """Set two result folders side by side in one HTML page."""
    from kvsim.report import compare_reports

    _require_results(first)
    _require_results(second)
    default = Path("reports") / _safe_folder_name(f"compare-{first.resolve().name}-vs-{second.resolve().name}")
    path = compare_reports(first, second, out or default / "compare.html")
    console.print(f"wrote {path}", highlight=False)


def _require_results(folder: Path) -> None:
    if not (folder / "summary.json").is_file():
        raise UserError(f"{folder}: no summary.json here; pass a folder written by `kvsim run`")


# ---------------------------------------------------------------------- validate


@app.command()
def validate(
    write: Annotated[bool, typer.Option("--write", help="Also regenerate docs/validation.md in the source checkout.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Run the fragmentation study with 1,000 requests instead of 4,000.")] = False,
) -> None:
    """Compare kvsim with published KV sizes, capacities, memory waste and prefix hit rates."""
    from kvsim.validation import validate_command

    validate_command(write=write, quick=quick)


# ---------------------------------------------------------------------- calibrate


@app.command()
def calibrate(
    model: Annotated[str, typer.Option("--model", "-m", help="Model preset, or a Hugging Face config.json, whose shapes are measured.")] = "Llama-3.1-8B",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="Scaled-down shapes (under a minute on a quiet 2-core CPU).")] = False,
    out: Annotated[Path, typer.Option(help="Profile JSON to write.")] = Path("profile.json"),
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Measure attention kernels and GEMMs on this device and fit a step-time profile."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: unknown device {device!r}; use auto, cpu or cuda")
    try:
        import calibrate as calibration
    except ImportError as exc:
        raise UserError(f"the calibration package is missing ({exc}); install kvsim with its calibrate extra: "
                        f"pip install -e '.[calibrate]'")
    calibration.main(model, device, quick, out, show_progress=sys.stderr.isatty(), threads=threads)


# ---------------------------------------------------------------------- trace


@trace_app.command("inspect")
def trace_inspect(
    path: Annotated[Path, typer.Argument(help="Trace file (Mooncake JSONL, Azure CSV, BurstGPT CSV, generic).")],
    format: Annotated[str, typer.Option(help="auto, mooncake, azure, burstgpt or generic.")] = "auto",
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per block when counting shared prefix blocks.")] = 512,
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Requests, duration, rate, length percentiles and prefix sharing of a trace."""
    from kvsim.workload.analysis import inspect_trace

    stats = inspect_trace(path, format, block_size=block_size)
    if json_output:
        console.print_json(json.dumps(stats, default=float))
        return
    table = Table(title=str(path), show_header=False)
    table.add_column("statistic")
    table.add_column("value", justify="right")
    for key, value in _flatten(stats):
        table.add_row(key, _format_stat(value))
    console.print(table)


@trace_app.command("hit-rate")
def trace_hit_rate(
    path: Annotated[Path, typer.Argument(help="Trace file.")],
    format: Annotated[str, typer.Option(help="auto, mooncake, azure, burstgpt or generic.")] = "auto",
    capacities: Annotated[str, typer.Option(help="Comma-separated cache capacities in blocks; 'inf' for unbounded.")] = "inf,100000,50000,30000,10000,1000",
    block_size: Annotated[int, typer.Option(min=1, help="Tokens per cached block.")] = 512,
    policies: Annotated[str, typer.Option(help="Comma-separated eviction policies: lru, lfu.")] = "lru,lfu",
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Prefix-cache hit rate of a trace by cache capacity and eviction policy."""
    from kvsim.workload.analysis import hit_rate_by_capacity
    from kvsim.workload.traces import open_trace

    parsed: list[int | None] = []
    for item in capacities.split(","):
        item = item.strip().lower()
        if item in ("inf", "unbounded", "none"):
            parsed.append(None)
            continue
        try:
            capacity = int(item)
        except ValueError:
            capacity = 0
        if capacity < 1:
            raise UserError(f"--capacities: {item!r} is not a positive whole number of blocks or 'inf'")
        parsed.append(capacity)
    policy_list = tuple(p.strip().lower() for p in policies.split(",") if p.strip())
    for policy in policy_list:
        if policy not in ("lru", "lfu"):
            raise UserError(f"--policies: unknown eviction policy {policy!r}; use lru or lfu")
    rows = hit_rate_by_capacity(open_trace(path, format).iter_requests(), parsed, policies=policy_list,
                                block_size=block_size)
    if json_output:
        console.print_json(json.dumps(rows, default=float))
        return
    table = Table(title=f"prefix hit rate of {path} ({block_size}-token blocks; first use of a block is a miss)")
    columns = ("policy", "capacity_blocks", "prefix_hit_rate_blocks", "prefix_hit_rate_tokens", "evicted_blocks")
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        capacity = row["capacity_blocks"]
        table.add_row(row["policy"], "unbounded" if capacity is None else f"{capacity:,}",
                      f"{row['prefix_hit_rate_blocks']:.3f}", f"{row['prefix_hit_rate_tokens']:.3f}",
                      f"{row['evicted_blocks']:,}")
    console.print(table)
    if all(row["hit_blocks"] == 0 for row in rows):
        console.print("No prompt shares a prefix with an earlier one. Traces that record lengths only, such as "
                      "Azure's, carry no prompt content, so kvsim gives every prompt its own tokens.",
                      style="dim", highlight=False)


def _format_stat(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{value}"
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.4g}"


def _flatten(stats: dict[str, Any], prefix: str = ""):
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + ".")
        else:
            yield name, value


# Registered last so that `kvsim --help` lists memory and run first.
app.command("plan")(plan_command)
app.command("sweep")(sweep_command)


if __name__ == "__main__":
    main()
