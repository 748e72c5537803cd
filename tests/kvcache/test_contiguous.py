"""Contiguous reservations: hole placement, merging, fragmentation and the reservation policies."""

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


@pytest.mark.parametrize("reservation, final_len, expected", [
    ("max", 40, 1000),
    ("pow2", 1, 1),
    ("pow2", 5, 8),
    ("pow2", 8, 8),
    ("pow2", 9, 16),
    ("pow2", 600, 1000),  # the next power of two, 1024, is capped at max_model_len
    ("oracle", 37, 37),
])
def test_reservation_sizes(reservation, final_len, expected):
    manager = make_contiguous(capacity=4000, max_model_len=1000, reservation=reservation)
    assert manager.reservation_tokens(make_seq(1, 1, final_len)) == expected


@pytest.mark.parametrize("reservation, reserved, internal", [
    ("oracle", 30, 0),
    ("pow2", 30, 24),  # final 40 -> 64 slots
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
