"""CalibratedLatencyModel against step times worked out by hand from a tiny profile."""

from __future__ import annotations

import numpy as np
import pytest
from profile_factory import make_profile

from kvsim.engine.calibrated import CalibratedLatencyModel, expected_experts_touched, layer_gemms
from kvsim.engine.latency import BatchShape, LatencyModel
from kvsim.errors import UserError
from kvsim.models import ModelSpec, load_preset
from kvsim.profile import OpCoefficients

# 2 layers, 4 query heads, 2 KV heads of 8 dims, hidden 32, gated MLP of 64, vocabulary 100.
TINY = ModelSpec(name="tiny", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8,
                 hidden_size=32, intermediate_size=64, vocab_size=100)

# The tiny profile's generic GEMM fit, in fp32 (4 bytes per element):
#   t = 1e-6 + 1e-9 · 4·(M·K + K·N + M·N) + 1e-10 · 2·M·K·N
# Per layer: QKV 32 -> (4 + 2·2)·8 = 64, O 32 -> 32, gate_up 32 -> 2·64, down 64 -> 32; LM head 32 -> 100.


def gemm_s(m, k, n):
    return 1e-6 + 1e-9 * 4 * (m * k + k * n + m * n) + 1e-10 * 2 * m * k * n


def layer_gemms_s(m):
    return gemm_s(m, 32, 64) + gemm_s(m, 32, 32) + gemm_s(m, 32, 128) + gemm_s(m, 64, 32)


def batch(new, context):
    return BatchShape(num_new_tokens=np.array(new), context_tokens=np.array(context))


def test_is_a_latency_model():
    assert isinstance(CalibratedLatencyModel(make_profile(), TINY), LatencyModel)


def test_decode_step_by_hand():
    model = CalibratedLatencyModel(make_profile(), TINY)
    # Two sequences, contexts 10 and 20: 30 context tokens.
    # KV bytes per token and layer: 2 (K, V) · 2 heads · 8 dims · 4 B = 128  ->  3840 B.
    # FLOPs per (query, key) pair: 2 · 4 heads · 2·8 = 128                   ->  3840 FLOPs.
    attention_per_layer = 2e-6 + 1e-7 * 2 + 1e-10 * 3840 + 1e-11 * 3840
    expected = 2 * layer_gemms_s(2) + gemm_s(2, 32, 100) + 2 * attention_per_layer
    assert model.step_time_s(batch([1, 1], [10, 20])) == pytest.approx(expected, rel=1e-12)
    # The same number written out once: 9.57568e-5 (GEMMs) + 1.6136e-5 (LM head) + 5.2448e-6.
    assert expected == pytest.approx(1.171376e-4, rel=1e-9)


def test_prefill_step_by_hand():
    model = CalibratedLatencyModel(make_profile(), TINY)
    # One prompt of 4 tokens: causal pairs 4 + 3 + 2 + 1 = 10; context bytes 4 · 128 = 512.
    attention_per_layer = 3e-6 + 2e-10 * 512 + 2e-11 * 10 * 128
    expected = 2 * layer_gemms_s(4) + gemm_s(1, 32, 100) + 2 * attention_per_layer
    assert model.step_time_s(batch([4], [4])) == pytest.approx(expected, rel=1e-12)


def test_mixed_step_adds_both_kernels():
    model = CalibratedLatencyModel(make_profile(), TINY)
    decode = 2e-6 + 1e-7 + 1e-10 * 7 * 128 + 1e-11 * 7 * 128
    # Chunk of 3 new tokens after 5 cached: pairs 3 · (8 - 1) = 21, context 8 tokens.
    prefill = 3e-6 + 2e-10 * 8 * 128 + 2e-11 * 21 * 128
    expected = 2 * layer_gemms_s(4) + gemm_s(2, 32, 100) + 2 * (decode + prefill)
    assert model.step_time_s(batch([1, 3], [7, 8])) == pytest.approx(expected, rel=1e-12)


