"""Contiguous reservations: hole placement, merging, buddy blocks, fragmentation and the reservation policies."""

import numpy as np
import pytest

from kvsim.kvcache import ContiguousKVCacheManager
from kvsim.kvcache.base import Sequence


def make_contiguous(capacity: int = 100, max_model_len: int = 100, reservation: str = "oracle",
                    fit: str = "first") -> ContiguousKVCacheManager:
    return ContiguousKVCacheManager(name="contiguous", capacity_tokens=capacity, max_model_len=max_model_len,
                                    reservation=reservation, fit=fit)


def make_seq(seq_id: int, prompt_len: int, final_len: int) -> Sequence:
    return Sequence(seq_id, np.arange(prompt_len, dtype=np.int64), final_len)


def test_external_fragmentation_from_holes():
    manager = make_contiguous()
    a, b, c = make_seq(1, 10, 30), make_seq(2, 10, 40), make_seq(3, 10, 30)
    for seq in (a, b, c):
        assert manager.allocate(seq, 10)
    assert [manager.reserved_range(s) for s in (a, b, c)] == [(0, 30), (30, 40), (70, 30)]
    manager.free(a)
    manager.free(c)
    assert manager.free_space.holes() == [(0, 30), (70, 30)]

    # 60 slots are free, but the largest hole has 30: a 50-token reservation does not fit.
    d = make_seq(4, 10, 50)
    assert manager.num_free_tokens == 60
    assert manager.largest_free_range_tokens == 30
    assert manager.reservation_tokens(d) == 50
    assert not manager.can_allocate(d, 10)
    assert not manager.allocate(d, 10)

    parts = manager.breakdown(next_request_tokens=manager.reservation_tokens(d))
    assert parts.token_state_tokens == 10
    assert parts.reserved_tokens == 30
    assert parts.external_fragmentation_tokens == 60
    assert parts.free_tokens == 0
    # A 30-token request would fit: no hole is too small for it.
    assert manager.breakdown(next_request_tokens=30).external_fragmentation_tokens == 0
    # Without a waiting request there is nothing to measure holes against.
    assert manager.breakdown().external_fragmentation_tokens == 0

    # Freeing the middle range merges all three into one hole.
    manager.free(b)
    assert manager.free_space.holes() == [(0, 100)]
    assert manager.allocate(d, 10)
    assert manager.reserved_range(d) == (0, 50)


def test_first_fit_and_best_fit_choose_different_holes():
    for fit, expected_start in (("first", 0), ("best", 60)):
        manager = make_contiguous(fit=fit)
        sizes = [30, 10, 20, 10, 30]
        seqs = [make_seq(i, 5, size) for i, size in enumerate(sizes)]
        for seq in seqs:
            assert manager.allocate(seq, 5)
        manager.free(seqs[0])  # hole (0, 30)
        manager.free(seqs[3])  # hole (60, 10)
        small = make_seq(99, 5, 10)
        assert manager.allocate(small, 5)
        assert manager.reserved_range(small) == (expected_start, 10), fit


def test_hole_merges_with_both_neighbours():
    manager = make_contiguous()
    seqs = [make_seq(i, 5, 20) for i in range(5)]
    for seq in seqs:
        assert manager.allocate(seq, 5)
    manager.free(seqs[1])
    manager.free(seqs[3])
    assert manager.free_space.holes() == [(20, 20), (60, 20)]
    manager.free(seqs[2])
    assert manager.free_space.holes() == [(20, 60)]
    manager.free(seqs[4])
    assert manager.free_space.holes() == [(20, 80)]
    manager.free(seqs[0])
    assert manager.free_space.holes() == [(0, 100)]


@pytest.mark.parametrize("reservation, prompt_len, final_len, expected", [
    ("max", 1, 40, 1000),
    # pow2 keeps the prompt exact and rounds the output up to a power of two.
    ("pow2", 40, 65, 72),     # output 25 -> 32, the vLLM paper's own example
    ("pow2", 1, 2, 2),        # output 1 -> 1
    ("pow2", 3, 8, 11),       # output 5 -> 8
    ("pow2", 10, 18, 18),     # output 8 -> 8
    ("pow2", 10, 19, 26),     # output 9 -> 16
    ("pow2", 7, 7, 7),        # no output left (a fully recomputed sequence): the prompt alone
    ("pow2", 100, 700, 1000),  # output 600 -> 1024, 1,124 in all, capped at max_model_len
    ("oracle", 1, 37, 37),
    ("oracle", 1, 1200, 1000),
])
def test_reservation_sizes(reservation, prompt_len, final_len, expected):
    manager = make_contiguous(capacity=4000, max_model_len=1000, reservation=reservation)
    assert manager.reservation_tokens(make_seq(1, prompt_len, final_len)) == expected


