"""The calibration profile: what `kvsim calibrate` measured on a device, and the step-time terms fitted to it.

A profile is one JSON file. The calibration pass (the `calibrate` package, which needs torch) writes
it; kvsim reads it with `load_profile` and builds a `CalibratedLatencyModel` from it, without torch.

Every fitted operation has the same linear form, with non-negative coefficients:

    time_s = fixed_s + per_seq_s · sequences + per_byte_s · bytes moved + per_flop_s · FLOPs

`bytes` and `flops` are computed from the operation's shape in the profile's `dtype` (see
`kvsim.engine.calibrated` for the formulas). Operation kinds:

- `gemm:<name>`: one matrix of a layer (`qkv`, `o`, `gate_up`, `down`, ...) at M tokens, for the
  profiled model's shape.
- `gemm`: one fit over all of them, used for any other shape.
- `attention_decode_paged` / `attention_decode_contiguous`: decode attention of one layer, one new
  token per sequence, over MHA, GQA and MQA head counts.
- `attention_prefill`: causal attention of one layer for a prompt with no cached prefix.
- `attention_prefill_cached`: the same for a chunk of new tokens after cached ones (chunked
  prefill, prefix cache hits).
- `mla_decode`: absorbed multi-head latent attention decode over the latent cache, one layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kvsim.atomic import atomic_write_text
from kvsim.errors import UserError, parse_json_object, read_user_file

SCHEMA_VERSION = 1

COEFFICIENT_NAMES = ("fixed_s", "per_seq_s", "per_byte_s", "per_flop_s")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProfiledModel(_Strict):
    """The model shape whose kernels were timed; `gemm_scale` < 1 marks the scaled-down quick pass."""

    name: str
    attention_kind: Literal["MHA", "GQA", "MQA", "MLA"]
    num_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    kv_lora_rank: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)
    gemm_scale: float = Field(default=1.0, gt=0, le=1)
    """Factor applied to hidden and intermediate sizes of the timed GEMMs (1 = the real shape)."""
    gemm_shapes: dict[str, tuple[int, int, int]] = Field(default_factory=dict)
    """Timed GEMMs: name → (batch, input features K, output features N)."""


class KernelPath(_Strict):
    """One implementation of an operation that the pass measured."""

    op: str
    description: str
    gathers_first: bool = False
    """True when the path copies the whole context out of the block pool before attending to it."""
    available: bool = True
    settings: dict[str, int | float | str] = Field(default_factory=dict)
    """Tuned settings the path ran with (the chunk buffer size of the chunked paged paths)."""
    error: str | None = None
    """Reason the path was left out (failed to compile, failed its reference check, ...)."""


class ReferenceCheck(_Strict):
    """A kernel's output compared with a float64 reference before it was timed."""

    path: str
    case: str
    max_abs_error: float = Field(ge=0)
    tolerance: float = Field(gt=0)
    passed: bool


class DeviceLimits(_Strict):
    copy_bandwidth_bytes_per_s: float = Field(gt=0)
    """Bytes read plus bytes written per second by a large device-to-device tensor copy."""
    matmul_flops_per_s: float = Field(gt=0)
    """FLOP/s of a large square matmul in the profile's dtype."""


class OpCoefficients(_Strict):
    """Fitted step-time terms of one operation kind (all in seconds per unit)."""

    fixed_s: float = Field(default=0.0, ge=0)
    per_seq_s: float = Field(default=0.0, ge=0)
    per_byte_s: float = Field(default=0.0, ge=0)
    per_flop_s: float = Field(default=0.0, ge=0)
    path: str = ""
    """Kernel path whose measurements were fitted."""
    shape: tuple[int, int, int] | None = None
    """(batch, K, N) of a per-matrix GEMM fit; None for fits over many shapes."""

    def time_s(self, *, num_seqs: Any = 0.0, bytes_moved: Any = 0.0, flops: Any = 0.0) -> Any:
        """Fitted time for scalars or numpy arrays of the three features."""
        return (self.fixed_s + self.per_seq_s * num_seqs + self.per_byte_s * bytes_moved
                + self.per_flop_s * flops)


class Point(_Strict):
    """One timed kernel call: its shape, its features for the fit, and the result."""

    op: str
    path: str
    params: dict[str, int | float | str] = Field(default_factory=dict)
    """Shape of the call (batch, context_tokens, tokens, kv_heads, ...), for plots and refits."""
    num_seqs: float = Field(ge=0)
    bytes_moved: float = Field(ge=0)
    flops: float = Field(ge=0)
    time_s: float = Field(gt=0)
    iqr_s: float = Field(ge=0)
    num_reps: int = Field(gt=0)
    bandwidth_fraction: float = Field(ge=0)
    """bytes_moved / time_s as a fraction of the device's copy bandwidth."""
    flops_fraction: float = Field(ge=0)
    """flops / time_s as a fraction of the device's matmul peak."""
    fitted_time_s: float | None = None
    held_out: bool = False
    """True when the point was left out of the fit and used to measure its error."""


