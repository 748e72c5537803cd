"""The scenario reference page is generated from the schema and must match it."""

from pathlib import Path

from kvsim.scenario_docs import render

DOCS = Path(__file__).resolve().parents[1] / "docs" / "scenarios.md"


def test_scenario_reference_is_current():
    # Regenerate with: python -m kvsim.scenario_docs > docs/scenarios.md
    assert DOCS.read_text() == render()


def test_every_engine_setting_documented():
    text = DOCS.read_text()
    for key in ("block_size", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                "enable_chunked_prefill", "preemption_mode", "scheduling_policy", "router"):
        assert f"| `{key}` |" in text