@pytest.mark.parametrize("reservation, reserved, internal", [
    ("oracle", 30, 0),
    ("pow2", 30, 2),   # prompt 10 + output 30 -> 32: 42 slots
    ("max", 30, 60),   # 100 slots
])
def test_breakdown_per_policy(reservation, reserved, internal):
    manager = make_contiguous(capacity=200, max_model_len=100, reservation=reservation)
    seq = make_seq(1, 10, 40)
    assert manager.allocate(seq, 10)
    parts = manager.breakdown()
    assert parts.token_state_tokens == 10
    assert parts.reserved_tokens == reserved
    assert parts.internal_fragmentation_tokens == internal
    assert parts.free_tokens == 200 - 10 - reserved - internal

    assert manager.allocate(seq, 30)  # grown to the final length
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.reserved_tokens, parts.internal_fragmentation_tokens) == \
        (40, 0, internal)


def test_buddy_splits_and_merges():
    manager = make_contiguous(capacity=64, max_model_len=64, fit="buddy")
    a, b, c = make_seq(1, 4, 10), make_seq(2, 4, 20), make_seq(3, 4, 5)

    # 10 slots -> 16: [0, 64) splits into [0, 32) + [32, 32), then [0, 16) + [16, 16); a takes [0, 16).
    assert manager.allocate(a, 4)
    assert manager.block_range(a) == (0, 16)
    assert manager.reserved_range(a) == (0, 10)
    assert manager.free_space.holes() == [(16, 16), (32, 32)]
    # 20 slots -> 32: the smallest free block that fits is [32, 32), taken whole.
    assert manager.allocate(b, 4)
    assert manager.block_range(b) == (32, 32)
    assert manager.free_space.holes() == [(16, 16)]
    # 5 slots -> 8: [16, 16) splits into [16, 8) + [24, 8).
    assert manager.allocate(c, 4)
    assert manager.block_range(c) == (16, 8)
    assert manager.free_space.holes() == [(24, 8)]

    # Slack 6 + 12 + 3 is external fragmentation; reserved is 6 + 16 + 1 slots still to fill.
    assert manager.block_slack_tokens == 21
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.reserved_tokens, parts.internal_fragmentation_tokens) == (12, 23, 0)
    assert parts.external_fragmentation_tokens == 21
    assert parts.free_tokens == 8
    assert manager.num_free_tokens == 8

    # [0, 16)'s buddy [16, 16) is split and partly used, so freeing a merges nothing.
    manager.free(a)
    assert manager.free_space.holes() == [(0, 16), (24, 8)]
    # 24 slots are free, but a 17-slot request needs a 32-slot block.
    d = make_seq(4, 4, 17)
    assert manager.num_free_tokens == 24
    assert manager.largest_free_range_tokens == 16
    assert not manager.can_allocate(d, 4)
    assert not manager.allocate(d, 4)
    parts = manager.breakdown(next_request_tokens=17)
    assert parts.external_fragmentation_tokens == 12 + 3 + 24
    assert parts.free_tokens == 0

    # Freeing c merges [16, 8) with [24, 8), then [16, 16) with [0, 16); [0, 32)'s buddy is b.
    manager.free(c)
    assert manager.free_space.holes() == [(0, 32)]
    assert manager.allocate(d, 4)
    assert manager.block_range(d) == (0, 32)
    manager.free(b)
    manager.free(d)
    assert manager.free_space.holes() == [(0, 64)]
    assert manager.block_slack_tokens == 0


def test_buddy_takes_smallest_block():
    # 100 slots are top-level blocks of 64, 32 and 4, which never merge with each other.
    manager = make_contiguous(capacity=100, max_model_len=100, fit="buddy")
    assert manager.free_space.holes() == [(0, 64), (64, 32), (96, 4)]
    small, middle, large = make_seq(1, 2, 3), make_seq(2, 2, 30), make_seq(3, 2, 33)
    assert manager.allocate(small, 2)
    assert manager.block_range(small) == (96, 4)  # the smallest block, not the lowest address
    assert manager.allocate(middle, 2)
    assert manager.block_range(middle) == (64, 32)
    assert manager.allocate(large, 2)
    assert manager.block_range(large) == (0, 64)
    assert manager.num_free_tokens == 0
    for seq in (small, middle, large):
        manager.free(seq)
    assert manager.free_space.holes() == [(0, 64), (64, 32), (96, 4)]
    # 65 slots round to 128, larger than any top-level block: it never fits, even in an empty cache.
    assert not manager.can_allocate(make_seq(4, 2, 65), 2)


