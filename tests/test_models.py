"""ModelSpec: KV bytes per token, parameter counts and config import, against hand-computed figures."""

import json
from pathlib import Path

import pytest

from kvsim.errors import UserError
from kvsim.models import AttentionKind, ModelSpec, load_preset, preset_names

SHARED_CONFIGS = Path(__file__).resolve().parents[1] / "kvsim" / "data" / "configs"


def test_textbook_70b_request_bytes():
    # 2 (K and V) · 80 layers · 64 heads · 128 dims · 4,096 tokens · 2 bytes (fp16)
    spec = load_preset("hypothetical-70B-MHA")
    per_request = spec.kv_bytes_per_token * 4096
    assert per_request == 2 * 80 * 64 * 128 * 4096 * 2 == 10_737_418_240
    assert per_request * 100 == 1_073_741_824_000  # ~1.07 TB for 100 users
    assert spec.attention_kind is AttentionKind.MHA


def test_llama2_70b_gqa_bytes():
    spec = load_preset("Llama-2-70B")
    assert spec.attention_kind is AttentionKind.GQA
    assert spec.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680


def test_deepseek_v3_mla_bytes():
    spec = load_preset("DeepSeek-V3")
    assert spec.attention_kind is AttentionKind.MLA
    assert spec.kv_elements_per_token == (512 + 64) * 61 == 35_136
    assert spec.kv_bytes_per_token == 576 * 61 * 2 == 70_272


def test_deepseek_v2_mla_elements():
    spec = load_preset("DeepSeek-V2")
    assert spec.kv_elements_per_token == 34_560


def test_opt13b_shaped_config_bytes():
    config = {"model_type": "opt", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
              "ffn_dim": 20480, "vocab_size": 50272, "torch_dtype": "float16"}
    spec = ModelSpec.from_hf_dict(config, name="opt-13b-shaped")
    # 2 · 40 layers · 5,120 hidden · 2 bytes = 800 KiB per token.
    assert spec.kv_bytes_per_token == 819_200
    assert spec.attention_kind is AttentionKind.MHA


@pytest.mark.parametrize("name", sorted(p.name for p in SHARED_CONFIGS.glob("*.json")))
def test_every_shipped_config_imports(name):
    spec = ModelSpec.from_hf_config(SHARED_CONFIGS / name)
    assert spec.kv_bytes_per_token > 0
    assert spec.num_params > 1e9


@pytest.mark.parametrize("name, expected", [("Llama-3.1-8B", 8.03e9), ("Llama-3.1-70B", 70.6e9)])
def test_llama31_parameter_counts(name, expected):
    params = load_preset(name).num_params
    assert abs(params - expected) / expected < 0.01


def test_moe_parameter_counts():
    # Published totals: Mixtral-8x7B 46.7 B, DeepSeek-V3 671 B (without its multi-token-prediction module).
    assert abs(load_preset("Mixtral-8x7B-v0.1").num_params - 46.7e9) / 46.7e9 < 0.01
    assert abs(load_preset("DeepSeek-V3").num_params - 671e9) / 671e9 < 0.01
    # Mixtral activates 2 of 8 experts: published 12.9 B active parameters.
    assert abs(load_preset("Mixtral-8x7B-v0.1").num_active_params - 12.9e9) / 12.9e9 < 0.01


def test_missing_head_dim_and_kv_heads(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 32,
                                "intermediate_size": 11008, "vocab_size": 32000}))
    spec = ModelSpec.from_hf_config(path)
    assert spec.head_dim == 128
    assert spec.num_kv_heads == 32
    assert spec.kv_bytes_per_token == 2 * 2 * 32 * 128 * 2  # bf16 default


def test_kv_dtypes_bytes():
    spec = load_preset("Llama-3.1-8B")
    per_element = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}
    for dtype, size in per_element.items():
        assert spec.with_changes(kv_dtype=dtype).kv_bytes_per_token == int(2 * 32 * 8 * 128 * size)


def test_tensor_parallel_kv_split_and_replication():
    spec = load_preset("Llama-3.1-70B")  # 8 KV heads
    assert spec.kv_bytes_per_token_per_rank(4) == 2 * 80 * 2 * 128 * 2
    # 16 ranks > 8 KV heads: each rank keeps one (replicated) head.
    assert spec.kv_heads_per_rank(16) == 1
    assert spec.kv_bytes_per_token_per_rank(16) == 2 * 80 * 1 * 128 * 2
    mla = load_preset("DeepSeek-V3")
    assert mla.kv_bytes_per_token_per_rank(8) == 70_272  # the latent is replicated on every rank
    assert spec.weight_bytes_per_rank(4) == pytest.approx(spec.weight_bytes / 4, abs=1)


def test_invalid_tp_rejected():
    with pytest.raises(UserError, match="tp=3 does not divide num_attention_heads"):
        load_preset("Llama-3.1-8B").check_tp(3)


def test_attention_variants():
    base = load_preset("Llama-3.1-8B")
    assert base.as_attention("MHA").kv_bytes_per_token == 2 * 32 * 32 * 128 * 2
    assert base.as_attention("MQA").kv_bytes_per_token == 2 * 32 * 1 * 128 * 2
    assert base.as_attention("MLA").kv_bytes_per_token == 32 * 576 * 2


def test_unknown_preset_lists_choices():
    with pytest.raises(UserError, match="unknown model preset 'nope'.*Llama-3.1-8B"):
        load_preset("nope")
    assert "hypothetical-70B-MHA" in preset_names()


def test_bad_config_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="invalid JSON at line 1"):
        ModelSpec.from_hf_config(path)
    with pytest.raises(UserError, match="not found"):
        ModelSpec.from_hf_config(tmp_path / "missing.json")
