"""Paged KV cache with optional automatic prefix caching, with the semantics of vLLM v1's KVCacheManager.

A sequence owns a block table: `ceil(num_tokens / block_size)` blocks from the `BlockPool`, in any
physical order. With prefix caching on, every full block is registered under its chained key as soon
as it is allocated, as vLLM v1 does in `allocate_slots`. That includes blocks that fill during
decode. A new request reuses the longest cached prefix of its prompt:

- The hit is at most `prompt_len - 1` tokens, rounded down to whole blocks: when the whole prompt is
  cached, the last prompt token is still computed, because its logits give the first output token.
- Allocation is all or nothing: when the hit blocks plus the new ones do not fit, nothing changes.
- A request's blocks go back to the free queue's tail last block first, so its prefix blocks, the
  ones most likely to be shared, are evicted last.

Sharing within a request (parallel sampling, beam search) uses `fork`, with copy on write of a
shared, partly filled last block as in vLLM v0's block manager. NOTE: vLLM v1 has no fork. It runs
the n samples of a request as separate requests that share full prompt blocks through the prefix
cache, and each copy holds its own partial last block.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import numpy as np

from kvsim.kvcache.base import MemoryBreakdown, PrefixCacheStats, Sequence, max_steps_that_fit
from kvsim.kvcache.block_pool import BlockPool
from kvsim.kvcache.hashing import SequenceBlockHasher

logger = logging.getLogger(__name__)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_final_length(seq: Sequence, num_tokens: int) -> None:
    """Raise if an allocation would take `seq` past its final length, whose token ids do not exist."""
    if num_tokens > seq.final_num_tokens:
        raise ValueError(f"sequence {seq.seq_id} would hold {num_tokens} tokens, more than its final length "
                         f"{seq.final_num_tokens}")


@dataclass
class _PagedSequence:
    """A running sequence's block table and how much of it is written and cached."""

    block_ids: list[int]
    num_tokens: int
    num_cached_blocks: int
    """Leading blocks of the table that are registered in the prefix cache (or were hits)."""


@dataclass
class _LookupMemo:
    cache_version: int
    num_lookup_tokens: int
    hit_block_ids: list[int] = field(default_factory=list)


