"""How much the calibration pass measures: shapes, repetitions and size limits per device type and mode.

The quick CPU plan is sized to finish in about two minutes on two cores. The full plans measure
the model's real GEMM shapes and longer contexts. GPU plans use bf16, the dtype engines serve in.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True, kw_only=True)
class Plan:
    dtype: str
    """Compute and cache dtype of every timed kernel: fp32 on the CPU, bf16 on CUDA."""
    warmup: int
    reps: int
    """Repetitions of every timed point; more, up to `max_reps`, while their spread stays wide."""
    max_reps: int
    target_relative_iqr: float
    """Repetitions continue past `reps` while the interquartile range exceeds this share of the median."""
    max_point_s: float
    """Stop repeating a point after this long (keeping at least 3 repetitions)."""
    copy_bytes: int
    """Size of the tensor copied to measure the copy bandwidth."""
    matmul_size: int
    """N of the N×N×N matmul that measures the matmul peak."""
    block_size: int = 16
    comparison_batch: int
    comparison_contexts: tuple[int, ...]
    scratch_candidates: tuple[int, ...]
    """Chunk buffer sizes tried for the chunked paged paths; the fastest is kept."""
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    max_case_bytes: int
    """Largest KV cache (keys + values, one layout) a decode case may allocate."""
    mla_batches: tuple[int, ...]
    mla_contexts: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    prefill_prefixes: tuple[int, ...]
    gemm_tokens: tuple[int, ...]
    gemm_scale: float
    """Factor on hidden size, intermediate size and head counts of the timed GEMMs."""
    kinds_batch: int
    kinds_context: int


def make_plan(device_type: str, quick: bool) -> Plan:
    if device_type == "cpu" and quick:
        return Plan(
            dtype="fp32", warmup=1, reps=7, max_reps=25, target_relative_iqr=0.05, max_point_s=0.6,
            copy_bytes=256 * MiB, matmul_size=1536,
            comparison_batch=8, comparison_contexts=(1024, 2048, 4096),
            scratch_candidates=(1 * MiB, 4 * MiB, 16 * MiB),
            decode_batches=(1, 2, 4, 8), decode_contexts=(512, 1024, 2048, 4096), max_case_bytes=256 * MiB,
            mla_batches=(1, 4, 8), mla_contexts=(512, 1024, 2048, 4096),
            prefill_tokens=(16, 32, 64, 128, 256), prefill_prefixes=(0, 256, 1024),
            gemm_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), gemm_scale=0.25,
            kinds_batch=4, kinds_context=1024,
        )
    if device_type == "cpu":
        return Plan(
            dtype="fp32", warmup=2, reps=9, max_reps=25, target_relative_iqr=0.05, max_point_s=4.0,
            copy_bytes=512 * MiB, matmul_size=2048,
            comparison_batch=8, comparison_contexts=(512, 1024, 2048, 4096, 8192),
            scratch_candidates=(1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB),
            decode_batches=(1, 2, 4, 8, 16), decode_contexts=(256, 1024, 2048, 4096, 8192),
            max_case_bytes=512 * MiB,
            mla_batches=(1, 4, 16), mla_contexts=(512, 2048, 8192),
            prefill_tokens=(16, 64, 128, 256, 512, 1024), prefill_prefixes=(0, 512, 2048),
            gemm_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), gemm_scale=1.0,
            kinds_batch=4, kinds_context=2048,
        )
    if quick:
        return Plan(
            dtype="bf16", warmup=3, reps=10, max_reps=30, target_relative_iqr=0.05, max_point_s=0.5,
            copy_bytes=1 * GiB, matmul_size=4096,
            comparison_batch=8, comparison_contexts=(1024, 4096, 16384),
            scratch_candidates=(64 * MiB, 512 * MiB),
            decode_batches=(1, 8, 32), decode_contexts=(1024, 4096, 16384), max_case_bytes=2 * GiB,
            mla_batches=(1, 8, 32), mla_contexts=(1024, 4096, 16384),
            prefill_tokens=(128, 256, 512, 1024, 2048), prefill_prefixes=(0, 2048, 8192),
            gemm_tokens=(1, 8, 64, 256, 1024, 4096), gemm_scale=1.0,
            kinds_batch=8, kinds_context=4096,
        )
    return Plan(
        dtype="bf16", warmup=5, reps=20, max_reps=50, target_relative_iqr=0.05, max_point_s=1.0,
        copy_bytes=2 * GiB, matmul_size=8192,
        comparison_batch=8, comparison_contexts=(1024, 4096, 16384, 65536),
        scratch_candidates=(64 * MiB, 512 * MiB),
        decode_batches=(1, 4, 16, 64, 256), decode_contexts=(512, 2048, 8192, 32768), max_case_bytes=8 * GiB,
        mla_batches=(1, 8, 64), mla_contexts=(1024, 8192, 32768),
        prefill_tokens=(128, 256, 512, 1024, 2048, 4096, 8192), prefill_prefixes=(0, 4096, 16384),
        gemm_tokens=(1, 2, 8, 32, 128, 512, 2048, 8192), gemm_scale=1.0,
        kinds_batch=16, kinds_context=8192,
    )
