"""Step time from a calibration profile: fitted per-operation terms applied to the model's shapes.

One engine step, on one tensor-parallel rank, is costed as the sum of the operations a decoder
forward pass runs:

    per layer:  the layer's GEMMs at M = tokens computed this step (QKV, O, MLP or the routed experts)
                + attention: decode sequences through the decode kernel, prefill chunks through the
                  prefill kernel, each from its KV bytes read and its FLOPs
    once:       the LM head at M = sequences (logits of each sequence's last token)
                + two ring allreduces per layer when tp > 1, if an interconnect bandwidth is given
                + `step_overhead_s`

Each operation's time is `fixed_s + per_seq_s·seqs + per_byte_s·bytes + per_flop_s·FLOPs` with the
coefficients the profile fitted (see `kvsim.profile`). Bytes and FLOPs are counted in the profile's
dtype, because that is the dtype the timed kernels ran in.

NOTE: a profile measured in one dtype serves models of any dtype unchanged, so a CPU profile
(fp32) costs a bf16 model as if its weights and cache were fp32. `describe()` reports the
profile's dtype.

A GEMM whose (batch, K, N) was timed during calibration uses that matrix's own fit. Any other shape
uses the all-shapes `gemm` fit, and `describe()` then reports `extrapolated_from_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kvsim.engine.latency import BatchShape
from kvsim.errors import UserError
from kvsim.models import ModelSpec
from kvsim.profile import OpCoefficients, Profile

# ------------------------------------------------------------------------------------ layer shapes


@dataclass(frozen=True)
class GemmShape:
    """One matrix multiply of a layer on one TP rank: [M, K] @ [K, N], repeated `batch` times."""

    name: str
    in_features: int
    out_features: int
    batch: int = 1
    """Independent matrices of this shape applied to the same rows (per-head absorbed MLA products)."""

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.batch, self.in_features, self.out_features)

    def flops(self, num_rows: Any) -> Any:
        return 2.0 * num_rows * self.in_features * self.out_features * self.batch

    def bytes_moved(self, num_rows: Any, dtype_bytes: float) -> Any:
        """Input, weight and output bytes; the weights dominate at small M, the activations at large M."""
        elements = (num_rows * self.in_features + self.in_features * self.out_features
                    + num_rows * self.out_features)
        return elements * self.batch * dtype_bytes


@dataclass(frozen=True)
class LayerGemms:
    """The GEMMs of one model, grouped by the number of rows each multiplies in a step."""

    attention: tuple[GemmShape, ...]
    """M = tokens computed this step."""
    dense_mlp: tuple[GemmShape, ...]
    """M = tokens; in every layer of a dense model and the leading dense layers of an MoE model (else empty)."""
    routed_expert: tuple[GemmShape, ...] = ()
    """One routed expert; M = the tokens routed to it."""
    shared_experts: tuple[GemmShape, ...] = ()
    """The shared experts of an MoE layer as one MLP; M = tokens."""
    router: tuple[GemmShape, ...] = ()
    lm_head: GemmShape | None = None
    """M = sequences in the step."""

    def all_shapes(self) -> list[GemmShape]:
        shapes = [*self.attention, *self.dense_mlp, *self.routed_expert, *self.shared_experts, *self.router]
        if self.lm_head is not None:
            shapes.append(self.lm_head)
        return shapes


def _mlp(prefix: str, hidden: int, intermediate: int, gated: bool) -> tuple[GemmShape, ...]:
    up_width = 2 * intermediate if gated else intermediate
    up_name = "gate_up" if gated else "up"
    return (GemmShape(f"{prefix}{up_name}", hidden, up_width), GemmShape(f"{prefix}down", intermediate, hidden))


def layer_gemms(model: ModelSpec, tp: int = 1) -> LayerGemms:
    """Return the GEMM shapes of `model` on one rank of `tp`, split the way vLLM shards them.

    Column-parallel matrices (QKV, gate/up) split their outputs by `tp`, row-parallel ones (O, down)
    their inputs. MLA's down-projections to the latent (`q_a`, `kv_a`) are replicated on every rank.
    """
    model.check_tp(tp)
    hidden = model.hidden_size
    heads = model.num_attention_heads // tp

    if model.is_mla:
        rope, nope = model.qk_rope_head_dim, model.qk_nope_head_dim or model.head_dim
        v_dim = model.v_head_dim or model.head_dim
        rank = model.kv_lora_rank
        q_width = heads * (nope + rope)
        if model.q_lora_rank:
            query = (GemmShape("q_a", hidden, model.q_lora_rank), GemmShape("q_b", model.q_lora_rank, q_width))
        else:
            query = (GemmShape("q", hidden, q_width),)
        # NOTE: every step is costed in the absorbed form (queries multiplied into the latent space,
        # outputs projected out of it per head). vLLM uses it for decode; for prefill it up-projects
        # the latent to full keys and values instead, which this does not model.
        attention = (
            *query,
            GemmShape("kv_a", hidden, rank + rope),
            GemmShape("q_absorb", nope, rank, batch=heads),
            GemmShape("v_absorb", rank, v_dim, batch=heads),
            GemmShape("o", heads * v_dim, hidden),
        )
    else:
        kv_heads = model.kv_heads_per_rank(tp)
        attention = (
            GemmShape("qkv", hidden, (heads + 2 * kv_heads) * model.head_dim),
            GemmShape("o", heads * model.head_dim, hidden),
        )

    has_dense_layers = model.num_layers > model.num_moe_layers
    dense = _mlp("", hidden, model.intermediate_size // tp, model.mlp_gated) if has_dense_layers else ()
    routed: tuple[GemmShape, ...] = ()
    shared: tuple[GemmShape, ...] = ()
    router: tuple[GemmShape, ...] = ()
    if model.num_moe_layers:
        expert_width = model.expert_intermediate_size // tp
        routed = _mlp("expert_", hidden, expert_width, model.mlp_gated)
        if model.num_shared_experts:
            shared = _mlp("shared_", hidden, model.num_shared_experts * expert_width, model.mlp_gated)
        router = (GemmShape("router", hidden, model.num_routed_experts),)

    lm_head = GemmShape("lm_head", hidden, model.vocab_size // tp)
    return LayerGemms(attention=attention, dense_mlp=dense, routed_expert=routed, shared_experts=shared,
                      router=router, lm_head=lm_head)


def expected_experts_touched(num_tokens: Any, num_experts: int, num_active: int) -> Any:
    """Expected distinct experts hit by `num_tokens` tokens that each pick `num_active` of `num_experts`.

    Assumes uniform, independent routing: each expert is missed by one token with probability
    1 − k/E, so it is hit by at least one of T tokens with probability 1 − (1 − k/E)^T.
    """
    miss = 1.0 - num_active / num_experts
    return num_experts * (1.0 - np.power(miss, num_tokens))


# ------------------------------------------------------------------------------- attention shapes


def attention_flops_per_pair(model: ModelSpec, tp: int) -> float:
    """FLOPs of QKᵀ and PV for one (new token, context token) pair on one rank.

    Absorbed MLA scores against the whole latent (kv_lora_rank + rope) and sums values of kv_lora_rank.
    """
    heads = model.num_attention_heads / tp
    if model.is_mla:
        return 2.0 * heads * (2 * model.kv_lora_rank + model.qk_rope_head_dim)
    return 2.0 * heads * 2 * model.head_dim


def kv_bytes_per_token_per_layer(model: ModelSpec, tp: int, dtype_bytes: float) -> float:
    """Cache bytes one context token costs one layer's attention on one rank, in `dtype_bytes` per element."""
    if model.is_mla:
        return (model.kv_lora_rank + model.qk_rope_head_dim) * dtype_bytes
    return 2 * model.kv_heads_per_rank(tp) * model.head_dim * dtype_bytes


