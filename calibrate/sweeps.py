"""The measurements of the calibration pass: device limits, reference checks and the timed sweeps.

Each sweep returns `kvsim.profile.Point`s whose `bytes_moved` and `flops` come from the same
functions `kvsim.engine.calibrated` uses to serve the fit, so a fitted coefficient means the same
thing when it is measured and when it is applied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from calibrate.attention import (
    contiguous_context,
    decode_reference,
    make_decode_case,
    mla_decode_absorbed,
    mla_reference,
    paged_context,
    prefill_reference,
    prefill_sdpa,
    tolerance,
)
from calibrate.measure import CacheFlush, Timing, synchronize, time_call, time_interleaved
from calibrate.paths import (
    DECODE_CONTIGUOUS,
    DECODE_PAGED,
    GEMM,
    MLA_DECODE,
    PATHS,
    PREFILL,
    PREFILL_CACHED,
    DecodeRunner,
    is_paged,
)
from calibrate.plan import Plan
from kvsim.engine.calibrated import (
    GemmShape,
    attention_flops_per_pair,
    causal_pairs,
    kv_bytes_per_token_per_layer,
)
from kvsim.models import ModelSpec
from kvsim.profile import DeviceLimits, PagedComparison, Point, ReferenceCheck

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

Progress = Callable[[str], None]


@dataclass
class Context:
    """State shared by the sweeps: device, plan, device limits (for the fractions) and a progress hook."""

    device: torch.device
    plan: Plan
    limits: DeviceLimits | None = None
    progress: Progress = lambda message: None
    scratch_bytes: dict[str, int] = field(default_factory=dict)
    """Chunk buffer size chosen for each chunked paged path."""
    flush: CacheFlush | None = None
    """Run before every timed repetition, so that each kernel starts with cold caches."""

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.plan.dtype]

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.plan.dtype]

    def time(self, fn: Callable[[], object]) -> Timing:
        plan = self.plan
        return time_call(fn, self.device, warmup=plan.warmup, reps=plan.reps, max_reps=plan.max_reps,
                         target_relative_iqr=plan.target_relative_iqr, max_total_s=plan.max_point_s,
                         flush=self.flush)

    def point(self, *, op: str, path: str, params: dict, num_seqs: float, bytes_moved: float, flops: float,
              timing: Timing) -> Point:
        assert self.limits is not None, "measure the device limits before timing kernels"
        return Point(
            op=op, path=path, params=params, num_seqs=num_seqs, bytes_moved=bytes_moved, flops=flops,
            time_s=timing.median_s, iqr_s=timing.iqr_s, num_reps=timing.num_reps,
            bandwidth_fraction=bytes_moved / timing.median_s / self.limits.copy_bandwidth_bytes_per_s,
            flops_fraction=flops / timing.median_s / self.limits.matmul_flops_per_s,
        )

    def runner(self, path: str) -> DecodeRunner:
        return DecodeRunner(path, scratch_bytes=self.scratch_bytes.get(path, 4 << 20))


# -------------------------------------------------------------------------------- device limits


def measure_device_limits(ctx: Context) -> DeviceLimits:
    """Measure the copy bandwidth (bytes read + written per second) and square-matmul FLOP/s in the plan's dtype."""
    ctx.progress("device limits")
    plan, device = ctx.plan, ctx.device
    source = torch.ones(plan.copy_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy = time_call(lambda: target.copy_(source), device, warmup=2, reps=max(5, plan.reps), max_reps=plan.max_reps)
    bandwidth = 2 * plan.copy_bytes / copy.median_s
    del source, target

    n = plan.matmul_size
    a = torch.randn(n, n, device=device).to(ctx.dtype)
    b = torch.randn(n, n, device=device).to(ctx.dtype)
    c = torch.empty(n, n, dtype=ctx.dtype, device=device)
    matmul = time_call(lambda: torch.mm(a, b, out=c), device, warmup=2, reps=max(5, plan.reps), max_reps=plan.max_reps)
    return DeviceLimits(copy_bandwidth_bytes_per_s=bandwidth, matmul_flops_per_s=2.0 * n**3 / matmul.median_s)


# ----------------------------------------------------------------------------- reference checks


def _check(path: str, case: str, result: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype) -> ReferenceCheck:
    error = float((result.detach().double().cpu() - reference).abs().max())
    allowed = tolerance(dtype, reference)
    return ReferenceCheck(path=path, case=case, max_abs_error=error, tolerance=allowed, passed=error <= allowed)


def run_reference_checks(ctx: Context, paths: list[str]) -> tuple[list[ReferenceCheck], dict[str, str]]:
    """Compare every path with its float64 reference on small shapes; return the checks and the failures.

    A path that raises (a compiler missing for torch.compile, a Triton error) or exceeds its
    tolerance is reported in the failures and left out of the timings.
    """
    checks: list[ReferenceCheck] = []
    failures: dict[str, str] = {}
    for path in paths:
        ctx.progress(f"reference check {path}")
        try:
            path_checks = list(_reference_cases(ctx, path))
        except Exception as exc:  # any failure of a path disqualifies it; the pass goes on with the others
            failures[path] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            continue
        checks.extend(path_checks)
        failed = [check for check in path_checks if not check.passed]
        if failed:
            worst = max(failed, key=lambda check: check.max_abs_error / check.tolerance)
            failures[path] = (f"reference check {worst.case}: max abs error {worst.max_abs_error:.3g} "
                              f"exceeds tolerance {worst.tolerance:.3g}")
    return checks, failures


def _reference_cases(ctx: Context, path: str):
    device, dtype = ctx.device, ctx.dtype
    op = PATHS[path].op
    if op in (DECODE_CONTIGUOUS, DECODE_PAGED):
        runner = DecodeRunner(path, scratch_bytes=48 << 10)  # small buffer, so several chunks are exercised
        for kv_heads, kind in ((8, "MHA"), (2, "GQA"), (1, "MQA")):
            lens = [37, 64, 5, 50] if is_paged(path) else [48, 48, 48]
            case = make_decode_case(batch=len(lens), num_heads=8, kv_heads=kv_heads, head_dim=64, context_lens=lens,
                                    block_size=16, dtype=dtype, device=device, seed=kv_heads)
            if is_paged(path):
                keys = paged_context(case.k_pool.cpu(), case.block_table.cpu(), case.context_lens.cpu())
                values = paged_context(case.v_pool.cpu(), case.block_table.cpu(), case.context_lens.cpu())
            else:
                keys, values = contiguous_context(case.k.cpu()), contiguous_context(case.v.cpu())
            reference = decode_reference(case.q.cpu(), keys, values)
            yield _check(path, f"decode {kind} 8 heads / {kv_heads} KV heads, contexts {lens}",
                         runner(case), reference, dtype)
    elif op == PREFILL:
        generator = torch.Generator().manual_seed(1)
        for num_new, seq in ((12, 30), (16, 16)):
            q = torch.randn(1, 8, num_new, 64, generator=generator)
            k = torch.randn(1, 2, seq, 64, generator=generator)
            v = torch.randn(1, 2, seq, 64, generator=generator)
            result = prefill_sdpa(*(t.to(dtype=dtype, device=device) for t in (q, k, v)))
            reference = prefill_reference(*(t.to(dtype).double() for t in (q, k, v)))
            yield _check(path, f"prefill {num_new} new tokens over {seq}", result, reference, dtype)
    elif op == MLA_DECODE:
        generator = torch.Generator().manual_seed(2)
        rank, rope = 32, 16
        q = torch.randn(2, 4, rank + rope, generator=generator)
        latent = torch.randn(2, 40, rank + rope, generator=generator)
        scale = 1.0 / (48**0.5)
        result = mla_decode_absorbed(q.to(dtype=dtype, device=device), latent.to(dtype=dtype, device=device),
                                     rank, scale)
        reference = mla_reference(q.to(dtype), latent.to(dtype), rank, scale)
        yield _check(path, "absorbed MLA decode, rank 32 + rope 16, 40 tokens", result, reference, dtype)
    elif op == GEMM:
        generator = torch.Generator().manual_seed(3)
        for shape in (GemmShape("dense", 64, 48), GemmShape("per_head", 32, 24, batch=3)):
            cpu = torch.device("cpu")
            x = _gemm_input(shape, 5, torch.float32, cpu, generator)
            w = _gemm_weight(shape, torch.float32, cpu, generator)
            result = _gemm_call(shape, x.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device))()
            reference = _gemm_call(shape, x.to(dtype).double(), w.to(dtype).double())()
            yield _check(path, f"{shape.name} GEMM batch {shape.batch}, K {shape.in_features}, "
                         f"N {shape.out_features}, M 5", result, reference, dtype)


