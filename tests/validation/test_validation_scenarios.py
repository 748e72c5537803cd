"""The scenarios behind the validation: the vLLM paper's fragmentation study and the MLA comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvsim.scenario import load_scenario
from kvsim.simulation import simulate_run
from kvsim.validation import load_fragmentation_scenario, simulate_fragmentation

ROOT = Path(__file__).resolve().parents[2]
SYSTEMS = ("Orca (Max)", "Orca (Pow2)", "Orca (Oracle)", "vLLM")


@pytest.fixture(scope="module")
def reduced_summaries():
    return simulate_fragmentation(load_fragmentation_scenario(num_requests=1500))


def test_fragmentation_scenario_settings():
    scenario = load_fragmentation_scenario()
    strategies = {strategy.name: strategy for strategy in scenario.strategies}
    assert list(strategies) == list(SYSTEMS)
    assert [strategies[name].reservation for name in SYSTEMS[:3]] == ["max", "pow2", "oracle"]
    # The vLLM paper's Orca baselines use a buddy allocator; Max's power-of-two reservations need none.
    assert [strategies[name].fit for name in SYSTEMS[:3]] == ["first", "buddy", "buddy"]
    assert strategies["vLLM"].kind == "paged"
    assert scenario.engine.block_size == 16
    assert scenario.max_model_len == 2048
    assert scenario.model.name == "OPT-13B"
    assert scenario.gpu.name == "A100-40GB"


def test_fragmentation_lengths_match_sharegpt_means():
    # The ShareGPT sample of the PagedAttention paper (Kwon et al., SOSP'23): mean prompt 161.31, output 337.99.
    workload = load_fragmentation_scenario().spec.workload
    prompt = workload.prompt[0].tokens
    output = workload.output_tokens
    assert prompt.mean() == pytest.approx(161.31, rel=0.01)
    assert output.mean() == pytest.approx(337.99, rel=0.01)

    # Independent check by sampling, with the engine's cut of outputs at max_model_len.
    rng = np.random.default_rng(7)
    prompts = prompt.sample_tokens(rng, 200_000)
    outputs = np.minimum(output.sample_tokens(rng, 200_000), 2048 - prompts)
    assert prompts.mean() == pytest.approx(161.31, rel=0.02)
    assert outputs.mean() == pytest.approx(337.99, rel=0.02)
    assert prompts.max() <= 1024


def test_token_state_shares_ordered(reduced_summaries):
    shares = [reduced_summaries[name]["token_state_fraction"] for name in SYSTEMS]
    assert shares[0] < shares[1], shares
    assert shares[1] < shares[2], shares
    assert shares[2] < shares[3], shares


def test_vllm_token_states_above_90_percent(reduced_summaries):
    assert reduced_summaries["vLLM"]["token_state_fraction"] > 0.9


def test_orca_max_batch_is_seven(reduced_summaries):
    # 15,536 slots hold 7 reservations of 2,048 (7 × 2,048 = 14,336; 8 would need 16,384).
    capacity = reduced_summaries["Orca (Max)"]["kv_capacity_tokens"]
    assert capacity // 2048 == 7
    assert reduced_summaries["Orca (Max)"]["max_concurrent_requests"] == 7
    assert reduced_summaries["Orca (Max)"]["saturated_concurrent_requests"] == pytest.approx(7.0, abs=0.01)


def test_orca_max_same_in_buddy_allocator():
    # 2,048-slot reservations are buddy blocks already, and 15,536 slots hold 7 of them either way.
    scenario = load_fragmentation_scenario(num_requests=1500)
    scenario = scenario.with_changes({"strategies": [
        {"kind": "contiguous", "reservation": "max", "name": "first fit"},
        {"kind": "contiguous", "reservation": "max", "fit": "buddy", "name": "buddy"}]})
    first_fit, buddy = (simulate_run(scenario, run, seed=scenario.spec.seed).summary for run in scenario.runs())
    for key in ("requests_completed", "max_concurrent_requests", "simulated_time_s", "preemptions"):
        assert first_fit[key] == buddy[key], key
    for key in ("token_state_fraction", "reserved_fraction", "internal_fragmentation_fraction",
                "external_fragmentation_fraction", "saturated_concurrent_requests"):
        assert first_fit[key] == pytest.approx(buddy[key], abs=1e-4), key


def test_load_keeps_a_queue(reduced_summaries):
    # Every system must run at its memory limit, so each had requests waiting.
    for name in SYSTEMS:
        assert reduced_summaries[name]["saturated_concurrent_requests"] is not None, name


def test_mla_scenario_kv_bytes_per_rank():
    scenario = load_scenario(ROOT / "scenarios" / "mla-savings.yaml")
    assert scenario.engine.tp == 8
    per_rank = {label: model.kv_bytes_per_token_per_rank(8) for label, model in scenario.variant_models()}
    # MLA: (512 + 64) × 61 layers × 2 B on every rank. GQA-8: one KV head of 128 per rank, K and V.
    # MHA: 128 heads / 8 = 16 per rank.
    assert per_rank == {
        "MLA (as released)": 576 * 61 * 2,
        "GQA-8": 2 * 1 * 128 * 61 * 2,
        "MHA": 2 * 16 * 128 * 61 * 2,
    }


def test_mla_scenario_capacity_order():
    scenario = load_scenario(ROOT / "scenarios" / "mla-savings.yaml")
    capacity = {label: scenario.capacity(model).kv_capacity_tokens for label, model in scenario.variant_models()}
    # With the latent replicated on 8 ranks, GQA-8 stores more tokens than MLA, and MHA the fewest.
    assert capacity["GQA-8"] > capacity["MLA (as released)"] > capacity["MHA"]
    assert [run.key for run in scenario.runs()] == [
        "MLA (as released)/paged", "MLA (as released)/paged+prefix", "GQA-8/paged", "GQA-8/paged+prefix",
        "MHA/paged", "MHA/paged+prefix"]
