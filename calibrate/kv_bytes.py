"""The KV-cache tensors a serving engine keeps for one token, allocated for real.

The calibration pass allocates them and checks that their bytes equal
`ModelSpec.kv_bytes_per_token_per_rank`, so the simulator's capacity formula and the tensors the
kernels read cannot drift apart.
"""

from __future__ import annotations

import math

import torch

from kvsim.models import ModelSpec

TORCH_KV_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "int8": torch.int8,
}


def allocate_kv_for_tokens(model: ModelSpec, tp: int = 1, num_tokens: int = 1,
                           device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Allocate every layer's cache for `num_tokens` tokens on one TP rank, in `model.kv_dtype`.

    MHA, GQA and MQA keep a key and a value tensor `[tokens, kv_heads_per_rank, head_dim]` per layer;
    MLA keeps one latent `[tokens, kv_lora_rank + qk_rope_head_dim]` per layer, whole on every rank.
    int4 packs two elements per byte into uint8, as quantised caches store it.
    """
    tensors = []
    for _ in range(model.num_layers):
        if model.is_mla:
            shapes = [(num_tokens, model.kv_lora_rank + model.qk_rope_head_dim)]
        else:
            shapes = [(num_tokens, model.kv_heads_per_rank(tp), model.head_dim)] * 2
        for shape in shapes:
            tensors.append(_empty(shape, model.kv_dtype, device))
    return tensors


def _empty(shape: tuple[int, ...], kv_dtype: str, device: str | torch.device) -> torch.Tensor:
    if kv_dtype == "int4":
        packed = (*shape[:-1], math.ceil(shape[-1] / 2))
        return torch.empty(packed, dtype=torch.uint8, device=device)
    return torch.empty(shape, dtype=TORCH_KV_DTYPES[kv_dtype], device=device)


def tensor_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
