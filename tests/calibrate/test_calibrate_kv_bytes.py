"""Bytes of the KV tensors the calibration pass allocates equal ModelSpec's KV bytes per token."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibrate.kv_bytes import allocate_kv_for_tokens, tensor_bytes  # noqa: E402
from kvsim.models import ModelSpec, load_preset  # noqa: E402

BASE = ModelSpec(name="base", num_layers=4, num_attention_heads=16, num_kv_heads=16, head_dim=64,
                 hidden_size=1024, intermediate_size=2816, vocab_size=1000)

KINDS = {
    "MHA": BASE.as_attention("MHA"),
    "GQA": BASE.as_attention("GQA", num_kv_heads=4),
    "MQA": BASE.as_attention("MQA"),
    "MLA": BASE.as_attention("MLA", kv_lora_rank=128, qk_rope_head_dim=32),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "bf16", "fp8", "int8", "int4"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_allocated_bytes_equal_formula(kind, kv_dtype, tp):
    model = KINDS[kind].with_changes(kv_dtype=kv_dtype)
    tensors = allocate_kv_for_tokens(model, tp=tp)
    assert tensor_bytes(tensors) == model.kv_bytes_per_token_per_rank(tp)


def test_bytes_scale_with_tokens():
    model = KINDS["GQA"]
    assert tensor_bytes(allocate_kv_for_tokens(model, num_tokens=7)) == 7 * model.kv_bytes_per_token_per_rank(1)


def test_hand_counted_bytes():
    # GQA, 4 layers x (K + V) x 4 KV heads x 64 dims x 2 bytes (bf16).
    assert tensor_bytes(allocate_kv_for_tokens(KINDS["GQA"])) == 4 * 2 * 4 * 64 * 2
    # MQA: one KV head.
    assert tensor_bytes(allocate_kv_for_tokens(KINDS["MQA"])) == 4 * 2 * 1 * 64 * 2
    # MLA: one latent of 128 + 32 elements per layer, whole on every rank.
    assert tensor_bytes(allocate_kv_for_tokens(KINDS["MLA"], tp=4)) == 4 * (128 + 32) * 2


def test_published_llama_and_deepseek_bytes():
    # Llama-3.1-8B: 32 layers, 8 KV heads of 128 in bf16 -> 2·32·8·128·2 = 131,072 B per token.
    assert tensor_bytes(allocate_kv_for_tokens(load_preset("Llama-3.1-8B"))) == 131072
    # DeepSeek-V3's HF config: 61 layers x (512 + 64) latent elements in bf16 = 70,272 B per token.
    assert tensor_bytes(allocate_kv_for_tokens(load_preset("DeepSeek-V3"))) == 70272
