"""The plan and sweep commands, registered on a local typer app as the kvsim app registers them."""

from __future__ import annotations

import json

import pytest
import typer
import yaml
from conftest import TINY_OPEN_LOOP, with_dotted
from typer.testing import CliRunner

from kvsim.cli_planning import plan_command, sweep_command
from kvsim.errors import UserError

app = typer.Typer()
app.command("plan")(plan_command)
app.command("sweep")(sweep_command)
runner = CliRunner()


def write_scenario(tmp_path, changes):
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(with_dotted(TINY_OPEN_LOOP, changes), sort_keys=False))
    return path


def test_plan_json(tmp_path):
    path = write_scenario(tmp_path, {"strategies": ["paged"], "plan.max_load": 2.0, "plan.target_rate_per_s": 7.0,
                                     "plan.gpu_hour_cost_usd": 1.0})
    result = runner.invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["runs"]["paged"]["max_load"] == 2.0
    # ceil(7 / 2) replicas of one GPU.
    assert plan["runs"]["paged"]["gpus_needed"] == 4
    assert plan["load_unit"] == "requests/s"


def test_plan_table_names_unreachable_runs(tmp_path):
    path = write_scenario(tmp_path, {"strategies": ["paged"], "slo.ttft_s": 1e-4})
    result = runner.invoke(app, ["plan", str(path)])
    assert result.exit_code == 0, result.output
    assert "paged: misses the SLOs at every load tried" in result.output


def test_plan_out_writes_report(tmp_path):
    path = write_scenario(tmp_path, {"strategies": ["paged"], "plan.max_load": 2.0})
    out = tmp_path / "out"
    result = runner.invoke(app, ["plan", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "summary.json").read_text())["plan"]["runs"]["paged"]["status"] == "at_max_load"
    assert (out / "report.html").is_file()


def test_sweep_then_resume(write_sweep, tmp_path):
    path = write_sweep()
    out = tmp_path / "out"
    first = runner.invoke(app, ["sweep", str(path), "--workers", "1", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "ran 2 variants, reused 0" in first.output
    second = runner.invoke(app, ["sweep", str(path), "--workers", "1", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "ran 0 variants, reused 2" in second.output
    assert (out / "sweep.csv").is_file()


def test_sweep_unknown_executor(write_sweep):
    result = runner.invoke(app, ["sweep", str(write_sweep()), "--executor", "dask"])
    assert isinstance(result.exception, UserError)
    assert "--executor: unknown executor 'dask'; use local or ray" in str(result.exception)


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_sweep_workers_below_one(write_sweep, workers):
    result = runner.invoke(app, ["sweep", str(write_sweep()), "--workers", workers])
    assert result.exit_code == 2
