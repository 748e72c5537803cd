"""A small hand-written calibration profile for the profile and calibrated-model tests."""

from __future__ import annotations

from kvsim.profile import DeviceLimits, FitSummary, KernelPath, OpCoefficients, Profile, ProfiledModel


def make_profile(coefficients: dict[str, OpCoefficients] | None = None, **changes) -> Profile:
    if coefficients is None:
        coefficients = {
            "gemm": OpCoefficients(fixed_s=1e-6, per_byte_s=1e-9, per_flop_s=1e-10, path="gemm_linear"),
            "attention_decode_paged": OpCoefficients(fixed_s=2e-6, per_seq_s=1e-7, per_byte_s=1e-10,
                                                     per_flop_s=1e-11, path="paged_chunked"),
            "attention_decode_contiguous": OpCoefficients(fixed_s=1e-6, per_byte_s=5e-11, path="contiguous_matmul"),
            "attention_prefill": OpCoefficients(fixed_s=3e-6, per_byte_s=2e-10, per_flop_s=2e-11,
                                                path="prefill_sdpa"),
        }
    fields = dict(
        device="test CPU",
        device_type="cpu",
        torch_version="2.13.0",
        dtype="fp32",
        threads=2,
        created_at="2026-01-01T00:00:00+00:00",
        model=ProfiledModel(name="tiny", attention_kind="GQA", num_layers=2, num_attention_heads=4,
                            num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=64),
        kernel_paths={"paged_chunked": KernelPath(op="attention_decode_paged", description="test")},
        device_limits=DeviceLimits(copy_bandwidth_bytes_per_s=1e11, matmul_flops_per_s=1e12),
        coefficients=coefficients,
        fit=FitSummary(median_abs_pct_error=0.03, p90_abs_pct_error=0.08, num_points=40, num_held_out=10,
                       holdout_rule="every 4th"),
    )
    fields.update(changes)
    return Profile(**fields)

