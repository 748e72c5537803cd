"""Run a scenario: every strategy × attention variant on the same request stream, then write the results."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import simpy

from kvsim import __version__
from kvsim.atomic import atomic_write_text
from kvsim.capacity import CapacityPlan
from kvsim.engine.cluster import Cluster
from kvsim.engine.latency import LatencyModel, RooflineLatencyModel
from kvsim.engine.replica import SchedulerConfig
from kvsim.errors import UserError
from kvsim.hardware import GiB
from kvsim.kvcache import make_manager
from kvsim.metrics import RunRecorder, steady_window, summarize_run
from kvsim.models import ModelSpec
from kvsim.scenario import Run, Scenario
from kvsim.workload import build_workload
from kvsim.workload.analysis import hit_rate_by_capacity

log = logging.getLogger(__name__)

ATTENTION_KINDS = ("MHA", "GQA", "MQA", "MLA")


@dataclass
class RunResult:
    run: Run
    capacity: CapacityPlan
    summary: dict[str, Any]
    requests: pd.DataFrame
    timeline: pd.DataFrame
    wall_time_s: float


@dataclass
class SimulationResult:
    scenario: Scenario
    seed: int
    latency: dict[str, Any]
    runs: list[RunResult] = field(default_factory=list)
    profile_path: Path | None = None

    def summary(self) -> dict[str, Any]:
        spec = self.scenario.spec
        engine = spec.engine.model_dump()
        engine["max_model_len"] = self.scenario.max_model_len
        starts = [r.requests["arrival_s"].min() for r in self.runs if not r.requests.empty]
        ends = [r.requests["finish_s"].max() for r in self.runs if not r.requests.empty]
        return {
            "kvsim_version": __version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scenario": {
                "name": spec.name,
                "description": spec.description,
                "path": str(self.scenario.path) if self.scenario.path else None,
                "seed": self.seed,
                "model": self.scenario.model.name,
                "gpu": self.scenario.gpu.name,
                "tp": spec.engine.tp,
                "replicas": spec.engine.replicas,
                "engine": engine,
                "slo": slo_targets(spec.slo),
                "workload": spec.workload.model_dump(mode="json"),
            },
            "latency_model": self.latency,
            "window": {"start_s": float(min(starts)) if starts else 0.0, "end_s": float(max(ends)) if ends else 0.0},
            "strategies": {r.run.key: _clean(r.summary) for r in self.runs},
        }


def slo_targets(slo) -> dict[str, float]:
    """Express the SLO as `metric_pNN_s` limits (`ttft_p99_s: 2.0`), the form reports read."""
    percentile = f"p{slo.percentile:g}"
    bounds = {"ttft": slo.ttft_s, "tpot": slo.tpot_s, "e2e": slo.e2e_latency_s}
    return {f"{metric}_{percentile}_s": bound for metric, bound in bounds.items() if bound is not None}


def make_latency_model(scenario: Scenario, model: ModelSpec, profile: Any | None) -> LatencyModel:
    if profile is not None:
        from kvsim.engine.calibrated import CalibratedLatencyModel

        return CalibratedLatencyModel(profile, model, scenario.engine.tp,
                                      interconnect_bandwidth_bytes_per_s=scenario.gpu.interconnect_bandwidth_bytes_per_s)
    return RooflineLatencyModel(model=model, gpu=scenario.gpu, tp=scenario.engine.tp)


def scheduler_config(scenario: Scenario, model: ModelSpec) -> SchedulerConfig:
    engine = scenario.engine
    return SchedulerConfig(
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=scenario.max_num_batched_tokens,
        max_model_len=scenario.max_model_len,
        enable_chunked_prefill=engine.enable_chunked_prefill,
        preemption_mode=engine.preemption_mode,
        scheduling_policy=engine.scheduling_policy,
        watermark=engine.watermark,
        swap_space_bytes=int(engine.swap_space_gib * GiB),
        # Swapping moves KV one way at a time: half the datasheet's two-way PCIe figure.
        pcie_bandwidth_bytes_per_s=scenario.gpu.pcie_bandwidth_bytes_per_s / 2,
        kv_bytes_per_token=model.kv_bytes_per_token_per_rank(engine.tp),
        fast_forward=scenario.spec.simulation.fast_forward,
    )


def simulate_run(scenario: Scenario, run: Run, *, seed: int, profile: Any | None = None) -> RunResult:
    """Simulate one run of `scenario` and summarise it."""
    started = time.perf_counter()
    engine = scenario.engine
    capacity = scenario.capacity(run.model)
    per_token = capacity.kv_bytes_per_token_per_rank
    if engine.kv_capacity_tokens is not None:
        budget = engine.kv_capacity_tokens * per_token
    else:
        budget = capacity.kv_budget_bytes_per_rank

    def make_kv():
        return make_manager(run.strategy, kv_budget_bytes=budget, kv_bytes_per_token=per_token,
                            block_size=engine.block_size, max_model_len=scenario.max_model_len)

    env = simpy.Environment()
    recorder = RunRecorder(timeline_interval_s=scenario.spec.simulation.timeline_interval_s)
    latency = make_latency_model(scenario, run.model, profile)
    cluster = Cluster(env, num_replicas=engine.replicas, make_kv=make_kv, latency=latency,
                      config=scheduler_config(scenario, run.model), recorder=recorder,
                      router=engine.router, router_load_guard=engine.router_load_guard)
    workload = build_workload(scenario.spec.workload, seed=seed, base_dir=scenario.base_dir)
    workload.start(env, cluster.submit)
    env.run()
    recorder.close(cluster.last_finish_s)

    requests = recorder.requests_frame()
    if requests.empty and recorder.rejected == 0:
        raise UserError(f"{scenario.path or scenario.name}: workload: the workload produced no requests; "
                        f"check its size (users, num_requests, duration_s) or the trace file's rows")
    sim = scenario.spec.simulation
    window = steady_window(requests, sim.warmup_s, sim.cooldown_s)
    slo = scenario.spec.slo.model_dump(exclude_none=True)
    if set(slo) <= {"percentile"}:
        slo = None
    summary = summarize_run(recorder, requests, window=window, slo=slo)
    wall = time.perf_counter() - started
    summary.update({
        "strategy": run.strategy.name,
        "variant": run.variant,
        "attention_kind": run.model.attention_kind.value,
        "kv_dtype": run.model.kv_dtype,
        "kv_bytes_per_token": run.model.kv_bytes_per_token,
        "kv_capacity_tokens": int(make_kv().capacity_tokens) * engine.replicas,
        "kv_capacity_tokens_per_replica": int(make_kv().capacity_tokens),
        "gpus": engine.tp * engine.replicas,
        "window": {"start_s": window.start_s, "end_s": window.end_s},
        "wall_time_s": wall,
    })
    users = summary["saturated_concurrent_requests"]
    if users is None:
        users = summary["max_concurrent_requests"]
    summary["users_per_gpu"] = users / summary["gpus"]
    return RunResult(run=run, capacity=capacity, summary=summary, requests=requests,
                     timeline=recorder.timeline_frame(), wall_time_s=wall)


def simulate(scenario: Scenario, *, seed: int | None = None, profile: Any | None = None,
             profile_path: Path | None = None,
             on_run: Callable[[Run, RunResult | None], None] | None = None) -> SimulationResult:
    """Simulate every run of `scenario`; `on_run(run, None)` before and `on_run(run, result)` after each."""
    seed = scenario.spec.seed if seed is None else seed
    runs = scenario.runs()
    latency = make_latency_model(scenario, scenario.model, profile).describe()
    if profile_path is not None:
        latency["profile_file"] = profile_path.name
    result = SimulationResult(scenario=scenario, seed=seed, latency=latency, profile_path=profile_path)
    for run in runs:
        if on_run:
            on_run(run, None)
        run_result = simulate_run(scenario, run, seed=seed, profile=profile)
        result.runs.append(run_result)
        if on_run:
            on_run(run, run_result)
    return result


def attention_table(scenario: Scenario, mean_request_tokens: float) -> pd.DataFrame:
    """Tabulate the scenario's model under each attention kind: bytes per token and users per GPU."""
    rows = []
    base = scenario.model
    variants = [("as configured", base)]
    for kind in ATTENTION_KINDS:
        if kind == "GQA" and base.attention_kind.value == "GQA":
            continue
        if kind == base.attention_kind.value:
            continue
        variants.append((kind if kind != "GQA" else "GQA-8", base.as_attention(kind)))
    for label, model in variants:
        try:
            model.check_tp(scenario.engine.tp)
            capacity = scenario.capacity(model)
        except Exception as exc:  # noqa: BLE001 - a variant that cannot run is reported, not fatal
            log.info("attention variant %s skipped: %s", label, exc)
            continue
        concurrency = capacity.kv_capacity_tokens / max(mean_request_tokens, 1.0)
        rows.append({
            "variant": label,
            "attention_kind": model.attention_kind.value,
            "kv_bytes_per_token": model.kv_bytes_per_token,
            "kv_capacity_tokens": capacity.kv_capacity_tokens,
            "max_concurrency": concurrency,
            "users_per_gpu": concurrency / scenario.engine.tp,
        })
    return pd.DataFrame(rows)