def test_cached_prefix_chunk_uses_its_fit():
    profile = make_profile()
    coefficients = dict(profile.coefficients)
    coefficients["attention_prefill_cached"] = OpCoefficients(fixed_s=9e-6, path="prefill_sdpa")
    model = CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), TINY)
    # A whole prompt of 4 tokens keeps the plain prefill fit; a chunk of 3 after 5 cached uses 9e-6.
    fresh = 3e-6 + 2e-10 * 4 * 128 + 2e-11 * 10 * 128
    expected = 2 * layer_gemms_s(7) + gemm_s(2, 32, 100) + 2 * (fresh + 9e-6)
    assert model.step_time_s(batch([4, 3], [4, 8])) == pytest.approx(expected, rel=1e-12)
    assert model.describe()["prefill_cached_op"] == "attention_prefill_cached"


def test_empty_step_takes_no_time():
    model = CalibratedLatencyModel(make_profile(), TINY)
    assert model.step_time_s(batch([], [])) == 0.0
    assert model.step_time_s(batch([0, 0], [5, 6])) == 0.0


def test_vectorised_decode_matches_single_steps():
    model = CalibratedLatencyModel(make_profile(), TINY)
    totals = np.array([30, 31, 32, 500])
    spans = model.decode_step_times_s(2, totals)
    for total, span in zip(totals, spans):
        assert span == pytest.approx(model.step_time_s(batch([1, 1], [total - 10, 10])), rel=1e-12)


def test_contiguous_path_uses_its_fit():
    model = CalibratedLatencyModel(make_profile(), TINY, attention_path="contiguous")
    attention_per_layer = 1e-6 + 5e-11 * 3840
    expected = 2 * layer_gemms_s(2) + gemm_s(2, 32, 100) + 2 * attention_per_layer
    assert model.step_time_s(batch([1, 1], [10, 20])) == pytest.approx(expected, rel=1e-12)
    assert model.describe()["decode_kernel"] == "contiguous_matmul"


def test_own_gemm_fit_replaces_generic():
    profile = make_profile()
    coefficients = dict(profile.coefficients)
    coefficients["gemm:qkv"] = OpCoefficients(fixed_s=5e-5, path="gemm_linear", shape=(1, 32, 64))
    model = CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), TINY)
    generic = CalibratedLatencyModel(profile, TINY)
    # Two layers, each QKV now 5e-5 instead of the generic time at M = 2.
    delta = 2 * (5e-5 - gemm_s(2, 32, 64))
    step = batch([1, 1], [10, 20])
    assert model.step_time_s(step) - generic.step_time_s(step) == pytest.approx(delta, rel=1e-9)


def test_extrapolation_reported_until_every_shape_is_fitted():
    profile = make_profile()
    described = CalibratedLatencyModel(profile, TINY).describe()
    assert "qkv, o, gate_up, down, lm_head" in described["extrapolated_from_model"]
    coefficients = dict(profile.coefficients)
    for name, shape in {"qkv": (1, 32, 64), "o": (1, 32, 32), "gate_up": (1, 32, 128), "down": (1, 64, 32),
                        "lm_head": (1, 32, 100)}.items():
        coefficients[f"gemm:{name}"] = OpCoefficients(fixed_s=1e-6, path="gemm_linear", shape=shape)
    fitted = CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), TINY)
    assert fitted.describe()["extrapolated_from_model"] is None


def test_mla_falls_back_to_decode_fit():
    mla = TINY.as_attention("MLA", kv_lora_rank=16, qk_rope_head_dim=8)
    model = CalibratedLatencyModel(make_profile(), mla)
    # Latent of 16 + 8 elements, 4 B each: 96 B per token; FLOPs per pair 2 · 4 heads · (2·16 + 8) = 320.
    attention_per_layer = 2e-6 + 1e-7 + 1e-10 * 96 * 50 + 1e-11 * 320 * 50
    gemm_part = model.gemm_time_s(1, 1)
    assert model.step_time_s(batch([1], [50])) == pytest.approx(gemm_part + 2 * attention_per_layer, rel=1e-12)
    assert model.describe()["decode_op"] == "attention_decode_paged"


def test_mla_fit_is_preferred():
    mla = TINY.as_attention("MLA", kv_lora_rank=16, qk_rope_head_dim=8)
    profile = make_profile()
    coefficients = dict(profile.coefficients)
    coefficients["mla_decode"] = OpCoefficients(fixed_s=7e-6, path="mla_absorbed")
    model = CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), mla)
    assert model.step_time_s(batch([1], [50])) == pytest.approx(model.gemm_time_s(1, 1) + 2 * 7e-6, rel=1e-12)


