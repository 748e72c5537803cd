"""The paged strategy against vLLM's prefix-caching behaviour, worked out by hand on tiny pools.

Block size 16 unless a test sets another. "Pool of N" means N usable blocks, ids 0..N-1, handed
out from the free queue's head (block-id order at start).
"""

import numpy as np
import pytest

from kvsim.kvcache import PagedKVCacheManager
from kvsim.kvcache.base import Sequence


def make_paged(num_blocks: int = 10, block_size: int = 16, prefix: bool = True) -> PagedKVCacheManager:
    return PagedKVCacheManager(name="paged", num_blocks=num_blocks, block_size=block_size,
                               enable_prefix_caching=prefix)


def make_seq(seq_id: int, prompt, num_output_tokens: int = 10, salt: str | None = None,
             output=None) -> Sequence:
    prompt = np.asarray(prompt, dtype=np.int64)
    output_ids = None if output is None else np.asarray(output, dtype=np.int64)
    return Sequence(seq_id, prompt, prompt.shape[0] + num_output_tokens, cache_salt=salt,
                    output_token_ids=output_ids)


def admit(manager: PagedKVCacheManager, seq: Sequence) -> int:
    """Look up and allocate the whole prompt; return the hit in tokens."""
    hit = manager.lookup(seq)
    assert manager.allocate(seq, seq.num_prompt_tokens - hit, hit)
    return hit


def distinct(start: int, length: int) -> np.ndarray:
    return np.arange(start, start + length, dtype=np.int64)


# ---------------------------------------------------------------------- case 1


def test_only_full_blocks_are_shared():
    manager = make_paged(num_blocks=10)
    first = make_seq(1, distinct(0, 55))
    assert admit(manager, first) == 0
    assert manager.block_ids(first) == [0, 1, 2, 3]
    # 55 tokens: three full blocks are cached, the 7-token fourth is not.
    assert manager.pool.is_cached.tolist()[:4] == [True, True, True, False]

    second = make_seq(2, np.concatenate([distinct(0, 48), distinct(1000, 5)]))
    assert admit(manager, second) == 48
    assert manager.block_ids(second) == [0, 1, 2, 4]
    assert manager.pool.ref_cnt.tolist()[:5] == [2, 2, 2, 1, 1]
    assert manager.pool.num_free_blocks == 5
    assert manager.pool.free_queue.blocks_in_order() == [5, 6, 7, 8, 9]


# ---------------------------------------------------------------------- case 2


def test_decode_grows_in_place_then_caches_filled_block():
    manager = make_paged(num_blocks=10)
    seq = make_seq(1, distinct(0, 55), num_output_tokens=40, output=distinct(5000, 40))
    admit(manager, seq)

    assert manager.allocate(seq, 4)  # 59 tokens: still four blocks
    assert manager.block_ids(seq) == [0, 1, 2, 3]
    assert manager.pool.num_free_blocks == 6
    assert not manager.pool.is_cached[3]

    assert manager.allocate(seq, 19)  # 78 tokens: a fifth block, and block 3 is now full
    assert manager.block_ids(seq) == [0, 1, 2, 3, 4]
    assert manager.pool.num_free_blocks == 5
    assert manager.pool.is_cached[3]
    assert not manager.pool.is_cached[4]

    # A prompt equal to the first 64 tokens (55 prompt + 9 generated) hits all four full blocks.
    follower = make_seq(2, np.concatenate([distinct(0, 55), distinct(5000, 9), distinct(9000, 6)]))
    assert manager.lookup(follower) == 64


# ---------------------------------------------------------------------- case 3


