"""The contract every KV-cache strategy keeps, checked after every operation of random workloads.

Each strategy also runs against a deliberately simple reference model of its own semantics. Paged
uses lists and exact token tuples, contiguous first and best fit a sorted list of ranges, buddy
allocation the free blocks recomputed from the allocated ones, and radix longest common prefixes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsim.kvcache import (
    ContiguousKVCacheManager,
    PagedKVCacheManager,
    RadixKVCacheManager,
)
from kvsim.kvcache.base import Sequence

BLOCK_SIZE = 4

STRATEGIES = {
    "contiguous-max": lambda: ContiguousKVCacheManager(name="c", capacity_tokens=60, max_model_len=24),
    "contiguous-pow2": lambda: ContiguousKVCacheManager(name="c", capacity_tokens=60, max_model_len=24,
                                                        reservation="pow2"),
    "contiguous-oracle-best": lambda: ContiguousKVCacheManager(name="c", capacity_tokens=60, max_model_len=24,
                                                               reservation="oracle", fit="best"),
    "contiguous-pow2-buddy": lambda: ContiguousKVCacheManager(name="c", capacity_tokens=60, max_model_len=24,
                                                              reservation="pow2", fit="buddy"),
    "contiguous-oracle-buddy": lambda: ContiguousKVCacheManager(name="c", capacity_tokens=100, max_model_len=24,
                                                                reservation="oracle", fit="buddy"),
    "paged": lambda: PagedKVCacheManager(name="p", num_blocks=14, block_size=BLOCK_SIZE,
                                         enable_prefix_caching=False),
    "paged+prefix": lambda: PagedKVCacheManager(name="p", num_blocks=14, block_size=BLOCK_SIZE,
                                                enable_prefix_caching=True),
    "radix": lambda: RadixKVCacheManager(name="r", capacity_pages=56),
    "radix-lfu": lambda: RadixKVCacheManager(name="r", capacity_pages=56, eviction="lfu"),
    "radix-page4": lambda: RadixKVCacheManager(name="r", capacity_pages=14, page_size=4),
}

# Each operation: (kind, a, b), interpreted by `run_workload`. Admissions and growth dominate, so
# that pools fill up, evict and reject. Resets are rare, so that cached prefixes get hit.
OPERATION_KINDS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5]
OPERATIONS = st.lists(st.tuples(st.sampled_from(OPERATION_KINDS), st.integers(0, 10**4), st.integers(0, 10**4)),
                      min_size=1, max_size=60)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_sequence(seq_id: int, a: int, b: int) -> Sequence:
    """A prompt of up to 23 tokens: a prefix of one of three shared families, then tokens of its own."""
    family = a % 3
    prefix_len = (a // 3) % 20
    tail_len = 1 + b % 5
    prompt = np.concatenate([np.arange(prefix_len) + 1000 * family, np.arange(tail_len) + 100_000 * seq_id])
    num_output_tokens = 1 + (b // 7) % 10
    salt = "tenant" if a % 11 == 0 else None
    final = min(prompt.shape[0] + num_output_tokens, 24)
    return Sequence(seq_id, prompt[:min(prompt.shape[0], final - 1)].astype(np.int64), final, cache_salt=salt)


# ---------------------------------------------------------------------- contract checks


def check_accounting(manager, live: list[Sequence]) -> None:
    """Shares are non-negative and sum to capacity, and they match the manager's own structures."""
    next_tokens = manager.reservation_tokens(live[0]) if live else None
    parts = manager.breakdown(next_tokens)
    for field in ("token_state_tokens", "reserved_tokens", "internal_fragmentation_tokens",
                  "external_fragmentation_tokens", "cached_free_tokens", "free_tokens"):
        assert getattr(parts, field) >= 0, (field, parts)
    assert parts.used_tokens + parts.free_tokens + parts.cached_free_tokens + \
        parts.external_fragmentation_tokens == manager.capacity_tokens
    held = sum(manager.num_tokens(seq) for seq in live)
    if isinstance(manager, ContiguousKVCacheManager):
        check_contiguous_layout(manager, live)
        assert parts.token_state_tokens == held
    elif isinstance(manager, PagedKVCacheManager):
        check_paged_ownership(manager, live)
        if not np.any(manager.pool.ref_cnt > 1):  # no block shared by a prefix hit or a fork
            assert parts.token_state_tokens == held
    else:
        manager.check_invariants()
        assert parts.cached_free_tokens == manager.evictable_tokens
    assert parts.token_state_tokens <= held
    # A buddy block's slack past its reservation counts as external fragmentation but is not free.
    slack = manager.block_slack_tokens if isinstance(manager, ContiguousKVCacheManager) else 0
    assert manager.num_free_tokens == parts.free_tokens + parts.cached_free_tokens + \
        parts.external_fragmentation_tokens - slack


