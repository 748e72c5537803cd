"""A fake output folder of `kvsim run`, written to the format of docs/outputs.md.

The numbers are chosen by hand to look like a 70B model on four GPUs and to make the verdict
unambiguous: paged+prefix admits 412 users within the SLOs; radix admits more but misses TPOT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SCENARIO_NAME = "Chat <b>bold</b> & co"
TP = 2
REPLICAS = 2
WINDOW_END_S = 800.0
SLO = {"ttft_p99_s": 2.0, "tpot_p99_s": 0.1}


@dataclass(frozen=True)
class FakeRun:
    max_concurrent_requests: int
    kv_capacity_tokens: int
    token_state: float
    reserved: float
    internal_fragmentation: float
    external_fragmentation: float
    cached_free: float
    hit_rate: float
    preemptions: int
    ttft_p99_s: float
    tpot_p99_s: float
    slo_met: bool
    gpus_needed: int

    @property
    def free(self) -> float:
        return 1.0 - (self.token_state + self.reserved + self.internal_fragmentation
                      + self.external_fragmentation + self.cached_free)


RUNS = {
    "contiguous": FakeRun(96, 917280, 0.24, 0.38, 0.21, 0.12, 0.0, 0.0, 57, 6.5, 0.045, False, 20),
    "paged": FakeRun(380, 917280, 0.78, 0.0, 0.012, 0.0, 0.0, 0.0, 0, 1.1, 0.052, True, 9),
    "paged+prefix": FakeRun(412, 917280, 0.64, 0.0, 0.011, 0.0, 0.2, 0.31, 0, 0.9, 0.05, True, 8),
    "radix": FakeRun(420, 917280, 0.63, 0.0, 0.0, 0.0, 0.22, 0.34, 0, 0.85, 0.12, False, 8),
}

VARIANT_RUNS = {
    "GQA/paged+prefix": RUNS["paged+prefix"],
    "MLA-512/paged+prefix": FakeRun(1448, 3260000, 0.7, 0.0, 0.01, 0.0, 0.18, 0.33, 0, 1.4, 0.07, True, 3),
}


def _percentiles(p99_s: float) -> dict[str, float]:
    return {"p50": p99_s * 0.3, "p90": p99_s * 0.6, "p99": p99_s, "mean": p99_s * 0.35}


def _strategy_entry(run: str, fake: FakeRun) -> dict:
    return {
        "strategy": run.split("/")[-1], "variant": run.split("/")[0] if "/" in run else "base",
        "attention_kind": "MLA" if run.startswith("MLA") else "GQA",
        "kv_bytes_per_token": 327680, "kv_capacity_tokens": fake.kv_capacity_tokens,
        "requests_completed": 1000, "max_concurrent_requests": fake.max_concurrent_requests,
        "mean_concurrent_requests": fake.max_concurrent_requests * 0.9,
        "token_state_fraction": fake.token_state, "reserved_fraction": fake.reserved,
        "internal_fragmentation_fraction": fake.internal_fragmentation,
        "external_fragmentation_fraction": fake.external_fragmentation,
        "cached_free_fraction": fake.cached_free, "free_fraction": fake.free,
        "prefix_hit_rate_tokens": fake.hit_rate, "prefix_hit_rate_blocks": fake.hit_rate * 0.97,
        "prefill_tokens_computed": 180000, "prefill_tokens_saved": int(990000 * fake.hit_rate),
        "preemptions": fake.preemptions, "output_tokens_per_s": 5400.0, "requests_per_s": 2.1,
        "ttft_s": _percentiles(fake.ttft_p99_s), "tpot_s": _percentiles(fake.tpot_p99_s),
        "e2e_latency_s": _percentiles(130.0), "queueing_delay_s": _percentiles(0.1),
        "slo_met": fake.slo_met, "goodput_requests_per_s": 2.1 if fake.slo_met else 1.4,
        "gpus_needed": fake.gpus_needed, "simulated_time_s": WINDOW_END_S, "wall_time_s": 1.9,
    }


def _timeline(runs: dict[str, FakeRun], rng: np.random.Generator) -> pd.DataFrame:
    frames = []
    for run, fake in runs.items():
        for replica in range(REPLICAS):
            # Samples at a fixed 2 s interval plus irregular event times, as the engine writes them.
            times = np.unique(np.concatenate([np.arange(0, WINDOW_END_S, 2.0),
                                              rng.uniform(0, WINDOW_END_S, 600)]))
            ramp = np.clip(times / 120.0, 0, 1)
            wave = 1 + 0.08 * np.sin(times / 37.0 + replica)
            running = np.round(fake.max_concurrent_requests / REPLICAS * ramp * wave / 1.08)
            used = np.clip(ramp * wave / 1.08, 0, 1)
            frame = pd.DataFrame({
                "run": run, "replica": replica, "time_s": times,
                "running": running,
                "waiting": np.round(np.maximum(0, 40 * np.sin(times / 90.0)) * (fake.slo_met is False)),
                "token_state_fraction": fake.token_state * used,
                "reserved_fraction": fake.reserved * used,
                "internal_fragmentation_fraction": fake.internal_fragmentation * used,
                "external_fragmentation_fraction": fake.external_fragmentation * used,
                "cached_free_fraction": fake.cached_free * ramp,
            })
            frame["free_fraction"] = 1 - frame[[c for c in frame.columns if c.endswith("_fraction")]].sum(axis=1)
            frame["prefix_hit_rate_tokens"] = fake.hit_rate * (1 - np.exp(-times / 150.0))
            frame["preemptions"] = np.floor(fake.preemptions / REPLICAS * times / WINDOW_END_S)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _requests(runs: dict[str, FakeRun], rng: np.random.Generator) -> pd.DataFrame:
    frames = []
    for run, fake in runs.items():
        count = 1000
        arrival = np.sort(rng.uniform(0, WINDOW_END_S * 0.9, count))
        # Log-normal latencies scaled so that the 99th percentile lands near the summary's p99.
        ttft = np.exp(rng.normal(0, 0.8, count)) * fake.ttft_p99_s / np.exp(0.8 * 2.326)
        tpot = np.exp(rng.normal(0, 0.3, count)) * fake.tpot_p99_s / np.exp(0.3 * 2.326)
        output_tokens = rng.integers(1, 800, count)
        tpot[output_tokens == 1] = np.nan
        e2e = ttft + np.nan_to_num(tpot) * (output_tokens - 1)
        frames.append(pd.DataFrame({
            "run": run, "request_id": np.arange(count), "replica": np.arange(count) % REPLICAS,
            "session_id": np.arange(count) // 4, "arrival_s": arrival, "first_scheduled_s": arrival,
            "first_token_s": arrival + ttft, "finish_s": arrival + e2e,
            "prompt_tokens": rng.integers(200, 4000, count), "cached_tokens": 0,
            "output_tokens": output_tokens, "preemptions": 0, "ttft_s": ttft, "tpot_s": tpot,
            "e2e_latency_s": e2e, "queueing_delay_s": rng.exponential(0.02, count),
        }))
    return pd.concat(frames, ignore_index=True)


# Llama-3.1-70B has 80 layers, 64 query heads of dim 128 and a 16-bit KV cache. Per layer and token,
# MHA stores K and V as 2 × 64 × 128 × 2 B, GQA with 8 KV heads 2 × 8 × 128 × 2 B, MQA 2 × 1 × 128 × 2 B.
# MLA (as in DeepSeek-V2) caches one 512-wide latent plus a 64-wide RoPE key, 576 × 2 B.
ATTENTION_BYTES_PER_TOKEN = {
    "MHA": 80 * 2 * 64 * 128 * 2,
    "GQA": 80 * 2 * 8 * 128 * 2,
    "MQA": 80 * 2 * 1 * 128 * 2,
    "MLA-512": 80 * (512 + 64) * 2,
}


def _attention() -> pd.DataFrame:
    rows = []
    for variant, bytes_per_token in ATTENTION_BYTES_PER_TOKEN.items():
        capacity_tokens = int(300e9 / bytes_per_token)
        max_concurrency = capacity_tokens // 2200
        rows.append({"variant": variant, "attention_kind": variant.split("-")[0],
                     "kv_bytes_per_token": bytes_per_token, "kv_capacity_tokens": capacity_tokens,
                     "max_concurrency": max_concurrency, "users_per_gpu": max_concurrency / (TP * REPLICAS)})
    return pd.DataFrame(rows)


def _hit_rate_by_capacity() -> pd.DataFrame:
    rows = []
    for policy, scale in (("lru", 1.0), ("fifo", 0.85), ("lfu", 0.95)):
        for capacity_blocks in (64, 256, 1024, 4096, 16384, 65536):
            hit_rate = 0.6 * scale * (1 - np.exp(-capacity_blocks / 6000))
            rows.append({"capacity_blocks": capacity_blocks, "policy": policy,
                         "hit_rate_blocks": hit_rate * 0.97, "hit_rate_tokens": hit_rate})
    return pd.DataFrame(rows)


def profile_point(op: str, path: str, params: dict, time_s: float, fitted_time_s: float | None,
                  held_out: bool = False) -> dict:
    """One timed kernel call with the fields of kvsim.profile.Point."""
    return {"op": op, "path": path, "params": params, "num_seqs": params.get("batch", 1), "bytes_moved": 1e6,
            "flops": 1e6, "time_s": time_s, "iqr_s": time_s * 0.02, "num_reps": 20, "bandwidth_fraction": 0.5,
            "flops_fraction": 0.1, "fitted_time_s": fitted_time_s, "held_out": held_out}


def _profile() -> dict:
    points = []
    for batch in (1, 8, 32):
        for index, context_tokens in enumerate((128, 512, 2048, 8192, 32768)):
            fitted_s = 0.012 + batch * context_tokens * 2.1e-8
            measured_s = fitted_s * (1 + 0.04 * np.sin(context_tokens + batch))
            params = {"batch": batch, "context_tokens": context_tokens}
            points.append(profile_point("attention_decode_paged", "triton", params, measured_s, fitted_s,
                                        held_out=index % 3 == 2))
            # A second kernel path, timed but not fitted: the chart leaves it out.
            points.append(profile_point("attention_decode_paged", "torch", params, measured_s * 1.3, None))
    # GEMM calls have no context length, so they are not on the chart.
    points.append(profile_point("gemm:qkv", "torch", {"tokens": 256}, 0.002, 0.0021))
    return {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "dtype": "bf16",
            "created_at": "2026-11-30T10:00:00+00:00",
            "fit": {"median_abs_pct_error": 0.04, "p90_abs_pct_error": 0.09}, "points": points}


def _plan(runs: dict[str, FakeRun]) -> dict:
    plan_runs = {}
    for run, fake in runs.items():
        points = []
        for load in (0.5, 1.0, 2.0, 3.0, 4.0):
            ttft = fake.ttft_p99_s * 0.3 * (1 + load ** 2 / 4)
            tpot = fake.tpot_p99_s * (0.6 + 0.15 * load)
            points.append({"load": load, "ttft_p99_s": ttft, "tpot_p99_s": tpot,
                           "slo_met": ttft <= SLO["ttft_p99_s"] and tpot <= SLO["tpot_p99_s"]})
        plan_runs[run] = {"points": points}
    return {"slo": SLO, "load_unit": "requests/s", "runs": plan_runs}


def write_fake_run_folder(out_dir: Path, *, runs: dict[str, FakeRun] = RUNS, scenario_name: str = SCENARIO_NAME,
                          with_timeline: bool = True, with_requests: bool = True, with_attention: bool = True,
                          with_hit_rate_curve: bool = True, with_profile: bool = True, with_plan: bool = True,
                          with_slo: bool = True, seed: int = 0) -> Path:
    """Write a fake output folder; each `with_` flag drops one optional file or section when False."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "kvsim_version": "0.1.0",
        "created_at": "2026-12-04T20:15:00+00:00",
        "scenario": {"name": scenario_name, "path": "scenarios/chat.yaml", "seed": seed,
                     "model": "Llama-3.1-70B", "gpu": "H100-SXM", "tp": TP, "replicas": REPLICAS,
                     "engine": {"block_size": 16, "max_num_seqs": 256, "max_num_batched_tokens": 8192},
                     "slo": SLO if with_slo else {}},
        "latency_model": ({"latency_model": "calibrated", "profile": "profiles/h100.json"} if with_profile
                          else {"latency_model": "roofline", "gpu": "H100-SXM", "tp": TP,
                                "bandwidth_efficiency": 0.8, "compute_efficiency": 0.6}),
        "window": {"start_s": 0.0, "end_s": WINDOW_END_S},
        "strategies": {run: _strategy_entry(run, fake) for run, fake in runs.items()},
    }
    if not with_slo:
        for entry in summary["strategies"].values():
            del entry["slo_met"]
    if with_plan:
        summary["plan"] = _plan(runs)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "scenario.yaml").write_text(f"name: \"{scenario_name}\"\nmodel: Llama-3.1-70B\n")
    if with_timeline:
        _timeline(runs, rng).to_csv(out_dir / "timeline.csv", index=False)
    if with_requests:
        _requests(runs, rng).to_csv(out_dir / "requests.csv", index=False)
    if with_attention:
        _attention().to_csv(out_dir / "attention.csv", index=False)
    if with_hit_rate_curve:
        _hit_rate_by_capacity().to_csv(out_dir / "hit_rate_by_capacity.csv", index=False)
    if with_profile:
        (out_dir / "profile.json").write_text(json.dumps(_profile(), indent=2))
    return out_dir