def test_full_prompt_hit_recomputes_last_token():
    manager = make_paged(num_blocks=10)
    admit(manager, make_seq(1, distinct(0, 64)))  # four full blocks, all cached

    # Same 64 tokens: at most 63 may hit, rounded down to whole blocks = 48.
    assert manager.lookup(make_seq(2, distinct(0, 64))) == 48
    # One more token: all 64 cached tokens may hit.
    assert manager.lookup(make_seq(3, distinct(0, 65))) == 64
    # A 49-token prefix of it: at most 48 may hit, which is exactly three blocks.
    assert manager.lookup(make_seq(4, distinct(0, 49))) == 48
    assert manager.lookup(make_seq(5, distinct(0, 48))) == 32


# ---------------------------------------------------------------------- case 4


def test_freed_blocks_evict_in_lru_order():
    manager = make_paged(num_blocks=10)
    first = make_seq(1, distinct(0, 40))    # blocks 0, 1 full and cached; block 2 holds 8 tokens
    second = make_seq(2, distinct(100, 20))  # block 3 full and cached; block 4 holds 4 tokens
    admit(manager, first)
    admit(manager, second)
    assert manager.block_ids(first) == [0, 1, 2]
    assert manager.block_ids(second) == [3, 4]

    manager.free(first)
    manager.free(second)
    # Never-used blocks first, then each request's blocks last block first, in the order freed.
    assert manager.pool.free_queue.blocks_in_order() == [5, 6, 7, 8, 9, 2, 1, 0, 4, 3]
    assert manager.breakdown().cached_free_tokens == 3 * 16

    # Six new blocks: the five never used, then the first request's uncached last block.
    big = make_seq(3, distinct(10_000, 96))
    admit(manager, big)
    assert manager.block_ids(big) == [5, 6, 7, 8, 9, 2]
    assert manager.stats.evictions == 0
    assert manager.lookup(make_seq(4, distinct(0, 40))) == 32

    # Two more: the first request's cached blocks, its later block first.
    small = make_seq(5, distinct(20_000, 32))
    admit(manager, small)
    assert manager.block_ids(small) == [1, 0]
    assert manager.stats.evictions == 2
    assert manager.lookup(make_seq(6, distinct(0, 40))) == 0
    assert manager.lookup(make_seq(7, distinct(100, 20))) == 16

    # A hit on a free cached block takes it out of the middle of the queue.
    again = make_seq(8, distinct(100, 20))
    assert admit(manager, again) == 16
    assert manager.block_ids(again) == [3, 4]
    assert manager.pool.free_queue.blocks_in_order() == []


# ---------------------------------------------------------------------- case 5


def test_hit_plus_new_blocks_is_all_or_nothing():
    manager = make_paged(num_blocks=10)
    owner = make_seq(1, distinct(0, 100))  # blocks 0..5 full and cached, block 6 partial
    admit(manager, owner)
    admit(manager, make_seq(2, distinct(500, 10)))  # block 7
    assert manager.pool.num_free_blocks == 2

    # 96 cached tokens + 40 new = 136 tokens = 9 blocks: 6 hit, 3 new, but only 2 are free.
    request = make_seq(3, np.concatenate([distinct(0, 96), distinct(900, 40)]))
    hit = manager.lookup(request)
    assert hit == 96
    ref_before = manager.pool.ref_cnt.copy()
    keys_before = dict(manager.pool.key_to_block_id)
    assert not manager.can_allocate(request, 40, hit)
    assert not manager.allocate(request, 40, hit)
    assert manager.block_ids(request) == []
    assert np.array_equal(manager.pool.ref_cnt, ref_before)
    assert manager.pool.key_to_block_id == keys_before
    assert manager.pool.free_queue.blocks_in_order() == [8, 9]
    assert manager.stats.lookups == 2


