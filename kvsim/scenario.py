"""The scenario file: model, GPU, engine settings, strategies, workload, SLOs.

Every section forbids unknown keys, so a typo is an error instead of a silently ignored setting. Field
descriptions are the reference for the YAML format (docs/scenarios.md) and for error messages.
YAML is read with `yaml.safe_load` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvsim.capacity import CapacityPlan, plan_capacity
from kvsim.errors import UserError, parse_yaml, read_user_file
from kvsim.hardware import GB, GiB, TFLOPS, GpuSpec, load_gpu
from kvsim.models import ModelSpec, load_preset, normalize_dtype
from kvsim.workload.spec import UNION_TAGS as WORKLOAD_UNION_TAGS
from kvsim.workload.spec import WorkloadSpec


def _in_section(source: str, section: str, resolve):
    """Call `resolve`, prefixing a UserError's message with the file and the section it concerns."""
    try:
        return resolve()
    except UserError as exc:
        raise UserError(f"{source}: {section}: {exc}") from None


def _preset_shorthand(value: Any) -> Any:
    """Let a section be written as its preset name alone (`gpu: H100-SXM`)."""
    if isinstance(value, str):
        return {"preset": value}
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionVariant(_Section):
    """One attention design of the scenario's model to simulate beside the model as configured."""

    name: str | None = Field(None, description="Label in reports; derived from the kind when omitted.")
    attention: Literal["base", "MHA", "GQA", "MQA", "MLA"] = Field(
        "base", description="`base` keeps the model's own attention.")
    num_kv_heads: int | None = Field(None, ge=1, description="KV heads of a GQA variant.")
    kv_lora_rank: int = Field(512, ge=1, description="Latent width of an MLA variant.")
    qk_rope_head_dim: int = Field(64, ge=1, description="Decoupled RoPE key width of an MLA variant.")
    kv_dtype: str | None = Field(None, description="KV-cache dtype of this variant (fp16, bf16, fp8, int8, int4).")

    @field_validator("kv_dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else normalize_dtype(value, "kv_dtype")

    def label(self) -> str:
        if self.name:
            return self.name
        parts = []
        if self.attention == "base":
            parts.append("base")
        elif self.attention == "GQA":
            parts.append(f"GQA-{self.num_kv_heads or 8}")
        elif self.attention == "MLA":
            parts.append(f"MLA-{self.kv_lora_rank}")
        else:
            parts.append(self.attention)
        if self.kv_dtype:
            parts.append(self.kv_dtype)
        return " ".join(parts)

    def apply(self, model: ModelSpec) -> ModelSpec:
        spec = model
        if self.attention != "base":
            spec = spec.as_attention(self.attention, num_kv_heads=self.num_kv_heads,
                                     kv_lora_rank=self.kv_lora_rank, qk_rope_head_dim=self.qk_rope_head_dim)
        if self.kv_dtype:
            spec = spec.with_changes(kv_dtype=self.kv_dtype)
        return spec


class ModelSection(_Section):
    """The model: a preset name, a Hugging Face config.json path, or the shape inline."""

    preset: str | None = Field(None, description="A shipped model (`kvsim memory --list-models`).")
    config: str | None = Field(None, description="Path of a Hugging Face config.json, relative to the scenario.")
    inline: dict[str, Any] | None = Field(None, description="ModelSpec fields, e.g. num_layers, num_kv_heads.")
    weight_dtype: str | None = Field(None, description="Weight dtype, overriding the config's torch_dtype.")
    kv_dtype: str | None = Field(None, description="KV-cache dtype (fp16, bf16, fp8, int8, int4).")
    variants: list[AttentionVariant] = Field(
        default_factory=list,
        description="Attention variants to simulate with every strategy (MHA, GQA, MQA, MLA, KV dtypes).")

    _shorthand = model_validator(mode="before")(classmethod(lambda cls, value: _preset_shorthand(value)))

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        sources = [name for name in ("preset", "config", "inline") if getattr(self, name) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of preset, config or inline")
        return self

    def resolve(self, base_dir: Path) -> ModelSpec:
        if self.preset is not None:
            spec = load_preset(self.preset)
        elif self.config is not None:
            spec = ModelSpec.from_hf_config(base_dir / self.config)
        else:
            fields = dict(self.inline or {})
            fields.setdefault("name", "inline model")
            try:
                spec = ModelSpec(**fields)
            except TypeError as exc:
                raise UserError(f"model.inline: {exc}; see the ModelSpec fields in docs/scenarios.md")
        changes = {}
        if self.weight_dtype:
            changes["weight_dtype"] = normalize_dtype(self.weight_dtype, "model.weight_dtype")
        if self.kv_dtype:
            changes["kv_dtype"] = normalize_dtype(self.kv_dtype, "model.kv_dtype")
        return spec.with_changes(**changes) if changes else spec


class GpuSection(_Section):
    """The GPU: a preset name, or a custom GPU with its limits."""

    preset: str | None = Field(None, description="A GPU preset, e.g. H100-SXM, A100-80GB.")
    name: str | None = Field(None, description="Name of a custom GPU.")
    memory_gib: float | None = Field(None, gt=0, description="Memory of a custom GPU, in GiB.")
    hbm_bandwidth_gb_per_s: float | None = Field(None, gt=0, description="Memory bandwidth, in GB/s.")
    fp16_tflops: float | None = Field(None, gt=0, description="Dense FP16/BF16 peak, in TFLOP/s.")
    fp8_tflops: float | None = Field(None, gt=0, description="Dense FP8 peak, in TFLOP/s.")
    interconnect_gb_per_s: float = Field(0.0, ge=0, description="GPU-to-GPU bandwidth, in GB/s.")
    pcie_gb_per_s: float = Field(64.0, gt=0, description="Host link bandwidth, in GB/s (swap cost).")

    _shorthand = model_validator(mode="before")(classmethod(lambda cls, value: _preset_shorthand(value)))

    @model_validator(mode="after")
    def _complete(self) -> GpuSection:
        if self.preset is None:
            missing = [f for f in ("name", "memory_gib", "hbm_bandwidth_gb_per_s", "fp16_tflops")
                       if getattr(self, f) is None]
            if missing:
                raise ValueError(f"a custom GPU needs {', '.join(missing)} (or give a preset)")
        return self

    def resolve(self) -> GpuSpec:
        if self.preset is not None:
            return load_gpu(self.preset)
        return GpuSpec(
            name=self.name or "custom GPU",
            memory_bytes=int(self.memory_gib * GiB),
            hbm_bandwidth_bytes_per_s=self.hbm_bandwidth_gb_per_s * GB,
            fp16_flops_per_s=self.fp16_tflops * TFLOPS,
            fp8_flops_per_s=self.fp8_tflops * TFLOPS if self.fp8_tflops else None,
            interconnect_bandwidth_bytes_per_s=self.interconnect_gb_per_s * GB,
            pcie_bandwidth_bytes_per_s=self.pcie_gb_per_s * GB,
            source="defined in the scenario",
        )


class EngineSection(_Section):
    """Engine settings, named as vLLM names them."""

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block (page).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory the engine may use.")
    max_num_seqs: int = Field(256, ge=1, description="Max sequences in one batch (vLLM V1 default 256).")
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="Token budget of one step (vLLM V1 default 8192 with chunked prefill).")
    max_model_len: int | None = Field(
        None, ge=16, description="Max prompt + output tokens per request; the model's context length if unset.")
    tp: int = Field(1, ge=1, description="Tensor-parallel degree: GPUs per replica.")
    replicas: int = Field(1, ge=1, description="Data-parallel replicas, each with its own KV cache.")
    enable_chunked_prefill: bool = Field(True, description="Split long prompts across steps (vLLM V1 default).")
    preemption_mode: Literal["recompute", "swap"] = Field("recompute", description="What preemption does.")
    scheduling_policy: Literal["fcfs", "priority", "lpm"] = Field(
        "fcfs", description="Waiting-queue order: first come first served, priority, or longest prefix match.")
    watermark: float = Field(0.0, ge=0, lt=1, description="KV share an admission must leave free.")
    swap_space_gib: float = Field(4.0, ge=0, description="CPU memory per GPU for swapped KV, in GiB.")
    router: Literal["round_robin", "least_outstanding", "prefix_aware"] = Field(
        "round_robin", description="How requests are spread over replicas.")
    router_load_guard: int = Field(8, ge=0, description="prefix_aware: max extra outstanding requests tolerated.")
    kv_capacity_tokens: int | None = Field(
        None, ge=1, description="Override the estimated KV capacity per replica (what-if, e.g. a CPU tier).")
    activation_peak_gib: float | None = Field(None, ge=0, description="Override the activation estimate, GiB.")
    runtime_overhead_gib: float | None = Field(None, ge=0, description="Override the runtime reserve, GiB.")


class SloSection(_Section):
    """Latency objectives; a run meets them when the percentile of each bound holds."""

    ttft_s: float | None = Field(None, gt=0, description="Bound on time to first token, seconds.")
    tpot_s: float | None = Field(None, gt=0, description="Bound on time per output token, seconds.")
    e2e_latency_s: float | None = Field(None, gt=0, description="Bound on end-to-end latency, seconds.")
    percentile: float = Field(99, gt=0, le=100, description="Percentile the bounds apply to.")


class SimulationSection(_Section):
    """Settings of the simulation run and of what it records."""

    warmup_s: float = Field(0.0, ge=0, description="Arrivals before first arrival + warmup_s are left out of latency metrics.")
    cooldown_s: float = Field(0.0, ge=0, description="Arrivals after last arrival − cooldown_s are left out too.")
    timeline_interval_s: float = Field(1.0, gt=0, description="Min spacing of timeline rows between events.")
    fast_forward: bool = Field(True, description="Advance pure-decode spans in one event (same results, faster).")
    hit_rate_capacities_blocks: list[int] | None = Field(
        None, description="Cache capacities, in blocks of hit_rate_block_tokens, for the hit rate against "
                          "capacity chart (a sequential replay of the workload's prompts; unbounded is added).")
    hit_rate_block_tokens: int = Field(
        512, ge=1, description="Block size of that replay, in tokens (512: the Mooncake traces' block).")


class PlanSection(_Section):
    """Inputs of `kvsim plan`: the load to serve and what a GPU costs."""

    target_rate_per_s: float | None = Field(None, gt=0, description="Open-loop load to serve, requests/s.")
    target_users: int | None = Field(None, ge=1, description="Closed-loop load to serve, concurrent users.")
    gpu_hour_cost_usd: float | None = Field(None, ge=0, description="Price of one GPU-hour, USD.")
    tolerance: float = Field(0.05, gt=0, lt=1, description="Relative tolerance of the load search.")
    max_load: float | None = Field(None, gt=0, description="Upper end of the load search.")


class ScenarioFile(_Section):
    """A whole scenario file."""

    name: str = Field(description="Name of the scenario; the default output folder is reports/<name>/.")
    description: str = Field("", description="What the scenario studies.")
    seed: int = Field(0, ge=0, description="Seed of every random stream.")
    model: ModelSection = Field(description="The model: a preset name, or a mapping (see `model`).")
    gpu: GpuSection = Field(description="The GPU: a preset name, or a mapping (see `gpu`).")
    engine: EngineSection = Field(default_factory=EngineSection, description="Engine settings (see `engine`).")
    strategies: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["paged"], min_length=1,
        description="KV-cache strategies: contiguous, contiguous-pow2, contiguous-oracle, paged, paged+prefix, "
                    "radix, or mappings with options.")
    workload: WorkloadSpec = Field(description="What the users send: a closed loop, an open loop or a trace.")
    slo: SloSection = Field(default_factory=SloSection, description="Latency objectives (see `slo`).")
    simulation: SimulationSection = Field(default_factory=SimulationSection,
                                          description="Simulation settings (see `simulation`).")
    plan: PlanSection = Field(default_factory=PlanSection, description="Inputs of `kvsim plan` (see `plan`).")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, value: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        from kvsim.kvcache import parse_strategy

        labels = []
        for entry in value:
            try:
                labels.append(parse_strategy(entry).name)
            except UserError as exc:
                raise ValueError(str(exc)) from None
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"strategy names must be unique; repeated: {', '.join(duplicates)}")
        return value


