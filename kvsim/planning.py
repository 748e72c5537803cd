"""Capacity planning under SLOs: the highest load one replica sustains, and the GPUs a target load needs.

For each run of a scenario (strategy × attention variant), `plan_scenario` searches the load axis of
the workload for the highest load whose simulation meets every SLO bound of the scenario:

- open loop: `workload.arrival.rate_per_s` (requests/s, or sessions/s with multi-turn sessions);
- closed loop: `workload.users` (concurrent users, a whole number);
- trace replay: `workload.rate_scale` (a multiple of the trace's own arrival rate).

Each probe is one `simulate_run` of a single replica (`engine.replicas` forced to 1), because
replicas behind a router serve independent shares of the load. The search brackets the limit
(doubling up from the workload's own load, or halving down from `plan.max_load`), then bisects to the
relative tolerance `plan.tolerance`, like the rate sweeps of `vllm bench serve` done by hand.

SLO met is not exactly monotonic in load. Every probe uses the same seed, and arrival gaps are drawn
as `exponential(1 / rate)` (gamma likewise), so the arrival times at load L are those at load 1
scaled by 1 / L. That keeps the noise small, but a queue can still clear by luck at one load and not
at a slightly lower one. The search therefore reports a load at which the probe met the SLOs, as did
every lower probe, while every higher probe missed. The chart of all probes (the `points`) shows any
load where that ordering breaks.

Then for the scenario's target load: replicas = ceil(target / max load per replica), GPUs =
replicas × tp, and the cost per million output tokens at the max load.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kvsim.atomic import atomic_write_text
from kvsim.errors import UserError
from kvsim.scenario import Scenario
from kvsim.workload.spec import ClosedLoopWorkload, OpenLoopWorkload, TraceWorkload

log = logging.getLogger(__name__)

MAX_BRACKET_STEPS = 12
"""Doublings (or halvings) tried before the search gives up: a factor of 4,096 from the start load."""

PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"

SECONDS_PER_HOUR = 3600.0
TOKENS_PER_MILLION = 1e6

SearchStatus = Literal["found", "never_met", "unbounded", "at_max_load"]
"""The outcome of a search.

found: the limit lies between a probe that met the SLOs and one that missed, within the tolerance.
never_met: every probe missed, down to the lowest load tried.
unbounded: every probe met, up to the highest load tried, so max_load is a lower bound.
at_max_load: the probe at plan.max_load met, so max_load is that bound and the true limit may be higher.
"""


# ---------------------------------------------------------------------------------------------------
# The load axis of a workload
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadAxis:
    """The workload setting the planner varies, with its unit and the plan target that applies."""

    key: str
    """Dotted scenario path of the setting, e.g. "workload.arrival.rate_per_s"."""
    unit: str
    """Unit shown on tables and chart axes, e.g. "requests/s"."""
    start: float
    """The scenario's own value of the setting, where an upward search starts."""
    integer: bool
    """True when loads must be whole numbers (users)."""
    min_load: float
    """Lowest load a downward search probes before it declares the SLOs unreachable."""
    target_field: str
    """The `plan:` field holding the load to serve in this unit (or in requests/s)."""
    measured_rate: bool
    """True when the request rate at a load must be measured from the probe's arrivals, because the
    load is not itself requests/s (sessions, trace rate multiples)."""

    @classmethod
    def for_scenario(cls, scenario: Scenario) -> LoadAxis:
        """Return the load axis of the scenario's workload kind."""
        workload = scenario.spec.workload
        if isinstance(workload, ClosedLoopWorkload):
            # NOTE: a probe simulates users × turns_per_user requests, so under loose SLOs the upward
            # search reaches costly probes before the first miss; plan.max_load caps it.
            return cls(key="workload.users", unit="users", start=float(workload.users), integer=True,
                       min_load=1.0, target_field="target_users", measured_rate=False)
        if isinstance(workload, OpenLoopWorkload):
            # NOTE: with num_requests fixed, a higher rate shortens the arrival window, and the p99 of a
            # short probe may come before the queue has grown to its steady length. Give enough
            # requests (and simulation.warmup_s) that the p99 settles.
            start = float(workload.arrival.rate_per_s)
            sessions = workload.sessions is not None
            return cls(key="workload.arrival.rate_per_s", unit="sessions/s" if sessions else "requests/s",
                       start=start, integer=False, min_load=start / 2**MAX_BRACKET_STEPS,
                       target_field="target_rate_per_s", measured_rate=sessions)
        if isinstance(workload, TraceWorkload):
            start = float(workload.rate_scale)
            return cls(key="workload.rate_scale", unit="× trace rate", start=start, integer=False,
                       min_load=start / 2**MAX_BRACKET_STEPS, target_field="target_rate_per_s",
                       measured_rate=True)
        raise AssertionError(f"unhandled workload kind {type(workload).__name__}")

    def normalize(self, load: float) -> float:
        """Round a load to what the axis accepts: whole users, rates as they are."""
        return float(max(1, math.floor(load))) if self.integer else float(load)

    def setting(self, load: float) -> int | float:
        return int(load) if self.integer else float(load)


