"""KV-cache capacity of one replica, estimated the way vLLM sizes its block pool.

vLLM profiles a forward pass of `max_num_batched_tokens` dummy tokens, then gives the KV cache what is
left of `gpu_memory_utilization` × GPU memory after weights, the activation peak of that pass and the
memory outside torch's allocator. kvsim cannot profile, so it estimates each term per TP rank:

    kv_bytes = memory_bytes × gpu_memory_utilization
               − weight_bytes / tp
               − activation_peak_bytes
               − runtime_overhead_bytes

- activation_peak_bytes: the MLP of one layer holds, per token, the residual stream (hidden), the
  fused gate/up output (2 × intermediate / tp) and the activated half (intermediate / tp) in the
  activation dtype; the sampler holds fp32 logits and probabilities for `max_num_seqs` sequences.
  Non-gated MLPs hold one intermediate tensor fewer; MoE layers use the routed experts' intermediate
  size × active experts.
- runtime_overhead_bytes: memory outside the activation profile (CUDA context, cuBLAS and NCCL
  workspaces, CUDA-graph pools); 0.75 GiB by default.

Check against a vLLM log: Llama-3.1-8B on an RTX 3090 (24 GiB) at gpu_memory_utilization 0.90,
max_model_len 20,480 without chunked prefill (so a 20,480-token profile pass) reported 3.81 GiB of KV
cache, 1,952 blocks of 16. This estimate gives 3.85 GiB, 1,972 blocks: 1.0% more
(tests/test_capacity.py recomputes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvsim.errors import UserError
from kvsim.hardware import GiB, GpuSpec
from kvsim.models import DTYPE_BYTES, ModelSpec

DEFAULT_RUNTIME_OVERHEAD_BYTES = int(0.75 * GiB)


@dataclass(frozen=True, kw_only=True)
class CapacityPlan:
    """One replica's GPU memory split per TP rank, and the KV capacity that results."""

    memory_bytes: int
    gpu_memory_utilization: float
    tp: int
    weight_bytes_per_rank: int
    activation_peak_bytes: int
    runtime_overhead_bytes: int
    kv_bytes_per_token_per_rank: int
    block_size: int
    kv_budget_bytes_per_rank: int
    num_blocks: int

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def block_bytes_per_rank(self) -> int:
        return self.block_size * self.kv_bytes_per_token_per_rank

    @property
    def kv_bytes_per_rank(self) -> int:
        """Bytes the block pool really allocates on each rank (whole blocks only)."""
        return self.num_blocks * self.block_bytes_per_rank

    def max_concurrency(self, tokens_per_request: int) -> float:
        return self.kv_capacity_tokens / tokens_per_request


def estimate_activation_peak_bytes(model: ModelSpec, *, tp: int, max_num_batched_tokens: int,
                                   max_num_seqs: int, activation_dtype: str = "bf16") -> int:
    """Peak activation bytes per rank of one forward pass over `max_num_batched_tokens` tokens."""
    act_bytes = DTYPE_BYTES[activation_dtype]
    if model.num_routed_experts:
        intermediate = model.expert_intermediate_size * (model.num_active_experts + model.num_shared_experts)
        intermediate = max(intermediate, model.intermediate_size if model.num_dense_layers else 0)
    else:
        intermediate = model.intermediate_size
    intermediate_tensors = 3 if model.mlp_gated else 1
    per_token = model.hidden_size + intermediate_tensors * intermediate / tp
    mlp_bytes = max_num_batched_tokens * per_token * act_bytes
    # The sampler materialises fp32 logits and the probabilities derived from them.
    sampler_bytes = min(max_num_seqs, max_num_batched_tokens) * model.vocab_size / tp * 4 * 2
    return math.ceil(mlp_bytes + sampler_bytes)


def plan_capacity(model: ModelSpec, gpu: GpuSpec, *, tp: int = 1, block_size: int = 16,
                  gpu_memory_utilization: float = 0.9, max_num_batched_tokens: int = 8192,
                  max_num_seqs: int = 256, activation_peak_bytes: int | None = None,
                  runtime_overhead_bytes: int | None = None, kv_capacity_tokens: int | None = None,
                  check_fits: bool = True) -> CapacityPlan:
    """Size the KV block pool of one replica.

    `kv_capacity_tokens` replaces the estimate with a fixed capacity (a what-if such as a large
    CPU-memory cache tier); the memory terms are still reported. Raises UserError when the model does
    not fit, naming both numbers and the settings to change.
    """
    if not 0 < gpu_memory_utilization <= 1:
        raise UserError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if block_size < 1:
        raise UserError(f"block_size must be at least 1, got {block_size}")
    weights = model.weight_bytes_per_rank(tp)
    if activation_peak_bytes is None:
        activation_dtype = model.weight_dtype if model.weight_dtype in ("fp16", "bf16", "fp32") else "bf16"
        activation_peak_bytes = estimate_activation_peak_bytes(
            model, tp=tp, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
            activation_dtype=activation_dtype)
    if runtime_overhead_bytes is None:
        runtime_overhead_bytes = DEFAULT_RUNTIME_OVERHEAD_BYTES

    usable = int(gpu.memory_bytes * gpu_memory_utilization)
    budget = usable - weights - activation_peak_bytes - runtime_overhead_bytes
    per_token = model.kv_bytes_per_token_per_rank(tp)
    block_bytes = block_size * per_token

    # The GPU must hold the weights, the activations and at least one KV block. A fixed capacity (a what-if
    # tier such as CPU memory) still needs the first three on the GPU.
    kv_needed = block_bytes if kv_capacity_tokens is None else 0
    if check_fits and budget < kv_needed:
        needed = weights + activation_peak_bytes + runtime_overhead_bytes + kv_needed
        raise UserError(
            f"model {model.name!r} does not fit {gpu.name} at tp={tp}: each GPU needs "
            f"{needed / GiB:.2f} GiB (weights {weights / GiB:.2f} GiB, activations "
            f"{activation_peak_bytes / GiB:.2f} GiB, runtime {runtime_overhead_bytes / GiB:.2f} GiB"
            f"{', one KV block' if kv_needed else ''}) but gpu_memory_utilization={gpu_memory_utilization} "
            f"allows {usable / GiB:.2f} GiB; raise tp, choose a larger GPU, a smaller weight_dtype, "
            f"or lower max_num_batched_tokens"
        )
    if kv_capacity_tokens is not None:
        num_blocks = kv_capacity_tokens // block_size
    else:
        num_blocks = max(0, budget // block_bytes)
    return CapacityPlan(
        memory_bytes=gpu.memory_bytes,
        gpu_memory_utilization=gpu_memory_utilization,
        tp=tp,
        weight_bytes_per_rank=weights,
        activation_peak_bytes=activation_peak_bytes,
        runtime_overhead_bytes=runtime_overhead_bytes,
        kv_bytes_per_token_per_rank=per_token,
        block_size=block_size,
        kv_budget_bytes_per_rank=budget,
        num_blocks=int(num_blocks),
    )
