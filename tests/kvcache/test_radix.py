"""The radix strategy against SGLang's RadixAttention behaviour, worked out by hand on tiny trees."""

import numpy as np
import pytest

from kvsim.kvcache import RadixKVCacheManager
from kvsim.kvcache.base import Sequence


def make_radix(capacity: int = 100, page_size: int = 1, eviction: str = "lru") -> RadixKVCacheManager:
    return RadixKVCacheManager(name="radix", capacity_pages=capacity // page_size, page_size=page_size,
                               eviction=eviction)


def make_seq(seq_id: int, prompt, num_output_tokens: int = 0, salt: str | None = None) -> Sequence:
    prompt = np.asarray(prompt, dtype=np.int64)
    return Sequence(seq_id, prompt, prompt.shape[0] + num_output_tokens, cache_salt=salt)


def run_prompt(manager: RadixKVCacheManager, seq: Sequence) -> int:
    """Admit `seq` with its whole prompt, then free it; return the hit."""
    hit = manager.lookup(seq)
    assert manager.allocate(seq, seq.num_prompt_tokens - hit, hit)
    manager.free(seq)
    manager.check_invariants()
    return hit


def tree_edges(manager: RadixKVCacheManager, salt: str | None = None) -> list[tuple[int, ...]]:
    """Every edge's tokens, depth first, children in insertion order."""
    edges = []
    stack = list(reversed(manager._roots[salt].children.values()))
    while stack:
        node = stack.pop()
        edges.append(tuple(node.key.tolist()))
        stack.extend(reversed(node.children.values()))
    return edges


def test_hits_exact_and_capped():
    manager = make_radix()
    run_prompt(manager, make_seq(1, range(1, 11)))
    assert manager.lookup(make_seq(2, [1, 2, 3, 4, 5, 6, 99, 98])) == 6
    assert manager.lookup(make_seq(3, range(1, 11))) == 9
    assert manager.lookup(make_seq(4, list(range(1, 11)) + [50])) == 10
    assert manager.lookup(make_seq(5, [7, 8, 9])) == 0
    assert tree_edges(manager) == [tuple(range(1, 11))]  # lookups do not split


def test_partial_match_splits_node():
    manager = make_radix()
    run_prompt(manager, make_seq(1, range(1, 11)))
    assert run_prompt(manager, make_seq(2, [1, 2, 3, 4, 5, 6, 99, 98])) == 6
    assert tree_edges(manager) == [(1, 2, 3, 4, 5, 6), (7, 8, 9, 10), (99, 98)]
    assert manager.tree_tokens == 12
    assert manager.evictable_tokens == 12


def test_running_sequence_locks_its_path():
    manager = make_radix(capacity=20)
    seq = make_seq(1, range(10), num_output_tokens=4)
    assert manager.allocate(seq, 10)
    # The prompt enters the tree at allocation and stays locked while the sequence runs.
    assert manager.tree_tokens == 10
    assert manager.evictable_tokens == 0
    for _ in range(4):
        assert manager.allocate(seq, 1)
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.cached_free_tokens, parts.free_tokens) == (14, 0, 6)
    assert manager.num_free_tokens == 6
    manager.check_invariants()

    manager.free(seq)  # the 4 generated tokens join the tree, all unlocked
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.cached_free_tokens, parts.free_tokens) == (0, 14, 6)
    assert manager.num_free_tokens == 20
    manager.check_invariants()


def test_duplicate_prefill_is_stored_once():
    manager = make_radix(capacity=30)
    first = make_seq(1, range(10), num_output_tokens=5)
    second = make_seq(2, range(10), num_output_tokens=5)
    assert manager.allocate(first, 10)
    assert manager.lookup(second) == 9
    assert manager.allocate(second, 1, 9)
    # The second sequence recomputed token 9, which the tree already contains, so its copy is freed.
    assert manager.tree_tokens == 10
    assert manager.breakdown().token_state_tokens == 10
    assert manager.allocate(first, 1)
    assert manager.allocate(second, 1)
    assert manager.breakdown().token_state_tokens == 12
    assert manager.breakdown().free_tokens == 18
    manager.check_invariants()


def _build_lfu_lru_tree(eviction: str) -> RadixKVCacheManager:
    """A tree of 24 tokens in a 24-token cache: S (8, hit once) with leaves a, b (4 each), and d (8)."""
    manager = make_radix(capacity=24, eviction=eviction)
    s, a, b, d = list(range(8)), [100, 101, 102, 103], [200, 201, 202, 203], list(range(300, 308))
    assert run_prompt(manager, make_seq(1, s + a)) == 0
    assert run_prompt(manager, make_seq(2, s + b)) == 8
    assert run_prompt(manager, make_seq(3, d)) == 0
    assert tree_edges(manager) == [tuple(s), tuple(a), tuple(b), tuple(d)]
    assert manager.num_free_tokens == 24
    assert manager.breakdown().free_tokens == 0
    return manager


