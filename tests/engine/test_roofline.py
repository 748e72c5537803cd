"""The roofline step-time model against figures computed by hand for a tiny model and GPU."""

import numpy as np
import pytest

from kvsim.engine.latency import BatchShape, RooflineLatencyModel
from kvsim.hardware import GpuSpec
from kvsim.models import ModelSpec

# 2 layers, 4 query heads and 2 KV heads of 8, hidden 32, SwiGLU 64, vocabulary 100, fp16.
TINY = ModelSpec(name="tiny", num_layers=2, num_attention_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,
                 intermediate_size=64, vocab_size=100, weight_dtype="fp16", kv_dtype="fp16")

# Per layer: q 32·32 + k, v 2·32·16 + o 32·32 = 3,072; MLP 3·32·64 = 6,144; two norms 64 -> 9,280.
NON_EMBEDDING_PARAMS = 2 * 9280 + 32  # + the final norm
TABLE_PARAMS = 100 * 32  # input embedding and LM head, untied
STREAMED_WEIGHT_BYTES = (NON_EMBEDDING_PARAMS + TABLE_PARAMS) * 2  # LM head read, input table not
KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 8 * 2  # K and V, 2 layers, 2 KV heads of 8, fp16 = 128
ATTENTION_FLOPS_PER_PAIR = 2 * 2 * 4 * (8 + 8)  # 2 FLOPs × layers × heads × (key + value width)


def gpu(flops_per_s, interconnect=0.0):
    return GpuSpec(name="unit", memory_bytes=2**30, hbm_bandwidth_bytes_per_s=1e12, fp16_flops_per_s=flops_per_s,
                   interconnect_bandwidth_bytes_per_s=interconnect, pcie_bandwidth_bytes_per_s=64e9)


def model_on(device, tp=1):
    return RooflineLatencyModel(model=TINY, gpu=device, tp=tp, bandwidth_efficiency=1.0, compute_efficiency=1.0,
                                step_overhead_s=0.0, allreduce_latency_s=0.0)


def test_parameter_count_by_hand():
    assert TINY.num_params == NON_EMBEDDING_PARAMS + 2 * TABLE_PARAMS


def test_decode_memory_bound():
    roofline = model_on(gpu(flops_per_s=1e15))
    # Two sequences attending 100 and 300 tokens (their new tokens included).
    batch = BatchShape(np.array([1, 1]), np.array([100, 300]))
    moved = STREAMED_WEIGHT_BYTES + KV_BYTES_PER_TOKEN * (400 + 2)
    assert roofline.step_time_s(batch) == pytest.approx(moved / 1e12)
    assert roofline.decode_step_times_s(2, np.array([400]))[0] == pytest.approx(moved / 1e12)


def test_prefill_compute_bound():
    roofline = model_on(gpu(flops_per_s=1e6))
    # One chunk of 10 new tokens after 20 cached ones: causal pairs 10·30 − 10·9/2 = 255.
    batch = BatchShape(np.array([10]), np.array([30]))
    flops = 2 * NON_EMBEDDING_PARAMS * 10 + 2 * TABLE_PARAMS * 1 + ATTENTION_FLOPS_PER_PAIR * 255
    assert roofline.step_time_s(batch) == pytest.approx(flops / 1e6)


def test_tensor_parallel_allreduce_cost():
    roofline = RooflineLatencyModel(model=TINY, gpu=gpu(flops_per_s=1e15, interconnect=100e9), tp=2,
                                    bandwidth_efficiency=1.0, compute_efficiency=1.0, step_overhead_s=0.0,
                                    allreduce_latency_s=1e-6)
    batch = BatchShape(np.array([1]), np.array([100]))
    moved = STREAMED_WEIGHT_BYTES / 2 + (KV_BYTES_PER_TOKEN / 2) * 101
    # 4 all-reduces (2 per layer) of 32 bf16 values, ring factor 2·(2−1)/2 = 1, over 50 GB/s one way.
    allreduce_s = 4 * 32 * 2 * 1 / 50e9 + 4 * 1e-6
    assert roofline.step_time_s(batch) == pytest.approx(moved / 1e12 + allreduce_s)


def test_no_nvlink_uses_pcie():
    with_pcie = RooflineLatencyModel(model=TINY, gpu=gpu(flops_per_s=1e15), tp=2, bandwidth_efficiency=1.0,
                                     compute_efficiency=1.0, step_overhead_s=0.0, allreduce_latency_s=0.0)
    batch = BatchShape(np.array([1]), np.array([100]))
    moved = STREAMED_WEIGHT_BYTES / 2 + (KV_BYTES_PER_TOKEN / 2) * 101
    assert with_pcie.step_time_s(batch) == pytest.approx(moved / 1e12 + 4 * 32 * 2 / 32e9)
