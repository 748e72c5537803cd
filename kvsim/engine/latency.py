"""Step-time models: how long one engine step takes for a given batch.

Two implementations share one protocol: `RooflineLatencyModel`, from a GPU's datasheet limits, and
the calibrated model in `kvsim.engine.calibrated`, from a measured profile. A decode span of many
steps is costed with one vectorised call, so the engine never loops over tokens in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from kvsim.hardware import GpuSpec
from kvsim.models import DTYPE_BYTES, ModelSpec


@dataclass(frozen=True)
class BatchShape:
    """One step's work: per scheduled sequence, the tokens computed now and the context they attend to.

    `context_tokens[i]` includes the sequence's cached tokens and its `num_new_tokens[i]` new ones.
    """

    num_new_tokens: np.ndarray
    context_tokens: np.ndarray

    @property
    def num_seqs(self) -> int:
        return int(self.num_new_tokens.shape[0])

    @property
    def total_new_tokens(self) -> int:
        return int(self.num_new_tokens.sum())


@runtime_checkable
class LatencyModel(Protocol):
    name: str

    def step_time_s(self, batch: BatchShape) -> float:
        """Duration of one step that computes `batch`."""

    def decode_step_times_s(self, num_seqs: int, total_context_tokens: np.ndarray) -> np.ndarray:
        """Durations of pure-decode steps: `num_seqs` sequences, one new token each.

        `total_context_tokens[j]` is the summed context of all sequences in step j (new tokens included).
        """

    def describe(self) -> dict[str, Any]:
        """Provenance for reports: which model, from what device or profile."""


@dataclass(frozen=True)
class RooflineLatencyModel:
    """Step time from datasheet limits: the slower of moving the bytes and doing the FLOPs, per rank.

    Per step and TP rank:
      bytes = weights / tp, less the input embedding table (read once per step, as batched GEMMs do;
              the embedding lookup reads only the rows it needs)
              + KV bytes of every attended context token on this rank + KV bytes of the new tokens
      flops = 2 × non-embedding parameters / tp per new token (GEMMs; active experts only for MoE)
              + 2 × vocabulary × hidden / tp per sequence (the LM head, for the one position sampled)
              + attention: 2 × layers × heads/tp × (key + value width) per (new token, attended token) pair
      time  = max(bytes / (bandwidth × bandwidth_efficiency), flops / (peak × compute_efficiency))
              + a fixed per-step overhead
              + with tp > 1, two ring all-reduces per layer of each new token's bf16 activations, over
                one direction of NVLink (or of PCIe where the GPU has no NVLink), plus a fixed latency
                per all-reduce

    The efficiencies stand for what real kernels achieve against the datasheet peaks. This is an
    estimate; a calibrated profile replaces it.

    NOTE: the efficiencies, the per-step overhead and the all-reduce latency are round guesses, not
    fitted to measurements.
    """

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    bandwidth_efficiency: float = 0.8
    compute_efficiency: float = 0.6
    step_overhead_s: float = 0.002
    """CPU-side scheduling and kernel-launch time per step (an estimate of vLLM V1 with CUDA graphs)."""
    allreduce_latency_s: float = 8e-6
    """Fixed cost of one small all-reduce (an estimate for NCCL within one node)."""
    name: str = "roofline"

    def __post_init__(self) -> None:
        # Every step is costed from these constants; computing them once keeps the per-step cost to a
        # few float operations.
        model, gpu, tp = self.model, self.gpu, self.tp
        heads = model.num_attention_heads / tp
        if model.is_mla:
            # Absorbed MLA attends over the latent: keys of kv_lora_rank + rope, values of kv_lora_rank.
            width = 2 * model.kv_lora_rank + model.qk_rope_head_dim
        else:
            width = 2 * model.head_dim
        table_params = model.vocab_size * model.hidden_size
        weight_bytes_per_element = DTYPE_BYTES[model.weight_dtype]
        streamed_weight_bytes = model.weight_bytes
        if not model.tie_word_embeddings:
            streamed_weight_bytes -= table_params * weight_bytes_per_element

        allreduce_s_per_token = 0.0
        allreduce_s_per_step = 0.0
        if tp > 1:
            # Datasheets give NVLink and PCIe bandwidth summed over both directions; a ring all-reduce
            # sends one way around the ring, so it gets half.
            link = gpu.interconnect_bandwidth_bytes_per_s or gpu.pcie_bandwidth_bytes_per_s
            ring = 2.0 * (tp - 1) / tp
            allreduces = 2 * model.num_layers
            allreduce_s_per_token = allreduces * DTYPE_BYTES["bf16"] * model.hidden_size * ring / (link / 2)
            allreduce_s_per_step = allreduces * self.allreduce_latency_s

        constants = {
            # NOTE: MoE weights are all counted as read each step, which holds for large batches and
            # overestimates small-batch decode, where only the routed experts are read.
            "_weight_bytes": streamed_weight_bytes / tp,
            "_kv_bytes_per_token": float(model.kv_bytes_per_token_per_rank(tp)),
            "_gemm_flops_per_token": 2.0 * (model.num_active_params - model.embedding_params) / tp,
            "_lm_head_flops_per_seq": 2.0 * table_params / tp,
            "_attention_flops_per_pair": 2.0 * model.num_layers * heads * width,
            "_bandwidth": gpu.hbm_bandwidth_bytes_per_s * self.bandwidth_efficiency,
            "_peak_flops": gpu.flops_per_s(model.weight_dtype) * self.compute_efficiency,
            "_allreduce_s_per_token": allreduce_s_per_token,
            "_fixed_s": self.step_overhead_s + allreduce_s_per_step,
        }
        for name, value in constants.items():
            object.__setattr__(self, name, value)

    def _time(self, new_tokens, num_seqs, context_new_products, context_tokens):
        """Step time; the arguments may be floats or numpy arrays of equal shape."""
        moved = self._weight_bytes + self._kv_bytes_per_token * (context_tokens + new_tokens)
        flops = (self._gemm_flops_per_token * new_tokens + self._lm_head_flops_per_seq * num_seqs
                 + self._attention_flops_per_pair * context_new_products)
        memory_s = moved / self._bandwidth
        compute_s = flops / self._peak_flops
        return np.maximum(memory_s, compute_s) + self._fixed_s + self._allreduce_s_per_token * new_tokens

    def step_time_s(self, batch: BatchShape) -> float:
        if batch.num_seqs == 0:
            return 0.0
        new = batch.num_new_tokens
        context = batch.context_tokens
        # A chunk of n new tokens over c context tokens attends to n × c − n × (n − 1)/2 pairs (causal).
        pairs = float(np.dot(new, context)) - float(np.dot(new, new - 1)) / 2.0
        new_tokens = float(new.sum())
        memory_s = (self._weight_bytes + self._kv_bytes_per_token * (float(context.sum()) + new_tokens)) / self._bandwidth
        compute_s = (self._gemm_flops_per_token * new_tokens + self._lm_head_flops_per_seq * batch.num_seqs
                     + self._attention_flops_per_pair * pairs) / self._peak_flops
        return max(memory_s, compute_s) + self._fixed_s + self._allreduce_s_per_token * new_tokens

    def decode_step_times_s(self, num_seqs: int, total_context_tokens: np.ndarray) -> np.ndarray:
        context = np.asarray(total_context_tokens, dtype=float)
        return self._time(float(num_seqs), float(num_seqs), context, context)

    def describe(self) -> dict[str, Any]:
        return {
            "latency_model": self.name,
            "gpu": self.gpu.name,
            "tp": self.tp,
            "bandwidth_efficiency": self.bandwidth_efficiency,
            "compute_efficiency": self.compute_efficiency,
            "step_overhead_s": self.step_overhead_s,
            "allreduce_latency_s": self.allreduce_latency_s,
        }
