"""The verdict a report opens with: users per GPU for each run, whether its SLOs hold, and the best run."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from kvsim.report.data import RunFolder, finite_float, positive_int
from kvsim.report.formatting import format_count, format_duration_s, format_number, format_ratio

# An SLO key of scenario.slo: the metric, then the statistic, in seconds ("ttft_p99_s", "e2e_mean_s").
_SLO_KEY = re.compile(r"^(?P<metric>[a-z0-9_]+?)_(?P<statistic>p\d{1,2}|mean)_s$")

# Summary key and page label of each SLO metric.
_SLO_METRICS = {
    "ttft": ("ttft_s", "TTFT"),
    "tpot": ("tpot_s", "TPOT"),
    "itl": ("itl_s", "ITL"),
    "e2e": ("e2e_latency_s", "E2E latency"),
    "e2e_latency": ("e2e_latency_s", "E2E latency"),
    "queueing_delay": ("queueing_delay_s", "queueing delay"),
}


@dataclass(frozen=True)
class SloTarget:
    """One latency limit of the scenario, such as TTFT p99 ≤ 2 s."""

    key: str
    """The key in scenario.slo, such as "ttft_p99_s"."""
    summary_key: str
    statistic: str
    label: str
    limit_s: float

    def describe(self) -> str:
        return f"{self.label} {self.statistic} ≤ {format_duration_s(self.limit_s)}"


@dataclass(frozen=True)
class SloCheck:
    """A run's value of one SLO metric and whether it is within the limit (None when unknown)."""

    target: SloTarget
    value_s: float | None
    met: bool | None


@dataclass(frozen=True)
class RunVerdict:
    """One run's line of the verdict table."""

    run: str
    max_concurrent_requests: int | None
    concurrent_requests: float | None
    """Users the run holds: the time-averaged batch while requests queued (the KV cache's sustained
    capacity), or the peak when nothing ever queued."""
    users_per_gpu: float | None
    kv_capacity_tokens: int | None
    slo_met: bool | None
    """The summary's `slo_met` when present, otherwise worked out from the SLO checks."""
    slo_checks: tuple[SloCheck, ...]
    gpus_needed: float | None
    output_tokens_per_s: float | None
    goodput_requests_per_s: float | None = None
    ttft_p99_s: float | None = None
    tpot_p99_s: float | None = None


@dataclass(frozen=True)
class Verdict:
    rows: tuple[RunVerdict, ...]
    slo_targets: tuple[SloTarget, ...]
    num_gpus: int
    best_run: str | None
    headline: str
    """Sentences that state how many users fit per GPU, and with which run."""


def slo_targets(slo: dict[str, Any]) -> tuple[SloTarget, ...]:
    """Parse the limits in scenario.slo that the summary can be checked against, and skip other keys."""
    targets = []
    for key, limit in slo.items():
        match = _SLO_KEY.match(str(key))
        limit_s = finite_float(limit)
        if match is None or limit_s is None or match["metric"] not in _SLO_METRICS:
            continue
        summary_key, label = _SLO_METRICS[match["metric"]]
        targets.append(SloTarget(key=key, summary_key=summary_key, statistic=match["statistic"],
                                 label=label, limit_s=limit_s))
    return tuple(targets)


def _check_slos(strategy: dict[str, Any], targets: tuple[SloTarget, ...]) -> tuple[SloCheck, ...]:
    checks = []
    for target in targets:
        stats = strategy.get(target.summary_key)
        value_s = finite_float(stats.get(target.statistic)) if isinstance(stats, dict) else None
        met = None if value_s is None else value_s <= target.limit_s
        checks.append(SloCheck(target=target, value_s=value_s, met=met))
    return tuple(checks)


def _gpus_needed(folder: RunFolder, run: str) -> float | None:
    # The planner may write the figure per run, or as one map keyed by run at the top level.
    value = folder.strategy(run).get("gpus_needed")
    if value is None and isinstance(folder.summary.get("gpus_needed"), dict):
        value = folder.summary["gpus_needed"].get(run)
    return finite_float(value)