def test_free_hit_blocks_do_not_count_as_room():
    manager = make_paged(num_blocks=10)
    owner = make_seq(1, distinct(0, 100))
    admit(manager, owner)
    manager.free(owner)
    admit(manager, make_seq(2, distinct(500, 48)))  # takes blocks 7, 8, 9
    assert manager.pool.free_queue.blocks_in_order() == [6, 5, 4, 3, 2, 1, 0]

    # Seven free blocks, six of them the hit itself: one is left for new content.
    two_new = make_seq(3, np.concatenate([distinct(0, 96), distinct(900, 20)]))
    assert manager.lookup(two_new) == 96
    assert not manager.allocate(two_new, 20, 96)
    one_new = make_seq(4, np.concatenate([distinct(0, 96), distinct(900, 10)]))
    assert manager.allocate(one_new, 10, manager.lookup(one_new))
    assert manager.block_ids(one_new) == [0, 1, 2, 3, 4, 5, 6]
    assert manager.stats.evictions == 0  # block 6 held no cached content


# ---------------------------------------------------------------------- case 6


def test_caching_off_never_shares():
    manager = make_paged(num_blocks=5, prefix=False)
    first = make_seq(1, distinct(0, 40))
    second = make_seq(2, distinct(0, 40))
    assert admit(manager, first) == 0
    assert manager.block_ids(first) == [0, 1, 2]
    assert manager.lookup(second) == 0
    assert not manager.allocate(second, 40)  # needs 3 blocks, 2 free
    assert manager.pool.key_to_block_id == {}

    manager.free(first)
    assert manager.allocate(second, 40)
    assert manager.block_ids(second) == [3, 4, 2]
    assert manager.stats.hit_tokens == 0


# ---------------------------------------------------------------------- case 7


def test_cache_salt_separates_namespaces():
    manager = make_paged(num_blocks=20)
    admit(manager, make_seq(1, distinct(0, 40), salt="alice"))
    assert manager.lookup(make_seq(2, distinct(0, 40), salt="alice")) == 32
    assert manager.lookup(make_seq(3, distinct(0, 40), salt="bob")) == 0
    assert manager.lookup(make_seq(4, distinct(0, 40))) == 0

    # The salt changes the first block's key, and through the chain the second one's too.
    admit(manager, make_seq(5, distinct(0, 40), salt="bob"))
    alice_keys = manager._hasher.block_keys(make_seq(6, distinct(0, 40), salt="alice"), 2)
    bob_keys = manager._hasher.block_keys(make_seq(7, distinct(0, 40), salt="bob"), 2)
    assert alice_keys[0] != bob_keys[0]
    assert alice_keys[1] != bob_keys[1]
    assert len(manager.pool.key_to_block_id) == 4


# ---------------------------------------------------------------------- case 8


def test_reset_fails_while_in_use_then_clears():
    manager = make_paged(num_blocks=10)
    seq = make_seq(1, distinct(0, 40))
    admit(manager, seq)
    assert not manager.reset_prefix_cache()
    assert manager.lookup(make_seq(2, distinct(0, 40))) == 32
    assert manager.stats.lookups == 1

    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.lookup(make_seq(3, distinct(0, 40))) == 0
    assert manager.breakdown().cached_free_tokens == 0
    assert manager.stats.lookups == 0
    assert manager.pool.num_free_blocks == 10


# ---------------------------------------------------------------------- beyond the eight cases


def test_duplicate_blocks_survive_eviction_of_one_copy():
    manager = make_paged(num_blocks=11)
    prompt = distinct(0, 64)
    first = make_seq(1, prompt)
    assert manager.allocate(first, 16)  # a first 16-token chunk: block 0, cached

    second = make_seq(2, prompt)
    assert manager.lookup(second) == 16
    assert manager.allocate(second, 48, 16)  # blocks 1, 2, 3 cached under the chain's keys
    assert manager.block_ids(second) == [0, 1, 2, 3]
    assert manager.allocate(first, 48)  # blocks 4, 5, 6 with the same content: duplicates
    assert manager.block_ids(first) == [0, 4, 5, 6]

    manager.free(second)  # blocks 3, 2, 1 go to the queue; block 0 is still held by the first
    assert manager.pool.free_queue.blocks_in_order() == [7, 8, 9, 10, 3, 2, 1]
    filler = make_seq(3, distinct(10_000, 112))
    admit(manager, filler)  # takes 7..10, then evicts 3, 2, 1
    assert manager.stats.evictions == 3

    # The duplicates now serve the hits.
    third = make_seq(4, prompt)
    assert manager.lookup(third) == 48
    manager.free(filler)
    assert manager.allocate(third, 16, 48)
    assert manager.block_ids(third) == [0, 4, 5, 1]


