"""Simulation records and the summary computed from them.

The recorder is called by replicas at events (admission, step start and end, decode spans,
preemption, finish). It keeps per-request records, a timeline sampled at events and at a fixed
interval, time integrals of the memory breakdown and of concurrency, and a histogram of inter-token
latencies. It never stores one row per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from kvsim.kvcache.base import BREAKDOWN_FIELDS, MemoryBreakdown

if TYPE_CHECKING:
    from kvsim.engine.replica import Replica
    from kvsim.engine.state import RequestState

REQUEST_COLUMNS = [
    "request_id", "replica", "session_id", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s",
    "prompt_tokens", "cached_tokens", "output_tokens", "preemptions",
]
TIMELINE_COLUMNS = ["replica", "time_s", "running", "waiting", *BREAKDOWN_FIELDS,
                    "prefix_hit_rate_tokens", "prefix_hit_tokens", "prefix_queried_tokens", "preemptions"]

# Inter-token latency histogram: log-spaced bins from 1 µs to 1,000 s.
_ITL_EDGES = np.logspace(-6, 3, 1801)


@dataclass
class _ReplicaMemory:
    last_t: float | None = None
    last: np.ndarray | None = None
    span_start: np.ndarray | None = None
    span_t: float = 0.0
    integral: np.ndarray = field(default_factory=lambda: np.zeros(6))
    capacity_tokens: int = 0
    last_row_t: float = -math.inf
    started: bool = False
    # The batch at capacity: running requests integrated over the time the replica was blocked.
    running: int = 0
    max_running: int = 0
    blocked: bool = False
    blocked_integral: float = 0.0
    blocked_s: float = 0.0

    def integrate_blocked(self, elapsed_s: float) -> None:
        if self.blocked and elapsed_s > 0:
            self.blocked_integral += self.running * elapsed_s
            self.blocked_s += elapsed_s


class RunRecorder:
    """Records one run (one strategy and attention variant) across all replicas of a cluster."""

    def __init__(self, *, timeline_interval_s: float = 1.0):
        self.timeline_interval_s = timeline_interval_s
        self.requests: list[tuple] = []
        self.timeline: list[tuple] = []
        self.rejected = 0
        self.preemptions = 0
        self.preemptions_by_replica: dict[int, int] = {}
        self.prefill_tokens_computed = 0
        self.prefill_tokens_saved = 0
        self.first_admission_prompt_tokens = 0
        self.first_admission_hit_tokens = 0
        self.first_admission_prompt_blocks = 0
        self.first_admission_hit_blocks = 0
        self.running_total = 0
        self.max_running = 0
        self._running_integral = 0.0
        self._running_t: float | None = None
        self.queued_total = 0
        """Requests waiting or swapped out, across replicas."""
        self.itl_counts = np.zeros(len(_ITL_EDGES) + 1, dtype=np.int64)
        self.num_steps = 0
        self._memory: dict[int, _ReplicaMemory] = {}

    def replica(self, replica_id: int) -> ReplicaRecorder:
        return ReplicaRecorder(self, replica_id)

    # ------------------------------------------------------------------ concurrency

    def _running_changed(self, now: float, delta: int, queued_delta: int = 0) -> None:
        if self._running_t is not None:
            elapsed = now - self._running_t
            self._running_integral += self.running_total * elapsed
        self._running_t = now
        self.running_total += delta
        self.queued_total += queued_delta
        self.max_running = max(self.max_running, self.running_total)

    @property
    def saturated_running(self) -> float | None:
        """Requests the cluster keeps running at capacity: per replica, the batch averaged over the time
        requests waited for KV memory or a sequence slot (its peak batch if that never happened), summed.

        None when no replica ever reached capacity: the load never filled the cache or `max_num_seqs`.
        """
        replicas = list(self._memory.values())
        if not any(memory.blocked_s > 0 for memory in replicas):
            return None
        return sum(memory.blocked_integral / memory.blocked_s if memory.blocked_s > 0 else memory.max_running
                   for memory in replicas)

    # ------------------------------------------------------------------ memory integral

    def _snapshot(self, replica: Replica) -> np.ndarray:
        head = replica.kv.reservation_tokens(replica.waiting[0].seq) if replica.waiting else None
        breakdown: MemoryBreakdown = replica.kv.breakdown(head)
        memory = self._memory_of(replica)
        memory.capacity_tokens = breakdown.capacity_tokens
        return np.array([
            breakdown.token_state_tokens, breakdown.reserved_tokens, breakdown.internal_fragmentation_tokens,
            breakdown.external_fragmentation_tokens, breakdown.cached_free_tokens, breakdown.free_tokens,
        ], dtype=float)

    def _memory_of(self, replica: Replica) -> _ReplicaMemory:
        memory = self._memory.get(replica.replica_id)
        if memory is None:
            memory = self._memory[replica.replica_id] = _ReplicaMemory()
        return memory

    def _advance(self, memory: _ReplicaMemory, now: float) -> None:
        if memory.last_t is not None and memory.last is not None:
            memory.integral += memory.last * (now - memory.last_t)
            memory.integrate_blocked(now - memory.last_t)
        memory.last_t = now

    @staticmethod
    def _note_batch(memory: _ReplicaMemory, replica: Replica) -> None:
        memory.running = len(replica.running)
        memory.max_running = max(memory.max_running, memory.running)
        memory.blocked = replica.capacity_blocked

    def _row(self, now: float, replica: Replica, force: bool = False) -> None:
        memory = self._memory_of(replica)
        if not force and now - memory.last_row_t < self.timeline_interval_s:
            return
        memory.last_row_t = now
        shares = memory.last / max(memory.capacity_tokens, 1) if memory.last is not None else np.zeros(6)
        self.timeline.append((replica.replica_id, now, len(replica.running), len(replica.waiting),
                              *map(float, shares), self.prefix_hit_rate_tokens, self.first_admission_hit_tokens,
                              self.first_admission_prompt_tokens, self.preemptions))

    def close(self, end_s: float) -> None:
        """Integrate every replica's memory up to `end_s`, the end of the busy period."""
        for memory in self._memory.values():
            if memory.last_t is not None and memory.last_t < end_s:
                self._advance(memory, end_s)
        if self._running_t is not None and self._running_t < end_s:
            self._running_changed(end_s, 0)

    # ------------------------------------------------------------------ derived

    @property
    def prefix_hit_rate_tokens(self) -> float:
        return self.first_admission_hit_tokens / max(self.first_admission_prompt_tokens, 1)

    @property
    def prefix_hit_rate_blocks(self) -> float:
        return self.first_admission_hit_blocks / max(self.first_admission_prompt_blocks, 1)

    def memory_fractions(self, replica_id: int | None = None) -> dict[str, float]:
        """Time-averaged memory shares over the busy period, of one replica or summed over all."""
        total = np.zeros(6)
        for key, memory in self._memory.items():
            if replica_id is None or key == replica_id:
                total += memory.integral
        norm = total.sum()
        shares = total / norm if norm > 0 else np.array([0, 0, 0, 0, 0, 1.0])
        return dict(zip(BREAKDOWN_FIELDS, map(float, shares)))

    def mean_running(self, duration_s: float) -> float:
        return self._running_integral / duration_s if duration_s > 0 else 0.0

    def itl_percentiles(self) -> dict[str, float]:
        counts = self.itl_counts
        total = counts.sum()
        if total == 0:
            return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
        cumulative = np.cumsum(counts) / total
        centres = np.concatenate([[_ITL_EDGES[0]], np.sqrt(_ITL_EDGES[:-1] * _ITL_EDGES[1:]), [_ITL_EDGES[-1]]])
        result = {f"p{q}": float(centres[np.searchsorted(cumulative, q / 100)]) for q in (50, 90, 99)}
        result["mean"] = float((counts * centres).sum() / total)
        return result

    def requests_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.requests, columns=REQUEST_COLUMNS)
        frame["ttft_s"] = frame["first_token_s"] - frame["arrival_s"]
        decode_tokens = (frame["output_tokens"] - 1).where(frame["output_tokens"] > 1)
        frame["tpot_s"] = (frame["finish_s"] - frame["first_token_s"]) / decode_tokens
        frame["e2e_latency_s"] = frame["finish_s"] - frame["arrival_s"]
        frame["queueing_delay_s"] = frame["first_scheduled_s"] - frame["arrival_s"]
        return frame

    def timeline_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.timeline, columns=TIMELINE_COLUMNS)