def check_contiguous_layout(manager: ContiguousKVCacheManager, live: list[Sequence]) -> None:
    """Allocated blocks never overlap, and with the holes they tile the address space exactly."""
    ranges = sorted([manager.block_range(seq) for seq in live] + manager.free_space.holes())
    position = 0
    for start, size in ranges:
        assert start == position, ranges
        position += size
    assert position == manager.capacity_tokens
    parts = manager.breakdown()
    reserved_slots = sum(manager.reserved_range(seq)[1] for seq in live)
    block_slots = sum(manager.block_range(seq)[1] for seq in live)
    assert parts.token_state_tokens + parts.reserved_tokens + parts.internal_fragmentation_tokens == reserved_slots
    assert parts.external_fragmentation_tokens == manager.block_slack_tokens == block_slots - reserved_slots
    for seq in live:
        start, size = manager.reserved_range(seq)
        block_start, block_size = manager.block_range(seq)
        assert start == block_start, (seq.seq_id, start, block_start)
        assert size <= block_size, (seq.seq_id, size, block_size)
        if manager.fit == "buddy":
            assert block_size & (block_size - 1) == 0, (seq.seq_id, block_size)
            assert start % block_size == 0, (seq.seq_id, start, block_size)
        else:
            assert size == block_size


def check_paged_ownership(manager: PagedKVCacheManager, live: list[Sequence]) -> None:
    """Every block is either free (in the queue, unreferenced) or referenced once per table holding it."""
    pool = manager.pool
    holders = np.zeros(pool.num_blocks, dtype=np.int64)
    for seq in live:
        table = manager.block_ids(seq)
        assert len(set(table)) == len(table), f"sequence {seq.seq_id} holds a block twice: {table}"
        assert len(table) == math.ceil(manager.num_tokens(seq) / manager.block_size)
        holders[table] += 1
    assert np.array_equal(holders, pool.ref_cnt)
    free = pool.free_queue.blocks_in_order()
    assert len(free) == len(set(free)) == pool.num_free_blocks
    assert set(free) == set(np.flatnonzero(holders == 0).tolist())
    parts = manager.breakdown()
    num_used = int(np.count_nonzero(holders))
    assert parts.token_state_tokens + parts.reserved_tokens + parts.internal_fragmentation_tokens == \
        num_used * manager.block_size
    assert parts.cached_free_tokens == int(pool.is_cached[free].sum()) * manager.block_size


def snapshot(manager, live: list[Sequence]):
    state = (manager.breakdown(), manager.num_free_tokens, tuple(manager.num_tokens(s) for s in live))
    if isinstance(manager, PagedKVCacheManager):
        state += (manager.pool.ref_cnt.tolist(), dict(manager.pool.key_to_block_id),
                  manager.pool.free_queue.blocks_in_order())
    if isinstance(manager, RadixKVCacheManager):
        state += (manager.tree_tokens, manager.evictable_tokens)
    return state


def checked_allocate(manager, live, seq, num_new_tokens, num_cached_tokens=0) -> bool:
    """Allocate, checking that can_allocate agrees and that a refusal changes nothing."""
    expected = manager.can_allocate(seq, num_new_tokens, num_cached_tokens)
    before = snapshot(manager, live)
    ok = manager.allocate(seq, num_new_tokens, num_cached_tokens)
    assert ok == expected
    if not ok:
        assert snapshot(manager, live) == before
    return ok