def hit_rate_curve(scenario: Scenario) -> pd.DataFrame | None:
    """Replay the workload's prompts through prefix caches of the scenario's chart capacities.

    The replay is sequential, with only full blocks cached (`kvsim.workload.analysis`); the unbounded
    cache is the row whose capacity is None. Returns None when the scenario lists no capacities.
    """
    simulation = scenario.spec.simulation
    if not simulation.hit_rate_capacities_blocks:
        return None
    source = build_workload(scenario.spec.workload, seed=scenario.spec.seed, base_dir=scenario.base_dir)
    rows = hit_rate_by_capacity(source.iter_requests(), [*simulation.hit_rate_capacities_blocks, None],
                                block_size=simulation.hit_rate_block_tokens, full_blocks_only=True)
    return pd.DataFrame([{
        "capacity_blocks": row["capacity_blocks"],
        "policy": row["policy"],
        "hit_rate_blocks": row["prefix_hit_rate_blocks"],
        "hit_rate_tokens": row["prefix_hit_rate_tokens"],
        "block_tokens": simulation.hit_rate_block_tokens,
    } for row in rows])


RESULT_FILES = ("summary.json", "requests.csv", "timeline.csv", "attention.csv", "hit_rate_by_capacity.csv",
                "scenario.yaml", "profile.json")