@dataclass(frozen=True)
class Run:
    """One simulation of a scenario: a strategy with one attention variant of the model."""

    key: str
    strategy: Any
    variant: str
    model: ModelSpec


class Scenario:
    """A validated scenario with its model and GPU resolved."""

    def __init__(self, spec: ScenarioFile, *, path: Path | None = None):
        self.spec = spec
        self.path = path
        self.base_dir = path.parent if path else Path.cwd()
        source = self.source = str(path) if path else "scenario"
        self.model = _in_section(source, "model", lambda: spec.model.resolve(self.base_dir))
        self.gpu = _in_section(source, "gpu", spec.gpu.resolve)
        _in_section(source, "engine.tp", lambda: self.model.check_tp(spec.engine.tp))
        limit = self.model.max_position_embeddings
        if spec.engine.max_model_len is not None and spec.engine.max_model_len > limit:
            # vLLM refuses this too: positions past the trained context are undefined for the model.
            raise UserError(f"{source}: engine.max_model_len: {spec.engine.max_model_len:,} exceeds the context length "
                            f"of {self.model.name} ({limit:,} tokens, max_position_embeddings); lower it to at "
                            f"most {limit:,}")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def engine(self) -> EngineSection:
        return self.spec.engine

    @property
    def max_model_len(self) -> int:
        return self.spec.engine.max_model_len or self.model.max_position_embeddings

    @cached_property
    def strategies(self) -> list[Any]:
        from kvsim.kvcache import parse_strategy

        return [parse_strategy(entry) for entry in self.spec.strategies]

    def variant_models(self) -> list[tuple[str, ModelSpec]]:
        variants = self.spec.model.variants
        if not variants:
            return [("base", self.model)]
        result = []
        for variant in variants:
            spec = variant.apply(self.model)
            spec.check_tp(self.engine.tp)
            result.append((variant.label(), spec))
        labels = [label for label, _ in result]
        if len(set(labels)) != len(labels):
            raise UserError(f"{self.path}: model.variants: labels must be unique, got {labels}; give each a name")
        return result

    def runs(self) -> list[Run]:
        variants = self.variant_models()
        runs = []
        for label, model in variants:
            for strategy in self.strategies:
                key = strategy.name if len(variants) == 1 else f"{label}/{strategy.name}"
                runs.append(Run(key=key, strategy=strategy, variant=label, model=model))
        return runs

    def capacity(self, model: ModelSpec | None = None) -> CapacityPlan:
        engine = self.engine
        return _in_section(self.source, "engine", lambda: plan_capacity(
            model or self.model, self.gpu, tp=engine.tp, block_size=engine.block_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=engine.max_num_seqs,
            activation_peak_bytes=None if engine.activation_peak_gib is None else int(engine.activation_peak_gib * GiB),
            runtime_overhead_bytes=None if engine.runtime_overhead_gib is None else int(engine.runtime_overhead_gib * GiB),
            kv_capacity_tokens=engine.kv_capacity_tokens,
        ))

    @property
    def max_num_batched_tokens(self) -> int:
        engine = self.engine
        if not engine.enable_chunked_prefill:
            # Without chunking a whole prompt must fit one step, so vLLM raises the budget to max_model_len.
            return max(engine.max_num_batched_tokens, self.max_model_len)
        return engine.max_num_batched_tokens

    def with_changes(self, changes: dict[str, Any]) -> Scenario:
        """Return a copy with dotted-path settings replaced, e.g. {"engine.tp": 2, "workload.users": 50}."""
        data = self.spec.model_dump(mode="python", exclude_unset=True, by_alias=True)
        for dotted, value in changes.items():
            target = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise UserError(f"cannot set {dotted!r}: {part!r} is not a section")
            target[parts[-1]] = value
        return Scenario(validate_scenario(data, source=str(self.path or "scenario")), path=self.path)