# ------------------------------------------------------------------------ paged vs contiguous


def decode_features(variant: ModelSpec, batch: int, context: int, dtype_bytes: int) -> tuple[float, float]:
    """KV bytes read and attention FLOPs of one layer's decode, as the calibrated model counts them."""
    total_context = batch * context
    kv_bytes = kv_bytes_per_token_per_layer(variant, 1, dtype_bytes) * total_context
    return kv_bytes, attention_flops_per_pair(variant, 1) * total_context


def tune_scratch(ctx: Context, variant: ModelSpec, paths: list[str]) -> None:
    """Pick the chunk buffer size of each chunked paged path at the comparison's largest shape."""
    chunked = [path for path in paths if path in ("paged_chunked", "paged_fused")]
    if not chunked:
        return
    plan = ctx.plan
    context = max(plan.comparison_contexts)
    case = make_decode_case(batch=plan.comparison_batch, num_heads=variant.num_attention_heads,
                            kv_heads=variant.num_kv_heads, head_dim=variant.head_dim,
                            context_lens=[context] * plan.comparison_batch, block_size=plan.block_size,
                            dtype=ctx.dtype, device=ctx.device, layouts=("paged",), exact_random=False)
    for path in chunked:
        ctx.progress(f"tune chunk size of {path}")
        runners = {size: DecodeRunner(path, scratch_bytes=size) for size in plan.scratch_candidates}
        timings = time_interleaved({str(size): (lambda r=runner: r(case)) for size, runner in runners.items()},
                                   ctx.device, warmup=1, reps=max(3, plan.reps // 2), flush=ctx.flush)
        ctx.scratch_bytes[path] = int(min(timings, key=lambda size: timings[size].median_s))


def compare_paged_contiguous(ctx: Context, variant: ModelSpec, paths: list[str]) -> list[PagedComparison]:
    """Time every decode path at each comparison context, interleaved so that load affects all alike."""
    plan = ctx.plan
    comparisons = []
    for context in plan.comparison_contexts:
        ctx.progress(f"paged vs contiguous at context {context}")
        case = make_decode_case(batch=plan.comparison_batch, num_heads=variant.num_attention_heads,
                                kv_heads=variant.num_kv_heads, head_dim=variant.head_dim,
                                context_lens=[context] * plan.comparison_batch, block_size=plan.block_size,
                                dtype=ctx.dtype, device=ctx.device, exact_random=False)
        runners = {path: ctx.runner(path) for path in paths}
        timings = time_interleaved({path: (lambda r=runner: r(case)) for path, runner in runners.items()},
                                   ctx.device, warmup=plan.warmup, reps=max(plan.reps, plan.max_reps // 2),
                                   flush=ctx.flush)
        times = {path: timing.median_s for path, timing in timings.items()}
        bandwidth = ctx.limits.copy_bandwidth_bytes_per_s
        fractions = {path: case.kv_bytes / time / bandwidth for path, time in times.items()}
        paged = [path for path in paths if is_paged(path) and not PATHS[path].gathers_first]
        paged = paged or [path for path in paths if is_paged(path)]
        contiguous = [path for path in paths if not is_paged(path)]
        best_paged = min(paged, key=times.__getitem__)
        best_contiguous = min(contiguous, key=times.__getitem__)
        comparisons.append(PagedComparison(
            context_tokens=context, batch=plan.comparison_batch, num_attention_heads=variant.num_attention_heads,
            num_kv_heads=variant.num_kv_heads, head_dim=variant.head_dim, block_size=plan.block_size,
            times_s=times, bandwidth_fractions=fractions, best_paged_path=best_paged,
            best_contiguous_path=best_contiguous, latency_ratio=times[best_paged] / times[best_contiguous],
        ))
        del case
    return comparisons


# ------------------------------------------------------------------------------------- sweeps


def attention_variants(model: ModelSpec) -> dict[str, ModelSpec]:
    """MHA, GQA and MQA forms of the model's attention, with its query heads and head size."""
    if model.attention_kind.value == "GQA":
        gqa_kv_heads = model.num_kv_heads
    elif model.num_attention_heads % 8 == 0:
        gqa_kv_heads = 8
    else:
        gqa_kv_heads = 1
    return {
        "MHA": model.as_attention("MHA"),
        "GQA": model.as_attention("GQA", num_kv_heads=gqa_kv_heads),
        "MQA": model.as_attention("MQA"),
    }


def mla_variant(model: ModelSpec) -> ModelSpec:
    if model.is_mla:
        return model
    return model.as_attention("MLA")


def sweep_decode(ctx: Context, model: ModelSpec, paths: dict[str, str]) -> list[Point]:
    """Decode points of each attention kind, batch and context, for the chosen paged and contiguous paths.

    `paths` maps the op kind (paged, contiguous) to the path measured for it.
    """
    plan = ctx.plan
    points = []
    for kind, variant in attention_variants(model).items():
        for batch in plan.decode_batches:
            for context in plan.decode_contexts:
                kv_bytes, flops = decode_features(variant, batch, context, ctx.dtype_bytes)
                if kv_bytes > plan.max_case_bytes:
                    continue
                ctx.progress(f"decode {kind} batch {batch} context {context}")
                case = make_decode_case(batch=batch, num_heads=variant.num_attention_heads,
                                        kv_heads=variant.num_kv_heads, head_dim=variant.head_dim,
                                        context_lens=[context] * batch, block_size=plan.block_size,
                                        dtype=ctx.dtype, device=ctx.device, exact_random=False)
                for op, path in paths.items():
                    runner = ctx.runner(path)
                    timing = ctx.time(lambda: runner(case))
                    params = {"kind": kind, "batch": batch, "context_tokens": context,
                              "num_attention_heads": variant.num_attention_heads,
                              "num_kv_heads": variant.num_kv_heads, "head_dim": variant.head_dim}
                    points.append(ctx.point(op=op, path=path, params=params, num_seqs=batch, bytes_moved=kv_bytes,
                                            flops=flops, timing=timing))
                del case
    return points


def mla_inputs(ctx: Context, variant: ModelSpec, batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = variant.kv_lora_rank + variant.qk_rope_head_dim
    generator = torch.Generator().manual_seed(context + batch)
    q = torch.randn(batch, variant.num_attention_heads, width, generator=generator).to(ctx.dtype).to(ctx.device)
    tile = torch.randn(width, generator=generator).to(ctx.dtype).to(ctx.device)
    latent = torch.empty(batch, context, width, dtype=ctx.dtype, device=ctx.device)
    latent.copy_(tile)  # broadcast: a repeated row fills the cache at copy speed
    return q, latent


def sweep_mla(ctx: Context, model: ModelSpec) -> list[Point]:
    plan = ctx.plan
    variant = mla_variant(model)
    scale = 1.0 / (variant.q_heads_dim**0.5)
    points = []
    for batch in plan.mla_batches:
        for context in plan.mla_contexts:
            kv_bytes, flops = decode_features(variant, batch, context, ctx.dtype_bytes)
            if kv_bytes > plan.max_case_bytes:
                continue
            ctx.progress(f"MLA decode batch {batch} context {context}")
            q, latent = mla_inputs(ctx, variant, batch, context)
            timing = ctx.time(lambda: mla_decode_absorbed(q, latent, variant.kv_lora_rank, scale))
            params = {"kind": "MLA", "batch": batch, "context_tokens": context,
                      "num_attention_heads": variant.num_attention_heads, "kv_lora_rank": variant.kv_lora_rank,
                      "qk_rope_head_dim": variant.qk_rope_head_dim}
            points.append(ctx.point(op=MLA_DECODE, path="mla_absorbed", params=params, num_seqs=batch,
                                    bytes_moved=kv_bytes, flops=flops, timing=timing))
    return points


def sweep_prefill(ctx: Context, model: ModelSpec) -> list[Point]:
    """Time causal prefill of one sequence for each (cached prefix, new tokens), in the model's head layout.

    Prompts without a cached prefix and chunks after one are fitted as separate ops, because
    torch's CPU kernel takes a different, masked path for the second.
    """
    plan = ctx.plan
    variant = attention_variants(model)["GQA"] if model.is_mla else model
    heads, kv_heads, head_dim = variant.num_attention_heads, variant.num_kv_heads, variant.head_dim
    points = []
    for prefix in plan.prefill_prefixes:
        for num_new in plan.prefill_tokens:
            seq = prefix + num_new
            ctx.progress(f"prefill {num_new} tokens after {prefix}")
            generator = torch.Generator().manual_seed(seq)
            q = torch.randn(1, heads, num_new, head_dim, generator=generator).to(ctx.dtype).to(ctx.device)
            k = torch.randn(1, kv_heads, seq, head_dim, generator=generator).to(ctx.dtype).to(ctx.device)
            v = torch.randn(1, kv_heads, seq, head_dim, generator=generator).to(ctx.dtype).to(ctx.device)
            timing = ctx.time(lambda: prefill_sdpa(q, k, v))
            kv_bytes = kv_bytes_per_token_per_layer(variant, 1, ctx.dtype_bytes) * seq
            flops = attention_flops_per_pair(variant, 1) * float(causal_pairs(num_new, seq))
            params = {"batch": 1, "new_tokens": num_new, "context_tokens": seq, "num_attention_heads": heads,
                      "num_kv_heads": kv_heads, "head_dim": head_dim}
            op = PREFILL if prefix == 0 else PREFILL_CACHED
            points.append(ctx.point(op=op, path="prefill_sdpa", params=params, num_seqs=1,
                                    bytes_moved=kv_bytes, flops=flops, timing=timing))
    return points


def _gemm_input(shape: GemmShape, rows: int, dtype: torch.dtype, device: torch.device,
                generator: torch.Generator) -> torch.Tensor:
    size = (rows, shape.in_features) if shape.batch == 1 else (shape.batch, rows, shape.in_features)
    return torch.randn(*size, generator=generator).to(dtype=dtype, device=device)


def _gemm_weight(shape: GemmShape, dtype: torch.dtype, device: torch.device,
                 generator: torch.Generator) -> torch.Tensor:
    """[N, K] as nn.Linear stores it, or [batch, K, N] for per-head products."""
    if shape.batch == 1:
        size = (shape.out_features, shape.in_features)
    else:
        size = (shape.batch, shape.in_features, shape.out_features)
    return torch.randn(*size, generator=generator).to(dtype=dtype, device=device)


def _gemm_call(shape: GemmShape, x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    if shape.batch == 1:
        return lambda: F.linear(x, w)
    return lambda: torch.bmm(x, w)


def sweep_gemms(ctx: Context, shapes: list[GemmShape]) -> list[Point]:
    """Time every GEMM shape at every token count M, creating each shape's weights once."""
    plan = ctx.plan
    points = []
    for shape in shapes:
        generator = torch.Generator().manual_seed(shape.in_features * 31 + shape.out_features)
        weight = _gemm_weight(shape, ctx.dtype, ctx.device, generator)
        for rows in plan.gemm_tokens:
            ctx.progress(f"GEMM {shape.name} M={rows}")
            x = _gemm_input(shape, rows, ctx.dtype, ctx.device, generator)
            timing = ctx.time(_gemm_call(shape, x, weight))
            params = {"name": shape.name, "tokens": rows, "batch": shape.batch, "in_features": shape.in_features,
                      "out_features": shape.out_features}
            points.append(ctx.point(op=f"gemm:{shape.name}", path="gemm_linear", params=params, num_seqs=0,
                                    bytes_moved=shape.bytes_moved(rows, ctx.dtype_bytes), flops=shape.flops(rows),
                                    timing=timing))
        del weight
        synchronize(ctx.device)
    return points