def test_stats_count_admissions_not_lookups():
    manager = make_paged(num_blocks=10)
    admit(manager, make_seq(1, distinct(0, 40)))
    waiting = make_seq(2, distinct(0, 50))
    for _ in range(3):
        assert manager.lookup(waiting) == 32
    assert manager.stats.lookups == 1
    assert manager.allocate(waiting, 18, 32)
    assert (manager.stats.lookups, manager.stats.queried_tokens, manager.stats.hit_tokens) == (2, 90, 32)
    assert (manager.stats.queried_blocks, manager.stats.hit_blocks) == (2 + 3, 2)


def test_resumed_sequence_looks_up_generated_tokens():
    manager = make_paged(num_blocks=10)
    seq = make_seq(1, distinct(0, 30), num_output_tokens=20, output=distinct(700, 20))
    admit(manager, seq)
    assert manager.allocate(seq, 10)  # 40 tokens: two full blocks cached
    manager.free(seq)  # preempted
    assert manager.lookup(seq) == 16  # the prompt alone covers one full block
    assert manager.lookup(seq, num_lookup_tokens=40) == 32
    assert manager.allocate(seq, 8, 32)
    assert manager.stats.queried_tokens == 30 + 40


def test_wrong_cached_tokens_raise():
    manager = make_paged(num_blocks=10)
    admit(manager, make_seq(1, distinct(0, 40)))
    seq = make_seq(2, distinct(0, 40))
    with pytest.raises(ValueError, match="not a multiple of block_size=16"):
        manager.allocate(seq, 30, 10)
    with pytest.raises(ValueError, match="exceeds the 32 tokens now cached"):
        manager.allocate(seq, 0, 48)


def test_max_decode_steps_bisects_block_needs():
    manager = make_paged(num_blocks=6)
    a = make_seq(1, distinct(0, 15), num_output_tokens=100)
    b = make_seq(2, distinct(100, 16), num_output_tokens=100)
    admit(manager, a)
    admit(manager, b)
    assert manager.pool.num_free_blocks == 4
    admit(manager, make_seq(3, distinct(200, 5)))
    # 3 free blocks. After k steps a needs ceil((15+k)/16) - 1 more, b ceil((16+k)/16) - 1:
    # k = 17 needs 1 + 2 = 3 blocks, k = 18 needs 2 + 2 = 4.
    assert manager.max_decode_steps([a, b], 1000) == 17
    assert manager.max_decode_steps([a, b], 10) == 10
    assert manager.max_decode_steps([a, b], 0) == 0
    assert manager.allocate(a, 17)
    assert manager.allocate(b, 17)
    assert manager.pool.num_free_blocks == 0


def test_breakdown_splits_last_block():
    manager = make_paged(num_blocks=10)
    # 20 prompt tokens, final length 26: two blocks; the second holds 4, will hold 10, never 16.
    seq = make_seq(1, distinct(0, 20), num_output_tokens=6)
    admit(manager, seq)
    parts = manager.breakdown()
    assert parts.token_state_tokens == 20
    assert parts.reserved_tokens == 6
    assert parts.internal_fragmentation_tokens == 6
    assert parts.cached_free_tokens == 0
    assert parts.free_tokens == 160 - 32
    manager.free(seq)
    parts = manager.breakdown()
    assert parts.token_state_tokens == 0
    assert parts.cached_free_tokens == 16  # the one full block
    assert parts.free_tokens == 144
