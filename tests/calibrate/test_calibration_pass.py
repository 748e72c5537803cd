"""The whole calibration pass on a tiny model and plan: the profile it writes, and a model built from it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibrate.plan import Plan  # noqa: E402
from calibrate.run import fit_profile_points, run_calibration, scaled_for_gemms, timed_gemm_shapes  # noqa: E402
from kvsim.engine.calibrated import CalibratedLatencyModel  # noqa: E402
from kvsim.engine.latency import BatchShape  # noqa: E402
from kvsim.errors import UserError  # noqa: E402
from kvsim.models import ModelSpec, load_preset  # noqa: E402
from kvsim.profile import Point, load_profile  # noqa: E402

TINY = ModelSpec(name="tiny", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=16, hidden_size=128,
                 intermediate_size=256, vocab_size=1000)

TINY_PLAN = Plan(
    dtype="fp32", warmup=0, reps=3, max_reps=3, target_relative_iqr=0.1, max_point_s=0.2,
    copy_bytes=8 << 20, matmul_size=128,
    comparison_batch=2, comparison_contexts=(64, 128), scratch_candidates=(16 << 10, 64 << 10),
    decode_batches=(1, 2), decode_contexts=(32, 64, 128), max_case_bytes=1 << 20,
    mla_batches=(1, 2), mla_contexts=(32, 64, 128), prefill_tokens=(2, 4, 8, 16, 32), prefill_prefixes=(0, 8),
    gemm_tokens=(1, 2, 4, 8, 16), gemm_scale=1.0, kinds_batch=2, kinds_context=64,
)

# The compiled paths are covered by the kernel tests; leaving them out here saves their compile time.
PATHS = ["contiguous_sdpa", "contiguous_matmul", "paged_gather_matmul", "paged_chunked", "prefill_sdpa",
         "mla_absorbed", "gemm_linear"]


@pytest.fixture(scope="module")
def pass_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "profile.json"
    calls = []
    profile = run_calibration(TINY, "cpu", quick=True, out=out, progress=lambda *args: calls.append(args),
                              plan=TINY_PLAN, kernel_paths=PATHS)
    return profile, out, calls


def test_profile_file_loads_back(pass_result):
    profile, out, _ = pass_result
    assert load_profile(out) == profile


def test_provenance(pass_result):
    profile, _, _ = pass_result
    assert profile.device_type == "cpu"
    assert profile.dtype == "fp32"
    assert profile.torch_version == torch.__version__
    assert profile.threads == torch.get_num_threads()
    assert profile.model.name == "tiny"
    assert profile.model.gemm_shapes == {"qkv": (1, 128, 128), "o": (1, 64, 128), "gate_up": (1, 128, 512),
                                         "down": (1, 256, 128)}


def test_paths_and_checks(pass_result):
    profile, _, _ = pass_result
    assert set(profile.kernel_paths) == set(PATHS)
    assert profile.kernel_paths["paged_gather_matmul"].gathers_first
    assert not profile.kernel_paths["paged_chunked"].gathers_first
    assert all(path.available for path in profile.kernel_paths.values())
    assert profile.kernel_paths["paged_chunked"].settings["scratch_bytes"] in TINY_PLAN.scratch_candidates
    assert profile.reference_checks
    assert all(check.passed for check in profile.reference_checks)


def test_points_and_fit(pass_result):
    profile, _, _ = pass_result
    ops = {point.op for point in profile.points}
    assert ops == {"attention_decode_paged", "attention_decode_contiguous", "mla_decode", "attention_prefill",
                   "attention_prefill_cached", "gemm:qkv", "gemm:o", "gemm:gate_up", "gemm:down"}
    assert set(profile.coefficients) == ops | {"gemm"}
    assert all(point.fitted_time_s is not None for point in profile.points)
    assert sum(point.held_out for point in profile.points) == profile.fit.num_held_out
    assert profile.fit.num_points == len(profile.points)
    assert 0 <= profile.fit.median_abs_pct_error <= profile.fit.p90_abs_pct_error


def test_decode_points_cover_kinds(pass_result):
    profile, _, _ = pass_result
    kinds = {point.params["kind"] for point in profile.points if point.op == "attention_decode_paged"}
    assert kinds == {"MHA", "GQA", "MQA"}
    point = next(p for p in profile.points if p.op == "attention_decode_paged" and p.params["kind"] == "GQA"
                 and p.params["batch"] == 2 and p.params["context_tokens"] == 64)
    # 2 sequences x 64 tokens x (K + V) x 2 KV heads x 16 dims x 4 bytes.
    assert point.bytes_moved == 2 * 64 * 2 * 2 * 16 * 4
    # 2 x 4 query heads x (16 + 16) FLOPs per (query, key) pair.
    assert point.flops == 2 * 64 * 2 * 4 * 32


def test_paged_comparison(pass_result):
    profile, _, _ = pass_result
    assert [c.context_tokens for c in profile.paged_vs_contiguous] == [64, 128]
    for comparison in profile.paged_vs_contiguous:
        assert comparison.best_paged_path in ("paged_chunked", "paged_gather_matmul")
        assert comparison.latency_ratio == pytest.approx(
            comparison.times_s[comparison.best_paged_path] / comparison.times_s[comparison.best_contiguous_path])


def test_attention_kinds(pass_result):
    profile, _, _ = pass_result
    by_kind = {point.kind: point for point in profile.attention_kinds}
    assert set(by_kind) == {"MHA", "GQA", "MQA", "MLA"}
    # The model's bf16 cache: 2 layers x 2 (K, V) x KV heads x 16 dims x 2 bytes.
    assert by_kind["MHA"].kv_bytes_per_token == 2 * 2 * 4 * 16 * 2
    assert by_kind["GQA"].kv_bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert by_kind["MQA"].kv_bytes_per_token == 2 * 2 * 1 * 16 * 2
    # MLA of as_attention: latent 512 + rope 64 per layer.
    assert by_kind["MLA"].kv_bytes_per_token == 2 * (512 + 64) * 2


def test_progress_reaches_total(pass_result):
    _, _, calls = pass_result
    completed = [done for _, done, _ in calls]
    assert completed == sorted(completed)
    assert calls[-1][1] == calls[-1][2]


def test_latency_model_from_profile(pass_result):
    profile, _, _ = pass_result
    model = CalibratedLatencyModel(profile, TINY)
    # Every layer GEMM was timed at the model's own shape; only the LM head uses the generic fit.
    assert model.describe()["extrapolated_from_model"].endswith("serve lm_head")
    short = model.step_time_s(BatchShape(num_new_tokens=[1, 1], context_tokens=[10, 10]))
    long = model.step_time_s(BatchShape(num_new_tokens=[1, 1], context_tokens=[1000, 1000]))
    assert 0 < short <= long


def test_unknown_path_is_a_user_error():
    with pytest.raises(UserError, match="kernel_paths: paged_magic not available on cpu"):
        run_calibration(TINY, "cpu", plan=TINY_PLAN, kernel_paths=["paged_magic"])


def test_quick_gemms_are_scaled():
    llama = load_preset("Llama-3.1-8B")
    shapes = {shape.name: shape.key for shape in timed_gemm_shapes(scaled_for_gemms(llama, 0.25))}
    # hidden 4096 -> 1024, MLP 14336 -> 3584, 32 / 8 heads of 128 -> 8 / 2.
    assert shapes == {"qkv": (1, 1024, (8 + 2 * 2) * 128), "o": (1, 8 * 128, 1024), "gate_up": (1, 1024, 7168),
                      "down": (1, 3584, 1024)}


def test_fit_marks_held_out_points():
    points = [Point(op="gemm:o", path="gemm_linear", params={"batch": 1, "in_features": 8, "out_features": 8},
                    num_seqs=0, bytes_moved=1000.0 * (i + 1), flops=0.0, time_s=1e-6 + 1e-9 * 1000 * (i + 1),
                    iqr_s=0.0, num_reps=3, bandwidth_fraction=0.1, flops_fraction=0.0) for i in range(8)]
    coefficients, updated, summary = fit_profile_points(points)
    assert [p.held_out for p in updated] == [False, False, False, True, False, False, False, True]
    assert coefficients["gemm:o"].shape == (1, 8, 8)
    assert coefficients["gemm:o"].per_byte_s == pytest.approx(1e-9, rel=1e-6)
    assert summary.median_abs_pct_error == pytest.approx(0.0, abs=1e-6)


def test_summary_names_paths_and_errors(pass_result):
    from rich.console import Console

    from calibrate.run import print_summary

    profile, out, _ = pass_result
    console = Console(record=True, width=200, emoji=False)
    print_summary(profile, out, console)
    text = console.export_text()
    assert "paged_chunked" in text
    assert "paged / contiguous latency by context: 64:" in text
    assert "gemm:o: median" in text
    assert f"wrote {out}" in text