def causal_pairs(num_new_tokens: np.ndarray, context_tokens: np.ndarray) -> np.ndarray:
    """(query, key) pairs a causal chunk of n new tokens over c context tokens attends: n·(c − (n−1)/2)."""
    new = np.asarray(num_new_tokens, dtype=float)
    return new * (np.asarray(context_tokens, dtype=float) - (new - 1.0) / 2.0)


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class CalibratedLatencyModel:
    """Step time of `model` on one rank of `tp`, from the terms fitted in `profile`."""

    profile: Profile
    model: ModelSpec
    tp: int = 1
    attention_path: Literal["paged", "contiguous"] = "paged"
    """Decode kernel whose fit is used: the block-table one (as in vLLM and SGLang) or a contiguous cache."""
    interconnect_bandwidth_bytes_per_s: float = 0.0
    """GPU-to-GPU bandwidth for the TP allreduces; 0 leaves them out (the profile times one device)."""
    step_overhead_s: float = 0.0
    """Per-step host time (scheduling, sampling) that the profile's kernel timings do not contain."""
    name: str = "calibrated"
    _gemms: LayerGemms = field(init=False, repr=False)
    _gemm_fits: dict[str, OpCoefficients] = field(init=False, repr=False)
    _generic_gemms: tuple[str, ...] = field(init=False, repr=False)
    _decode_op: str = field(init=False, repr=False)
    _prefill_op: str = field(init=False, repr=False)
    _prefill_cached_op: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model.check_tp(self.tp)
        if self.attention_path not in ("paged", "contiguous"):
            raise UserError(f"attention_path must be 'paged' or 'contiguous', got {self.attention_path!r}")
        if self.step_overhead_s < 0 or self.interconnect_bandwidth_bytes_per_s < 0:
            raise UserError("step_overhead_s and interconnect_bandwidth_bytes_per_s must not be negative")
        coefficients = self.profile.coefficients
        if "gemm" not in coefficients:
            raise UserError("profile: field 'coefficients' has no 'gemm' fit; run `kvsim calibrate` again")

        gemms = layer_gemms(self.model, self.tp)
        by_shape = {fit.shape: fit for key, fit in coefficients.items() if key.startswith("gemm:") and fit.shape}
        fits: dict[str, OpCoefficients] = {}
        generic: list[str] = []
        for shape in gemms.all_shapes():
            own = by_shape.get(shape.key)
            fits[shape.name] = own if own is not None else coefficients["gemm"]
            if own is None:
                generic.append(shape.name)

        decode_op = f"attention_decode_{self.attention_path}"
        if self.model.is_mla and "mla_decode" in coefficients:
            decode_op = "mla_decode"
        if decode_op not in coefficients:
            raise UserError(f"profile: field 'coefficients' has no {decode_op!r} fit, which the "
                            f"{self.attention_path} attention path needs; run `kvsim calibrate` again")
        prefill_op = "attention_prefill" if "attention_prefill" in coefficients else decode_op
        prefill_cached_op = "attention_prefill_cached" if "attention_prefill_cached" in coefficients else prefill_op

        object.__setattr__(self, "_gemms", gemms)
        object.__setattr__(self, "_gemm_fits", fits)
        object.__setattr__(self, "_generic_gemms", tuple(generic))
        object.__setattr__(self, "_decode_op", decode_op)
        object.__setattr__(self, "_prefill_op", prefill_op)
        object.__setattr__(self, "_prefill_cached_op", prefill_cached_op)

    # -------------------------------------------------------------------------------- GEMMs

    def _gemm_time_s(self, shape: GemmShape, num_rows: Any) -> Any:
        fit = self._gemm_fits[shape.name]
        return fit.time_s(bytes_moved=shape.bytes_moved(num_rows, self.profile.dtype_bytes),
                          flops=shape.flops(num_rows))

    def gemm_time_s(self, num_tokens: float, num_seqs: float) -> float:
        """GEMM time of one step that computes `num_tokens` tokens for `num_seqs` sequences."""
        if num_tokens <= 0:
            return 0.0
        gemms, model = self._gemms, self.model
        per_layer = sum(self._gemm_time_s(shape, num_tokens) for shape in gemms.attention)
        dense_layers = model.num_layers - model.num_moe_layers
        total = model.num_layers * per_layer
        total += dense_layers * sum(self._gemm_time_s(shape, num_tokens) for shape in gemms.dense_mlp)

        if model.num_moe_layers:
            touched = float(expected_experts_touched(num_tokens, model.num_routed_experts,
                                                     model.num_active_experts))
            rows_per_expert = num_tokens * model.num_active_experts / touched
            # NOTE: routing is taken as uniform and every expert as local to this rank, without expert
            # parallelism. Skewed routing makes the busiest expert's GEMM longer than this average.
            moe = touched * sum(self._gemm_time_s(shape, rows_per_expert) for shape in gemms.routed_expert)
            moe += sum(self._gemm_time_s(shape, num_tokens) for shape in (*gemms.shared_experts, *gemms.router))
            total += model.num_moe_layers * moe

        if gemms.lm_head is not None and num_seqs > 0:
            total += self._gemm_time_s(gemms.lm_head, num_seqs)
        return float(total)

    # ---------------------------------------------------------------------------- attention

    def _attention_time_s(self, op: str, num_seqs: Any, context_tokens: Any, pairs: Any) -> Any:
        fit = self.profile.coefficients[op]
        kv_bytes = kv_bytes_per_token_per_layer(self.model, self.tp, self.profile.dtype_bytes)
        flops = attention_flops_per_pair(self.model, self.tp) * np.asarray(pairs, dtype=float)
        per_layer = fit.time_s(num_seqs=num_seqs, bytes_moved=kv_bytes * np.asarray(context_tokens, dtype=float),
                               flops=flops)
        return self.model.num_layers * per_layer

    def _allreduce_time_s(self, num_tokens: float) -> float:
        if self.tp == 1 or self.interconnect_bandwidth_bytes_per_s <= 0:
            return 0.0
        activation_bytes = self.profile.dtype_bytes * self.model.hidden_size * num_tokens
        ring = 2.0 * (self.tp - 1) / self.tp
        return 2 * self.model.num_layers * activation_bytes * ring / self.interconnect_bandwidth_bytes_per_s

    # ----------------------------------------------------------------------------- protocol

    def step_time_s(self, batch: BatchShape) -> float:
        new = np.asarray(batch.num_new_tokens, dtype=float)
        context = np.asarray(batch.context_tokens, dtype=float)
        scheduled = new > 0
        if not scheduled.any():
            return 0.0
        new, context = new[scheduled], context[scheduled]
        num_tokens = float(new.sum())
        num_seqs = float(new.shape[0])

        # One new token attends through the decode kernel. Longer chunks go through a prefill
        # kernel: the plain causal one for whole prompts, the cached-prefix one after cached tokens.
        decoding = new == 1
        fresh = ~decoding & (context <= new)
        cached = ~decoding & (context > new)
        time = self.gemm_time_s(num_tokens, num_seqs)
        if decoding.any():
            ctx = float(context[decoding].sum())
            time += float(self._attention_time_s(self._decode_op, float(decoding.sum()), ctx, ctx))
        for op, chosen in ((self._prefill_op, fresh), (self._prefill_cached_op, cached)):
            if chosen.any():
                pairs = float(causal_pairs(new[chosen], context[chosen]).sum())
                time += float(self._attention_time_s(op, float(chosen.sum()), float(context[chosen].sum()), pairs))
        return time + self._allreduce_time_s(num_tokens) + self.step_overhead_s

    def decode_step_times_s(self, num_seqs: int, total_context_tokens: np.ndarray) -> np.ndarray:
        context = np.asarray(total_context_tokens, dtype=float)
        if num_seqs <= 0:
            return np.zeros_like(context)
        fixed = self.gemm_time_s(float(num_seqs), float(num_seqs))
        fixed += self._allreduce_time_s(float(num_seqs)) + self.step_overhead_s
        attention = self._attention_time_s(self._decode_op, float(num_seqs), context, context)
        return fixed + np.asarray(attention, dtype=float)

    # ---------------------------------------------------------------------------- provenance

    @property
    def extrapolated_from_model(self) -> str | None:
        """None when every GEMM has its own fit from the profiled shape; else what the fit came from."""
        if not self._generic_gemms:
            return None
        profiled = self.profile.model
        scale = "" if profiled.gemm_scale == 1 else f", GEMMs timed at {profiled.gemm_scale:g}× its size"
        return (f"{profiled.name}{scale}; per-byte and per-FLOP terms serve "
                f"{', '.join(self._generic_gemms)}")

    def describe(self) -> dict[str, Any]:
        profile = self.profile
        return {
            "latency_model": self.name,
            "profile_device": profile.device,
            "profile_device_type": profile.device_type,
            "profile_dtype": profile.dtype,
            "profile_created_at": profile.created_at,
            "profile_torch_version": profile.torch_version,
            "profiled_model": profile.model.name,
            "extrapolated_from_model": self.extrapolated_from_model,
            "attention_path": self.attention_path,
            "decode_op": self._decode_op,
            "decode_kernel": profile.coefficients[self._decode_op].path,
            "prefill_op": self._prefill_op,
            "prefill_cached_op": self._prefill_cached_op,
            "tp": self.tp,
            "fit_median_abs_pct_error": profile.fit.median_abs_pct_error,
            "fit_p90_abs_pct_error": profile.fit.p90_abs_pct_error,
            "step_overhead_s": self.step_overhead_s,
        }