def plan_target(scenario: Scenario, axis: LoadAxis) -> float | None:
    """Return the target load of the `plan:` section in the axis's terms, or None when none is given.

    Raises UserError when only the target of another workload kind is given.
    """
    plan = scenario.spec.plan
    other_field = "target_users" if axis.target_field == "target_rate_per_s" else "target_rate_per_s"
    value = getattr(plan, axis.target_field)
    other = getattr(plan, other_field)
    kind = scenario.spec.workload.kind.replace("_", "-")
    if value is None and other is not None:
        raise UserError(
            f"plan.{other_field} is {other} but does not apply to a {kind} workload, whose load is measured in "
            f"{'users' if axis.integer else 'requests/s'}; set plan.{axis.target_field} instead")
    if value is not None and other is not None:
        log.warning("plan.%s does not apply to a %s workload and is left out; plan.%s is used",
                    other_field, kind, axis.target_field)
    return None if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# Probes and the search
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadPoint:
    """The outcome of one probe: a simulation of one replica at one load."""

    load: float
    slo_met: bool
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    e2e_latency_p99_s: float | None
    slo_observed: dict[str, float | None] = field(default_factory=dict)
    """The values the SLO bounds were checked against, at the scenario's percentile."""
    output_tokens_per_s: float = 0.0
    requests_per_s: float = 0.0
    arrival_rate_per_s: float | None = None
    """Requests arriving per second, measured from the first to the last arrival of the probe."""
    max_concurrent_requests: int = 0
    preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "load": self.load,
            "slo_met": self.slo_met,
            "ttft_p99_s": self.ttft_p99_s,
            "tpot_p99_s": self.tpot_p99_s,
            "e2e_latency_p99_s": self.e2e_latency_p99_s,
            "slo_observed": dict(self.slo_observed),
            "output_tokens_per_s": self.output_tokens_per_s,
            "requests_per_s": self.requests_per_s,
            "arrival_rate_per_s": self.arrival_rate_per_s,
            "max_concurrent_requests": self.max_concurrent_requests,
            "preemptions": self.preemptions,
        }


@dataclass(frozen=True)
class SearchResult:
    """The highest load meeting the SLOs, how the search ended, and every probe in load order."""

    status: SearchStatus
    max_load: float | None
    points: tuple[LoadPoint, ...]

    def point_at(self, load: float | None) -> LoadPoint | None:
        return next((point for point in self.points if point.load == load), None)


