"""Synthetic workloads: determinism, independent random streams, prompt contents and SimPy timing."""

from pathlib import Path

import numpy as np
import pytest
import simpy

from kvsim.workload import build_workload, parse_workload
from kvsim.workload.request import Request
from kvsim.workload.tokens import content_token_ids, output_token_ids

SYSTEM_TOKENS = 100
MESSAGE_TOKENS = 7
OUTPUT_TOKENS = 5


def closed_loop(**fields):
    data = {
        "kind": "closed_loop",
        "users": 3,
        "turns_per_user": 4,
        "prompt": [
            {"name": "system", "tokens": SYSTEM_TOKENS, "shared": True},
            {"name": "message", "tokens": MESSAGE_TOKENS},
        ],
        "output_tokens": OUTPUT_TOKENS,
    }
    data.update(fields)
    return parse_workload(data)


def open_loop(**fields):
    data = {
        "kind": "open_loop",
        "arrival": {"process": "poisson", "rate_per_s": 10},
        "num_requests": 200,
        "prompt": [
            {"name": "system", "tokens": 64, "shared": True},
            {"name": "message", "tokens": {"dist": "lognormal", "mean": 300, "std": 150}},
        ],
        "output_tokens": {"dist": "uniform", "min": 10, "max": 100},
    }
    data.update(fields)
    return parse_workload(data)


def build(spec, seed=7, base_dir=Path(".")):
    return build_workload(spec, seed=seed, base_dir=base_dir)


def same_requests(first: list[Request], second: list[Request]) -> bool:
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if (a.request_id, a.arrival_time_s, a.output_tokens, a.session_id, a.parent_request_id, a.request_class) != (
            b.request_id,
            b.arrival_time_s,
            b.output_tokens,
            b.session_id,
            b.parent_request_id,
            b.request_class,
        ):
            return False
        if not np.array_equal(a.prompt_token_ids, b.prompt_token_ids):
            return False
    return True


class FakeEngine:
    """Finishes every request `service_s` after submission and records what it was sent."""

    def __init__(self, env: simpy.Environment, service_s: float, set_output_ids: bool = False) -> None:
        self.env = env
        self.service_s = service_s
        self.set_output_ids = set_output_ids
        self.submitted: list[tuple[float, Request]] = []

    def submit(self, request: Request) -> simpy.Event:
        self.submitted.append((self.env.now, request))
        done = self.env.event()
        self.env.process(self._finish(request, done))
        return done

    def _finish(self, request, done):
        yield self.env.timeout(self.service_s)
        if self.set_output_ids:
            request.output_token_ids = content_token_ids(("engine reply", request.request_id), request.output_tokens)
        done.succeed(request)


def run(source, service_s=1.5, set_output_ids=False) -> FakeEngine:
    env = simpy.Environment()
    engine = FakeEngine(env, service_s, set_output_ids)
    source.start(env, engine.submit)
    env.run()
    return engine


# ---------------------------------------------------------------------------------------------------
# Determinism and independent streams
# ---------------------------------------------------------------------------------------------------


def test_same_seed_same_requests():
    for spec in (open_loop(), closed_loop(multi_turn=True, think_time_s={"dist": "exponential", "mean": 3})):
        first = list(build(spec, seed=11).iter_requests())
        second = list(build(spec, seed=11).iter_requests())
        assert same_requests(first, second)


def test_different_seed_different_requests():
    first = list(build(open_loop(), seed=1).iter_requests())
    second = list(build(open_loop(), seed=2).iter_requests())
    assert [r.arrival_time_s for r in first] != [r.arrival_time_s for r in second]
    assert [r.prompt_tokens for r in first] != [r.prompt_tokens for r in second]


def test_output_distribution_leaves_arrivals_and_prompts():
    base = list(build(open_loop()).iter_requests())
    changed = list(build(open_loop(output_tokens={"dist": "exponential", "mean": 500})).iter_requests())
    assert [r.arrival_time_s for r in base] == [r.arrival_time_s for r in changed]
    assert all(np.array_equal(a.prompt_token_ids, b.prompt_token_ids) for a, b in zip(base, changed))
    assert [r.output_tokens for r in base] != [r.output_tokens for r in changed]


def test_prompt_distribution_leaves_arrivals_and_outputs():
    base = list(build(open_loop()).iter_requests())
    changed = list(
        build(
            open_loop(prompt=[{"name": "system", "tokens": 64, "shared": True}, {"name": "message", "tokens": 20}])
        ).iter_requests()
    )
    assert [r.arrival_time_s for r in base] == [r.arrival_time_s for r in changed]
    assert [r.output_tokens for r in base] == [r.output_tokens for r in changed]


