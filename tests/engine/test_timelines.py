"""Hand-worked scheduling timelines: every time below is computed by hand from a linear step time."""

from dataclasses import dataclass

import numpy as np
import pytest
import simpy

from kvsim.engine.cluster import Cluster
from kvsim.engine.latency import BatchShape
from kvsim.engine.replica import SchedulerConfig
from kvsim.kvcache import make_manager, parse_strategy
from kvsim.metrics import RunRecorder
from kvsim.workload.request import Request
from kvsim.workload.tokens import content_token_ids


@dataclass(frozen=True)
class LinearLatency:
    """Step time = 10 ms + 1 ms per token computed in the step."""

    name: str = "linear"

    def step_time_s(self, batch: BatchShape) -> float:
        return 0.010 + 0.001 * batch.total_new_tokens

    def decode_step_times_s(self, num_seqs, total_context_tokens):
        return np.full(len(total_context_tokens), 0.010 + 0.001 * num_seqs)

    def describe(self):
        return {"latency_model": self.name}


def simulate(requests, *, num_blocks=1000, block_size=16, fast_forward=True, strategy="paged", **config):
    env = simpy.Environment()
    recorder = RunRecorder(timeline_interval_s=1.0)
    settings = dict(max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096)
    settings.update(config)
    scheduler = SchedulerConfig(fast_forward=fast_forward, **settings)

    def make_kv():
        return make_manager(parse_strategy(strategy), kv_budget_bytes=num_blocks * block_size,
                            kv_bytes_per_token=1, block_size=block_size, max_model_len=scheduler.max_model_len)

    cluster = Cluster(env, num_replicas=1, make_kv=make_kv, latency=LinearLatency(), config=scheduler,
                      recorder=recorder)

    def arrivals():
        for request in sorted(requests, key=lambda r: r.arrival_time_s):
            if request.arrival_time_s > env.now:
                yield env.timeout(request.arrival_time_s - env.now)
            cluster.submit(request)

    env.process(arrivals())
    env.run()
    frame = recorder.requests_frame().set_index("request_id").sort_index()
    return frame, recorder


def request(request_id, prompt_tokens, output_tokens, arrival_s=0.0, key=None):
    ids = content_token_ids(key if key is not None else ("prompt", request_id), prompt_tokens)
    return Request(request_id=request_id, arrival_time_s=arrival_s, prompt_token_ids=ids,
                   output_tokens=output_tokens)


def test_two_requests_prefill_then_decode():
    frame, recorder = simulate([request(1, 32, 3), request(2, 16, 2)])
    # Step 1 prefills 48 tokens: 10 + 48 ms. Both sample their first token at 0.058.
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.058)
    assert frame.loc[2, "first_token_s"] == pytest.approx(0.058)
    # Step 2 decodes both (12 ms): request 2 has its 2 tokens at 0.070.
    assert frame.loc[2, "finish_s"] == pytest.approx(0.070)
    # Step 3 decodes request 1 alone (11 ms).
    assert frame.loc[1, "finish_s"] == pytest.approx(0.081)
    assert recorder.prefill_tokens_computed == 48
    assert recorder.max_running == 2


def test_chunked_prefill_splits_prompt():
    frame, _ = simulate([request(1, 50, 2)], max_num_batched_tokens=20)
    # Chunks of 20, 20, 10 tokens: 30 + 30 + 20 ms; the first token comes with the last chunk.
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.080)
    assert frame.loc[1, "finish_s"] == pytest.approx(0.091)


def test_without_chunked_prefill_whole_prompt_in_one_step():
    frame, _ = simulate([request(1, 50, 2)], max_num_batched_tokens=64, enable_chunked_prefill=False)
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.060)
    assert frame.loc[1, "finish_s"] == pytest.approx(0.071)


def test_chunked_prefill_decodes_alongside_a_long_prompt():
    # Request 1 (prompt 10) starts alone; request 2 (prompt 40) arrives at 0.005, during step 1.
    frame, _ = simulate([request(1, 10, 4), request(2, 40, 2, arrival_s=0.005)], max_num_batched_tokens=21)
    # Step 1 [0, 0.020): request 1's prompt (10 tokens) -> first token at 0.020.
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.020)
    # Step 2 [0.020, 0.051): request 1 decodes 1 token and request 2 gets the other 20 of the budget of 21.
    # Step 3 [0.051, 0.082): the same split; request 2's prompt is complete and it samples at 0.082.
    assert frame.loc[2, "first_token_s"] == pytest.approx(0.082)
    # Step 4 [0.082, 0.094): both decode; request 1 has its 4 tokens and request 2 its 2.
    assert frame.loc[1, "finish_s"] == pytest.approx(0.094)
    assert frame.loc[2, "finish_s"] == pytest.approx(0.094)