@pytest.mark.parametrize("eviction, surviving_s_hit, surviving_d_hit", [
    # LRU: a (time 1), b (time 3), then S, whose last access (time 3) is older than d's (time 5).
    ("lru", 0, 8),
    # LFU: a and b (0 hits), then d (0 hits) before S (1 hit).
    ("lfu", 8, 0),
])
def test_eviction_order(eviction, surviving_s_hit, surviving_d_hit):
    manager = _build_lfu_lru_tree(eviction)
    newcomer = make_seq(10, range(1000, 1016))
    assert manager.allocate(newcomer, 16)  # needs 16 tokens: evicts 4 + 4 + 8
    assert manager.stats.evictions == 16
    manager.check_invariants()
    assert manager.lookup(make_seq(11, list(range(8)) + [555])) == surviving_s_hit
    assert manager.lookup(make_seq(12, list(range(300, 308)) + [555])) == surviving_d_hit


def test_evicting_a_leaf_exposes_its_parent():
    manager = make_radix(capacity=20)
    run_prompt(manager, make_seq(1, list(range(6)) + [10, 11, 12, 13]))
    run_prompt(manager, make_seq(2, list(range(6)) + [20, 21, 22, 23]))
    # 14 tokens in the tree, 6 free. 16 new tokens evict both 4-token leaves, then their parent.
    assert manager.allocate(make_seq(3, range(100, 116)), 16)
    assert manager.stats.evictions == 14
    assert manager.lookup(make_seq(4, list(range(6)) + [10])) == 0


def test_allocation_is_all_or_nothing():
    manager = make_radix(capacity=20)
    holder = make_seq(1, range(10), num_output_tokens=10)
    assert manager.allocate(holder, 10)
    run_prompt(manager, make_seq(2, range(50, 55)))  # 5 evictable tokens
    # 5 free + 5 evictable = 10; a hit on the holder's locked prefix adds no room.
    request = make_seq(3, list(range(10)) + list(range(200, 211)))
    assert manager.lookup(request) == 10
    assert not manager.can_allocate(request, 11, 10)
    assert not manager.allocate(request, 11, 10)
    assert manager.tree_tokens == 15
    assert manager.stats.evictions == 0
    assert manager.allocate(request, 10, 10)  # 10 new tokens fit exactly, evicting all 5
    assert manager.stats.evictions == 5
    assert manager.breakdown().free_tokens == 0
    manager.check_invariants()


def test_hit_on_unlocked_prefix_is_pinned_before_eviction():
    manager = make_radix(capacity=20)
    run_prompt(manager, make_seq(1, range(12)))  # 12 evictable tokens, 8 free
    request = make_seq(2, list(range(12)) + list(range(100, 109)))
    assert manager.lookup(request) == 12
    # Its 12-token hit is locked before eviction, so only 8 slots are left for 9 new tokens.
    assert not manager.can_allocate(request, 9, 12)
    assert manager.can_allocate(request, 8, 12)


def test_pages_round_hits_down():
    manager = make_radix(capacity=40, page_size=4)
    seq = make_seq(1, range(10), num_output_tokens=3)
    assert manager.allocate(seq, 10)
    # 8 tokens (two pages) enter the tree; the partial third page stays private.
    assert manager.tree_tokens == 8
    parts = manager.breakdown()
    assert parts.token_state_tokens == 10
    assert parts.reserved_tokens == 2
    assert parts.internal_fragmentation_tokens == 0
    manager.free(seq)  # 10 tokens: two whole pages are cached, the tail page is freed
    assert manager.tree_tokens == 8
    assert manager.breakdown().free_tokens == 32

    assert manager.lookup(make_seq(2, list(range(9)) + [77, 78, 79])) == 8
    assert manager.lookup(make_seq(3, list(range(7)) + [77])) == 4
    manager.check_invariants()


def test_salt_separates_namespaces():
    manager = make_radix()
    run_prompt(manager, make_seq(1, range(10), salt="alice"))
    assert manager.lookup(make_seq(2, range(10), salt="alice")) == 9
    assert manager.lookup(make_seq(3, range(10), salt="bob")) == 0
    assert manager.lookup(make_seq(4, range(10))) == 0


def test_max_decode_steps_counts_evictable_room():
    manager = make_radix(capacity=30)
    run_prompt(manager, make_seq(1, range(100, 106)))  # 6 evictable
    a, b = make_seq(2, range(5), 50), make_seq(3, range(10, 15), 50)
    assert manager.allocate(a, 5)
    assert manager.allocate(b, 5)
    # 30 - 6 - 10 = 14 free + 6 evictable = 20 tokens for two sequences: 10 steps.
    assert manager.max_decode_steps([a, b], 100) == 10
    assert manager.max_decode_steps([a, b], 3) == 3


def test_reset_only_when_idle():
    manager = make_radix()
    seq = make_seq(1, range(10))
    assert manager.allocate(seq, 10)
    assert not manager.reset_prefix_cache()
    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.lookup(make_seq(2, range(10))) == 0
    assert manager.tree_tokens == 0
    assert manager.stats.lookups == 0