def test_buddy_equal_blocks_lowest_address():
    manager = make_contiguous(capacity=64, max_model_len=64, fit="buddy")
    seqs = [make_seq(i, 2, 16) for i in range(4)]
    for seq in seqs:
        assert manager.allocate(seq, 2)
    assert [manager.block_range(seq)[0] for seq in seqs] == [0, 16, 32, 48]
    manager.free(seqs[3])
    manager.free(seqs[1])
    assert manager.free_space.holes() == [(16, 16), (48, 16)]
    again = make_seq(9, 2, 9)
    assert manager.allocate(again, 2)
    assert manager.block_range(again) == (16, 16)


def test_buddy_max_matches_first_fit():
    # max_model_len 2,048 is a power of two, so buddy blocks equal the reservations and leave no slack.
    # 15,536 slots = 8,192 + 4,096 + 2,048 + 1,024 + 128 + 32 + 16: 7 blocks of 2,048, as first fit's
    # 15,536 // 2,048 = 7, and 1,200 slots in smaller blocks.
    # The addresses differ: buddy takes the top-level 2,048 block first, then halves the 4,096 and 8,192 ones.
    expected_starts = {"first": [2048 * i for i in range(7)],
                       "buddy": [12_288, 8192, 10_240, 0, 2048, 4096, 6144]}
    for fit, starts in expected_starts.items():
        manager = make_contiguous(capacity=15_536, max_model_len=2048, reservation="max", fit=fit)
        seqs = [make_seq(i, 100, 500) for i in range(8)]
        assert [manager.allocate(seq, 100) for seq in seqs] == [True] * 7 + [False], fit
        assert [manager.block_range(seq) for seq in seqs[:7]] == [(start, 2048) for start in starts], fit
        assert manager.block_slack_tokens == 0
        parts = manager.breakdown(next_request_tokens=2048)
        assert parts.external_fragmentation_tokens == 1200, fit
        assert (parts.token_state_tokens, parts.reserved_tokens, parts.internal_fragmentation_tokens) == \
            (700, 2800, 7 * 1548), fit


def test_buddy_rejects_invalid_blocks():
    manager = make_contiguous(capacity=64, max_model_len=64, fit="buddy")
    with pytest.raises(ValueError, match="power-of-two size"):
        manager.free_space.find(12)
    with pytest.raises(ValueError, match="no free block of at least 32 slots starts at 16"):
        manager.free_space.take(16, 32)
    with pytest.raises(ValueError, match=r"\[8, 24\) is not a block"):
        manager.free_space.release(8, 16)


def test_unknown_fit_raises():
    with pytest.raises(ValueError, match="unknown fit policy 'worst'"):
        make_contiguous(fit="worst")


def test_breakdown_buddy_pow2():
    # Prompt 10 + output 30 -> 32: a 42-slot reservation in a 64-slot block. 200 slots are 128 + 64 + 8,
    # and the smallest block that fits is the top-level [128, 192).
    manager = make_contiguous(capacity=200, max_model_len=100, reservation="pow2", fit="buddy")
    seq = make_seq(1, 10, 40)
    assert manager.allocate(seq, 10)
    assert manager.reserved_range(seq) == (128, 42)
    assert manager.block_range(seq) == (128, 64)
    parts = manager.breakdown()
    assert (parts.token_state_tokens, parts.reserved_tokens, parts.internal_fragmentation_tokens) == (10, 30, 2)
    assert parts.external_fragmentation_tokens == 22
    assert parts.free_tokens == 136
    # Growth stops at the reservation's end, 42 - 10 slots on, not at the block's.
    assert manager.max_decode_steps([seq], 100) == 32


def test_growth_stays_inside_reservation():
    manager = make_contiguous(max_model_len=16, reservation="max")
    seq = make_seq(1, 10, 20)  # 16 slots, fewer than its final length
    assert manager.allocate(seq, 10)
    assert manager.max_decode_steps([seq], 100) == 6
    assert manager.max_decode_steps([seq], 4) == 4
    assert manager.allocate(seq, 6)
    assert not manager.can_allocate(seq, 1)
    assert not manager.allocate(seq, 1)
    assert manager.num_tokens(seq) == 16


def test_growth_past_final_length_raises():
    manager = make_contiguous(reservation="pow2")
    seq = make_seq(1, 10, 12)
    assert manager.allocate(seq, 10)
    with pytest.raises(ValueError, match="would hold 13 tokens, more than its final length 12"):
        manager.allocate(seq, 3)


def test_lookup_is_zero_and_cached_tokens_raise():
    manager = make_contiguous()
    seq = make_seq(1, 10, 20)
    assert manager.lookup(seq) == 0
    with pytest.raises(ValueError, match="share no prefix"):
        manager.allocate(seq, 5, 5)


def test_reset_only_when_empty():
    manager = make_contiguous()
    seq = make_seq(1, 10, 20)
    assert manager.allocate(seq, 10)
    assert manager.stats.lookups == 1
    assert not manager.reset_prefix_cache()
    manager.free(seq)
    assert manager.reset_prefix_cache()
    assert manager.stats.lookups == 0