def test_think_time_leaves_lengths():
    spec_a = closed_loop(prompt=[{"name": "message", "tokens": {"dist": "uniform", "min": 5, "max": 50}}])
    spec_b = closed_loop(
        prompt=[{"name": "message", "tokens": {"dist": "uniform", "min": 5, "max": 50}}],
        think_time_s={"dist": "exponential", "mean": 10},
    )
    by_id_a = {r.request_id: r.prompt_tokens for r in build(spec_a).iter_requests()}
    by_id_b = {r.request_id: r.prompt_tokens for r in build(spec_b).iter_requests()}
    assert by_id_a == by_id_b


def test_adding_users_keeps_existing_users():
    spec = dict(
        prompt=[{"name": "message", "tokens": {"dist": "uniform", "min": 5, "max": 500}}],
        think_time_s={"dist": "exponential", "mean": 2},
    )
    small = {r.request_id: r for r in build(closed_loop(users=2, **spec)).iter_requests()}
    large = {r.request_id: r for r in build(closed_loop(users=5, **spec)).iter_requests()}
    assert set(small) < set(large)
    for request_id, request in small.items():
        assert np.array_equal(request.prompt_token_ids, large[request_id].prompt_token_ids)


# ---------------------------------------------------------------------------------------------------
# Prompt contents
# ---------------------------------------------------------------------------------------------------


def test_shared_segment_equal_unique_segment_different():
    requests = list(build(closed_loop()).iter_requests())
    system = content_token_ids(("segment", "system", 0), SYSTEM_TOKENS)
    for request in requests:
        assert request.prompt_tokens == SYSTEM_TOKENS + MESSAGE_TOKENS
        assert np.array_equal(request.prompt_token_ids[:SYSTEM_TOKENS], system)
    messages = {tuple(r.prompt_token_ids[SYSTEM_TOKENS:]) for r in requests}
    assert len(messages) == len(requests)


def test_variants_pick_one_of_k_contents():
    spec = open_loop(
        prompt=[{"name": "examples", "tokens": 50, "shared": True, "variants": 3}, {"name": "message", "tokens": 10}],
        output_tokens=5,
    )
    requests = list(build(spec).iter_requests())
    heads = {tuple(r.prompt_token_ids[:50]) for r in requests}
    expected = {tuple(content_token_ids(("segment", "examples", variant), 50)) for variant in range(3)}
    assert heads == expected


def test_class_mix_and_class_fields():
    spec = open_loop(
        num_requests=4000,
        classes=[
            {"name": "chat", "weight": 3, "priority": 1},
            {
                "name": "summary",
                "weight": 1,
                "prompt": [{"name": "document", "tokens": 900}],
                "output_tokens": 40,
                "n": 2,
                "cache_salt": "tenant-b",
            },
        ],
    )
    requests = list(build(spec).iter_requests())
    summaries = [r for r in requests if r.request_class == "summary"]
    chats = [r for r in requests if r.request_class == "chat"]
    assert abs(len(summaries) / len(requests) - 0.25) < 0.03
    assert all(r.prompt_tokens == 900 and r.output_tokens == 40 for r in summaries)
    assert all(r.n == 2 and r.cache_salt == "tenant-b" and r.priority == 0 for r in summaries)
    assert all(r.n == 1 and r.cache_salt is None and r.priority == 1 for r in chats)
    assert all(10 <= r.output_tokens <= 100 for r in chats)


def test_empty_prompt_gets_one_token():
    spec = open_loop(prompt=[{"name": "message", "tokens": 0}], output_tokens=3)
    assert all(r.prompt_tokens == 1 for r in build(spec).iter_requests())


# ---------------------------------------------------------------------------------------------------
# Closed loop in SimPy
# ---------------------------------------------------------------------------------------------------


def test_multi_turn_prompt_extends_previous_exactly():
    source = build(closed_loop(users=2, multi_turn=True, think_time_s=2))
    engine = run(source, service_s=1.5)
    by_user: dict[str, list[tuple[float, Request]]] = {}
    for time_s, request in engine.submitted:
        by_user.setdefault(request.session_id, []).append((time_s, request))
    assert sorted(by_user) == ["user-0", "user-1"]

    for user_requests in by_user.values():
        assert len(user_requests) == 4
        # Turns are 1.5 s of service plus 2 s of thinking apart.
        assert [time_s for time_s, _ in user_requests] == pytest.approx([0.0, 3.5, 7.0, 10.5])
        for (_, previous), (_, current) in zip(user_requests, user_requests[1:]):
            reply = output_token_ids(previous.request_id, OUTPUT_TOKENS)
            expected_head = np.concatenate([previous.prompt_token_ids, reply])
            assert current.prompt_tokens == previous.prompt_tokens + OUTPUT_TOKENS + MESSAGE_TOKENS
            assert np.array_equal(current.prompt_token_ids[: expected_head.shape[0]], expected_head)
            new_message = current.prompt_token_ids[expected_head.shape[0] :]
            assert np.array_equal(new_message, content_token_ids(("segment", "message", "request", current.request_id), MESSAGE_TOKENS))
            assert current.parent_request_id == previous.request_id
            assert current.request_id == previous.request_id + 1


