"""The calibration pass: check every kernel path, time them, fit step-time terms, write the profile.

`run_calibration` is the library entry point; `main` adds a progress bar and a printed summary for
the command line (`kvsim calibrate`).
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

import kvsim
from calibrate import fit
from calibrate.attention import make_decode_case, mla_decode_absorbed
from calibrate.measure import CacheFlush, resolve_device
from calibrate.paths import DECODE_CONTIGUOUS, DECODE_PAGED, PATHS, available_paths, decode_paths
from calibrate.plan import Plan, make_plan
from calibrate.sweeps import (
    Context,
    attention_variants,
    compare_paged_contiguous,
    decode_features,
    measure_device_limits,
    mla_inputs,
    mla_variant,
    run_reference_checks,
    sweep_decode,
    sweep_gemms,
    sweep_mla,
    sweep_prefill,
    tune_scratch,
)
from kvsim.engine.calibrated import GemmShape, kv_bytes_per_token_per_layer, layer_gemms
from kvsim.errors import UserError
from kvsim.models import ModelSpec, load_preset
from kvsim.profile import (
    AttentionKindPoint,
    FitSummary,
    KernelPath,
    OpCoefficients,
    OpError,
    Point,
    Profile,
    ProfiledModel,
    write_profile,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]
"""Called as progress(message, completed_steps, total_steps) before each step of the pass."""

ATTENTION_TERMS = ("fixed_s", "per_seq_s", "per_byte_s", "per_flop_s")
GEMM_TERMS = ("fixed_s", "per_byte_s", "per_flop_s")


# ------------------------------------------------------------------------------------ shapes


def scaled_for_gemms(model: ModelSpec, scale: float) -> ModelSpec:
    """Return the model with hidden size, intermediate sizes and head counts multiplied by `scale`.

    Widths are rounded to multiples of 64, as real models' are. head_dim and the MLA ranks stay.
    """
    if scale == 1.0:
        return model

    def width(value: int) -> int:
        return max(64, int(round(value * scale / 64)) * 64) if value else 0

    heads = max(1, int(round(model.num_attention_heads * scale)))
    kv_heads = max(1, int(round(model.num_kv_heads * scale)))
    if heads % kv_heads:
        kv_heads = 1
    return model.with_changes(
        name=f"{model.name} (GEMMs at {scale:g}x)",
        hidden_size=width(model.hidden_size),
        intermediate_size=width(model.intermediate_size),
        moe_intermediate_size=width(model.moe_intermediate_size),
        num_attention_heads=heads,
        num_kv_heads=heads if model.is_mla else kv_heads,
    )


def timed_gemm_shapes(model: ModelSpec) -> list[GemmShape]:
    """Return one layer's GEMMs: attention projections, then the dense MLP or one routed (and the shared) expert.

    The LM head and the MoE router are not timed: at fp32 a 128K-vocabulary head is 2 GB, and
    both are served by the all-shapes `gemm` fit.
    """
    gemms = layer_gemms(model, tp=1)
    shapes = [*gemms.attention, *gemms.dense_mlp, *gemms.routed_expert, *gemms.shared_experts]
    unique: dict[tuple[int, int, int], GemmShape] = {}
    for shape in shapes:
        unique.setdefault(shape.key, shape)
    return list(unique.values())


# --------------------------------------------------------------------------------------- fit


def fit_profile_points(points: list[Point]) -> tuple[dict[str, OpCoefficients], list[Point], FitSummary]:
    """Fit every op kind, mark held-out points and their fitted times, and pool the errors."""
    by_op: dict[str, list[int]] = {}
    for index, point in enumerate(points):
        by_op.setdefault(point.op, []).append(index)

    coefficients: dict[str, OpCoefficients] = {}
    per_op: dict[str, OpError] = {}
    pooled: list[fit.OpFit] = []
    updated = list(points)
    for op, indices in by_op.items():
        members = [points[i] for i in indices]
        terms = GEMM_TERMS if op.startswith("gemm") else ATTENTION_TERMS
        result = fit.fit_with_holdout(members, terms)
        pooled.append(result)
        first = members[0]
        shape = None
        if op.startswith("gemm:"):
            shape = (int(first.params["batch"]), int(first.params["in_features"]), int(first.params["out_features"]))
        coefficients[op] = OpCoefficients(**result.coefficients, path=first.path, shape=shape)
        per_op[op] = OpError(median_abs_pct_error=result.median_abs_pct_error,
                             p90_abs_pct_error=result.p90_abs_pct_error,
                             num_held_out=int(result.held_out.sum()))
        for position, index in enumerate(indices):
            updated[index] = points[index].model_copy(update={
                "fitted_time_s": float(result.predicted_s[position]),
                "held_out": bool(result.held_out[position]),
            })

    gemm_points = [point for point in points if point.op.startswith("gemm:")]
    if gemm_points:
        result = fit.fit_with_holdout(gemm_points, GEMM_TERMS)
        coefficients["gemm"] = OpCoefficients(**result.coefficients, path="gemm_linear")
        per_op["gemm"] = OpError(median_abs_pct_error=result.median_abs_pct_error,
                                 p90_abs_pct_error=result.p90_abs_pct_error,
                                 num_held_out=int(result.held_out.sum()))

    median, p90, held_out = fit.pooled_errors(pooled)
    summary = FitSummary(median_abs_pct_error=median, p90_abs_pct_error=p90, num_points=len(points),
                         num_held_out=held_out, holdout_rule=fit.HOLDOUT_RULE, per_op=per_op)
    return coefficients, updated, summary


# ------------------------------------------------------------------------------------ progress


class _Steps:
    """Counts the pass's steps for a progress callback."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.completed = 0

    def __call__(self, message: str) -> None:
        logger.debug("calibration step %d/%d: %s", self.completed + 1, self.total, message)
        if self.callback is not None:
            self.callback(message, min(self.completed, self.total), self.total)
        self.completed += 1

    def finish(self) -> None:
        if self.callback is not None:
            self.callback("done", self.total, self.total)


