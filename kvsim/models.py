"""Model shapes, KV-cache bytes per token, parameter counts and weight bytes.

A `ModelSpec` is a frozen description of a decoder-only transformer. MHA, GQA and MQA differ only in
`num_kv_heads`; MLA is selected by a non-zero `kv_lora_rank` and caches one latent of
`kv_lora_rank + qk_rope_head_dim` elements per token and layer instead of keys and values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from kvsim.errors import UserError, parse_json_object, read_user_file

# Bytes per element. int4 packs two elements in a byte.
DTYPE_BYTES: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}

# Spellings found in Hugging Face configs and on command lines.
_DTYPE_ALIASES = {
    "float32": "fp32",
    "float": "fp32",
    "float16": "fp16",
    "half": "fp16",
    "bfloat16": "bf16",
    "float8": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
    "e4m3": "fp8",
}


def normalize_dtype(name: str, field: str = "dtype") -> str:
    """Return the canonical short name of a dtype (`bf16`, `fp8`, ...), or raise UserError."""
    key = str(name).lower().strip()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        choices = ", ".join(DTYPE_BYTES)
        raise UserError(f"{field}: unknown dtype {name!r}; use one of {choices}")
    return key


class AttentionKind(str, Enum):
    MHA = "MHA"
    GQA = "GQA"
    MQA = "MQA"
    MLA = "MLA"


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Shape of a decoder-only transformer, as far as memory and step time depend on it."""

    name: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    # False for the two-matrix MLP of OPT-style models; True for SwiGLU (gate, up, down).
    mlp_gated: bool = True

    # Mixture of experts. `num_routed_experts == 0` means every layer has a dense MLP.
    num_routed_experts: int = 0
    num_active_experts: int = 0
    num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    num_dense_layers: int = 0  # leading layers that keep a dense MLP (DeepSeek `first_k_dense_replace`)

    # Multi-head latent attention. `kv_lora_rank == 0` means keys and values are cached per KV head.
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0

    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_position_embeddings: int = 4096

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_attention_heads", "num_kv_heads", "hidden_size", "vocab_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise UserError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        if self.head_dim <= 0 and not self.is_mla:
            raise UserError(f"model {self.name!r}: head_dim must be positive, got {self.head_dim}")
        if self.num_kv_heads > self.num_attention_heads:
            raise UserError(
                f"model {self.name!r}: num_kv_heads ({self.num_kv_heads}) exceeds "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise UserError(
                f"model {self.name!r}: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.is_mla and self.qk_rope_head_dim <= 0:
            raise UserError(f"model {self.name!r}: an MLA model needs qk_rope_head_dim > 0")
        if self.num_routed_experts and not 0 < self.num_active_experts <= self.num_routed_experts:
            raise UserError(
                f"model {self.name!r}: num_active_experts must be between 1 and num_routed_experts "
                f"({self.num_routed_experts}), got {self.num_active_experts}"
            )
        object.__setattr__(self, "weight_dtype", normalize_dtype(self.weight_dtype, "weight_dtype"))
        object.__setattr__(self, "kv_dtype", normalize_dtype(self.kv_dtype, "kv_dtype"))

    # ------------------------------------------------------------------ attention and KV cache

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def attention_kind(self) -> AttentionKind:
        if self.is_mla:
            return AttentionKind.MLA
        if self.num_kv_heads == self.num_attention_heads:
            return AttentionKind.MHA
        if self.num_kv_heads == 1:
            return AttentionKind.MQA
        return AttentionKind.GQA

    @property
    def kv_elements_per_token_per_layer(self) -> int:
        """Cached elements per token in one layer: 2·kv_heads·head_dim, or the MLA latent width."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def kv_elements_per_token(self) -> int:
        return self.num_layers * self.kv_elements_per_token_per_layer

    @property
    def kv_bytes_per_element(self) -> float:
        return DTYPE_BYTES[self.kv_dtype]

    @property
    def kv_bytes_per_token_per_layer(self) -> int:
        return math.ceil(self.kv_elements_per_token_per_layer * self.kv_bytes_per_element)

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token costs across all layers, counted once (no TP replication)."""
        return self.num_layers * self.kv_bytes_per_token_per_layer

    def kv_heads_per_rank(self, tp: int) -> int:
        """KV heads stored on each tensor-parallel rank; replicated when there are fewer heads than ranks."""
        self.check_tp(tp)
        if self.is_mla:
            return 1
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token_per_rank(self, tp: int = 1) -> int:
        """KV bytes per token on one TP rank: KV heads split across ranks, the MLA latent replicated."""
        self.check_tp(tp)
        if self.is_mla:
            # Every rank keeps the whole latent, because each rank's heads attend to all of it.
            return self.kv_bytes_per_token
        elements = 2 * self.kv_heads_per_rank(tp) * self.head_dim
        return self.num_layers * math.ceil(elements * self.kv_bytes_per_element)

    def check_tp(self, tp: int) -> None:
        """Raise UserError unless `tp` divides the attention heads and fits the KV heads as vLLM requires."""
        if tp < 1:
            raise UserError(f"tp must be at least 1, got {tp}")
        if self.num_attention_heads % tp != 0:
            raise UserError(
                f"model {self.name!r}: tp={tp} does not divide num_attention_heads "
                f"({self.num_attention_heads}); use a divisor of {self.num_attention_heads}"
            )
        if not self.is_mla and self.num_kv_heads % tp != 0 and tp % self.num_kv_heads != 0:
            raise UserError(
                f"model {self.name!r}: num_kv_heads ({self.num_kv_heads}) and tp={tp} must divide one another"
            )

    # ------------------------------------------------------------------ parameters and weights

    @property
    def q_heads_dim(self) -> int:
        """Width of one query head: head_dim, or nope + rope for MLA."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @functools.cached_property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        if self.is_mla:
            heads = self.num_attention_heads
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * heads * self.q_heads_dim
            else:
                q = h * heads * self.q_heads_dim
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_up = self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
            out = heads * self.v_head_dim * h
            return q + kv_down + kv_up + out
        q = h * self.num_attention_heads * self.head_dim
        kv = 2 * h * self.num_kv_heads * self.head_dim
        out = self.num_attention_heads * self.head_dim * h
        return q + kv + out

    def _mlp_params(self, intermediate: int) -> int:
        matrices = 3 if self.mlp_gated else 2
        return matrices * self.hidden_size * intermediate

    @property
    def num_moe_layers(self) -> int:
        if not self.num_routed_experts:
            return 0
        return self.num_layers - self.num_dense_layers

    @functools.cached_property
    def mlp_params_total(self) -> int:
        dense_layers = self.num_layers - self.num_moe_layers
        total = dense_layers * self._mlp_params(self.intermediate_size)
        if self.num_moe_layers:
            experts = self.num_routed_experts + self.num_shared_experts
            per_layer = experts * self._mlp_params(self.expert_intermediate_size)
            per_layer += self.hidden_size * self.num_routed_experts  # router
            total += self.num_moe_layers * per_layer
        return total

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def embedding_params(self) -> int:
        tables = 1 if self.tie_word_embeddings else 2
        return tables * self.vocab_size * self.hidden_size

    @functools.cached_property
    def num_params(self) -> int:
        """Parameter count: embeddings, attention, MLP or experts, and RMSNorm weights."""
        norms = self.num_layers * 2 * self.hidden_size + self.hidden_size
        return self.embedding_params + self.num_layers * self.attention_params_per_layer + self.mlp_params_total + norms

    @functools.cached_property
    def num_active_params(self) -> int:
        """Parameters one token touches: all of them for a dense model, the routed top-k for MoE."""
        if not self.num_moe_layers:
            return self.num_params
        idle_experts = self.num_routed_experts - self.num_active_experts
        idle = self.num_moe_layers * idle_experts * self._mlp_params(self.expert_intermediate_size)
        return self.num_params - idle

    @functools.cached_property
    def weight_bytes(self) -> int:
        return math.ceil(self.num_params * DTYPE_BYTES[self.weight_dtype])

    def weight_bytes_per_rank(self, tp: int = 1) -> int:
        """Weight bytes on one TP rank. Every matrix and the vocabulary are split; norms are ignored."""
        self.check_tp(tp)
        return math.ceil(self.weight_bytes / tp)

    # ------------------------------------------------------------------ variants

    def with_changes(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def as_attention(self, kind: str, *, num_kv_heads: int | None = None, kv_lora_rank: int = 512,
                     qk_rope_head_dim: int = 64) -> ModelSpec:
        """Return this model with another attention: MHA, GQA (with `num_kv_heads`), MQA or MLA.

        The MLA variant keeps the query heads and caches `kv_lora_rank + qk_rope_head_dim` elements per
        token and layer, with DeepSeek-V2's split of the head into 128 no-rope and 64 rope dimensions
        when the model had none.
        """
        kind = kind.upper()
        base = dict(kv_lora_rank=0, qk_rope_head_dim=0, qk_nope_head_dim=0, v_head_dim=0, q_lora_rank=0)
        head_dim = self.head_dim or self.v_head_dim
        if kind == "MHA":
            return self.with_changes(name=f"{self.name} (MHA)", num_kv_heads=self.num_attention_heads,
                                     head_dim=head_dim, **base)
        if kind == "MQA":
            return self.with_changes(name=f"{self.name} (MQA)", num_kv_heads=1, head_dim=head_dim, **base)
        if kind == "GQA":
            groups = num_kv_heads or 8
            return self.with_changes(name=f"{self.name} (GQA-{groups})", num_kv_heads=groups,
                                     head_dim=head_dim, **base)
        if kind == "MLA":
            return self.with_changes(
                name=f"{self.name} (MLA-{kv_lora_rank})",
                num_kv_heads=self.num_attention_heads,
                kv_lora_rank=kv_lora_rank,
                qk_rope_head_dim=qk_rope_head_dim,
                qk_nope_head_dim=self.qk_nope_head_dim or head_dim,
                v_head_dim=self.v_head_dim or head_dim,
                head_dim=head_dim,
            )
        raise UserError(f"unknown attention kind {kind!r}; use MHA, GQA, MQA or MLA")

    # ------------------------------------------------------------------ Hugging Face configs

    @classmethod
    def from_hf_config(cls, path: str | Path, *, name: str | None = None) -> ModelSpec:
        """Read a Hugging Face `config.json` (Llama, Mistral, Mixtral, Qwen2, DeepSeek-V2/V3, OPT)."""
        path = Path(path)
        text = read_user_file(path, "model config", "pass the path of a Hugging Face config.json")
        config = parse_json_object(text, path, "config.json")
        return cls.from_hf_dict(config, name=name or path.name.removesuffix(".json").removesuffix(".config"),
                                source=str(path))

    @classmethod
    def from_hf_dict(cls, config: dict[str, Any], *, name: str, source: str = "config") -> ModelSpec:
        def need(key: str, *alternatives: str) -> Any:
            for candidate in (key, *alternatives):
                if candidate in config:
                    return config[candidate]
            raise UserError(f"{source}: required field {key!r} is missing")

        model_type = str(config.get("model_type", ""))
        hidden = int(need("hidden_size", "d_model"))
        heads = int(need("num_attention_heads", "n_head"))
        layers = int(need("num_hidden_layers", "n_layer"))
        kv_heads = int(config.get("num_key_value_heads") or heads)  # absent means MHA
        kv_lora_rank = int(config.get("kv_lora_rank") or 0)
        if "head_dim" in config and config["head_dim"]:
            head_dim = int(config["head_dim"])
        elif kv_lora_rank:
            head_dim = int(config.get("v_head_dim") or 0)
        else:
            if hidden % heads:
                raise UserError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
            head_dim = hidden // heads

        intermediate = int(need("intermediate_size", "ffn_dim"))
        routed = int(config.get("n_routed_experts") or config.get("num_local_experts") or 0)
        moe_intermediate = int(config.get("moe_intermediate_size") or 0)
        dense_layers = int(config.get("first_k_dense_replace") or 0)

        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bf16")
        quant = config.get("quantization_config") or {}
        if isinstance(quant, dict) and str(quant.get("quant_method", "")).lower() == "fp8":
            dtype = "fp8"
        weight_dtype = normalize_dtype(dtype, f"{source}: torch_dtype")
        # The KV cache is kept in the activation dtype even when the weights are stored in fp8.
        kv_dtype = "bf16" if weight_dtype == "fp8" else weight_dtype

        return cls(
            name=name,
            num_layers=layers,
            num_attention_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=hidden,
            intermediate_size=intermediate,
            vocab_size=int(need("vocab_size")),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type == "opt")),
            mlp_gated=model_type != "opt",
            num_routed_experts=routed,
            num_active_experts=int(config.get("num_experts_per_tok") or 0) if routed else 0,
            num_shared_experts=int(config.get("n_shared_experts") or 0),
            moe_intermediate_size=moe_intermediate,
            num_dense_layers=dense_layers,
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=int(config.get("qk_rope_head_dim") or 0),
            qk_nope_head_dim=int(config.get("qk_nope_head_dim") or 0),
            v_head_dim=int(config.get("v_head_dim") or 0),
            q_lora_rank=int(config.get("q_lora_rank") or 0),
            weight_dtype=weight_dtype,
            kv_dtype=kv_dtype,
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
        )


# ---------------------------------------------------------------------- presets

HYPOTHETICAL_70B_MHA = ModelSpec(
    name="hypothetical-70B-MHA",
    num_layers=80,
    num_attention_heads=64,
    num_kv_heads=64,
    head_dim=128,
    hidden_size=8192,
    intermediate_size=28672,
    vocab_size=32000,
    weight_dtype="fp16",
    kv_dtype="fp16",
)
"""The textbook 70B case: Llama-2-70B's shape with one KV head per query head, which no released model has."""

OPT_13B = ModelSpec(
    name="OPT-13B",
    num_layers=40,
    num_attention_heads=40,
    num_kv_heads=40,
    head_dim=128,
    hidden_size=5120,
    intermediate_size=20480,
    vocab_size=50272,
    tie_word_embeddings=True,
    mlp_gated=False,
    weight_dtype="fp16",
    kv_dtype="fp16",
    max_position_embeddings=2048,
)
"""OPT-13B (facebook/opt-13b config: 40 layers, hidden 5120, 40 heads, FFN 20480), the PagedAttention paper's model."""

_BUILT_IN = {spec.name: spec for spec in (HYPOTHETICAL_70B_MHA, OPT_13B)}


def _config_dir():
    return resources.files("kvsim") / "data" / "configs"


def preset_names() -> list[str]:
    names = [entry.name.removesuffix(".json") for entry in _config_dir().iterdir() if entry.name.endswith(".json")]
    return sorted(names) + sorted(_BUILT_IN)


def load_preset(name: str) -> ModelSpec:
    """Return the preset `name`: a shipped Hugging Face config or a built-in shape."""
    if name in _BUILT_IN:
        return _BUILT_IN[name]
    lowered = {preset.lower(): preset for preset in preset_names()}
    canonical = lowered.get(name.lower())
    if canonical is None:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(preset_names())}")
    if canonical in _BUILT_IN:
        return _BUILT_IN[canonical]
    config = json.loads((_config_dir() / f"{canonical}.json").read_text())
    return ModelSpec.from_hf_dict(config, name=canonical, source=f"preset {canonical}")