def _run_verdict(folder: RunFolder, run: str, targets: tuple[SloTarget, ...]) -> RunVerdict:
    strategy = folder.strategy(run)
    max_concurrent = finite_float(strategy.get("max_concurrent_requests"))
    concurrent = sustained_concurrency(strategy)
    capacity = finite_float(strategy.get("kv_capacity_tokens"))
    checks = _check_slos(strategy, targets)

    slo_met = strategy.get("slo_met")
    if not isinstance(slo_met, bool):
        # Worked out from the checks: one miss decides, but a pass needs every check to be known.
        known = [check.met for check in checks if check.met is not None]
        if False in known:
            slo_met = False
        elif known and len(known) == len(checks):
            slo_met = True
        else:
            slo_met = None

    return RunVerdict(
        run=run,
        max_concurrent_requests=None if max_concurrent is None else round(max_concurrent),
        concurrent_requests=concurrent,
        users_per_gpu=None if concurrent is None else concurrent / folder.num_gpus,
        kv_capacity_tokens=None if capacity is None else round(capacity),
        slo_met=slo_met,
        slo_checks=checks,
        gpus_needed=_gpus_needed(folder, run),
        output_tokens_per_s=finite_float(strategy.get("output_tokens_per_s")),
        goodput_requests_per_s=finite_float(strategy.get("goodput_requests_per_s")),
        ttft_p99_s=_percentile_of(strategy, "ttft_s", "p99"),
        tpot_p99_s=_percentile_of(strategy, "tpot_s", "p99"),
    )


def _percentile_of(strategy: dict[str, Any], key: str, statistic: str) -> float | None:
    stats = strategy.get(key)
    return finite_float(stats.get(statistic)) if isinstance(stats, dict) else None


def is_open_loop(folder: RunFolder) -> bool:
    """Check whether arrivals are fixed in advance (open loop, trace), so the load does not follow the server."""
    workload = folder.scenario.get("workload")
    return isinstance(workload, dict) and workload.get("kind") in ("open_loop", "trace")


def sustained_concurrency(strategy: dict[str, Any]) -> float | None:
    """Users a run holds: its batch averaged over the time requests queued, else its peak batch."""
    saturated = finite_float(strategy.get("saturated_concurrent_requests"))
    if saturated is not None:
        return saturated
    return finite_float(strategy.get("max_concurrent_requests"))


def _rank_key(row: RunVerdict) -> tuple[float, float]:
    # Most users first; throughput breaks ties between runs that hold the same number of users.
    return (row.concurrent_requests or 0, row.output_tokens_per_s or 0.0)


def _gpu_phrase(folder: RunFolder) -> str:
    tp = positive_int(folder.scenario.get("tp"), 1)
    replicas = positive_int(folder.scenario.get("replicas"), 1)
    gpu = str(folder.scenario.get("gpu") or "GPU")
    noun = "GPU" if folder.num_gpus == 1 else "GPUs"
    replica_noun = "replica" if replicas == 1 else "replicas"
    return f"{folder.num_gpus} {gpu} {noun}, TP {tp} × {replicas} {replica_noun}"


def _open_loop_rank_key(row: RunVerdict) -> tuple[float, float, float]:
    # The offered load is the same for every run, so the best run serves it best: the most requests
    # within the SLOs, then the shortest p99 TTFT, then the highest throughput.
    ttft = row.ttft_p99_s if row.ttft_p99_s is not None else float("inf")
    return (row.goodput_requests_per_s or 0.0, -ttft, row.output_tokens_per_s or 0.0)