class ReplicaRecorder:
    """The view of a `RunRecorder` one replica reports to."""

    def __init__(self, run: RunRecorder, replica_id: int):
        self.run = run
        self.replica_id = replica_id

    def on_reject(self, state: RequestState) -> None:
        self.run.rejected += 1

    def on_admit(self, state: RequestState, hit_tokens: int, now: float, block_size: int) -> None:
        run = self.run
        run.prefill_tokens_saved += hit_tokens
        if state.num_preemptions == 0:
            block = max(block_size, 1)
            run.first_admission_prompt_tokens += state.num_prompt_tokens
            run.first_admission_hit_tokens += hit_tokens
            run.first_admission_prompt_blocks += state.num_prompt_tokens // block
            run.first_admission_hit_blocks += hit_tokens // block
        run._running_changed(now, +1, -1)

    def on_preempt(self, state: RequestState, now: float) -> None:
        self.run.preemptions += 1
        self.run.preemptions_by_replica[self.replica_id] = self.run.preemptions_by_replica.get(self.replica_id, 0) + 1
        self.run._running_changed(now, -1, +1)

    def on_queue_change(self, now: float, delta: int) -> None:
        self.run._running_changed(now, 0, delta)

    def on_resume(self, now: float) -> None:
        self.run._running_changed(now, +1)

    def on_step_start(self, now: float, replica: Replica, preempted: int) -> None:
        run = self.run
        memory = run._memory_of(replica)
        memory.started = True
        run._advance(memory, now)
        memory.last = run._snapshot(replica)
        memory.span_start = memory.last
        memory.span_t = now
        run._note_batch(memory, replica)
        if preempted:
            run._row(now, replica, force=True)

    def on_step_end(self, now: float, prefill_tokens: int, replica: Replica) -> None:
        run = self.run
        run._advance(run._memory_of(replica), now)
        run.num_steps += 1
        run.prefill_tokens_computed += prefill_tokens
        run._row(now, replica)

    def on_token_gap(self, gap_s: float) -> None:
        """Record one inter-token latency: the time since the same sequence's previous token."""
        self.run.itl_counts[np.searchsorted(_ITL_EDGES, gap_s)] += 1

    def on_token_gaps(self, gaps_s: np.ndarray, weight: int = 1) -> None:
        """Record inter-token latencies, each `weight` times (one per sequence of a decode span)."""
        if len(gaps_s):
            np.add.at(self.run.itl_counts, np.searchsorted(_ITL_EDGES, gaps_s), weight)

    def on_span_end(self, now: float, step_times_s: np.ndarray, batch: int, replica: Replica) -> None:
        run = self.run
        memory = run._memory_of(replica)
        end = run._snapshot(replica)
        start = memory.span_start if memory.span_start is not None else end
        memory.integral += (start + end) / 2 * (now - memory.span_t)
        memory.integrate_blocked(now - memory.span_t)
        memory.last = end
        memory.last_t = now
        run.num_steps += len(step_times_s)
        run._row(now, replica)

    def on_finish(self, state: RequestState) -> None:
        run = self.run
        run._running_changed(state.finish_s, -1)
        request = state.request
        run.requests.append((
            request.request_id, state.replica_id, request.session_id, request.arrival_time_s,
            state.first_scheduled_s, state.first_token_s, state.finish_s, request.prompt_tokens,
            max(state.cached_tokens_first, 0), state.num_output_tokens, state.num_preemptions,
        ))

    def on_idle(self, now: float, replica: Replica) -> None:
        run = self.run
        memory = run._memory_of(replica)
        if not memory.started:
            # Time before a replica's first request lies outside the busy period.
            return
        run._advance(memory, now)
        memory.last = run._snapshot(replica)
        memory.blocked = False
        run._row(now, replica, force=True)


