"""Prefix-cache replay and trace statistics: hand-worked cases, a reference replay, the Mooncake recount."""

import json
from pathlib import Path

import numpy as np
import pytest

from kvsim.errors import UserError
from kvsim.workload import open_trace
from kvsim.workload.analysis import hit_rate_by_capacity, inspect_trace, prompt_block_hashes
from kvsim.workload.request import Request

MOONCAKE = Path(__file__).resolve().parents[2] / "scenarios" / "traces" / "mooncake_synthetic_trace.jsonl"


def request(token_ids, cache_salt=None, request_id=0):
    return Request(
        request_id=request_id,
        arrival_time_s=0.0,
        prompt_token_ids=np.asarray(token_ids, dtype=np.int64),
        output_tokens=1,
        cache_salt=cache_salt,
    )


def only_row(rows, policy, capacity):
    (row,) = [row for row in rows if row["policy"] == policy and row["capacity_blocks"] == capacity]
    return row


def test_lru_evicts_tail_blocks_first():
    # Block size 2: A = blocks a1 a2, B = blocks b1 b2, capacity 3, sequence A B A B.
    # A: 0 hits, cache a1 a2. B: 0 hits, and b2 evicts a2 (A's tail is its least recent block).
    # A: a1 hits (1), and a2 evicts b2. B: b1 hits (1), and b2 evicts a2. Hits: 2 of 8 blocks.
    a, b = request([1, 2, 3, 4]), request([5, 6, 7, 8])
    rows = hit_rate_by_capacity([a, b, a, b], [3], policies=["lru"], block_size=2)
    row = only_row(rows, "lru", 3)
    assert row["prompt_blocks"] == 8
    assert row["hit_blocks"] == 2
    assert row["prefix_hit_rate_blocks"] == 0.25
    assert row["hit_tokens"] == 4
    assert row["prompt_tokens"] == 16
    assert row["evicted_blocks"] == 3


def test_lfu_keeps_frequent_block():
    # One-block prompts, capacity 2: X X X Y Z X.
    # LRU: Z evicts X (least recent), so the last X misses: hits 2.
    # LFU: Z evicts Y (used once, X three times), so the last X hits: hits 3.
    x, y, z = request([1, 1]), request([2, 2]), request([3, 3])
    rows = hit_rate_by_capacity([x, x, x, y, z, x], [2], block_size=2)
    assert only_row(rows, "lru", 2)["hit_blocks"] == 2
    assert only_row(rows, "lfu", 2)["hit_blocks"] == 3


def test_partial_blocks_and_token_weighting():
    # Block size 4. P1: 10 tokens = blocks of 4, 4, 2. P2 shares its first 8 tokens. P3 equals P1.
    p1 = request(np.arange(10))
    p2 = request(np.concatenate([np.arange(8), [100, 101]]))
    p3 = request(np.arange(10))
    rows = hit_rate_by_capacity([p1, p2, p3], [None], policies=["lru"], block_size=4)
    row = rows[0]
    assert row["prompt_blocks"] == 9
    assert row["hit_blocks"] == 0 + 2 + 3
    assert row["prompt_tokens"] == 30
    assert row["hit_tokens"] == 0 + 8 + 10
    assert row["prefix_hit_rate_tokens"] == pytest.approx(18 / 30)

    full_only = hit_rate_by_capacity([p1, p2, p3], [None], policies=["lru"], block_size=4, full_blocks_only=True)[0]
    assert full_only["prompt_blocks"] == 6
    assert full_only["hit_blocks"] == 0 + 2 + 2
    assert full_only["hit_tokens"] == 16


def test_prefix_hit_stops_at_first_miss():
    # The second prompt differs only in its first block, so its equal later blocks cannot hit.
    first = request([1, 2, 3, 4, 5, 6])
    second = request([9, 9, 3, 4, 5, 6])
    row = hit_rate_by_capacity([first, second], [None], policies=["lru"], block_size=2)[0]
    assert row["hit_blocks"] == 0


def test_cache_salt_isolates():
    prompts = [request(np.arange(8), cache_salt="a"), request(np.arange(8), cache_salt="b"), request(np.arange(8), cache_salt="a")]
    row = hit_rate_by_capacity(prompts, [None], policies=["lru"], block_size=4)[0]
    assert row["hit_blocks"] == 2


def test_zero_capacity_never_hits():
    prompts = [request(np.arange(8))] * 3
    rows = hit_rate_by_capacity(prompts, [0], block_size=4)
    assert all(row["hit_blocks"] == 0 for row in rows)


def test_request_larger_than_cache_keeps_its_head():
    # Capacity 2 with a 4-block prompt: the first two blocks are cached, the rest are not.
    prompt = request(np.arange(8))
    rows = hit_rate_by_capacity([prompt, prompt], [2], block_size=2)
    assert only_row(rows, "lru", 2)["hit_blocks"] == 2
    assert only_row(rows, "lfu", 2)["hit_blocks"] == 2


@pytest.mark.parametrize(
    ("capacities", "policies", "block_size", "message"),
    [
        ([-1], ["lru"], 4, r"capacity -1 is invalid"),
        ([10], ["fifo"], 4, r"unknown eviction policy 'fifo'"),
        ([10], ["lru"], 0, r"block_size must be >= 1"),
    ],
)
def test_invalid_arguments(capacities, policies, block_size, message):
    with pytest.raises(UserError, match=message):
        hit_rate_by_capacity([request([1, 2])], capacities, policies=policies, block_size=block_size)