def _count_steps(plan: Plan, model: ModelSpec, paths: list[str], num_gemms: int, dtype_bytes: int) -> int:
    decode = sum(
        1
        for variant in attention_variants(model).values()
        for batch in plan.decode_batches
        for context in plan.decode_contexts
        if decode_features(variant, batch, context, dtype_bytes)[0] <= plan.max_case_bytes
    )
    mla = sum(
        1
        for batch in plan.mla_batches
        for context in plan.mla_contexts
        if decode_features(mla_variant(model), batch, context, dtype_bytes)[0] <= plan.max_case_bytes
    )
    tuning = sum(path in ("paged_chunked", "paged_fused") for path in paths)
    kinds = 4
    return (1 + len(paths) + tuning + len(plan.comparison_contexts) + decode + mla
            + len(plan.prefill_prefixes) * len(plan.prefill_tokens) + num_gemms * len(plan.gemm_tokens) + kinds)


# ------------------------------------------------------------------------------------- the pass


def run_calibration(model: ModelSpec, device: str = "auto", quick: bool = False, out: Path | str | None = None,
                    progress: ProgressCallback | None = None, *, plan: Plan | None = None,
                    kernel_paths: list[str] | None = None, threads: int | None = None) -> Profile:
    """Run the calibration pass for `model` on `device` (auto, cpu or cuda) and return the profile.

    `quick` times scaled-down GEMMs and shorter contexts. When `out` is given the profile is
    written there atomically (a temporary file in the same folder, then a rename). `plan` replaces
    the device's default sizes; `kernel_paths` limits the pass to some paths (each decode kind
    needs at least one paged and one contiguous path). `threads` sets torch's intra-op CPU threads
    for the pass (torch's default otherwise) and is restored afterwards.
    """
    if threads is not None and threads < 1:
        raise UserError(f"threads must be at least 1, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model, device, quick, out, progress, plan, kernel_paths)
    finally:
        torch.set_num_threads(previous_threads)


def _run(model: ModelSpec, device: str, quick: bool, out: Path | str | None, progress: ProgressCallback | None,
         plan: Plan | None, kernel_paths: list[str] | None) -> Profile:
    started = time.perf_counter()
    torch_device = resolve_device(device)
    plan = plan or make_plan(torch_device.type, quick)
    paths = available_paths(torch_device)
    if kernel_paths is not None:
        unknown = sorted(set(kernel_paths) - set(paths))
        if unknown:
            raise UserError(f"kernel_paths: {', '.join(unknown)} not available on {torch_device.type}; "
                            f"choose from {', '.join(paths)}")
        paths = [path for path in paths if path in kernel_paths]
    gemm_model = scaled_for_gemms(model, plan.gemm_scale)
    gemm_shapes = timed_gemm_shapes(gemm_model)
    dtype_bytes = {"fp32": 4, "fp16": 2, "bf16": 2}[plan.dtype]
    steps = _Steps(progress, _count_steps(plan, model, paths, len(gemm_shapes), dtype_bytes))
    ctx = Context(device=torch_device, plan=plan, progress=steps, flush=CacheFlush(torch_device))
    cpu_use = _OtherCpuUse()
    notes: list[str] = []

    # Device limits, then every path against its reference; failed paths are not timed.
    ctx.limits = measure_device_limits(ctx)
    checks, failures = run_reference_checks(ctx, paths)
    for path, error in failures.items():
        logger.warning("kernel path %s is left out: %s", path, error)
    working = [path for path in paths if path not in failures]

    # Paged against contiguous decode at the comparison shape; the fastest of each kind is swept.
    comparison_model = attention_variants(model)["GQA"]
    tune_scratch(ctx, comparison_model, [path for path in working if path in decode_paths(torch_device)])
    decode_working = [path for path in working if path in decode_paths(torch_device)]
    comparisons = compare_paged_contiguous(ctx, comparison_model, decode_working)
    longest = comparisons[-1]
    chosen = {DECODE_PAGED: longest.best_paged_path, DECODE_CONTIGUOUS: longest.best_contiguous_path}

    points = sweep_decode(ctx, model, chosen)
    if "mla_absorbed" in working:
        points += sweep_mla(ctx, model)
    if "prefill_sdpa" in working:
        points += sweep_prefill(ctx, model)
    points += sweep_gemms(ctx, gemm_shapes)
    kinds = _measure_attention_kinds(ctx, model, chosen[DECODE_PAGED], "mla_absorbed" in working)
    steps.finish()

    coefficients, points, summary = fit_profile_points(points)
    kernel_paths = {
        name: KernelPath(op=PATHS[name].op, description=PATHS[name].description,
                         gathers_first=PATHS[name].gathers_first, available=name not in failures,
                         settings=({"scratch_bytes": ctx.scratch_bytes[name]} if name in ctx.scratch_bytes else {}),
                         error=failures.get(name))
        for name in paths
    }
    if longest.latency_ratio > 1.3:
        notes.append(f"best paged decode path {longest.best_paged_path} took {longest.latency_ratio:.2f}x the best "
                     f"contiguous one ({longest.best_contiguous_path}) at context {longest.context_tokens}")

    profile = Profile(
        kvsim_version=kvsim.__version__,
        device=_device_name(torch_device),
        device_type=torch_device.type,
        torch_version=torch.__version__,
        dtype=plan.dtype,
        threads=torch.get_num_threads(),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        quick=quick,
        duration_s=time.perf_counter() - started,
        block_size=plan.block_size,
        model=_profiled_model(model, plan.gemm_scale, gemm_shapes),
        kernel_paths=kernel_paths,
        reference_checks=checks,
        device_limits=ctx.limits,
        coefficients=coefficients,
        points=points,
        fit=summary,
        paged_vs_contiguous=comparisons,
        attention_kinds=kinds,
        notes=notes + cpu_use.notes(torch_device),
    )
    if out is not None:
        write_profile(profile, out)
    return profile


def _measure_attention_kinds(ctx: Context, model: ModelSpec, paged_path: str,
                             with_mla: bool) -> list[AttentionKindPoint]:
    """Decode time of one layer for MHA, GQA, MQA (chosen paged path) and MLA at one batch and context."""
    plan = ctx.plan
    batch, context = plan.kinds_batch, plan.kinds_context
    variants = dict(attention_variants(model))
    if with_mla:
        variants["MLA"] = mla_variant(model)
    results = []
    for kind, variant in variants.items():
        ctx.progress(f"{kind} decode at batch {batch}, context {context}")
        if kind == "MLA":
            q, latent = mla_inputs(ctx, variant, batch, context)
            scale = 1.0 / (variant.q_heads_dim**0.5)
            timing = ctx.time(lambda: mla_decode_absorbed(q, latent, variant.kv_lora_rank, scale))
            path = "mla_absorbed"
        else:
            case = make_decode_case(batch=batch, num_heads=variant.num_attention_heads, kv_heads=variant.num_kv_heads,
                                    head_dim=variant.head_dim, context_lens=[context] * batch,
                                    block_size=plan.block_size, dtype=ctx.dtype, device=ctx.device,
                                    layouts=("paged",), exact_random=False)
            runner = ctx.runner(paged_path)
            timing = ctx.time(lambda: runner(case))
            path = paged_path
        results.append(AttentionKindPoint(
            kind=kind, num_kv_heads=0 if kind == "MLA" else variant.num_kv_heads,
            kv_bytes_per_token=variant.kv_bytes_per_token_per_rank(1),
            kv_bytes_per_token_per_layer_profiled=int(kv_bytes_per_token_per_layer(variant, 1, ctx.dtype_bytes)),
            batch=batch, context_tokens=context, path=path, decode_time_s=timing.median_s,
        ))
    return results


def _profiled_model(model: ModelSpec, gemm_scale: float, shapes: list[GemmShape]) -> ProfiledModel:
    return ProfiledModel(
        name=model.name, attention_kind=model.attention_kind.value, num_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.v_head_dim, hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size, kv_lora_rank=model.kv_lora_rank,
        qk_rope_head_dim=model.qk_rope_head_dim, gemm_scale=gemm_scale,
        gemm_shapes={shape.name: shape.key for shape in shapes},
    )


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


class _OtherCpuUse:
    """CPU time that other processes took on this machine while the pass ran (Linux /proc/stat).

    CPU timings are only as good as the machine is quiet, and the 1-minute load average cannot tell
    the pass's own threads from other processes. This takes the machine's busy CPU time over the
    pass and subtracts the pass's own.
    """

    def __init__(self) -> None:
        self.started_s = time.perf_counter()
        self.machine_busy_s = self._machine_busy_s()
        self.own_s = self._own_s()

    @staticmethod
    def _machine_busy_s() -> float | None:
        try:
            with open("/proc/stat") as handle:
                fields = handle.readline().split()
        except OSError:
            return None
        # user nice system idle iowait irq softirq steal ...: everything but idle and iowait is busy.
        ticks = [int(value) for value in fields[1:9]]
        busy = sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime

    def share(self) -> float | None:
        """Other processes' CPU time as a fraction of the machine's CPU time over the pass."""
        busy = self._machine_busy_s()
        if busy is None or self.machine_busy_s is None:
            return None
        wall_s = time.perf_counter() - self.started_s
        others_s = (busy - self.machine_busy_s) - (self._own_s() - self.own_s)
        return max(0.0, others_s) / (wall_s * (os.cpu_count() or 1))

    def notes(self, device: torch.device, threshold: float = 0.05) -> list[str]:
        share = self.share()
        if device.type != "cpu" or share is None or share <= threshold:
            return []
        return [f"other processes used {share:.0%} of this machine's CPU time during the pass, so the CPU "
                "timings are slower and noisier than on an idle machine"]


# ----------------------------------------------------------------------------- command line


def resolve_model(name_or_path: str) -> ModelSpec:
    """Load a preset by name, or a model from the path of a Hugging Face config.json."""
    if name_or_path.endswith(".json"):
        return ModelSpec.from_hf_config(name_or_path)
    return load_preset(name_or_path)


def main(model_name: str, device: str = "auto", quick: bool = False, out: Path | str | None = None,
         show_progress: bool = True, threads: int | None = None) -> Profile:
    """Run the pass for a preset (or config.json) with a progress bar, print a summary and return the profile."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    model = resolve_model(model_name)
    console = Console(emoji=False)
    if not show_progress:
        profile = run_calibration(model, device, quick, out, threads=threads)
    else:
        columns = (TextColumn("[bold]calibrate[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), TextColumn("{task.description}"))
        # No auto-refresh, because rich's refresh thread would wake ten times a second during the
        # timed calls and compete with them for the GIL and the CPU. The bar is redrawn between
        # measurements instead.
        with Progress(*columns, console=console, transient=True, auto_refresh=False) as bar:
            task = bar.add_task("starting", total=None)

            def report(message: str, completed: int, total: int) -> None:
                bar.update(task, description=message, completed=completed, total=total)
                bar.refresh()

            profile = run_calibration(model, device, quick, out, progress=report, threads=threads)
    print_summary(profile, out, console)
    return profile


def print_summary(profile: Profile, out: Path | str | None, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(emoji=False)
    limits = profile.device_limits
    console.print(f"[bold]{profile.device}[/bold] ({profile.device_type}, {profile.dtype}, {profile.threads} threads, "
                  f"torch {profile.torch_version}); pass took {profile.duration_s:.0f} s"
                  f"{' (quick)' if profile.quick else ''}")
    console.print(f"copy bandwidth {limits.copy_bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
                  f"matmul {limits.matmul_flops_per_s / 1e9:.0f} GFLOP/s")

    table = Table(title=f"decode paths, batch {profile.paged_vs_contiguous[-1].batch}, "
                        f"{profile.paged_vs_contiguous[-1].num_attention_heads} query / "
                        f"{profile.paged_vs_contiguous[-1].num_kv_heads} KV heads (ms)")
    table.add_column("path")
    table.add_column("gathers first")
    for comparison in profile.paged_vs_contiguous:
        table.add_column(f"ctx {comparison.context_tokens}", justify="right")
    for name, path in profile.kernel_paths.items():
        if path.op not in (DECODE_PAGED, DECODE_CONTIGUOUS):
            continue
        if not path.available:
            table.add_row(name, str(path.gathers_first), f"left out: {path.error}")
            continue
        times = [f"{c.times_s[name] * 1e3:.2f}" if name in c.times_s else "-" for c in profile.paged_vs_contiguous]
        table.add_row(name, "yes" if path.gathers_first else "no", *times)
    console.print(table)
    ratios = ", ".join(f"{c.context_tokens}: {c.latency_ratio:.2f}x ({c.best_paged_path} / {c.best_contiguous_path})"
                       for c in profile.paged_vs_contiguous)
    console.print(f"paged / contiguous latency by context: {ratios}")

    fit_summary = profile.fit
    console.print(f"fit on {fit_summary.num_held_out} held-out of {fit_summary.num_points} points: median "
                  f"{fit_summary.median_abs_pct_error:.1%}, p90 {fit_summary.p90_abs_pct_error:.1%} abs error")
    for op, error in fit_summary.per_op.items():
        console.print(f"  {op}: median {error.median_abs_pct_error:.1%}, p90 {error.p90_abs_pct_error:.1%}")
    failed = [check for check in profile.reference_checks if not check.passed]
    console.print(f"reference checks: {len(profile.reference_checks) - len(failed)} of "
                  f"{len(profile.reference_checks)} within tolerance")
    for note in profile.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if out is not None:
        console.print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover - a convenience for running the pass without the kvsim CLI
    import argparse

    parser = argparse.ArgumentParser(description="Run the kvsim calibration pass.")
    parser.add_argument("--model", default="Llama-3.1-8B", help="preset name or path of a config.json")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes, about 2 minutes on a CPU")
    parser.add_argument("--out", type=Path, required=True, help="where to write the profile JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    try:
        main(args.model, args.device, args.quick, args.out, threads=args.threads)
    except UserError as exc:
        raise SystemExit(f"error: {exc}") from None
