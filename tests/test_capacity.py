"""KV capacity estimate against a real vLLM log, and the refusal when a model does not fit."""

import pytest

from kvsim.capacity import plan_capacity
from kvsim.errors import UserError
from kvsim.hardware import GPU_PRESETS, GiB, load_gpu
from kvsim.models import load_preset


def test_llama31_8b_on_rtx3090_matches_vllm_log():
    # vLLM reported 3.81 GiB of KV cache = 1,952 blocks of 16 for Llama-3.1-8B on an RTX 3090 (24 GiB),
    # gpu_memory_utilization 0.90, a 20k-token context profiled without chunked prefill.
    plan = plan_capacity(load_preset("Llama-3.1-8B"), load_gpu("RTX-3090"), gpu_memory_utilization=0.9,
                         max_num_batched_tokens=20480, max_num_seqs=256)
    assert abs(plan.num_blocks - 1952) / 1952 < 0.03
    assert abs(plan.kv_bytes_per_rank / GiB - 3.81) < 0.1


def test_capacity_by_hand_with_overrides():
    model = load_preset("Llama-3.1-8B")
    gpu = load_gpu("H100-SXM")
    plan = plan_capacity(model, gpu, activation_peak_bytes=GiB, runtime_overhead_bytes=GiB)
    budget = int(80 * GiB * 0.9) - 8_030_261_248 * 2 - 2 * GiB
    assert plan.num_blocks == budget // (16 * 131_072)
    assert plan.kv_capacity_tokens == plan.num_blocks * 16


def test_model_that_does_not_fit_names_both_numbers():
    with pytest.raises(UserError, match=r"needs .* GiB .* allows 21\.60 GiB; raise tp"):
        plan_capacity(load_preset("Llama-3.1-70B"), load_gpu("RTX-4090"))


def test_tp_splits_weights_and_kv():
    model = load_preset("Llama-3.1-70B")
    one = plan_capacity(model, load_gpu("H100-SXM"), tp=2)
    two = plan_capacity(model, load_gpu("H100-SXM"), tp=4)
    assert two.weight_bytes_per_rank * 2 == pytest.approx(one.weight_bytes_per_rank, abs=2)
    assert two.kv_capacity_tokens > 2 * one.kv_capacity_tokens


def test_gpu_presets_complete():
    expected = {"A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "H200", "B200", "L40S", "RTX-4090",
                "RTX-3090", "MI300X"}
    assert expected <= set(GPU_PRESETS)
    for gpu in GPU_PRESETS.values():
        assert gpu.source
        assert gpu.hbm_bandwidth_bytes_per_s > 1e11