def validate_scenario(data: Any, *, source: str) -> ScenarioFile:
    """Validate a parsed YAML document; raise UserError with the first problem's field path and a fix."""
    if data is None:
        raise UserError(f"{source}: the file is empty; a scenario needs at least name, model, gpu and workload "
                        f"(see scenarios/ for examples)")
    if not isinstance(data, dict):
        raise UserError(f"{source}: a scenario must be a YAML mapping of sections (name:, model:, ...), "
                        f"not a {type(data).__name__}")
    try:
        return ScenarioFile.model_validate(data)
    except ValidationError as exc:
        raise UserError(_describe_validation_error(exc, source)) from None


def _describe_validation_error(exc: ValidationError, source: str) -> str:
    errors = exc.errors(include_url=False)
    error = errors[0]
    location = _clean_location(error["loc"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        message = f"unknown key {location.rsplit('.', 1)[-1]!r}; check its spelling against docs/scenarios.md"
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = error["msg"].removeprefix("Value error, ")
        if not isinstance(value, (dict, list)) and value is not None:
            message += f" (got {value!r})"
    more = f" ({len(errors) - 1} more problem{'s' if len(errors) > 2 else ''} after this one)" if len(errors) > 1 else ""
    return f"{source}: {location}: {message}{more}"


def _clean_location(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        text = str(item)
        # Drop pydantic's tags for union members and discriminator values.
        if (text in ("str", "int", "float", "dict[str,any]") or text in WORKLOAD_UNION_TAGS
                or text.startswith("function-") or "[" in text):
            continue
        parts.append(("." if parts else "") + text)
    return "".join(parts) or "(top level)"


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file; every problem is a UserError naming the file and field."""
    path = Path(path)
    text = read_user_file(path, "scenario file", "check the path (shipped scenarios are in scenarios/)")
    data = parse_yaml(text, path)
    spec = validate_scenario(data, source=str(path))
    return Scenario(spec, path=path.resolve())
