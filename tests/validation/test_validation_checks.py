"""The published-figure checks of `kvsim validate`: pass/fail logic, the KV and capacity rows, the page."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from kvsim import validation
from kvsim.validation import (
    GROUPS,
    Check,
    capacity_checks,
    format_value,
    fragmentation_checks,
    kv_bytes_checks,
    load_fragmentation_scenario,
    render_markdown,
    simulate_fragmentation,
)

REDUCED_REQUESTS = 1500


@pytest.fixture(scope="module")
def fragmentation_scenario():
    return load_fragmentation_scenario(num_requests=REDUCED_REQUESTS)


@pytest.fixture(scope="module")
def fragmentation_summaries(fragmentation_scenario):
    return simulate_fragmentation(fragmentation_scenario)


def _mooncake_rows() -> list[Check]:
    """Hand-made Mooncake rows, so the page test does not replay the 4,000-request trace."""
    group = GROUPS[4]
    return [
        Check(key="mooncake.replay-unbounded.blocks", group=group, name="replay, blocks", ours=0.640,
              published=0.66, unit="fraction", source="Mooncake", tolerance=0.03, required=True),
        Check(key="mooncake.simulated-unbounded", group=group, name="simulation, tokens", ours=0.646,
              published=0.66, unit="fraction", source="Mooncake", tolerance=0.03, required=True),
        Check(key="mooncake.simulated-real-capacity", group=group, name="real capacity", ours=0.225,
              published=None, unit="fraction", source="Mooncake", note="context only"),
    ]


# ---------------------------------------------------------------------------------------------------
# Check semantics
# ---------------------------------------------------------------------------------------------------


def test_check_absolute_tolerance():
    inside = Check(key="a", group=GROUPS[2], name="a", ours=24.9, published=20.0, unit="%", source="s",
                   tolerance=5.0)
    outside = Check(key="b", group=GROUPS[2], name="b", ours=25.1, published=20.0, unit="%", source="s",
                    tolerance=5.0)
    assert inside.passed is True
    assert outside.passed is False
    assert outside.deviation == pytest.approx(5.1)


def test_check_relative_tolerance():
    check = Check(key="c", group=GROUPS[1], name="c", ours=1971, published=1952, unit="blocks", source="s",
                  tolerance=0.03, relative=True, required=True)
    assert check.deviation == pytest.approx(19 / 1952)
    assert check.passed is True
    assert check.failed_required is False


def test_check_exact_and_context_rows():
    exact = Check(key="d", group=GROUPS[0], name="d", ours=327_681, published=327_680, unit="B", source="s",
                  tolerance=0, required=True)
    context = Check(key="e", group=GROUPS[4], name="e", ours=0.2, published=None, unit="fraction", source="s")
    assert exact.passed is False
    assert exact.failed_required is True
    assert context.passed is None
    assert context.failed_required is False


def test_informational_failure_is_not_required():
    check = Check(key="f", group=GROUPS[2], name="f", ours=50.0, published=38.2, unit="%", source="s",
                  tolerance=5.0)
    assert check.passed is False
    assert check.failed_required is False


# ---------------------------------------------------------------------------------------------------
# KV bytes and capacity rows
# ---------------------------------------------------------------------------------------------------


def test_kv_bytes_checks_pass():
    checks = kv_bytes_checks()
    assert len(checks) == 6
    for check in checks:
        assert check.required, check.name
        assert check.passed, f"{check.name}: kvsim {check.ours} against published {check.published}"


def test_kv_bytes_values_by_hand():
    by_key = {check.key: check for check in kv_bytes_checks()}
    # OPT-13B: K and V of hidden 5,120 in 40 layers, FP16.
    assert by_key["kv.opt-13b"].ours == 2 * 5120 * 40 * 2
    # DeepSeek-V3: latent 512 + RoPE key 64 in 61 layers, BF16.
    assert by_key["kv.deepseek-v3"].ours == (512 + 64) * 61 * 2
    assert by_key["kv.deepseek-v2"].ours == (512 + 64) * 60
    # DeepSeek 67B: 95 layers × 8 KV heads × 128 × K and V × 2 B; V2 at 6 bits per element.
    reduction = 1 - (576 * 60 * 0.75) / (95 * 8 * 128 * 2 * 2)
    assert by_key["kv.deepseek-v2-vs-67b"].ours == pytest.approx(100 * reduction)
    assert by_key["kv.textbook-70b-mha"].ours == pytest.approx(2 * 80 * 64 * 128 * 4096 * 2 / 1e9)


def test_capacity_checks_pass(fragmentation_scenario):
    checks = capacity_checks(fragmentation_scenario)
    assert {check.key for check in checks} == {
        "capacity.llama-3.1-8b-rtx-3090", "capacity.opt-13b-a100.slots", "capacity.opt-13b-a100.weights",
        "capacity.opt-13b-a100.kv-memory"}
    for check in checks:
        assert check.required, check.name
        assert check.passed, f"{check.name}: kvsim {check.ours} against published {check.published}"


def test_opt_13b_capacity_by_hand(fragmentation_scenario):
    # 0.9 × 40 GiB, less the FP16 weights (12,840,719,360 parameters) and the activation estimate,
    # in 16-token blocks of 800 KiB per token.
    plan = fragmentation_scenario.capacity()
    usable = int(40 * 1024**3 * 0.9)
    budget = usable - 2 * 12_840_719_360 - plan.activation_peak_bytes
    assert plan.runtime_overhead_bytes == 0
    assert plan.num_blocks == budget // (16 * 819_200)
    assert 15_700 * 0.97 <= plan.kv_capacity_tokens <= 15_700 * 1.03


# ---------------------------------------------------------------------------------------------------
# Fragmentation rows and the page
# ---------------------------------------------------------------------------------------------------


def test_fragmentation_rows_cover_fig2_and_fig13(fragmentation_summaries):
    checks = fragmentation_checks(fragmentation_summaries, REDUCED_REQUESTS, quick=True)
    keys = {check.key for check in checks}
    # 3 Orca systems × 4 shares, vLLM's token states, and Pow2 and Oracle placed first fit.
    assert sum(key.startswith("fig2.") for key in keys) == 15
    # 4 systems, and Pow2 and Oracle placed first fit.
    assert sum(key.startswith("fig13.") for key in keys) == 6
    for check in checks:
        assert not check.required, f"{check.name} must stay informational"
    comparison = [check for check in checks if "-first-fit" in check.key]
    assert {check.key for check in comparison} == {
        "fig2.orca-pow2-first-fit.token", "fig2.orca-oracle-first-fit.token",
        "fig13.orca-pow2-first-fit", "fig13.orca-oracle-first-fit"}
    for check in comparison:
        assert check.published is None, f"{check.name} has no published figure"


def test_first_fit_comparison_runs(fragmentation_summaries):
    # Only the buddy strategies get a first-fit run; Max is first fit already.
    assert set(fragmentation_summaries) == {"Orca (Max)", "Orca (Pow2)", "Orca (Oracle)", "vLLM",
                                            "Orca (Pow2), first fit", "Orca (Oracle), first fit"}
    for system in ("Orca (Pow2)", "Orca (Oracle)"):
        buddy = fragmentation_summaries[system]
        first_fit = fragmentation_summaries[f"{system}, first fit"]
        # Buddy blocks round each reservation up to a power of two: fewer requests fit, less memory holds tokens.
        assert buddy["saturated_concurrent_requests"] < first_fit["saturated_concurrent_requests"], system
        assert buddy["token_state_fraction"] < first_fit["token_state_fraction"], system
        assert buddy["external_fragmentation_fraction"] > first_fit["external_fragmentation_fraction"], system
    # Buddy slack counts as external fragmentation, so Oracle keeps no internal fragmentation, as in the
    # vLLM paper's Fig. 2.
    assert fragmentation_summaries["Orca (Oracle)"]["internal_fragmentation_fraction"] == 0


def test_fig2_shares_sum_to_100(fragmentation_summaries):
    checks = fragmentation_checks(fragmentation_summaries, REDUCED_REQUESTS, quick=True)
    for system in ("orca-max", "orca-pow2", "orca-oracle"):
        shares = [check.ours for check in checks if check.key.startswith(f"fig2.{system}.")]
        assert len(shares) == 4
        assert sum(shares) == pytest.approx(100.0, abs=1e-6)


def test_render_markdown_has_every_check(fragmentation_scenario, fragmentation_summaries):
    checks = (kv_bytes_checks() + capacity_checks(fragmentation_scenario)
              + fragmentation_checks(fragmentation_summaries, REDUCED_REQUESTS, quick=True) + _mooncake_rows())
    page = render_markdown(checks, "kvsim validate --write --quick")
    table_rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| Check")]
    assert len(table_rows) == len(checks)
    for check in checks:
        name_cell = check.name.replace("|", "\\|")
        matching = [row for row in table_rows if row.startswith(f"| {name_cell} |")]
        assert len(matching) == 1, check.name
        assert f"| {format_value(check.ours, check.unit)} |" in matching[0]
        assert f"| {format_value(check.published, check.unit)} |" in matching[0]
    for group in GROUPS:
        assert f"## {group}" in page
    assert "`kvsim validate --write --quick`" in page
    assert "## Orca (Pow2), Orca (Oracle) and the buddy allocator" in page
    assert "## The Mooncake hit rates" in page


def test_render_markdown_results_words():
    checks = [
        Check(key="r1", group=GROUPS[0], name="required ok", ours=1, published=1, unit="B", source="s",
              tolerance=0, required=True),
        Check(key="r2", group=GROUPS[0], name="required bad", ours=2, published=1, unit="B", source="s",
              tolerance=0, required=True),
        Check(key="i1", group=GROUPS[2], name="info bad", ours=50, published=30, unit="%", source="s",
              tolerance=5.0),
    ]
    page = render_markdown(checks, "kvsim validate --write")
    assert re.search(r"^\| required ok \|.*\| \*\*pass\*\* \|", page, re.MULTILINE)
    assert re.search(r"^\| required bad \|.*\| \*\*FAIL\*\* \|", page, re.MULTILINE)
    assert re.search(r"^\| info bad \|.*\| \*outside\* \|", page, re.MULTILINE)
    # Explanations that quote missing checks are left out, not rendered with holes.
    assert "## Why Orca" not in page


# ---------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("validate")(validation.validate_command)
    app.command("noop")(lambda: None)  # two commands keep "validate" as a subcommand name
    return app


def test_command_exits_1_on_required_failure(monkeypatch):
    failing = [Check(key="x", group=GROUPS[0], name="broken bytes", ours=2, published=1, unit="B", source="s",
                     tolerance=0, required=True)]
    monkeypatch.setattr(validation, "run_validation", lambda quick: failing)
    result = CliRunner().invoke(_app(), ["validate"])
    assert result.exit_code == 1
    assert "broken bytes" in result.output


def test_command_ignores_informational_failure(monkeypatch):
    informational = [Check(key="y", group=GROUPS[2], name="gap", ours=50, published=30, unit="%", source="s",
                           tolerance=5.0)]
    monkeypatch.setattr(validation, "run_validation", lambda quick: informational)
    result = CliRunner().invoke(_app(), ["validate"])
    assert result.exit_code == 0


def test_command_write_replaces_page(monkeypatch, tmp_path):
    rows = [Check(key="z", group=GROUPS[0], name="bytes", ours=1, published=1, unit="B", source="s", tolerance=0,
                  required=True)]
    monkeypatch.setattr(validation, "run_validation", lambda quick: rows)
    monkeypatch.setattr(validation, "PROJECT_ROOT", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "validation.md").write_text("old\n")
    result = CliRunner().invoke(_app(), ["validate", "--write", "--quick"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "docs" / "validation.md").read_text()
    assert page.startswith("# Validation against published results")
    assert "`kvsim validate --write --quick`" in page
    assert [path.name for path in (tmp_path / "docs").iterdir()] == ["validation.md"]