def _open_loop_verdict(folder: RunFolder, rows: tuple[RunVerdict, ...],
                       targets: tuple[SloTarget, ...]) -> Verdict:
    """Build the verdict for a fixed arrival process. Concurrency there is load × latency, so a slower run
    keeps more requests in flight, and the runs are compared by how well they serve the same load."""
    ranked = [row for row in rows if row.ttft_p99_s is not None]
    if not ranked:
        return Verdict(rows=rows, slo_targets=targets, num_gpus=folder.num_gpus, best_run=None,
                       headline="The summary records no latencies, so the runs cannot be compared.")
    meeting = [row for row in ranked if row.slo_met is True]
    best = max(meeting or ranked, key=_open_loop_rank_key)
    slo_text = ", ".join(target.describe() for target in targets)
    figures = (f"TTFT p99 {format_duration_s(best.ttft_p99_s)}"
               + (f", TPOT p99 {format_duration_s(best.tpot_p99_s)}" if best.tpot_p99_s is not None else "")
               + (f", {format_number(best.output_tokens_per_s)} output tokens/s"
                  if best.output_tokens_per_s is not None else ""))
    if meeting:
        headline = (f"{best.run} serves this load best within the SLOs ({slo_text}): {figures} on "
                    f"{_gpu_phrase(folder)}.")
    elif targets:
        headline = (f"No run meets the SLOs ({slo_text}) at this load on {_gpu_phrase(folder)}. "
                    f"{best.run} comes closest: {figures}"
                    + (f", {format_number(best.goodput_requests_per_s)} requests/s within the SLOs"
                       if best.goodput_requests_per_s is not None else "") + ".")
    else:
        headline = f"{best.run} serves this load best (the scenario sets no SLO): {figures} on {_gpu_phrase(folder)}."
    headline += (" The load is a fixed arrival process, so requests in flight measure latency rather than "
                 "capacity; `kvsim plan` finds the highest load each run sustains.")
    return Verdict(rows=rows, slo_targets=targets, num_gpus=folder.num_gpus, best_run=best.run, headline=headline)


def build_verdict(folder: RunFolder) -> Verdict:
    """Work out the verdict table and the headline for `folder`."""
    targets = slo_targets(folder.slo)
    rows = tuple(_run_verdict(folder, run, targets) for run in folder.run_keys)
    if is_open_loop(folder):
        return _open_loop_verdict(folder, rows, targets)
    ranked = [row for row in rows if row.concurrent_requests is not None]

    # Prefer runs that meet the SLOs; with no SLO result at all, every run competes.
    meeting = [row for row in ranked if row.slo_met is True]
    unknown = [row for row in ranked if row.slo_met is None]
    candidates = meeting or unknown
    best = max(candidates, key=_rank_key) if candidates else None
    headline = _headline(folder, rows, ranked, best, targets, any_meets=bool(meeting))
    return Verdict(rows=rows, slo_targets=targets, num_gpus=folder.num_gpus,
                   best_run=best.run if best else None, headline=headline)


def _headline(folder: RunFolder, rows: tuple[RunVerdict, ...], ranked: list[RunVerdict],
              best: RunVerdict | None, targets: tuple[SloTarget, ...], any_meets: bool) -> str:
    if not ranked:
        return "The summary records no maximum concurrency for any run, so users per GPU are unknown."
    slo_text = ", ".join(target.describe() for target in targets)

    if best is None:
        # Every run with a result misses its SLOs, so name the one that admits the most users anyway.
        most_users = max(ranked, key=_rank_key)
        return (f"No run meets the SLOs ({slo_text or 'as the summary records them'}). "
                f"{most_users.run} reaches the most users while missing them: "
                f"{format_number(most_users.users_per_gpu)} users per GPU "
                f"({format_number(most_users.concurrent_requests)} concurrent requests on {_gpu_phrase(folder)}).")

    if any_meets:
        qualifier = f"within the SLOs ({slo_text})" if slo_text else "within the SLOs"
    elif targets:
        qualifier = "(the summary cannot tell whether the SLOs hold)"
    else:
        qualifier = "(the scenario sets no SLO)"
    sentences = [
        f"{best.run} serves the most users {qualifier}: {format_number(best.users_per_gpu)} users per GPU "
        f"({format_number(best.concurrent_requests)} concurrent requests on {_gpu_phrase(folder)})."
    ]

    fewest = min(ranked, key=_rank_key)
    if (fewest.run != best.run and fewest.concurrent_requests
            and best.concurrent_requests > 1.005 * fewest.concurrent_requests):
        ratio = best.concurrent_requests / fewest.concurrent_requests
        sentences.append(f"That is {format_ratio(ratio)} the users of {fewest.run} "
                         f"({format_number(fewest.users_per_gpu)} per GPU).")
    if best.gpus_needed is not None:
        sentences.append(f"At the scenario's load it needs {format_number(best.gpus_needed)} GPUs.")
    failing = [row.run for row in rows if row.slo_met is False]
    if failing and any_meets:
        sentences.append(f"Missing the SLOs: {', '.join(failing)}.")
    return " ".join(sentences)
