"""Sweeps: the sweep file's checks, resume after an interruption, and equal tables from every executor."""

from __future__ import annotations

import json
from pathlib import Path

import shlex
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml

import kvsim.sweep as sweep_module
from kvsim.errors import UserError
from kvsim.scenario import load_scenario
from kvsim.simulation import simulate_run
from kvsim.sweep import load_sweep, make_tasks, run_sweep, run_variant, variant_id

REPO = Path(__file__).resolve().parents[2]

GRID_2X2 = {"engine.block_size": [16, 32], "workload.arrival.rate_per_s": [2.0, 6.0]}


class CountingTask:
    """Stands in for run_variant: counts calls and raises on call number `fail_on` (1-based)."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[str] = []
        self.fail_on = fail_on

    def __call__(self, task):
        if self.fail_on is not None and len(self.calls) + 1 == self.fail_on:
            raise RuntimeError("interrupted")
        self.calls.append(task.variant_id)
        return run_variant(task)


# ---------------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "grid", "message"),
    [
        ({"sed": 1}, None, r"sweep\.yaml: unknown key 'sed'; a sweep file has name, description, base, grid and seed"),
        ({}, {"engine.blok_size": [8]},
         r"grid\.engine\.blok_size: value 8 is invalid for the base scenario: engine\.blok_size: unknown key 'blok_size'"),
        ({}, {"engine.block_size": [16, 0]},
         r"grid\.engine\.block_size: value 0 is invalid for the base scenario: engine\.block_size: .*greater than or equal to 1"),
        ({}, {"gpu.preset": ["H100-SXM", "H900"]}, r"grid\.gpu\.preset: value H900 is invalid"),
        ({}, {"engine.block_size": 16}, r"grid\.engine\.block_size: expected a list of values, got 16"),
        ({}, {"engine.block_size": []}, r"grid\.engine\.block_size has no values"),
        ({}, {"engine.block_size": [16, 16]}, r"grid\.engine\.block_size repeats the value\(s\) 16"),
        ({}, {"engine": [{"tp": 1}], "engine.tp": [1]}, r"grid keys engine and engine\.tp overlap"),
        ({}, {"engine..tp": [1]}, r"grid key 'engine\.\.tp' is not a dotted setting name"),
        ({}, {}, r"grid: the grid is empty"),
        ({"seed": 1}, {"seed": [1, 2]}, r"seed is set and grid\.seed varies it too"),
        ({"base": "missing.yaml"}, None, r"base: scenario file 'missing\.yaml' not found"),
    ],
)
def test_bad_sweep_file_message(write_sweep, fields, grid, message):
    path = write_sweep(grid, **fields)
    with pytest.raises(UserError, match=message) as error:
        load_sweep(path)
    assert "\n" not in str(error.value)


def test_missing_base_key(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("grid: {engine.block_size: [16]}\n")
    with pytest.raises(UserError, match=r"sweep\.yaml: base: required field is missing"):
        load_sweep(path)


def test_sweep_file_not_mapping(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("- base.yaml\n")
    with pytest.raises(UserError, match="must be a YAML mapping with base: and grid:, not a list"):
        load_sweep(path)


def test_variants_cover_the_grid(write_sweep):
    sweep = load_sweep(write_sweep({"engine.block_size": [8, 16, 32], "strategies": [["paged"], ["paged+prefix"]]}))
    settings = [variant.settings_dict for variant in sweep.variants]
    assert len(settings) == 6
    assert {json.dumps(item, sort_keys=True) for item in settings} == {
        json.dumps({"engine.block_size": size, "strategies": strategies}, sort_keys=True)
        for size in (8, 16, 32) for strategies in (["paged"], ["paged+prefix"])}
    assert len({variant.id for variant in sweep.variants}) == 6


def test_variant_id_ignores_key_order():
    assert variant_id([("a.b", 1), ("c", "x")]) == variant_id([("c", "x"), ("a.b", 1)])
    assert variant_id([("a.b", 1)]) != variant_id([("a.b", 2)])
    assert variant_id([("a.b", 1)]) != variant_id([("a.c", 1)])


def test_seed_from_base_or_sweep(write_sweep):
    assert {variant.seed for variant in load_sweep(write_sweep()).variants} == {3}
    assert {variant.seed for variant in load_sweep(write_sweep(seed=11)).variants} == {11}
    seeds = [variant.seed for variant in load_sweep(write_sweep({"seed": [5, 6]})).variants]
    assert sorted(seeds) == [5, 6]


# ---------------------------------------------------------------------------------------------------
# Running, resuming, the table
# ---------------------------------------------------------------------------------------------------


def test_resume_runs_only_missing(write_sweep, tmp_path, monkeypatch):
    sweep = load_sweep(write_sweep(GRID_2X2))
    out = tmp_path / "out"

    interrupted = CountingTask(fail_on=3)
    monkeypatch.setattr(sweep_module, "run_variant", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_sweep(sweep, out, executor="serial", report=False)
    done = sorted(path.stem for path in (out / "variants").glob("*.json"))
    assert sorted(interrupted.calls) == done
    assert len(done) == 2

    resumed = CountingTask()
    monkeypatch.setattr(sweep_module, "run_variant", resumed)
    outcome = run_sweep(sweep, out, executor="serial", report=False)
    every_id = sorted(variant.id for variant in sweep.variants)
    assert sorted(resumed.calls) == sorted(set(every_id) - set(done))
    assert list(outcome.reused) == done
    assert len(outcome.table) == 4

    again = CountingTask()
    monkeypatch.setattr(sweep_module, "run_variant", again)
    run_sweep(sweep, out, executor="serial", report=False)
    assert again.calls == []


def test_other_seed_runs_again(write_sweep, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_sweep(load_sweep(write_sweep()), out, executor="serial", report=False)
    counting = CountingTask()
    monkeypatch.setattr(sweep_module, "run_variant", counting)
    run_sweep(load_sweep(write_sweep(seed=9)), out, executor="serial", report=False)
    assert len(counting.calls) == 2


def test_table_rows_match_direct_runs(write_sweep, tmp_path):
    sweep = load_sweep(write_sweep(GRID_2X2, scenario_changes={"strategies": ["paged", "contiguous"]}))
    outcome = run_sweep(sweep, tmp_path / "out", executor="serial", report=False)
    table = outcome.table
    assert len(table) == 4 * 2
    assert list(table["variant_id"]) == sorted(table["variant_id"])
    assert not [column for column in table.columns if "wall" in column or "time" in column.split("_")]

    variant = sweep.variants[0]
    scenario = load_scenario(sweep.base.path).with_changes(variant.settings_dict)
    for run in scenario.runs():
        summary = simulate_run(scenario, run, seed=variant.seed).summary
        row = table[(table["variant_id"] == variant.id) & (table["run"] == run.key)].iloc[0]
        assert row["engine.block_size"] == variant.settings_dict["engine.block_size"]
        assert row["max_concurrent_requests"] == summary["max_concurrent_requests"]
        users = summary["saturated_concurrent_requests"]
        if users is None:
            users = summary["max_concurrent_requests"]
        assert row["users_per_gpu"] == users / summary["gpus"]
        assert row["ttft_p99_s"] == summary["ttft_s"]["p99"]
        assert row["kv_capacity_tokens"] == summary["kv_capacity_tokens"]


def test_failed_variant_kept_as_error(write_sweep, tmp_path, monkeypatch):
    # Without the fixed KV capacity of the tiny scenario, the 70B weights must fit the GPU, and do not.
    sweep = load_sweep(write_sweep({"model.preset": ["Llama-3.1-8B", "Llama-3.1-70B"]},
                                   scenario_changes={"engine.kv_capacity_tokens": None}))
    outcome = run_sweep(sweep, tmp_path / "out", executor="serial")
    assert len(outcome.failed) == 1
    failed = outcome.table[outcome.table["error"].notna()]
    assert list(failed["model.preset"]) == ["Llama-3.1-70B"]
    assert "does not fit L40S" in failed["error"].iloc[0]
    assert failed["run"].isna().all()
    # The same settings would fail again, so a second run reuses the error.
    counting = CountingTask()
    monkeypatch.setattr(sweep_module, "run_variant", counting)
    run_sweep(sweep, tmp_path / "out", executor="serial", report=False)
    assert counting.calls == []


def test_report_charts_and_stale_png(write_sweep, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep_old_chart.png").write_bytes(b"old")
    run_sweep(load_sweep(write_sweep(GRID_2X2)), out, executor="serial")
    html = (out / "sweep.html").read_text()
    assert "workload.arrival.rate_per_s" in html
    assert (out / "sweep_users_per_gpu_by_engine_block_size.png").read_bytes().startswith(b"\x89PNG")
    assert (out / "sweep_ranking.png").is_file()
    assert (out / "sweep_tradeoff.png").is_file()
    assert not (out / "sweep_old_chart.png").exists()
    assert (out / "sweep.yaml").read_text() == (tmp_path / "sweep.yaml").read_text()


def test_report_escapes_grid_text(write_sweep, tmp_path):
    sweep = load_sweep(write_sweep({"engine.block_size": [16]}, description="<script>alert(1)</script>"))
    run_sweep(sweep, tmp_path / "out", executor="serial")
    html = (tmp_path / "out" / "sweep.html").read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;" in html


def test_local_pool_matches_serial(write_sweep, tmp_path):
    sweep = load_sweep(write_sweep(GRID_2X2))
    serial = run_sweep(sweep, tmp_path / "serial", executor="serial", report=False)
    pooled = run_sweep(sweep, tmp_path / "pooled", executor="local", workers=2, report=False)
    assert len(pooled.ran) == 4
    assert (tmp_path / "serial" / "sweep.csv").read_bytes() == (tmp_path / "pooled" / "sweep.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "serial" / "sweep.parquet"),
                                  pd.read_parquet(tmp_path / "pooled" / "sweep.parquet"))
    pd.testing.assert_frame_equal(serial.table, pooled.table)


RAY_IN_PRIVATE_NETWORK = """
import sys
from pathlib import Path
from kvsim.sweep import load_sweep, run_sweep
outcome = run_sweep(load_sweep(Path(sys.argv[1])), Path(sys.argv[2]), executor="ray", workers=2, report=False)
print(len(outcome.ran))
"""


@pytest.mark.ray
def test_ray_matches_local(write_sweep, tmp_path):
    pytest.importorskip("ray")
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) to give Ray a loopback-only network")
    sweep_path = write_sweep({"engine.block_size": [16, 32], "workload.arrival.rate_per_s": [2.0]})
    run_sweep(load_sweep(sweep_path), tmp_path / "local", executor="local", workers=2, report=False)

    # A local Ray's core services listen on every interface; a private network namespace whose only
    # interface is loopback keeps them off the machine's network.
    script = (f"ip link set lo up && {shlex.quote(sys.executable)} -c {shlex.quote(RAY_IN_PRIVATE_NETWORK)} "
              f"{shlex.quote(str(sweep_path))} {shlex.quote(str(tmp_path / 'ray'))}")
    process = subprocess.run(["unshare", "--net", "--map-root-user", "sh", "-c", script], capture_output=True,
                             text=True, timeout=600)
    if process.returncode != 0 and "unshare" in process.stderr:
        pytest.skip(f"cannot create a private network namespace: {process.stderr.strip()[:200]}")
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip().splitlines()[-1] == "2"
    assert (tmp_path / "local" / "sweep.csv").read_bytes() == (tmp_path / "ray" / "sweep.csv").read_bytes()


def test_ray_missing_is_user_error(write_sweep, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UserError, match=r"pip install 'kvsim\[distributed\]'"):
        run_sweep(load_sweep(write_sweep()), tmp_path / "out", executor="ray", report=False)


# ---------------------------------------------------------------------------------------------------
# Shipped files
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "scenarios" / "sweeps").glob("*.yaml")), ids=lambda path: path.name)
def test_shipped_sweep_runs_one_variant(path):
    sweep = load_sweep(path)
    assert len(sweep.variants) >= 2
    record = run_variant(make_tasks(sweep, sweep.variants[:1])[0])
    assert record["error"] is None
    assert set(record["runs"]) == {run.key for run in sweep.base.runs()}


def test_shipped_plan_scenario_has_plan_inputs():
    scenario = load_scenario(REPO / "scenarios" / "plan-chat-h100.yaml")
    assert scenario.spec.slo.ttft_s is not None
    assert scenario.spec.plan.target_rate_per_s is not None
    assert scenario.spec.plan.gpu_hour_cost_usd is not None
    assert yaml.safe_load((REPO / "scenarios" / "plan-chat-h100.yaml").read_text())["workload"]["kind"] == "open_loop"