# ---------------------------------------------------------------------------------------------------
# A second, brute-force replay of the same definition on random workloads
# ---------------------------------------------------------------------------------------------------


def reference_replay(block_lists, capacity, policy):
    """Replay by brute force, returning the number of hit blocks.

    Each cached block keeps the key (uses, request index, -position). Eviction removes the block
    outside the current request with the smallest key (LFU) or the smallest (request index, -position) (LRU).
    """
    key_of = {}
    hits = 0
    for request_index, blocks in enumerate(block_lists):
        num_hit = 0
        while num_hit < len(blocks) and blocks[num_hit] in key_of:
            num_hit += 1
        hits += num_hit
        current = set(blocks)
        for block in blocks[num_hit:]:
            if block in key_of:
                continue
            if len(key_of) >= capacity:
                candidates = [cached for cached in key_of if cached not in current]
                if not candidates:
                    break
                if policy == "lru":
                    victim = min(candidates, key=lambda cached: key_of[cached][1:])
                else:
                    victim = min(candidates, key=lambda cached: key_of[cached])
                del key_of[victim]
            key_of[block] = (0, -1, 0)
        for position, block in enumerate(blocks):
            if block in key_of:
                key_of[block] = (key_of[block][0] + 1, request_index, -position)
    return hits


def test_replay_matches_brute_force():
    rng = np.random.default_rng(5)
    prefixes = [rng.integers(0, 1000, size=int(length)) for length in rng.integers(4, 40, size=6)]
    prompts = []
    for _ in range(300):
        prefix = prefixes[int(rng.integers(len(prefixes)))]
        cut = int(rng.integers(1, len(prefix) + 1))
        tail = rng.integers(0, 1000, size=int(rng.integers(0, 12)))
        prompts.append(request(np.concatenate([prefix[:cut], tail])))
    block_lists = [prompt_block_hashes(p.prompt_token_ids, 4) for p in prompts]
    capacities = [5, 17, 40]
    rows = hit_rate_by_capacity(prompts, capacities, block_size=4)
    for capacity in capacities:
        for policy in ("lru", "lfu"):
            expected = reference_replay(block_lists, capacity, policy)
            assert only_row(rows, policy, capacity)["hit_blocks"] == expected, (policy, capacity)


# ---------------------------------------------------------------------------------------------------
# Mooncake: the unbounded block hit rate is 1 - unique / total hash ids
# ---------------------------------------------------------------------------------------------------


def test_mooncake_unbounded_hit_rate_recount():
    total = 0
    unique = set()
    with open(MOONCAKE) as file:
        for line in file:
            hash_ids = json.loads(line)["hash_ids"]
            total += len(hash_ids)
            unique.update(hash_ids)
    assert (total, len(unique)) == (121_877, 43_924)

    rows = hit_rate_by_capacity(open_trace(MOONCAKE).iter_requests(), [None, 10_000], block_size=512)
    unbounded = only_row(rows, "lru", None)
    assert unbounded["prompt_blocks"] == total
    assert unbounded["hit_blocks"] == total - len(unique)
    assert unbounded["prefix_hit_rate_blocks"] == pytest.approx(1 - 43_924 / 121_877)
    assert round(unbounded["prefix_hit_rate_blocks"], 3) == 0.640
    assert only_row(rows, "lfu", None)["hit_blocks"] == unbounded["hit_blocks"]
    # A bounded cache never hits more than an unbounded one.
    assert only_row(rows, "lru", 10_000)["hit_blocks"] < unbounded["hit_blocks"]
    assert only_row(rows, "lfu", 10_000)["hit_blocks"] < unbounded["hit_blocks"]


def test_inspect_mooncake():
    summary = inspect_trace(MOONCAKE)
    assert summary["format"] == "mooncake"
    assert summary["requests"] == 3993
    assert summary["total_blocks"] == 121_877
    assert summary["unique_blocks"] == 43_924
    assert summary["unbounded_prefix_hit_rate_blocks"] == pytest.approx(1 - 43_924 / 121_877)
    # The last row of the file arrives at 1,022,025 ms.
    assert summary["duration_s"] == pytest.approx(1022.025)
    assert summary["rate_per_s"] == pytest.approx(3993 / 1022.025)
    assert summary["sessions"] == 0


def test_inspect_generic_percentiles(tmp_path):
    path = tmp_path / "g.csv"
    lengths = list(range(1, 101))
    path.write_text(
        "arrival_s,prompt_tokens,output_tokens,session_id\n"
        + "".join(f"{i},{length},{2 * length},{'s' + str(i % 10)}\n" for i, length in enumerate(lengths))
    )
    summary = inspect_trace(path, block_size=16)
    assert summary["requests"] == 100
    assert summary["duration_s"] == 99
    # Linear interpolation over 1..100: p50 = 50.5, p90 = 90.1.
    assert summary["prompt_tokens"]["p50"] == pytest.approx(50.5)
    assert summary["prompt_tokens"]["p90"] == pytest.approx(90.1)
    assert summary["prompt_tokens"]["max"] == 100
    assert summary["output_tokens"]["mean"] == pytest.approx(101.0)
    assert summary["sessions"] == 10
    assert summary["requests_in_sessions"] == 100