def test_missing_gemm_fit_is_a_user_error():
    profile = make_profile()
    coefficients = {k: v for k, v in profile.coefficients.items() if k != "gemm"}
    with pytest.raises(UserError, match="has no 'gemm' fit"):
        CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), TINY)


def test_missing_decode_fit_is_a_user_error():
    profile = make_profile()
    coefficients = {k: v for k, v in profile.coefficients.items() if k != "attention_decode_contiguous"}
    with pytest.raises(UserError, match="no 'attention_decode_contiguous' fit"):
        CalibratedLatencyModel(profile.model_copy(update={"coefficients": coefficients}), TINY,
                               attention_path="contiguous")


def test_allreduce_with_interconnect():
    plain = CalibratedLatencyModel(make_profile(), TINY, tp=2)
    linked = CalibratedLatencyModel(make_profile(), TINY, tp=2, interconnect_bandwidth_bytes_per_s=1e9)
    # Two allreduces per layer of 3 tokens · 32 hidden · 4 B, ring factor 2·(2-1)/2 = 1.
    expected = 2 * 2 * (3 * 32 * 4) * 1.0 / 1e9
    step = batch([1, 1, 1], [5, 6, 7])
    assert linked.step_time_s(step) - plain.step_time_s(step) == pytest.approx(expected, rel=1e-9)


def test_tensor_parallel_shapes_of_llama():
    gemms = layer_gemms(load_preset("Llama-3.1-8B"), tp=2)
    shapes = {shape.name: (shape.in_features, shape.out_features) for shape in gemms.all_shapes()}
    # 16 query heads and 4 KV heads of 128 per rank; MLP 14336 / 2; vocabulary 128256 / 2.
    assert shapes == {"qkv": (4096, (16 + 2 * 4) * 128), "o": (16 * 128, 4096), "gate_up": (4096, 14336),
                      "down": (7168, 4096), "lm_head": (4096, 64128)}


def test_experts_touched():
    assert expected_experts_touched(1, 8, 2) == pytest.approx(2.0)
    # Two tokens of top-2 over 8: each expert missed with probability (6/8)^2.
    assert expected_experts_touched(2, 8, 2) == pytest.approx(8 * (1 - 0.75**2))
    assert expected_experts_touched(10_000, 8, 2) == pytest.approx(8.0)


def test_moe_step_counts_touched_experts():
    moe = TINY.with_changes(name="tiny-moe", num_routed_experts=4, num_active_experts=2, moe_intermediate_size=16)
    model = CalibratedLatencyModel(make_profile(), moe)
    # One token: QKV + O, 2 experts of (gate_up 32 -> 32, down 16 -> 32) at M = 1, a router 32 -> 4.
    per_layer = (gemm_s(1, 32, 64) + gemm_s(1, 32, 32) + 2 * (gemm_s(1, 32, 32) + gemm_s(1, 16, 32))
                 + gemm_s(1, 32, 4))
    assert model.gemm_time_s(1, 1) == pytest.approx(2 * per_layer + gemm_s(1, 32, 100), rel=1e-12)


def test_invalid_settings():
    with pytest.raises(UserError, match="attention_path must be 'paged' or 'contiguous'"):
        CalibratedLatencyModel(make_profile(), TINY, attention_path="blocked")
    with pytest.raises(UserError, match="tp=3 does not divide"):
        CalibratedLatencyModel(make_profile(), TINY, tp=3)


def test_moe_without_dense_layers_has_no_dense_mlp():
    moe = TINY.with_changes(name="tiny-moe", num_routed_experts=4, num_active_experts=2, moe_intermediate_size=16)
    gemms = layer_gemms(moe)
    assert gemms.dense_mlp == ()
    assert [shape.name for shape in gemms.routed_expert] == ["expert_gate_up", "expert_down"]
    described = CalibratedLatencyModel(make_profile(), moe).describe()["extrapolated_from_model"]
    assert described.endswith("serve qkv, o, expert_gate_up, expert_down, router, lm_head")