# ---------------------------------------------------------------------- summary


def percentiles(values: pd.Series) -> dict[str, float]:
    clean = values.dropna().to_numpy(dtype=float)
    if clean.size == 0:
        return {"p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan}
    p50, p90, p99 = np.percentile(clean, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(clean.mean())}


@dataclass(frozen=True)
class Window:
    """The steady-state window: requests arriving in [start_s, end_s] count for latency metrics."""

    start_s: float
    end_s: float


def steady_window(requests: pd.DataFrame, warmup_s: float, cooldown_s: float) -> Window:
    if requests.empty:
        return Window(0.0, 0.0)
    first = float(requests["arrival_s"].min())
    last = float(requests["arrival_s"].max())
    return Window(first + warmup_s, max(first + warmup_s, last - cooldown_s))


def summarize_run(recorder: RunRecorder, requests: pd.DataFrame, *, window: Window,
                  slo: dict[str, Any] | None) -> dict[str, Any]:
    """Compute the per-run fields of summary.json (see docs/outputs.md)."""
    in_window = requests[(requests["arrival_s"] >= window.start_s) & (requests["arrival_s"] <= window.end_s)]
    if in_window.empty:
        in_window = requests
    if requests.empty:
        busy_s = 0.0
    else:
        busy_s = float(requests["finish_s"].max() - requests["arrival_s"].min())
    if in_window.empty:
        window_s = 0.0
    else:
        window_s = float(in_window["finish_s"].max() - in_window["arrival_s"].min())

    summary: dict[str, Any] = {
        "requests_completed": int(len(requests)),
        "requests_rejected": int(recorder.rejected),
        "max_concurrent_requests": int(recorder.max_running),
        "saturated_concurrent_requests": recorder.saturated_running,
        "mean_concurrent_requests": recorder.mean_running(busy_s),
        **recorder.memory_fractions(),
        "prefix_hit_rate_tokens": recorder.prefix_hit_rate_tokens,
        "prefix_hit_rate_blocks": recorder.prefix_hit_rate_blocks,
        "prefill_tokens_computed": int(recorder.prefill_tokens_computed),
        "prefill_tokens_saved": int(recorder.prefill_tokens_saved),
        "preemptions": int(recorder.preemptions),
        "output_tokens_per_s": float(in_window["output_tokens"].sum() / window_s) if window_s > 0 else 0.0,
        "requests_per_s": float(len(in_window) / window_s) if window_s > 0 else 0.0,
        "ttft_s": percentiles(in_window["ttft_s"]),
        "tpot_s": percentiles(in_window["tpot_s"]),
        "itl_s": recorder.itl_percentiles(),
        "e2e_latency_s": percentiles(in_window["e2e_latency_s"]),
        "queueing_delay_s": percentiles(in_window["queueing_delay_s"]),
        "num_steps": int(recorder.num_steps),
        "simulated_time_s": busy_s,
    }
    shares = recorder.memory_fractions()
    summary["kv_utilization_fraction"] = (shares["token_state_fraction"] + shares["reserved_fraction"]
                                          + shares["internal_fragmentation_fraction"])
    if slo:
        summary.update(evaluate_slo(in_window, slo, window_s))
        if recorder.rejected:
            # A rejected request never got a reply, so no SLO holds for it.
            summary["slo_met"] = False
    replica_ids = sorted(recorder._memory)
    if len(replica_ids) > 1:
        summary["replicas"] = [summarize_replica(recorder, in_window, replica_id, window_s)
                               for replica_id in replica_ids]
    return summary


def summarize_replica(recorder: RunRecorder, requests: pd.DataFrame, replica_id: int,
                      window_s: float) -> dict[str, Any]:
    """Compute one replica's share of a run: its requests, latencies, preemptions and memory."""
    mine = requests[requests["replica"] == replica_id]
    shares = recorder.memory_fractions(replica_id)
    return {
        "replica": replica_id,
        "requests_completed": int(len(mine)),
        "preemptions": int(recorder.preemptions_by_replica.get(replica_id, 0)),
        "output_tokens_per_s": float(mine["output_tokens"].sum() / window_s) if window_s > 0 else 0.0,
        "prefix_hit_rate_tokens": float(mine["cached_tokens"].sum() / max(mine["prompt_tokens"].sum(), 1)),
        "kv_utilization_fraction": (shares["token_state_fraction"] + shares["reserved_fraction"]
                                    + shares["internal_fragmentation_fraction"]),
        **shares,
        "ttft_s": percentiles(mine["ttft_s"]),
        "tpot_s": percentiles(mine["tpot_s"]),
    }


def evaluate_slo(requests: pd.DataFrame, slo: dict[str, Any], window_s: float) -> dict[str, Any]:
    """Check the SLO percentiles and compute goodput, the requests per second that met every per-request bound."""
    quantile = float(slo.get("percentile", 99))
    checks = {"ttft_s": slo.get("ttft_s"), "tpot_s": slo.get("tpot_s"), "e2e_latency_s": slo.get("e2e_latency_s")}
    met = True
    good = pd.Series(True, index=requests.index)
    observed = {}
    for column, bound in checks.items():
        if bound is None:
            continue
        values = requests[column].dropna()
        value = float(np.percentile(values, quantile)) if len(values) else math.nan
        observed[f"{column.removesuffix('_s')}_p{quantile:g}_s"] = value
        if not value <= bound:
            met = False
        good &= requests[column].fillna(0.0) <= bound
    return {
        "slo_met": bool(met and not requests.empty),
        "slo_observed": observed,
        "goodput_requests_per_s": float(good.sum() / window_s) if window_s > 0 else 0.0,
    }