@pytest.mark.parametrize("fast_forward", [True, False])
def test_one_preemption_recomputes_victim(fast_forward):
    # 4 blocks of 4 tokens. A and B (prompt 6, output 6) take 2 blocks each.
    frame, recorder = simulate([request(1, 6, 6), request(2, 6, 6)], num_blocks=4, block_size=4, max_model_len=16,
                               fast_forward=fast_forward)
    # Step 1: 12 prompt tokens, 22 ms: both sample their first token at 0.022.
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.022)
    assert frame.loc[2, "first_token_s"] == pytest.approx(0.022)
    # Steps 2-3 decode both (12 ms each) -> 0.046; each holds 8 slots in 2 blocks.
    # Step 4: A needs a 3rd block, none is free: B (admitted last) is preempted with 3 tokens sampled.
    # A then decodes alone: steps 4, 5, 6 of 11 ms -> A's 6th token at 0.079.
    assert frame.loc[1, "finish_s"] == pytest.approx(0.079)
    assert frame.loc[1, "preemptions"] == 0
    # B waits (9 tokens need 3 blocks, 1 free) until A finishes, then recomputes prompt + 3 outputs
    # (9 tokens, 19 ms) -> 4th token at 0.098, then 2 decode steps of 11 ms -> 0.120.
    assert frame.loc[2, "finish_s"] == pytest.approx(0.120)
    assert frame.loc[2, "preemptions"] == 1
    assert frame.loc[2, "first_token_s"] == pytest.approx(0.022)
    assert recorder.preemptions == 1
    assert recorder.prefill_tokens_computed == 6 + 6 + 9


def test_prefix_hit_skips_cached_prompt():
    # Two prompts share their first 32 tokens (2 full blocks); the second arrives after the first finished.
    shared = content_token_ids("system", 32)
    first = Request(request_id=1, arrival_time_s=0.0, output_tokens=2,
                    prompt_token_ids=np.concatenate([shared, content_token_ids("u1", 8)]))
    second = Request(request_id=2, arrival_time_s=1.0, output_tokens=2,
                     prompt_token_ids=np.concatenate([shared, content_token_ids("u2", 8)]))
    frame, recorder = simulate([first, second], strategy="paged+prefix")
    assert frame.loc[2, "cached_tokens"] == 32
    # Only 8 prompt tokens are computed: 10 + 8 ms after arrival.
    assert frame.loc[2, "first_token_s"] == pytest.approx(1.018)
    assert recorder.prefill_tokens_computed == 40 + 8
    assert recorder.prefill_tokens_saved == 32


def test_parallel_sampling_runs_n_sequences():
    sampled = request(1, 32, 2)
    sampled.n = 2
    frame, recorder = simulate([sampled], strategy="paged+prefix")
    # Two sequences with the same prompt. The second hits the first's first block only, because its hit
    # is capped at 31 tokens, one whole block of 16. Step 1 computes 32 + 16 tokens in 58 ms.
    assert len(frame) == 2
    assert list(frame["first_token_s"]) == pytest.approx([0.058, 0.058])
    assert sorted(frame["cached_tokens"]) == [0, 16]
    assert recorder.prefill_tokens_saved == 16


@pytest.mark.parametrize("fast_forward", [True, False])
def test_last_prompt_token_alone_records_ttft(fast_forward):
    # Prompt 65 with a budget of 64: the last prompt token gets a step of its own and samples the first token.
    frame, _ = simulate([request(1, 65, 10)], max_num_batched_tokens=64, fast_forward=fast_forward)
    # Step 1: 64 tokens (74 ms); step 2: 1 token (11 ms) -> first token at 0.085; then 9 decode steps of 11 ms.
    assert frame.loc[1, "first_token_s"] == pytest.approx(0.085)
    assert frame.loc[1, "finish_s"] == pytest.approx(0.085 + 9 * 0.011)


def test_inter_token_latency_includes_preemption_stall():
    _, recorder = simulate([request(1, 6, 6), request(2, 6, 6)], num_blocks=4, block_size=4, max_model_len=16)
    # Gaps between consecutive tokens of each request (times worked out in the preemption test above):
    # A: 0.012, 0.012, 0.011, 0.011, 0.011; B: 0.012, 0.012, then 0.098 - 0.046 = 0.052 across its
    # preemption and recompute, then 0.011, 0.011.
    itl = recorder.itl_percentiles()
    assert itl["mean"] == pytest.approx((4 * 0.012 + 5 * 0.011 + 0.052) / 10, rel=0.02)
    assert itl["p99"] == pytest.approx(0.052, rel=0.02)


def test_idle_time_before_first_arrival_not_counted():
    early, early_recorder = simulate([request(1, 32, 8, arrival_s=0.0)])
    late, late_recorder = simulate([request(1, 32, 8, arrival_s=50.0)])
    early_recorder.close(float(early["finish_s"].max()))
    late_recorder.close(float(late["finish_s"].max()))
    assert late_recorder.memory_fractions() == pytest.approx(early_recorder.memory_fractions())


def test_priority_victim_waits_behind_higher_priority():
    # Two requests fill the cache; the low-priority one (priority 5) is preempted when the other grows.
    # A third request of priority 1 that fits the freed memory must not queue behind the victim.
    high = request(1, 6, 12)
    low = request(2, 6, 12)
    low.priority = 5
    third = request(3, 4, 2, arrival_s=0.03)
    third.priority = 1
    frame, recorder = simulate([high, low, third], num_blocks=5, block_size=4, max_model_len=20,
                               scheduling_policy="priority")
    assert frame.loc[2, "preemptions"] >= 1
    assert frame.loc[3, "first_token_s"] < frame.loc[2, "finish_s"]
    assert frame.loc[3, "first_token_s"] < frame.loc[1, "finish_s"]
