"""`plan_scenario` on tiny scenarios, checked against brute-force scans that call simulate_run directly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import TINY_CLOSED_LOOP, TINY_OPEN_LOOP, with_dotted

from kvsim.errors import UserError
from kvsim.planning import merge_plan_into_summary, plan_scenario, write_plan
from kvsim.scenario import Scenario, validate_scenario
from kvsim.simulation import simulate, simulate_run, write_results

TOLERANCE = 0.05


def slo_met_at(scenario, run_key: str, load_key: str, load) -> bool:
    """SLO met of one run at one load on one replica, simulated here without the planner."""
    at_load = scenario.with_changes({load_key: load, "engine.replicas": 1})
    run = next(run for run in at_load.runs() if run.key == run_key)
    return simulate_run(at_load, run, seed=scenario.spec.seed).summary["slo_met"]


def last_met_before_first_miss(scenario, run_key: str, load_key: str, loads) -> float:
    """Scan `loads` in order; return the last load met before the first miss, and check the scan is monotone."""
    met = [slo_met_at(scenario, run_key, load_key, load) for load in loads]
    assert met[0], f"{run_key} misses the SLOs already at {loads[0]}; start the scan lower"
    first_miss = met.index(False)
    # The bounds below hold for a limit that is monotone in load, so the scan must show one step.
    assert not any(met[first_miss:]), f"{run_key}: SLO met is not monotone on {list(zip(loads, met))}"
    return loads[first_miss - 1]


def brute_force_limit(scenario, run_key: str, coarse: list[float], fine_step: float) -> float:
    key = "workload.arrival.rate_per_s"
    coarse_limit = last_met_before_first_miss(scenario, run_key, key, coarse)
    coarse_step = coarse[1] - coarse[0]
    fine = [round(coarse_limit + i * fine_step, 6) for i in range(int(round(coarse_step / fine_step)) + 1)]
    return last_met_before_first_miss(scenario, run_key, key, fine)


@pytest.fixture(scope="module")
def tiny_plan():
    data = with_dotted(TINY_OPEN_LOOP, {"plan.tolerance": TOLERANCE})
    scenario = Scenario(validate_scenario(data, source="test"))
    return scenario, plan_scenario(scenario)


def test_rate_limit_matches_brute_force(tiny_plan):
    scenario, plan = tiny_plan
    runs = {run.run: run for run in plan.runs}
    cases = {"paged": ([float(rate) for rate in range(1, 25)], 0.1),
             "contiguous": ([0.25 * i for i in range(1, 11)], 0.05)}
    for run_key, (coarse, fine_step) in cases.items():
        limit = brute_force_limit(scenario, run_key, coarse, fine_step)
        found = runs[run_key].max_load
        assert runs[run_key].status == "found"
        # The true limit T lies in [limit, limit + fine_step); the search returns a load in [T / (1 + tol), T].
        assert found >= limit / (1 + TOLERANCE) - 1e-9, run_key
        assert found <= limit + fine_step + 1e-9, run_key


def test_found_load_meets_and_next_step_misses(tiny_plan):
    scenario, plan = tiny_plan
    for run in plan.runs:
        assert slo_met_at(scenario, run.run, "workload.arrival.rate_per_s", run.max_load)
        assert not slo_met_at(scenario, run.run, "workload.arrival.rate_per_s",
                              run.max_load * (1 + TOLERANCE) * 1.001)


def test_points_cover_every_probe(tiny_plan):
    _, plan = tiny_plan
    plan_dict = plan.to_dict()
    assert plan_dict["load_unit"] == "requests/s"
    assert plan_dict["slo"] == {"ttft_p99_s": 1.0, "tpot_p99_s": 0.05, "percentile": 99.0}
    for run in plan.runs:
        points = plan_dict["runs"][run.run]["points"]
        assert [point["load"] for point in points] == sorted(point["load"] for point in points)
        assert {"load", "ttft_p99_s", "tpot_p99_s", "slo_met"} <= set(points[0])
        met_loads = [point["load"] for point in points if point["slo_met"]]
        assert max(met_loads) == run.max_load
    json.dumps(plan_dict, allow_nan=False)


def test_users_limit_matches_brute_force(make_scenario):
    scenario = make_scenario({"plan.tolerance": 0.01}, base=TINY_CLOSED_LOOP)
    plan = plan_scenario(scenario)
    limit = last_met_before_first_miss(scenario, "paged", "workload.users", list(range(1, 17)))
    (run,) = plan.runs
    assert plan.axis.unit == "users"
    # Whole users and a 1 % tolerance: the search ends on adjacent numbers, so it finds the limit exactly.
    assert run.max_load == limit


def test_gpus_and_cost_by_hand(make_scenario):
    target_rate, price, tp = 50.0, 2.5, 2
    scenario = make_scenario({"engine.tp": tp, "strategies": ["paged"], "plan.target_rate_per_s": target_rate,
                              "plan.gpu_hour_cost_usd": price})
    (run,) = plan_scenario(scenario).runs

    replicas = math.ceil(target_rate / run.max_load)
    at_max = scenario.with_changes({"workload.arrival.rate_per_s": run.max_load, "engine.replicas": 1})
    output_tokens_per_s = simulate_run(at_max, at_max.runs()[0], seed=scenario.spec.seed).summary["output_tokens_per_s"]
    # tp GPUs cost tp × price per hour and emit output_tokens_per_s × 3600 tokens in that hour.
    cost_per_million = tp * price / (output_tokens_per_s * 3600) * 1e6

    assert run.replicas_needed == replicas
    assert run.gpus_needed == replicas * tp
    assert run.cost_per_hour_usd == pytest.approx(replicas * tp * price)
    assert run.cost_per_million_output_tokens_usd == pytest.approx(cost_per_million, rel=1e-9)


def test_unreachable_slo_is_reported(make_scenario):
    scenario = make_scenario({"slo.ttft_s": 1e-4, "strategies": ["paged"], "plan.target_rate_per_s": 10.0})
    (run,) = plan_scenario(scenario).runs
    assert run.status == "never_met"
    assert run.max_load is None
    assert run.gpus_needed is None
    assert "misses the SLOs at every load tried" in run.describe("requests/s")
    assert all(not point.slo_met for point in run.points)


def test_max_load_bound_caps_search(make_scenario):
    scenario = make_scenario({"strategies": ["paged"], "plan.max_load": 3.0})
    (run,) = plan_scenario(scenario).runs
    assert run.status == "at_max_load"
    assert run.max_load == 3.0
    assert len(run.points) == 1


def test_no_slo_is_user_error(make_scenario):
    scenario = make_scenario({"slo": {}})
    with pytest.raises(UserError, match=r"slo: no bound is set.*slo\.ttft_s"):
        plan_scenario(scenario)


def test_wrong_target_kind_is_user_error(make_scenario):
    scenario = make_scenario({"plan.target_users": 100})
    with pytest.raises(UserError, match=r"plan\.target_users is 100 .* set plan\.target_rate_per_s"):
        plan_scenario(scenario)


def test_probes_run_on_one_replica(make_scenario):
    scenario = make_scenario({"engine.replicas": 4, "strategies": ["paged"], "plan.max_load": 2.0})
    (run,) = plan_scenario(scenario).runs
    point = run.points[0]
    single = make_scenario({"strategies": ["paged"], "workload.arrival.rate_per_s": 2.0})
    summary = simulate_run(single, single.runs()[0], seed=single.spec.seed).summary
    assert point.max_concurrent_requests == summary["max_concurrent_requests"]
    assert point.ttft_p99_s == summary["ttft_s"]["p99"]


def test_write_plan_runs_scenario_first(make_scenario, tmp_path):
    scenario = make_scenario({"strategies": ["paged"], "plan.max_load": 2.0, "plan.target_rate_per_s": 5.0})
    plan = plan_scenario(scenario)
    write_plan(plan, scenario, tmp_path, render=False)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["plan"]["runs"]["paged"]["max_load"] == 2.0
    # ceil(5 / 2) replicas of one GPU each.
    assert summary["strategies"]["paged"]["gpus_needed"] == 3
    assert (tmp_path / "requests.csv").is_file()
    assert json.loads((tmp_path / "plan.json").read_text()) == summary["plan"]


def test_write_plan_merges_and_renders(make_scenario, tmp_path):
    scenario = make_scenario({"strategies": ["paged"], "plan.max_load": 2.0, "plan.target_rate_per_s": 5.0})
    write_results(simulate(scenario), tmp_path)
    before = json.loads((tmp_path / "summary.json").read_text())
    write_plan(plan_scenario(scenario), scenario, tmp_path)
    after = json.loads((tmp_path / "summary.json").read_text())
    assert after["strategies"]["paged"]["max_concurrent_requests"] == before["strategies"]["paged"]["max_concurrent_requests"]
    assert after["created_at"] == before["created_at"]
    assert after["strategies"]["paged"]["gpus_needed"] == 3
    assert (tmp_path / "plan.png").is_file()
    assert "Latency against load" in (tmp_path / "report.html").read_text()


def test_merge_rejects_other_scenario(tmp_path):
    summary = {"scenario": {"name": "other"}, "strategies": {"paged": {}}}
    plan_dict = {"scenario": "tiny-plan", "runs": {}}
    with pytest.raises(UserError, match="contains results of scenario 'other', not 'tiny-plan'"):
        merge_plan_into_summary(summary, plan_dict, source=tmp_path / "summary.json")


def test_merge_drops_stale_gpus_needed(tmp_path):
    summary = {"scenario": {"name": "s"}, "strategies": {"paged": {"gpus_needed": 7}, "radix": {"gpus_needed": 2}}}
    plan_dict = {"scenario": "s", "runs": {"paged": {"gpus_needed": None}}}
    merged = merge_plan_into_summary(summary, plan_dict, source=tmp_path / "summary.json")
    assert "gpus_needed" not in merged["strategies"]["paged"]
    # A run the plan does not cover keeps what it had.
    assert merged["strategies"]["radix"]["gpus_needed"] == 2
    assert summary["strategies"]["paged"]["gpus_needed"] == 7


def test_trace_rate_scale_axis(make_scenario, tmp_path):
    trace = tmp_path / "trace.csv"
    arrivals = np.arange(60) * 0.5
    rows = "\n".join(f"{t:.3f},{200 + (i % 7) * 40},{50 + (i % 5) * 30}" for i, t in enumerate(arrivals))
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + rows + "\n")
    scenario = make_scenario({"workload": {"kind": "trace", "path": str(trace), "format": "generic"},
                              "strategies": ["paged"], "plan.target_rate_per_s": 20.0, "plan.tolerance": 0.1})
    plan = plan_scenario(scenario)
    (run,) = plan.runs
    assert plan.axis.key == "workload.rate_scale"
    assert run.status == "found"
    # The trace sends 2 requests/s at rate_scale 1, so one replica at rate_scale s serves 2 s requests/s,
    # and the target needs the next whole number of replicas at or above 20 / (2 s).
    exact = 20.0 / (2.0 * run.max_load)
    assert run.replicas_needed >= exact - 1e-6
    assert run.replicas_needed - 1 < exact + 1e-6