def test_multi_turn_uses_engine_reply_ids():
    engine = run(build(closed_loop(users=1, turns_per_user=2, multi_turn=True)), set_output_ids=True)
    (_, first), (_, second) = engine.submitted
    reply = content_token_ids(("engine reply", first.request_id), OUTPUT_TOKENS)
    assert np.array_equal(second.prompt_token_ids[SYSTEM_TOKENS + MESSAGE_TOKENS :][:OUTPUT_TOKENS], reply)


def test_multi_turn_restarts_at_max_context():
    # Turn 1 has 107 tokens, and each later turn adds 5 + 7 = 12.
    # A cap of 125 allows turn 2 (119) but not turn 3 (131).
    engine = run(build(closed_loop(users=1, multi_turn=True, max_context_tokens=125)))
    lengths = [request.prompt_tokens for _, request in engine.submitted]
    sessions = [request.session_id for _, request in engine.submitted]
    assert lengths == [107, 119, 107, 119]
    assert sessions == ["user-0", "user-0", "user-0/1", "user-0/1"]
    assert engine.submitted[2][1].parent_request_id is None


def test_ramp_up_spreads_user_starts():
    engine = run(build(closed_loop(users=4, turns_per_user=1, ramp_up_s=8)))
    starts = sorted((request.request_id // 1_000_000, time_s) for time_s, request in engine.submitted)
    assert starts == [(0, 0.0), (1, 2.0), (2, 4.0), (3, 6.0)]


def test_single_turn_users_send_fresh_prompts():
    engine = run(build(closed_loop(users=1, turns_per_user=3, think_time_s=1)), service_s=2.0)
    assert [time_s for time_s, _ in engine.submitted] == pytest.approx([0.0, 3.0, 6.0])
    assert all(request.prompt_tokens == SYSTEM_TOKENS + MESSAGE_TOKENS for _, request in engine.submitted)
    assert all(request.session_id is None for _, request in engine.submitted)


def test_simulated_contents_match_iter_requests():
    spec = closed_loop(users=3, multi_turn=True, think_time_s={"dist": "exponential", "mean": 4})
    simulated = {request.request_id: request for _, request in run(build(spec), service_s=0.7).submitted}
    instant = {request.request_id: request for request in build(spec).iter_requests()}
    assert simulated.keys() == instant.keys()
    for request_id, request in simulated.items():
        assert np.array_equal(request.prompt_token_ids, instant[request_id].prompt_token_ids)


# ---------------------------------------------------------------------------------------------------
# Open loop
# ---------------------------------------------------------------------------------------------------


def gaps_of(requests):
    arrivals = np.array([r.arrival_time_s for r in requests])
    return np.diff(np.concatenate([[0.0], arrivals]))


def test_poisson_arrival_rate():
    spec = open_loop(num_requests=20_000, prompt=[{"name": "message", "tokens": 1}], output_tokens=1)
    gaps = gaps_of(build(spec).iter_requests())
    assert len(gaps) == 20_000
    # Exponential gaps: mean 1 / rate and coefficient of variation 1.
    assert abs(gaps.mean() - 0.1) < 0.003
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03


def test_gamma_arrival_burstiness():
    spec = open_loop(
        num_requests=20_000,
        arrival={"process": "gamma", "rate_per_s": 4, "cv": 3},
        prompt=[{"name": "message", "tokens": 1}],
        output_tokens=1,
    )
    gaps = gaps_of(build(spec).iter_requests())
    assert abs(gaps.mean() - 0.25) < 0.02
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.2


def test_duration_bounds_arrivals():
    spec = open_loop(num_requests=None, duration_s=200, prompt=[{"name": "message", "tokens": 1}], output_tokens=1)
    requests = list(build(spec).iter_requests())
    assert all(r.arrival_time_s < 200 for r in requests)
    # 10 per second for 200 s: 2000 expected, standard deviation sqrt(2000) ~ 45.
    assert abs(len(requests) - 2000) < 200


def test_open_loop_submits_at_arrival_times():
    spec = open_loop(num_requests=50)
    engine = run(build(spec))
    expected = [r.arrival_time_s for r in build(spec).iter_requests()]
    assert [time_s for time_s, _ in engine.submitted] == pytest.approx(expected)
    assert [request.request_id for _, request in engine.submitted] == list(range(50))


def test_sessions_count_turns_and_extend_prompts():
    spec = open_loop(
        num_requests=300,
        sessions={"turns": {"dist": "uniform", "min": 1, "max": 6}, "think_time_s": 5},
        prompt=[{"name": "system", "tokens": 32, "shared": True}, {"name": "message", "tokens": 9}],
        output_tokens=4,
    )
    simulated = [request for _, request in run(build(spec), service_s=3.0).submitted]
    assert len(simulated) == 300
    by_id = {request.request_id: request for request in simulated}
    for request in simulated:
        if request.parent_request_id is None:
            assert request.prompt_tokens == 41
            continue
        parent = by_id[request.parent_request_id]
        head = np.concatenate([parent.prompt_token_ids, output_token_ids(parent.request_id, 4)])
        assert np.array_equal(request.prompt_token_ids[: head.shape[0]], head)
        assert request.prompt_tokens == parent.prompt_tokens + 4 + 9

    instant = {request.request_id: request for request in build(spec).iter_requests()}
    assert instant.keys() == by_id.keys()
    assert all(np.array_equal(instant[key].prompt_token_ids, by_id[key].prompt_token_ids) for key in by_id)


# ---------------------------------------------------------------------------------------------------
# Expected lengths, from the distributions by hand and from the generated requests
# ---------------------------------------------------------------------------------------------------


def test_expected_mean_single_turn():
    spec = open_loop(
        prompt=[{"name": "system", "tokens": 100, "shared": True}, {"name": "message", "tokens": {"dist": "uniform", "min": 10, "max": 20}}],
        output_tokens=50,
    )
    source = build(spec)
    # 100 + (10 + 20) / 2 + 50
    assert source.expected_mean_request_tokens() == pytest.approx(165.0)
    assert source.describe()["num_requests"] == 200


def test_expected_mean_multi_turn():
    spec = closed_loop(
        users=400,
        turns_per_user=3,
        multi_turn=True,
        prompt=[{"name": "system", "tokens": 100, "shared": True}, {"name": "message", "tokens": {"dist": "uniform", "min": 10, "max": 20}}],
        output_tokens=50,
    )
    source = build(spec)
    # Turns have 115, 115 + 65 and 115 + 130 prompt tokens on average: mean 180, plus a 50-token reply.
    assert source.expected_mean_request_tokens() == pytest.approx(230.0)
    requests = list(source.iter_requests())
    measured = np.mean([r.total_tokens for r in requests])
    assert abs(measured - 230.0) < 1.0
    assert source.describe()["num_requests"] == 1200


# ---------------------------------------------------------------------------------------------------
# Lengths from a trace
# ---------------------------------------------------------------------------------------------------

AZURE = Path(__file__).resolve().parents[2] / "scenarios" / "traces" / "azure_llm_2023_code.csv"


def test_lengths_from_azure_trace_in_order():
    import csv

    with open(AZURE, newline="") as file:
        reader = csv.DictReader(file)
        rows = [row for _, row in zip(range(50), reader)]
    spec = parse_workload(
        {
            "kind": "open_loop",
            "arrival": {"process": "poisson", "rate_per_s": 5},
            "num_requests": 50,
            "lengths_from_trace": {"path": AZURE.name},
        }
    )
    source = build(spec, base_dir=AZURE.parent)
    requests = list(source.iter_requests())
    assert [r.prompt_tokens for r in requests] == [int(row["ContextTokens"]) for row in rows]
    assert [r.output_tokens for r in requests] == [int(row["GeneratedTokens"]) for row in rows]
    assert source.describe()["lengths_from_trace"]["rows"] == 8819


def test_lengths_from_trace_wrap_around(tmp_path):
    (tmp_path / "tiny.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,10,1\n1,20,2\n2,30,3\n")
    spec = parse_workload(
        {
            "kind": "open_loop",
            "arrival": {"process": "poisson", "rate_per_s": 5},
            "num_requests": 7,
            "lengths_from_trace": {"path": "tiny.csv"},
        }
    )
    requests = list(build(spec, base_dir=tmp_path).iter_requests())
    assert [r.prompt_tokens for r in requests] == [10, 20, 30, 10, 20, 30, 10]
    assert [r.request_id for r in requests] == list(range(7))
    # Unique prompts stay unique across passes.
    assert len({tuple(r.prompt_token_ids) for r in requests}) == 7


def test_lengths_from_trace_single_pass(tmp_path):
    (tmp_path / "tiny.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,10,1\n1,20,2\n2,30,3\n")
    spec = parse_workload(
        {"kind": "open_loop", "arrival": {"process": "poisson", "rate_per_s": 5}, "lengths_from_trace": {"path": "tiny.csv"}}
    )
    source = build(spec, base_dir=tmp_path)
    assert [r.prompt_tokens for r in source.iter_requests()] == [10, 20, 30]
    assert source.describe()["num_requests"] == 3
    # (10 + 20 + 30) / 3 + (1 + 2 + 3) / 3
    assert source.expected_mean_request_tokens() == pytest.approx(22.0)