class PagedKVCacheManager:
    """vLLM-style paged KV cache: fixed-size blocks, reference counts and (optionally) prefix caching."""

    def __init__(self, *, name: str, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.name = name
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.capacity_tokens = num_blocks * block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self.pool = BlockPool(num_blocks, block_size)
        self._hasher = SequenceBlockHasher(block_size)
        self._seqs: dict[int, _PagedSequence] = {}
        self._lookups: weakref.WeakKeyDictionary[Sequence, _LookupMemo] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ admission

    def lookup(self, seq: Sequence, *, num_lookup_tokens: int | None = None) -> int:
        """Return how many of `seq`'s first `num_lookup_tokens` (default: its prompt) are cached, in whole blocks.

        At most `num_lookup_tokens - 1`. A preempted sequence that resumes passes its prompt plus the
        tokens it had generated, as vLLM looks up all of a resumed request's tokens. No side effects
        on the cache; the counters in `stats` are updated when the sequence is first allocated.
        """
        return len(self._hit_block_ids(seq, num_lookup_tokens)) * self.block_size

    def reservation_tokens(self, seq: Sequence) -> int:
        """Return the slots that admitting `seq` with its whole prompt takes (whole blocks, no prefix hit)."""
        return _cdiv(seq.num_prompt_tokens, self.block_size) * self.block_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Check, without side effects, whether `allocate` with the same arguments would succeed."""
        state = self._seqs.get(seq.seq_id)
        if state is None:
            hit_block_ids = self._cached_blocks_for(seq, num_cached_tokens)
            num_new_blocks = _cdiv(num_cached_tokens + num_new_tokens, self.block_size) - len(hit_block_ids)
            # Hit blocks that sit in the free queue leave it when touched, so they cannot also be
            # counted as room for the new blocks.
            return num_new_blocks <= self.pool.num_free_blocks - self.pool.num_free_among(hit_block_ids)
        if num_cached_tokens:
            raise ValueError(f"sequence {seq.seq_id} is already allocated; num_cached_tokens must be 0 "
                             f"after its first allocation, got {num_cached_tokens}")
        return self._num_blocks_to_grow(state, num_new_tokens) <= self.pool.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Give `seq` slots for `num_new_tokens` more tokens, all or nothing (see the module docstring)."""
        if num_new_tokens < 0 or num_cached_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got num_new_tokens={num_new_tokens}, "
                             f"num_cached_tokens={num_cached_tokens}")
        state = self._seqs.get(seq.seq_id)
        _check_final_length(seq, num_cached_tokens + num_new_tokens + (0 if state is None else state.num_tokens))
        if state is None:
            return self._allocate_first(seq, num_new_tokens, num_cached_tokens)
        if num_cached_tokens == 0 and self._grow_in_last_block(state, num_new_tokens):
            return True
        if not self.can_allocate(seq, num_new_tokens, num_cached_tokens):
            return False
        self._grow(seq, state, num_new_tokens)
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, last block first. Cached blocks stay hittable until evicted."""
        state = self._seqs.pop(seq.seq_id, None)
        if state is None:
            return
        self.pool.free_blocks(np.asarray(state.block_ids[::-1], dtype=np.int64))

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` share every block of `parent` (parallel sampling, beam search).

        Full blocks stay shared. The partly filled last block is copied by whichever of the two
        appends to it first. `child` must have no blocks yet and should have the same token ids
        as `parent` up to the fork point.
        """
        parent_state = self._seqs.get(parent.seq_id)
        if parent_state is None:
            raise ValueError(f"failed to fork sequence {parent.seq_id}: it has no blocks; allocate it first")
        if child.seq_id in self._seqs:
            raise ValueError(f"failed to fork into sequence {child.seq_id}: it already has blocks")
        self.pool.touch(np.asarray(parent_state.block_ids, dtype=np.int64))
        self._seqs[child.seq_id] = _PagedSequence(list(parent_state.block_ids), parent_state.num_tokens,
                                                  parent_state.num_cached_blocks)
        if self.enable_prefix_caching:
            self._hasher.copy_keys(parent, child, parent_state.num_tokens // self.block_size)

    # ------------------------------------------------------------------ queries

    def num_tokens(self, seq: Sequence) -> int:
        state = self._seqs.get(seq.seq_id)
        return 0 if state is None else state.num_tokens

    def block_ids(self, seq: Sequence) -> list[int]:
        """Return the block table of `seq` (empty if it has none)."""
        state = self._seqs.get(seq.seq_id)
        return [] if state is None else list(state.block_ids)

    @property
    def num_free_tokens(self) -> int:
        """Slots an admission may use: free blocks, cached ones included (they are evicted on demand)."""
        return self.pool.num_free_blocks * self.block_size

    def max_decode_steps(self, seqs: list[Sequence], limit: int) -> int:
        """Return the largest k <= limit such that every seq in `seqs` can grow by k tokens from the free queue."""
        if limit <= 0 or not seqs:
            return max(limit, 0)
        states = [self._state(seq) for seq in seqs]
        num_tokens = np.fromiter((s.num_tokens for s in states), dtype=np.int64, count=len(states))
        num_blocks = np.fromiter((len(s.block_ids) for s in states), dtype=np.int64, count=len(states))
        num_copies = self._num_copies_on_write(states)
        free_blocks = self.pool.num_free_blocks
        block_size = self.block_size

        def blocks_needed(k: int) -> int:
            if k == 0:
                return 0
            extra = -(-(num_tokens + k) // block_size) - num_blocks
            return int(np.maximum(extra, 0).sum()) + num_copies

        return max_steps_that_fit(limit, blocks_needed, free_blocks)

    def breakdown(self, next_request_tokens: int | None = None) -> MemoryBreakdown:
        """Return the memory split now, in O(1).

        Paged memory has no external fragmentation, so `next_request_tokens` is unused.
        """
        pool = self.pool
        return MemoryBreakdown(
            capacity_tokens=self.capacity_tokens,
            token_state_tokens=pool.token_state_tokens,
            reserved_tokens=pool.final_tokens - pool.token_state_tokens,
            internal_fragmentation_tokens=pool.num_used_blocks * self.block_size - pool.final_tokens,
            cached_free_tokens=pool.num_cached_free_blocks * self.block_size,
        )

    def reset_prefix_cache(self) -> bool:
        """Forget all cached blocks, zero `stats` and return True, or return False while any block is in use."""
        if not self.pool.reset_prefix_cache():
            logger.warning("Failed to reset the prefix cache: %d blocks are still in use", self.pool.num_used_blocks)
            return False
        self.stats.reset()
        return True

    # ------------------------------------------------------------------ internals

    def _state(self, seq: Sequence) -> _PagedSequence:
        state = self._seqs.get(seq.seq_id)
        if state is None:
            raise ValueError(f"sequence {seq.seq_id} has no blocks; allocate it first")
        return state

    def _hit_block_ids(self, seq: Sequence, num_lookup_tokens: int | None) -> list[int]:
        if num_lookup_tokens is None:
            num_lookup_tokens = seq.num_prompt_tokens
        if not self.enable_prefix_caching:
            self._lookups[seq] = _LookupMemo(self.pool.cache_version, num_lookup_tokens)
            return []
        memo = self._lookups.get(seq)
        if memo is not None and memo.cache_version == self.pool.cache_version \
                and memo.num_lookup_tokens == num_lookup_tokens:
            return memo.hit_block_ids
        max_hit_blocks = max(num_lookup_tokens - 1, 0) // self.block_size
        keys = self._hasher.block_keys(seq, max_hit_blocks).tolist()
        hit_block_ids = self.pool.longest_cache_hit(keys)
        self._lookups[seq] = _LookupMemo(self.pool.cache_version, num_lookup_tokens, hit_block_ids)
        return hit_block_ids

    def _cached_blocks_for(self, seq: Sequence, num_cached_tokens: int) -> list[int]:
        """Return the cached blocks that a first allocation of `num_cached_tokens` reuses.

        Raises ValueError if that many tokens are not cached in whole blocks.
        """
        if num_cached_tokens == 0:
            return []
        if num_cached_tokens % self.block_size:
            raise ValueError(f"num_cached_tokens={num_cached_tokens} for sequence {seq.seq_id} is not a "
                             f"multiple of block_size={self.block_size}; pass the value lookup() returned")
        memo = self._lookups.get(seq)
        hit_block_ids = self._hit_block_ids(seq, None if memo is None else memo.num_lookup_tokens)
        num_hit_blocks = num_cached_tokens // self.block_size
        if num_hit_blocks > len(hit_block_ids):
            raise ValueError(f"num_cached_tokens={num_cached_tokens} for sequence {seq.seq_id} exceeds the "
                             f"{len(hit_block_ids) * self.block_size} tokens now cached; call lookup() again")
        return hit_block_ids[:num_hit_blocks]

    def _allocate_first(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int) -> bool:
        if not self.can_allocate(seq, num_new_tokens, num_cached_tokens):
            return False
        hit_block_ids = self._cached_blocks_for(seq, num_cached_tokens)
        num_tokens = num_cached_tokens + num_new_tokens
        num_new_blocks = _cdiv(num_tokens, self.block_size) - len(hit_block_ids)

        # Touch the hits before taking new blocks, so that eviction cannot take a hit block.
        self.pool.touch(np.asarray(hit_block_ids, dtype=np.int64))
        new_block_ids = self._get_new_blocks(num_new_blocks)
        state = _PagedSequence(hit_block_ids + new_block_ids.tolist(), num_cached_tokens, len(hit_block_ids))
        self._seqs[seq.seq_id] = state
        self._write_tokens(seq, state, num_new_tokens)
        self._record_lookup(seq, num_cached_tokens)
        return True

    def _get_new_blocks(self, num_blocks: int) -> np.ndarray:
        num_evicted_before = self.pool.num_evicted_blocks
        block_ids = self.pool.get_new_blocks(num_blocks)
        self.stats.evictions += self.pool.num_evicted_blocks - num_evicted_before
        return block_ids

    def _num_blocks_to_grow(self, state: _PagedSequence, num_new_tokens: int) -> int:
        num_blocks = _cdiv(state.num_tokens + num_new_tokens, self.block_size) - len(state.block_ids)
        return max(num_blocks, 0) + int(num_new_tokens > 0 and self._needs_copy_on_write(state))

    def _needs_copy_on_write(self, state: _PagedSequence) -> bool:
        """Return whether the next token would go into a partly filled block that others share."""
        return state.num_tokens % self.block_size != 0 and self.pool.ref_cnt[state.block_ids[-1]] > 1

    def _num_copies_on_write(self, states: list[_PagedSequence]) -> int:
        """Count the blocks that copy on write needs if all of `states` append.

        Of the holders of a shared partial block, each writer copies except the last holder, who
        writes in place.
        """
        holders: dict[int, int] = {}
        for state in states:
            if self._needs_copy_on_write(state):
                holders[state.block_ids[-1]] = holders.get(state.block_ids[-1], 0) + 1
        return sum(min(count, int(self.pool.ref_cnt[block_id]) - 1) for block_id, count in holders.items())

    def _grow_in_last_block(self, state: _PagedSequence, num_new_tokens: int) -> bool:
        """Write a decode step's tokens into the last block when it has room, is not shared and does not
        fill up, because a filled block must be cached. Returns False to take the general path."""
        block_size = self.block_size
        old = state.num_tokens
        new = old + num_new_tokens
        last = len(state.block_ids) - 1
        if num_new_tokens <= 0 or old // block_size != last or new >= (last + 1) * block_size:
            return False
        block_id = state.block_ids[last]
        pool = self.pool
        if old % block_size and pool.ref_cnt[block_id] > 1:
            return False
        state.num_tokens = new
        pool.num_filled_tokens[block_id] += num_new_tokens
        pool.token_state_tokens += num_new_tokens
        return True

    def _grow(self, seq: Sequence, state: _PagedSequence, num_new_tokens: int) -> None:
        if num_new_tokens > 0 and self._needs_copy_on_write(state):
            shared_block_id = state.block_ids[-1]
            copy_block_id = int(self._get_new_blocks(1)[0])
            state.block_ids[-1] = copy_block_id
            self.pool.free_blocks(np.asarray([shared_block_id], dtype=np.int64))
            self._set_occupancy(seq, state, len(state.block_ids) - 1, len(state.block_ids))
        num_new_blocks = _cdiv(state.num_tokens + num_new_tokens, self.block_size) - len(state.block_ids)
        if num_new_blocks > 0:
            state.block_ids.extend(self._get_new_blocks(num_new_blocks).tolist())
        self._write_tokens(seq, state, num_new_tokens)

    def _write_tokens(self, seq: Sequence, state: _PagedSequence, num_new_tokens: int) -> None:
        """Account `num_new_tokens` more tokens in `seq`'s blocks and cache the blocks they fill."""
        first_block = state.num_tokens // self.block_size
        state.num_tokens += num_new_tokens
        self._set_occupancy(seq, state, first_block, _cdiv(state.num_tokens, self.block_size))

        num_full_blocks = state.num_tokens // self.block_size
        if self.enable_prefix_caching and num_full_blocks > state.num_cached_blocks:
            keys = self._hasher.block_keys(seq, num_full_blocks)
            self.pool.cache_blocks(state.block_ids[state.num_cached_blocks:num_full_blocks],
                                   keys[state.num_cached_blocks:num_full_blocks].tolist())
            state.num_cached_blocks = num_full_blocks

    def _set_occupancy(self, seq: Sequence, state: _PagedSequence, start_block: int, end_block: int) -> None:
        """Record, for blocks [start_block, end_block) of `seq`'s table, the slots written now and at its end."""
        if end_block <= start_block:
            return
        block_size = self.block_size
        final_tokens = max(seq.final_num_tokens, state.num_tokens)
        if end_block - start_block <= 8:
            # Decode touches one block, a decode span a few: scalar arithmetic beats numpy at this size.
            for block in range(start_block, end_block):
                block_start = block * block_size
                filled = min(max(state.num_tokens - block_start, 0), block_size)
                final = min(max(final_tokens - block_start, 0), block_size)
                self.pool.set_block_occupancy(state.block_ids[block], filled, final)
            return
        block_starts = np.arange(start_block, end_block, dtype=np.int64) * block_size
        filled_tokens = np.minimum(np.maximum(state.num_tokens - block_starts, 0), block_size)
        final_tokens_per_block = np.minimum(np.maximum(final_tokens - block_starts, 0), block_size)
        self.pool.set_occupancy(np.asarray(state.block_ids[start_block:end_block], dtype=np.int64),
                                filled_tokens, final_tokens_per_block)

    def _record_lookup(self, seq: Sequence, num_cached_tokens: int) -> None:
        memo = self._lookups.pop(seq, None)
        num_lookup_tokens = seq.num_prompt_tokens if memo is None else memo.num_lookup_tokens
        self.stats.lookups += 1
        self.stats.queried_tokens += num_lookup_tokens
        self.stats.hit_tokens += num_cached_tokens
        self.stats.queried_blocks += num_lookup_tokens // self.block_size
        self.stats.hit_blocks += num_cached_tokens // self.block_size