def search_max_load(probe: Callable[[float], LoadPoint], *, start: float, tolerance: float,
                    integer: bool = False, min_load: float | None = None, upper: float | None = None,
                    max_steps: int = MAX_BRACKET_STEPS) -> SearchResult:
    """Find the highest load at which `probe(load).slo_met` holds, by bracketing and then bisection.

    Without `upper`, the search starts at `start` and doubles while probes meet the SLOs (or halves
    while they miss), at most `max_steps` times. With `upper`, it starts there and only halves.
    Bisection then narrows the bracket until (missed − met) ≤ tolerance × met, or to adjacent whole
    numbers when `integer`. Every probe at or below the returned load met the SLOs, and every probe
    above it missed.
    """
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance}")
    if integer:
        floor = 1.0
    else:
        floor = min_load if min_load is not None else (upper or start) / 2**max_steps
    probed: dict[float, LoadPoint] = {}

    def normalize(load: float) -> float:
        return float(max(1, math.floor(load))) if integer else float(load)

    def met(load: float) -> bool:
        if load not in probed:
            point = probe(load)
            probed[load] = point
        return probed[load].slo_met

    def finish(status: SearchStatus, max_load: float | None) -> SearchResult:
        return SearchResult(status=status, max_load=max_load,
                            points=tuple(probed[load] for load in sorted(probed)))

    # Bracket: find a load that meets the SLOs (lower) and one above it that misses (higher).
    first = normalize(upper if upper is not None else start)
    if met(first):
        if upper is not None:
            return finish("at_max_load", first)
        lower, higher = first, None
        for _ in range(max_steps):
            candidate = normalize(lower * 2)
            if not met(candidate):
                higher = candidate
                break
            lower = candidate
        if higher is None:
            return finish("unbounded", lower)
    else:
        higher, lower = first, None
        while higher > floor:
            candidate = max(normalize(higher / 2), floor)
            if candidate >= higher:
                break
            if met(candidate):
                lower = candidate
                break
            higher = candidate
        if lower is None:
            return finish("never_met", None)

    # Bisect: no probe ever lands inside (lower, higher), so the ordering above stays true.
    while not _converged(lower, higher, tolerance, integer):
        middle = float((int(lower) + int(higher)) // 2) if integer else (lower + higher) / 2
        if met(middle):
            lower = middle
        else:
            higher = middle
    return finish("found", lower)


def _converged(lower: float, higher: float, tolerance: float, integer: bool) -> bool:
    if integer and higher - lower <= 1:
        return True
    return higher - lower <= tolerance * lower


# ---------------------------------------------------------------------------------------------------
# The plan of a scenario
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """The plan of one run: its max load per replica and what the target load needs."""

    run: str
    status: SearchStatus
    max_load: float | None
    points: tuple[LoadPoint, ...]
    replicas_needed: int | None
    gpus_needed: int | None
    cost_per_million_output_tokens_usd: float | None
    """GPU cost of a million output tokens from one replica running at the max load."""
    cost_per_hour_usd: float | None
    """GPU cost per hour of the replicas the target needs."""

    @property
    def max_load_point(self) -> LoadPoint | None:
        return next((point for point in self.points if point.load == self.max_load), None)

    def describe(self, unit: str) -> str:
        """Describe in one sentence how the search ended, for tables and logs."""
        if self.status == "never_met":
            lowest = self.points[0].load if self.points else None
            return f"misses the SLOs at every load tried, down to {format_load(lowest)} {unit}"
        if self.status == "unbounded":
            return f"meets the SLOs at every load tried, up to {format_load(self.max_load)} {unit}"
        if self.status == "at_max_load":
            return f"meets the SLOs at plan.max_load ({format_load(self.max_load)} {unit})"
        return f"max {format_load(self.max_load)} {unit}"

    def to_dict(self) -> dict[str, Any]:
        point = self.max_load_point
        return {
            "status": self.status,
            "max_load": self.max_load,
            "max_load_point": None if point is None else point.to_dict(),
            "replicas_needed": self.replicas_needed,
            "gpus_needed": self.gpus_needed,
            "cost_per_million_output_tokens_usd": self.cost_per_million_output_tokens_usd,
            "cost_per_hour_usd": self.cost_per_hour_usd,
            "num_probes": len(self.points),
            "points": [p.to_dict() for p in self.points],
        }


@dataclass(frozen=True)
class PlanResult:
    """The plan of every run of a scenario, as `kvsim plan` prints it and writes to plan.json."""

    scenario: str
    model: str
    gpu: str
    tp: int
    seed: int
    axis: LoadAxis
    slo: dict[str, float]
    """SLO bounds keyed as the report reads them ("ttft_p99_s"), plus the percentile."""
    tolerance: float
    target_load: float | None
    gpu_hour_cost_usd: float | None
    max_load_bound: float | None
    runs: tuple[RunPlan, ...]

    def to_dict(self) -> dict[str, Any]:
        return _json_safe({
            "scenario": self.scenario,
            "model": self.model,
            "gpu": self.gpu,
            "tp": self.tp,
            "replicas_per_probe": 1,
            "seed": self.seed,
            "load_key": self.axis.key,
            "load_unit": self.axis.unit,
            "slo": dict(self.slo),
            "tolerance": self.tolerance,
            "max_load_bound": self.max_load_bound,
            "target": None if self.target_load is None else {
                "field": f"plan.{self.axis.target_field}",
                "value": self.target_load,
                "unit": "users" if self.axis.integer else "requests/s",
            },
            "gpu_hour_cost_usd": self.gpu_hour_cost_usd,
            "runs": {run.run: run.to_dict() for run in self.runs},
        })


def slo_bounds(scenario: Scenario) -> dict[str, float]:
    """Return the scenario's SLO bounds, keyed like `slo_observed` ("ttft_p99_s"), plus "percentile".

    Raises UserError when the scenario sets no bound, since there is then nothing to plan against.
    """
    slo = scenario.spec.slo
    percentile = f"p{slo.percentile:g}"
    bounds = {f"{name}_{percentile}_s": value
              for name, value in (("ttft", slo.ttft_s), ("tpot", slo.tpot_s), ("e2e_latency", slo.e2e_latency_s))
              if value is not None}
    if not bounds:
        raise UserError(f"{scenario.path or scenario.name}: slo: no bound is set, so there is no load limit to "
                        f"find; set at least one of slo.ttft_s, slo.tpot_s or slo.e2e_latency_s")
    return {**bounds, "percentile": float(slo.percentile)}


def probe_scenario(scenario: Scenario, axis: LoadAxis, load: float) -> Scenario:
    """Return the scenario at `load` on one replica."""
    return scenario.with_changes({"engine.replicas": 1, axis.key: axis.setting(load)})


def plan_scenario(scenario: Scenario, *, seed: int | None = None, profile: Any | None = None,
                  on_probe: Callable[[str, float, LoadPoint | None], None] | None = None) -> PlanResult:
    """Search the max load of every run of `scenario` under its SLOs, and size the target load.

    `on_probe(run_key, load, None)` is called before each probe and `on_probe(run_key, load, point)`
    after it. Raises UserError when the scenario has no SLO bound, or a plan target of the wrong kind.
    """
    from kvsim.simulation import simulate_run

    seed = scenario.spec.seed if seed is None else seed
    slo = slo_bounds(scenario)
    axis = LoadAxis.for_scenario(scenario)
    target = plan_target(scenario, axis)
    plan = scenario.spec.plan
    upper = None if plan.max_load is None else axis.normalize(plan.max_load)
    scenarios_by_load: dict[float, Scenario] = {}

    def scenario_at(load: float) -> Scenario:
        # One scenario per load, shared by the runs: validation and model resolution happen once.
        if load not in scenarios_by_load:
            scenarios_by_load[load] = probe_scenario(scenario, axis, load)
        return scenarios_by_load[load]

    run_plans = []
    for run in scenario.runs():
        def probe(load: float, key: str = run.key) -> LoadPoint:
            if on_probe:
                on_probe(key, load, None)
            at_load = scenario_at(load)
            run_at_load = next(r for r in at_load.runs() if r.key == key)
            result = simulate_run(at_load, run_at_load, seed=seed, profile=profile)
            point = load_point(load, result.summary, result.requests)
            log.debug("%s at %s %s: SLO %s", key, format_load(load), axis.unit,
                      "met" if point.slo_met else "missed")
            if on_probe:
                on_probe(key, load, point)
            return point

        search = search_max_load(probe, start=axis.start, tolerance=plan.tolerance, integer=axis.integer,
                                 min_load=axis.min_load, upper=upper)
        run_plans.append(size_run(run.key, search, axis=axis, target_load=target, tp=scenario.engine.tp,
                                  gpu_hour_cost_usd=plan.gpu_hour_cost_usd))
        log.info("%s: %s after %d probes", run.key, run_plans[-1].describe(axis.unit), len(search.points))

    return PlanResult(scenario=scenario.name, model=scenario.model.name, gpu=scenario.gpu.name,
                      tp=scenario.engine.tp, seed=seed, axis=axis, slo=slo, tolerance=plan.tolerance,
                      target_load=target, gpu_hour_cost_usd=plan.gpu_hour_cost_usd, max_load_bound=upper,
                      runs=tuple(run_plans))


def load_point(load: float, summary: dict[str, Any], requests: Any = None) -> LoadPoint:
    """Build a LoadPoint from a run summary (and its per-request frame, for the arrival rate)."""
    arrival_rate = None
    if requests is not None and len(requests) >= 2:
        span_s = float(requests["arrival_s"].max() - requests["arrival_s"].min())
        # n arrivals span n - 1 gaps.
        arrival_rate = (len(requests) - 1) / span_s if span_s > 0 else None
    return LoadPoint(
        load=load,
        slo_met=bool(summary.get("slo_met")),
        ttft_p99_s=_finite(summary["ttft_s"]["p99"]),
        tpot_p99_s=_finite(summary["tpot_s"]["p99"]),
        e2e_latency_p99_s=_finite(summary["e2e_latency_s"]["p99"]),
        slo_observed={key: _finite(value) for key, value in (summary.get("slo_observed") or {}).items()},
        output_tokens_per_s=float(summary["output_tokens_per_s"]),
        requests_per_s=float(summary["requests_per_s"]),
        arrival_rate_per_s=arrival_rate,
        max_concurrent_requests=int(summary["max_concurrent_requests"]),
        preemptions=int(summary["preemptions"]),
    )


def size_run(run: str, search: SearchResult, *, axis: LoadAxis, target_load: float | None, tp: int,
             gpu_hour_cost_usd: float | None) -> RunPlan:
    """Turn a search result into replicas, GPUs and cost for the target load."""
    point = search.point_at(search.max_load)
    replicas = None
    if target_load is not None and point is not None:
        capacity = replica_capacity(axis, point)
        if capacity is not None and capacity > 0:
            replicas = replicas_needed(target_load, capacity)
    gpus = None if replicas is None else replicas * tp

    cost_per_million = None
    cost_per_hour = None
    if gpu_hour_cost_usd is not None:
        if point is not None and point.output_tokens_per_s > 0:
            replica_cost_per_s = tp * gpu_hour_cost_usd / SECONDS_PER_HOUR
            cost_per_million = replica_cost_per_s / point.output_tokens_per_s * TOKENS_PER_MILLION
        if gpus is not None:
            cost_per_hour = gpus * gpu_hour_cost_usd
    return RunPlan(run=run, status=search.status, max_load=search.max_load, points=search.points,
                   replicas_needed=replicas, gpus_needed=gpus,
                   cost_per_million_output_tokens_usd=cost_per_million, cost_per_hour_usd=cost_per_hour)


def replica_capacity(axis: LoadAxis, point: LoadPoint) -> float | None:
    """Return the load one replica serves at `point`, in the unit of the plan target (users or requests/s)."""
    if axis.measured_rate:
        # Sessions send several requests per arrival, and a trace's rate multiple has no unit of its
        # own, so the request rate is what the probe's arrivals show.
        return point.arrival_rate_per_s
    return point.load


def replicas_needed(target_load: float, load_per_replica: float) -> int:
    """ceil(target / load per replica), at least 1.

    The ratio is shrunk by one part in 10^12 first, so that a floating-point quotient such as
    4.000000000000001 for an exact 4 does not add a replica.
    """
    return max(1, math.ceil(target_load / load_per_replica * (1 - 1e-12)))


# ---------------------------------------------------------------------------------------------------
# Writing the plan into a results folder
# ---------------------------------------------------------------------------------------------------


def write_plan(plan: PlanResult, scenario: Scenario, out_dir: Path, *, seed: int | None = None,
               profile: Any | None = None, profile_path: Path | None = None,
               render: bool = True) -> list[Path]:
    """Write plan.json into `out_dir` and merge the plan into its summary.json, then re-render the report.

    When `out_dir` has no summary.json yet, the scenario is simulated there first, as `kvsim run`
    does. Raises UserError when the folder contains the results of another scenario.
    """
    from kvsim.simulation import simulate, write_results

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary_path = out_dir / SUMMARY_FILE
    written = []
    if not summary_path.is_file():
        log.info("%s has no %s; simulating %s there first", out_dir, SUMMARY_FILE, scenario.name)
        result = simulate(scenario, seed=seed, profile=profile, profile_path=profile_path)
        written.extend(write_results(result, out_dir))

    plan_dict = plan.to_dict()
    written.append(atomic_write_text(out_dir / PLAN_FILE, json.dumps(plan_dict, indent=2, allow_nan=False) + "\n"))
    summary = merge_plan_into_summary(_read_summary(summary_path), plan_dict, source=summary_path)
    written.append(atomic_write_text(summary_path, json.dumps(summary, indent=2, allow_nan=False) + "\n"))

    if render:
        from kvsim.report import render_report

        written.append(render_report(out_dir))
    return list(dict.fromkeys(written))


def merge_plan_into_summary(summary: dict[str, Any], plan_dict: dict[str, Any], *, source: Path) -> dict[str, Any]:
    """Return `summary` with the `plan` key set and `gpus_needed` on each run the plan covers."""
    recorded = (summary.get("scenario") or {}).get("name")
    if recorded is not None and recorded != plan_dict["scenario"]:
        raise UserError(f"{source} contains results of scenario {recorded!r}, not {plan_dict['scenario']!r}; "
                        f"pass another --out folder, or an empty one")
    merged = dict(summary)
    merged["plan"] = plan_dict
    strategies = {key: dict(entry) for key, entry in (summary.get("strategies") or {}).items()}
    for key, entry in strategies.items():
        run_plan = plan_dict["runs"].get(key)
        if run_plan is None:
            continue
        if run_plan["gpus_needed"] is None:
            # A figure left from an earlier plan would no longer be true.
            entry.pop("gpus_needed", None)
        else:
            entry["gpus_needed"] = run_plan["gpus_needed"]
    merged["strategies"] = strategies
    missing = sorted(set(plan_dict["runs"]) - set(strategies))
    if missing:
        log.warning("%s has no runs %s; their plan is in plan.json only", source, ", ".join(missing))
    return merged


def _read_summary(path: Path) -> dict[str, Any]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg}); delete it and run "
                        f"`kvsim plan --out` again to rewrite the folder") from None
    if not isinstance(summary, dict):
        raise UserError(f"{path} contains a JSON {type(summary).__name__}, expected the object `kvsim run` writes")
    return summary


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def format_load(load: float | None) -> str:
    """Format a load for tables: whole numbers with separators, others to 4 significant digits."""
    if load is None:
        return "—"
    return f"{load:,.0f}" if load == int(load) and abs(load) >= 1 else f"{load:.4g}"


__all__ = [
    "LoadAxis", "LoadPoint", "PlanResult", "RunPlan", "SearchResult", "format_load", "load_point",
    "merge_plan_into_summary", "plan_scenario", "plan_target", "probe_scenario", "replica_capacity",
    "replicas_needed", "search_max_load", "size_run", "slo_bounds", "write_plan",
]