class OpError(_Strict):
    median_abs_pct_error: float = Field(ge=0)
    p90_abs_pct_error: float = Field(ge=0)
    num_held_out: int = Field(ge=0)


class FitSummary(_Strict):
    """Errors of the fitted terms on held-out points, as fractions (0.05 = 5%).

    The overall figures pool the held-out points of every op kind except the all-shapes `gemm` fit,
    whose points are those of the per-matrix fits again.
    """

    median_abs_pct_error: float = Field(ge=0)
    p90_abs_pct_error: float = Field(ge=0)
    num_points: int = Field(ge=0)
    num_held_out: int = Field(ge=0)
    holdout_rule: str
    per_op: dict[str, OpError] = Field(default_factory=dict)


class PagedComparison(_Strict):
    """Decode attention at one context length: every measured path, and the best paged against the best contiguous."""

    context_tokens: int = Field(gt=0)
    batch: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    block_size: int = Field(gt=0)
    times_s: dict[str, float]
    """Median time of each measured path."""
    bandwidth_fractions: dict[str, float]
    """KV bytes read per second by each path, as a fraction of the copy bandwidth."""
    best_paged_path: str
    best_contiguous_path: str
    latency_ratio: float = Field(gt=0)
    """Best paged time divided by best contiguous time."""


class AttentionKindPoint(_Strict):
    """KV bytes per token and decode latency of one attention kind, at one batch and context."""

    kind: Literal["MHA", "GQA", "MQA", "MLA"]
    num_kv_heads: int = Field(ge=0)
    kv_bytes_per_token: int = Field(gt=0)
    """For the whole model on one rank, in the model's kv dtype (ModelSpec.kv_bytes_per_token_per_rank)."""
    kv_bytes_per_token_per_layer_profiled: int = Field(gt=0)
    """For one layer, in the profile's dtype, as the timed kernel read it."""
    batch: int = Field(gt=0)
    context_tokens: int = Field(gt=0)
    path: str
    decode_time_s: float = Field(gt=0)
    """Measured time of one layer's decode attention."""


class Profile(_Strict):
    """A calibration profile: provenance, device limits, measured points and fitted terms."""

    schema_version: int = SCHEMA_VERSION
    kvsim_version: str = ""
    device: str
    device_type: Literal["cpu", "cuda"]
    torch_version: str
    dtype: Literal["fp32", "fp16", "bf16"]
    threads: int = Field(gt=0)
    """torch intra-op CPU threads during the pass (`torch.get_num_threads()`)."""
    created_at: str
    quick: bool = False
    duration_s: float = Field(default=0.0, ge=0)
    block_size: int = Field(default=16, gt=0)
    model: ProfiledModel
    kernel_paths: dict[str, KernelPath]
    reference_checks: list[ReferenceCheck] = Field(default_factory=list)
    device_limits: DeviceLimits
    coefficients: dict[str, OpCoefficients]
    points: list[Point] = Field(default_factory=list)
    fit: FitSummary
    paged_vs_contiguous: list[PagedComparison] = Field(default_factory=list)
    attention_kinds: list[AttentionKindPoint] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    """Conditions that affect how far the numbers can be trusted (a busy CPU, a missed target)."""

    @property
    def dtype_bytes(self) -> int:
        return {"fp32": 4, "fp16": 2, "bf16": 2}[self.dtype]


# ---------------------------------------------------------------------------------------------- I/O


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile JSON file; raise UserError naming the file and the invalid field."""
    path = Path(path)
    text = read_user_file(path, "profile", f"create one with `kvsim calibrate --out {path}`")
    data = parse_json_object(text, path, "profile")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: field 'schema_version' is {version!r}, but this kvsim reads version "
                        f"{SCHEMA_VERSION}; run `kvsim calibrate` again to write a current profile")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{path}: invalid profile: {_describe_errors(exc)}") from None


def write_profile(profile: Profile, path: str | Path) -> Path:
    """Write `profile` as indented JSON, atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, profile.model_dump_json(indent=1) + "\n")


def _describe_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = []
    for error in exc.errors()[:limit]:
        field = ".".join(str(item) for item in error["loc"]) or "(top level)"
        value = error.get("input")
        got = "" if error["type"] == "missing" else f" (got {_short_repr(value)})"
        parts.append(f"field {field!r}: {error['msg']}{got}")
    remaining = exc.error_count() - limit
    if remaining > 0:
        parts.append(f"and {remaining} more")
    return "; ".join(parts)


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