def run_workload(manager, operations, observer=None) -> list[Sequence]:
    """Apply random operations, checking the contract after each, and return the sequences still live.

    `observer(event, *args)` receives every operation and its result, for reference-model comparisons.
    """
    live: list[Sequence] = []
    next_id = 1
    for kind, a, b in operations:
        if kind in (0, 5) and (kind == 0 or not live or not isinstance(manager, PagedKVCacheManager)):
            seq = make_sequence(next_id, a, b)
            next_id += 1
            hit = manager.lookup(seq)
            assert 0 <= hit <= seq.num_prompt_tokens - 1
            first_chunk = seq.num_prompt_tokens - hit
            if b % 3 == 0:
                first_chunk = min(first_chunk, 1 + a % 5)  # chunked prefill
            ok = checked_allocate(manager, live, seq, first_chunk, hit)
            if observer:
                observer("admit", seq, hit, first_chunk, ok)
            if ok:
                live.append(seq)
        elif kind == 5:
            parent = live[a % len(live)]
            if manager.num_tokens(parent) > parent.num_prompt_tokens:
                continue
            child = Sequence(next_id, parent.prompt_token_ids, parent.final_num_tokens, cache_salt=parent.cache_salt)
            next_id += 1
            manager.fork(parent, child)
            if observer:
                observer("fork", parent, child)
            live.append(child)
        elif kind == 1 and live:
            seq = live[a % len(live)]
            room = seq.final_num_tokens - manager.num_tokens(seq)
            num_new = min(1 + b % 6, room)
            if num_new > 0:
                ok = checked_allocate(manager, live, seq, num_new)
                if observer:
                    observer("grow", seq, num_new, ok)
        elif kind == 2 and live:
            seq = live.pop(a % len(live))
            manager.free(seq)
            if observer:
                observer("free", seq)
        elif kind == 3 and live:
            limit = min(1 + a % 10, min(s.final_num_tokens - manager.num_tokens(s) for s in live))
            steps = manager.max_decode_steps(live, limit)
            assert 0 <= steps <= max(limit, 0)
            for _ in range(steps):
                for seq in live:
                    assert manager.allocate(seq, 1), "max_decode_steps promised room that was not there"
                    if observer:
                        observer("grow", seq, 1, True)
        elif kind == 4:
            ok = manager.reset_prefix_cache()
            assert ok == (not live)
            if observer:
                observer("reset", ok)
        check_accounting(manager, live)
    return live


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@FAST
@given(operations=OPERATIONS)
def test_contract_holds_through_random_workloads(strategy, operations):
    manager = STRATEGIES[strategy]()
    live = run_workload(manager, operations)
    for seq in live:
        manager.free(seq)
    check_accounting(manager, [])
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.reserved_tokens, parts.internal_fragmentation_tokens) == (0, 0, 0)
    assert manager.num_free_tokens == manager.capacity_tokens
    assert manager.reset_prefix_cache()
    assert manager.breakdown().free_tokens == manager.capacity_tokens