def write_results(result: SimulationResult, out_dir: Path) -> list[Path]:
    """Write summary.json, requests.csv, timeline.csv, attention.csv, scenario.yaml and, when the scenario
    lists hit-rate capacities, hit_rate_by_capacity.csv, each atomically.

    summary.json goes last, and an older one is removed first: a folder interrupted while it is being
    rewritten has no summary, so `kvsim report` refuses it instead of mixing two runs. Result files an
    older run left and this one does not write are removed too.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").unlink(missing_ok=True)
    scenario = result.scenario
    summary = result.summary()
    files: dict[str, str] = {}

    curve = hit_rate_curve(scenario)
    if curve is not None:
        unbounded = curve[curve["capacity_blocks"].isna()]
        summary["workload_prefix_reuse"] = {
            "unbounded_hit_rate_tokens": float(unbounded["hit_rate_tokens"].iloc[0]),
            "unbounded_hit_rate_blocks": float(unbounded["hit_rate_blocks"].iloc[0]),
            "block_tokens": int(unbounded["block_tokens"].iloc[0]),
        }
        files["hit_rate_by_capacity.csv"] = curve[curve["capacity_blocks"].notna()].to_csv(
            index=False, float_format="%.6g")

    requests = pd.concat([r.requests.assign(run=r.run.key) for r in result.runs], ignore_index=True)
    requests = requests[["run", *[c for c in requests.columns if c != "run"]]]
    timeline = pd.concat([r.timeline.assign(run=r.run.key) for r in result.runs], ignore_index=True)
    timeline = timeline[["run", *[c for c in timeline.columns if c != "run"]]]
    files["requests.csv"] = requests.to_csv(index=False, float_format="%.6g")
    files["timeline.csv"] = timeline.to_csv(index=False, float_format="%.6g")
    mean_tokens = float((requests["prompt_tokens"] + requests["output_tokens"]).mean()) if len(requests) else 1.0
    files["attention.csv"] = attention_table(scenario, mean_tokens).to_csv(index=False, float_format="%.6g")
    if scenario.path is not None and scenario.path.exists():
        files["scenario.yaml"] = scenario.path.read_text()
    if result.profile_path is not None:
        files["profile.json"] = result.profile_path.read_text()
    files["summary.json"] = json.dumps(summary, indent=2, allow_nan=False) + "\n"

    for name in RESULT_FILES:
        if name not in files:
            (out_dir / name).unlink(missing_ok=True)
    written = []
    for name, text in files.items():
        path = out_dir / name
        atomic_write_text(path, text)
        written.append(path)
    return written


def _clean(value: Any) -> Any:
    """Replace NaN and infinities with None so summary.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["RunResult", "SimulationResult", "simulate", "simulate_run", "write_results", "attention_table"]