def seeded_operations(seed: int, count: int = 600) -> list[tuple[int, int, int]]:
    """A long random workload, which keeps pools full for many more steps than hypothesis's examples."""
    rng = np.random.default_rng(seed)
    kinds = rng.choice(OPERATION_KINDS, count)
    values = rng.integers(0, 10**4, (count, 2))
    return [(int(kind), int(a), int(b)) for kind, (a, b) in zip(kinds, values)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_contract_holds_through_long_workload(strategy):
    manager = STRATEGIES[strategy]()
    live = run_workload(manager, seeded_operations(7))
    for seq in live:
        manager.free(seq)
    check_accounting(manager, [])
    assert manager.num_free_tokens == manager.capacity_tokens


# ---------------------------------------------------------------------- reference models


class ReferencePaged:
    """vLLM's block-pool rules with plain lists, and exact token tuples as cache keys."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.block_size = block_size
        self.caching = caching
        self.free = list(range(num_blocks))
        self.ref = [0] * num_blocks
        self.key_of: list[tuple | None] = [None] * num_blocks
        self.blocks_by_key: dict[tuple, list[int]] = {}
        self.tables: dict[int, list[int]] = {}
        self.num_tokens: dict[int, int] = {}
        self.num_cached: dict[int, int] = {}

    def key(self, seq: Sequence, num_blocks: int) -> tuple:
        return (seq.cache_salt, tuple(seq.token_ids(num_blocks * self.block_size).tolist()))

    def lookup(self, seq: Sequence) -> list[int]:
        hits = []
        if self.caching:
            for i in range((seq.num_prompt_tokens - 1) // self.block_size):
                blocks = self.blocks_by_key.get(self.key(seq, i + 1))
                if not blocks:
                    break
                hits.append(blocks[0])
        return hits

    def take(self, count: int) -> list[int]:
        taken, self.free = self.free[:count], self.free[count:]
        for block in taken:
            if self.key_of[block] is not None:
                self.blocks_by_key[self.key_of[block]].remove(block)
                self.key_of[block] = None
            self.ref[block] = 1
        return taken

    def allocate(self, seq: Sequence, num_new: int, num_cached: int) -> bool:
        size = self.block_size
        if seq.seq_id not in self.tables:
            hits = self.lookup(seq)[:num_cached // size]
            need = -(-(num_cached + num_new) // size) - len(hits)
            if need > len(self.free) - sum(1 for block in hits if self.ref[block] == 0):
                return False
            for block in hits:
                if self.ref[block] == 0:
                    self.free.remove(block)
                self.ref[block] += 1
            self.tables[seq.seq_id] = hits + self.take(need)
            self.num_tokens[seq.seq_id] = num_cached
            self.num_cached[seq.seq_id] = len(hits)
        else:
            table = self.tables[seq.seq_id]
            tokens = self.num_tokens[seq.seq_id]
            copy = num_new > 0 and tokens % size != 0 and self.ref[table[-1]] > 1
            need = max(-(-(tokens + num_new) // size) - len(table), 0)
            if need + copy > len(self.free):
                return False
            if copy:
                self.ref[table[-1]] -= 1
                table[-1] = self.take(1)[0]
            table += self.take(need)
        self.num_tokens[seq.seq_id] += num_new
        full = self.num_tokens[seq.seq_id] // size
        if self.caching:
            table = self.tables[seq.seq_id]
            for i in range(self.num_cached[seq.seq_id], full):
                key = self.key(seq, i + 1)
                self.key_of[table[i]] = key
                self.blocks_by_key.setdefault(key, []).append(table[i])
            self.num_cached[seq.seq_id] = max(full, self.num_cached[seq.seq_id])
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.tables[child.seq_id] = list(self.tables[parent.seq_id])
        for block in self.tables[child.seq_id]:
            self.ref[block] += 1
        self.num_tokens[child.seq_id] = self.num_tokens[parent.seq_id]
        self.num_cached[child.seq_id] = self.num_cached[parent.seq_id]

    def release(self, seq: Sequence) -> None:
        for block in reversed(self.tables.pop(seq.seq_id)):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free.append(block)
        del self.num_tokens[seq.seq_id], self.num_cached[seq.seq_id]

    def reset(self) -> bool:
        if any(self.ref):
            return False
        self.key_of = [None] * len(self.key_of)
        self.blocks_by_key.clear()
        return True


@pytest.mark.parametrize("caching", [False, True])
@FAST
@given(operations=OPERATIONS)
def test_paged_matches_reference_model(caching, operations):
    compare_paged_with_reference(caching, operations)


@pytest.mark.parametrize("caching", [False, True])
def test_paged_matches_reference_model_long(caching):
    manager = compare_paged_with_reference(caching, seeded_operations(11))
    if caching:
        assert manager.stats.hit_tokens > 0
        assert manager.stats.evictions > 0


def compare_paged_with_reference(caching: bool, operations) -> PagedKVCacheManager:
    manager = PagedKVCacheManager(name="p", num_blocks=14, block_size=BLOCK_SIZE, enable_prefix_caching=caching)
    reference = ReferencePaged(14, BLOCK_SIZE, caching)

    def observe(event, *args):
        if event == "admit":
            seq, hit, first_chunk, ok = args
            assert hit == len(reference.lookup(seq)) * BLOCK_SIZE
            assert ok == reference.allocate(seq, first_chunk, hit)
        elif event == "grow":
            seq, num_new, ok = args
            assert ok == reference.allocate(seq, num_new, 0)
        elif event == "fork":
            reference.fork(*args)
        elif event == "free":
            reference.release(args[0])
        elif event == "reset":
            assert args[0] == reference.reset()
        for seq_id, table in reference.tables.items():
            assert manager._seqs[seq_id].block_ids == table
        assert manager.pool.free_queue.blocks_in_order() == reference.free

    run_workload(manager, operations, observe)
    return manager


class ReferenceContiguous:
    """First or best fit over a sorted list of reserved ranges."""

    def __init__(self, capacity: int, fit: str) -> None:
        self.capacity = capacity
        self.fit = fit
        self.ranges: dict[int, tuple[int, int]] = {}

    def place(self, size: int) -> int | None:
        used = sorted(self.ranges.values())
        gaps, position = [], 0
        for start, length in used + [(self.capacity, 0)]:
            if start - position >= size:
                gaps.append((start - position, position))
            position = start + length
        if not gaps:
            return None
        return min(gaps)[1] if self.fit == "best" else min(gaps, key=lambda gap: gap[1])[1]


class ReferenceBuddy:
    """Buddy allocation without split or merge bookkeeping: the free blocks are recomputed from the allocated ones.

    A free block is a block of the buddy tree that no allocation overlaps, inside a tree node that some
    allocation does overlap (or a top-level block). That is the state a buddy allocator reaches when
    it splits only on demand and merges every pair of free buddies.
    """

    def __init__(self, capacity: int) -> None:
        self.top_level: list[tuple[int, int]] = []
        start = 0
        for size in (2 ** bit for bit in range(capacity.bit_length() - 1, -1, -1)):
            if capacity & size:
                self.top_level.append((start, size))
                start += size
        self.blocks: dict[int, tuple[int, int]] = {}

    def free_blocks(self) -> list[tuple[int, int]]:
        used = list(self.blocks.values())
        found: list[tuple[int, int]] = []

        def visit(start: int, size: int) -> None:
            overlapping = [(a, b) for a, b in used if a < start + size and start < a + b]
            if not overlapping:
                found.append((start, size))
            elif not any(a <= start and start + size <= a + b for a, b in overlapping):
                visit(start, size // 2)
                visit(start + size // 2, size // 2)

        for start, size in self.top_level:
            visit(start, size)
        return sorted(found)

    def place(self, size: int) -> tuple[int, int] | None:
        block = 2 ** math.ceil(math.log2(size))
        fitting = [(free_size, start) for start, free_size in self.free_blocks() if free_size >= block]
        return (min(fitting)[1], block) if fitting else None


def reference_reservation(reservation: str, seq: Sequence, max_model_len: int) -> int:
    """The vLLM paper's Orca reservations: max_model_len, prompt + next power of two of the output, exact."""
    if reservation == "max":
        return max_model_len
    if reservation == "oracle":
        return min(seq.final_num_tokens, max_model_len)
    num_output_tokens = seq.final_num_tokens - seq.num_prompt_tokens
    rounded = 2 ** math.ceil(math.log2(num_output_tokens)) if num_output_tokens else 0
    return min(seq.num_prompt_tokens + rounded, max_model_len)


@pytest.mark.parametrize("reservation, fit", [("max", "first"), ("pow2", "first"), ("oracle", "best")])
@FAST
@given(operations=OPERATIONS)
def test_contiguous_matches_reference_model(reservation, fit, operations):
    manager = ContiguousKVCacheManager(name="c", capacity_tokens=60, max_model_len=24, reservation=reservation,
                                       fit=fit)
    reference = ReferenceContiguous(60, fit)

    def observe(event, *args):
        if event == "admit":
            seq, _, _, ok = args
            size = reference_reservation(reservation, seq, 24)
            start = reference.place(size)
            assert ok == (start is not None)
            if ok:
                reference.ranges[seq.seq_id] = (start, size)
                assert manager.reserved_range(seq) == (start, size)
        elif event == "free":
            reference.ranges.pop(args[0].seq_id)

    run_workload(manager, operations, observe)


@pytest.mark.parametrize("reservation, capacity", [("pow2", 60), ("oracle", 100), ("max", 64)])
@FAST
@given(operations=OPERATIONS)
def test_buddy_matches_reference_model(reservation, capacity, operations):
    compare_buddy_with_reference(reservation, capacity, operations)


def test_buddy_matches_reference_model_long():
    manager = compare_buddy_with_reference("oracle", 100, seeded_operations(13))
    assert manager.stats.lookups > 0


def compare_buddy_with_reference(reservation: str, capacity: int, operations) -> ContiguousKVCacheManager:
    manager = ContiguousKVCacheManager(name="c", capacity_tokens=capacity, max_model_len=24, reservation=reservation,
                                       fit="buddy")
    reference = ReferenceBuddy(capacity)

    def observe(event, *args):
        if event == "admit":
            seq, _, _, ok = args
            size = reference_reservation(reservation, seq, 24)
            placed = reference.place(size)
            assert ok == (placed is not None)
            if ok:
                reference.blocks[seq.seq_id] = placed
                assert manager.block_range(seq) == placed
                assert manager.reserved_range(seq) == (placed[0], size)
        elif event == "free":
            reference.blocks.pop(args[0].seq_id)
        assert manager.free_space.holes() == reference.free_blocks()

    run_workload(manager, operations, observe)
    return manager


@pytest.mark.parametrize("page_size", [1, 4])
@FAST
@given(operations=OPERATIONS)
def test_radix_hits_match_longest_common_prefix(page_size, operations):
    # Large enough that nothing is evicted, so the tree contains every sequence ever inserted.
    manager = RadixKVCacheManager(name="r", capacity_pages=10_000 // page_size, page_size=page_size)
    stored: list[tuple[str | None, list[int]]] = []
    progress: dict[int, int] = {}

    def longest_prefix(seq: Sequence) -> int:
        key = seq.prompt_token_ids.tolist()[:seq.num_prompt_tokens - 1]
        best = 0
        for salt, tokens in stored:
            if salt != seq.cache_salt:
                continue
            common = 0
            while common < min(len(key), len(tokens)) and key[common] == tokens[common]:
                common += 1
            best = max(best, common)
        return best // page_size * page_size

    def observe(event, *args):
        if event == "admit":
            seq, hit, first_chunk, ok = args
            assert hit == longest_prefix(seq)
            assert ok
            progress[seq.seq_id] = hit + first_chunk
        elif event == "grow":
            seq, num_new, _ = args
            progress[seq.seq_id] += num_new
        else:
            if event == "reset" and args[0]:
                stored.clear()
            return
        # The prompt part allocated so far is in the tree (whole pages), as after SGLang's prefill.
        seq = args[0]
        prefill = min(progress[seq.seq_id], seq.num_prompt_tokens) // page_size * page_size
        stored.append((seq.cache_salt, seq.token_ids(prefill).tolist()))

    def observe_free(event, *args):
        observe(event, *args)
        if event == "free":
            seq = args[0]
            aligned = progress[seq.seq_id] // page_size * page_size
            stored.append((seq.cache_salt, seq.token_ids(aligned).tolist()))

    run_workload(manager, operations, observe_free)
    assert manager.stats.evictions == 0
