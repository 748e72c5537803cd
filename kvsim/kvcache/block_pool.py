"""The block pool behind the paged strategy: free queue, reference counts and the prefix-cache map.

This re-implements the semantics of vLLM v1's `BlockPool` and `FreeKVCacheBlockQueue`
(vllm/v1/core/block_pool.py and kv_cache_utils.py, 2025):

- The free queue starts in block-id order. Allocation takes blocks from its head; a block whose
  reference count drops to 0 goes to its tail. A free block still keeps its cached content, so the
  queue order is the eviction order: never-used blocks first, then the least recently freed.
- A cached block that a new request hits while it is free is taken out of the middle of the queue.
- The map from block key to block keeps duplicates (two blocks with equal content, written before
  either was cached) instead of merging them, because block tables only ever grow. A lookup returns
  the earliest cached one.
- A block is evicted (its key dropped) only when it is taken from the free queue for new content.

The pool alone owns these invariants. It also keeps, per block, how many token slots are written
and how many its owner will have written when it finishes, so that the memory breakdown is a sum
maintained incrementally instead of a scan over every block.

NOTE: vLLM v1 keeps block 0 as a "null block" that is never handed out, so a vLLM pool of N blocks
has N - 1 usable ones. Here every block is usable.
"""

from __future__ import annotations

import numpy as np


class FreeBlockQueue:
    """Free blocks in eviction order, with O(1) removal from the middle and vectorised batch operations.

    vLLM uses a doubly linked list of block objects. Here the queue is an append-only log of block
    ids read from `_head` to `_tail`: a block's live entry is the one at `_pos[block]`, and removing
    a block only clears `_pos[block]`, leaving a stale entry that later reads skip. The log is
    compacted when it fills, so every operation costs O(1) per block, amortised.
    """

    def __init__(self, num_blocks: int) -> None:
        self._log = np.empty(max(2 * num_blocks, 64), dtype=np.int64)
        self._log[:num_blocks] = np.arange(num_blocks)
        self._pos = np.arange(num_blocks, dtype=np.int64)
        self._head = 0
        self._tail = num_blocks
        self.num_free_blocks = num_blocks

    def __contains__(self, block_id: int) -> bool:
        return bool(self._pos[block_id] >= 0)

    def contains(self, block_ids: np.ndarray) -> np.ndarray:
        """Mask of the blocks of `block_ids` that are in the queue."""
        return self._pos[block_ids] >= 0

    def popleft_n(self, num_blocks: int) -> np.ndarray:
        """Remove and return the `num_blocks` blocks at the head of the queue, head first."""
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"failed to take {num_blocks} blocks: the free queue has {self.num_free_blocks}")
        if num_blocks == 1:
            # A decode step takes one block at a time: skip stale entries with scalar reads.
            log, pos = self._log, self._pos
            head = self._head
            while pos[log[head]] != head:
                head += 1
            block = int(log[head])
            self._head = head + 1
            pos[block] = -1
            self.num_free_blocks -= 1
            return np.array([block], dtype=np.int64)
        chunks: list[np.ndarray] = []
        remaining = num_blocks
        head = self._head
        while remaining > 0:
            end = min(self._tail, head + max(2 * remaining, 32))
            window = self._log[head:end]
            live = np.flatnonzero(self._pos[window] == np.arange(head, end))
            if live.shape[0] >= remaining:
                live = live[:remaining]
                chunks.append(window[live])
                head += int(live[-1]) + 1
                remaining = 0
            else:
                chunks.append(window[live])
                remaining -= live.shape[0]
                head = end
        self._head = head
        blocks = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        self._pos[blocks] = -1
        self.num_free_blocks -= num_blocks
        return blocks

    def remove_n(self, block_ids: np.ndarray) -> None:
        """Take the given blocks, all of which must be in the queue, out of it."""
        if block_ids.shape[0] == 0:
            return
        assert np.all(self._pos[block_ids] >= 0), f"blocks {block_ids[self._pos[block_ids] < 0]} are not free"
        self._pos[block_ids] = -1
        self.num_free_blocks -= block_ids.shape[0]

    def append_n(self, block_ids: np.ndarray) -> None:
        """Put the given blocks, none of which may be in the queue, at its tail in the given order."""
        count = block_ids.shape[0]
        if count == 0:
            return
        if self._tail + count > self._log.shape[0]:
            self._compact()
        self._log[self._tail:self._tail + count] = block_ids
        self._pos[block_ids] = np.arange(self._tail, self._tail + count)
        self._tail += count
        self.num_free_blocks += count

    def blocks_in_order(self) -> list[int]:
        """Return the free blocks, head (next evicted) first, in O(queue length) for tests and debugging."""
        window = self._log[self._head:self._tail]
        live = self._pos[window] == np.arange(self._head, self._tail)
        return window[live].tolist()

    def _compact(self) -> None:
        live_blocks = np.asarray(self.blocks_in_order(), dtype=np.int64)
        self._log[:live_blocks.shape[0]] = live_blocks
        self._pos[live_blocks] = np.arange(live_blocks.shape[0])
        self._head = 0
        self._tail = live_blocks.shape[0]


class BlockPool:
    """A fixed pool of KV-cache blocks: allocation, reference counts, prefix-cache keys and eviction.

    Also keeps the occupancy of blocks in use: `token_state_tokens` (slots written),
    `final_tokens` (slots that will be written before their owners finish) and `num_used_blocks`.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs num_blocks >= 1 and block_size >= 1, "
                             f"got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_queue = FreeBlockQueue(num_blocks)
        self.ref_cnt = np.zeros(num_blocks, dtype=np.int64)
        self.is_cached = np.zeros(num_blocks, dtype=bool)
        self.block_key = np.zeros(num_blocks, dtype=np.uint64)
        self.key_to_block_id: dict[int, int] = {}
        # Later blocks cached under a key that already had one, oldest first.
        self._duplicate_block_ids: dict[int, list[int]] = {}

        self.num_filled_tokens = np.zeros(num_blocks, dtype=np.int64)
        self.num_final_tokens = np.zeros(num_blocks, dtype=np.int64)
        self.num_used_blocks = 0
        self.token_state_tokens = 0
        self.final_tokens = 0
        self.num_cached_free_blocks = 0

        self.num_evicted_blocks = 0
        self.cache_version = 0
        """Changes whenever the key map changes, so callers can memoise lookups."""

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never used, uncached, or cached but unreferenced."""
        return self.free_queue.num_free_blocks

    def longest_cache_hit(self, block_keys: list[int]) -> list[int]:
        """Block ids of the longest prefix of `block_keys` present in the cache."""
        hit_block_ids: list[int] = []
        key_to_block_id = self.key_to_block_id
        for key in block_keys:
            block_id = key_to_block_id.get(key)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
        return hit_block_ids

    def num_free_among(self, block_ids: list[int]) -> int:
        """Count the blocks of `block_ids` that are unreferenced, that is in the free queue."""
        if not block_ids:
            return 0
        return int(np.count_nonzero(self.ref_cnt[np.asarray(block_ids, dtype=np.int64)] == 0))

    # ------------------------------------------------------------------ allocation

    def get_new_blocks(self, num_blocks: int) -> np.ndarray:
        """Take `num_blocks` blocks from the head of the free queue, evicting their cached content.

        The blocks come back with reference count 1 and no occupancy. Raises ValueError if the queue
        is too short. Callers check first, so that their allocation is all or nothing.
        """
        if num_blocks == 0:
            return np.empty(0, dtype=np.int64)
        block_ids = self.free_queue.popleft_n(num_blocks)

        # Evict: a block taken for new content loses its key.
        cached = block_ids[self.is_cached[block_ids]]
        if cached.shape[0]:
            keys = self.block_key[cached].tolist()
            if self._duplicate_block_ids:
                for block_id, key in zip(cached.tolist(), keys):
                    self._drop_key(key, block_id)
            else:
                # Without duplicates every cached block is the one its key maps to.
                drop = self.key_to_block_id.__delitem__
                for key in keys:
                    drop(key)
            self.is_cached[cached] = False
            self.num_cached_free_blocks -= cached.shape[0]
            self.num_evicted_blocks += cached.shape[0]
            self.cache_version += 1

        self.ref_cnt[block_ids] = 1
        self.num_filled_tokens[block_ids] = 0
        self.num_final_tokens[block_ids] = 0
        self.num_used_blocks += num_blocks
        return block_ids

    def touch(self, block_ids: np.ndarray) -> None:
        """Add a reference to each of the distinct `block_ids`, taking unreferenced ones off the free queue."""
        if block_ids.shape[0] == 0:
            return
        was_free = block_ids[self.ref_cnt[block_ids] == 0]
        if was_free.shape[0]:
            self.free_queue.remove_n(was_free)
            self.num_cached_free_blocks -= int(np.count_nonzero(self.is_cached[was_free]))
            self.num_used_blocks += was_free.shape[0]
            self.token_state_tokens += int(self.num_filled_tokens[was_free].sum())
            self.final_tokens += int(self.num_final_tokens[was_free].sum())
        self.ref_cnt[block_ids] += 1

    def free_blocks(self, ordered_block_ids: np.ndarray) -> None:
        """Drop one reference to each distinct block, and append those left unreferenced to the queue in order."""
        if ordered_block_ids.shape[0] == 0:
            return
        self.ref_cnt[ordered_block_ids] -= 1
        assert np.all(self.ref_cnt[ordered_block_ids] >= 0), "a block was freed more often than referenced"
        now_free = ordered_block_ids[self.ref_cnt[ordered_block_ids] == 0]
        if now_free.shape[0]:
            self.free_queue.append_n(now_free)
            self.num_cached_free_blocks += int(np.count_nonzero(self.is_cached[now_free]))
            self.num_used_blocks -= now_free.shape[0]
            self.token_state_tokens -= int(self.num_filled_tokens[now_free].sum())
            self.final_tokens -= int(self.num_final_tokens[now_free].sum())

    def set_occupancy(self, block_ids: np.ndarray, filled_tokens: np.ndarray, final_tokens: np.ndarray) -> None:
        """Record how many slots of each distinct block in use are written now and will be written."""
        self.token_state_tokens += int(filled_tokens.sum() - self.num_filled_tokens[block_ids].sum())
        self.final_tokens += int(final_tokens.sum() - self.num_final_tokens[block_ids].sum())
        self.num_filled_tokens[block_ids] = filled_tokens
        self.num_final_tokens[block_ids] = final_tokens

    def set_block_occupancy(self, block_id: int, filled_tokens: int, final_tokens: int) -> None:
        """Record the occupancy of one block, as `set_occupancy` does for many."""
        self.token_state_tokens += filled_tokens - int(self.num_filled_tokens[block_id])
        self.final_tokens += final_tokens - int(self.num_final_tokens[block_id])
        self.num_filled_tokens[block_id] = filled_tokens
        self.num_final_tokens[block_id] = final_tokens

    # ------------------------------------------------------------------ prefix cache

    def cache_blocks(self, block_ids: list[int], block_keys: list[int]) -> None:
        """Register full, uncached blocks under their keys so that later requests can hit them."""
        if not block_ids:
            return
        key_to_block_id = self.key_to_block_id
        if key_to_block_id.keys().isdisjoint(block_keys):
            key_to_block_id.update(zip(block_keys, block_ids))
        else:
            for block_id, key in zip(block_ids, block_keys):
                if key in key_to_block_id:
                    self._duplicate_block_ids.setdefault(key, []).append(block_id)
                else:
                    key_to_block_id[key] = block_id
        ids = np.asarray(block_ids, dtype=np.int64)
        assert not np.any(self.is_cached[ids]), f"blocks {ids[self.is_cached[ids]]} are already cached"
        self.is_cached[ids] = True
        self.block_key[ids] = np.asarray(block_keys, dtype=np.uint64)
        self.cache_version += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached key and return True, or return False while any block is in use."""
        if self.num_used_blocks:
            return False
        self.key_to_block_id.clear()
        self._duplicate_block_ids.clear()
        self.is_cached[:] = False
        self.num_cached_free_blocks = 0
        self.cache_version += 1
        return True

    def _drop_key(self, key: int, block_id: int) -> None:
        duplicates = self._duplicate_block_ids.get(key)
        if self.key_to_block_id.get(key) == block_id:
            if duplicates:
                self.key_to_block_id[key] = duplicates.pop(0)
                if not duplicates:
                    del self._duplicate_block_ids[key]
            else:
                del self.key_to_block_id[key]
        else:
            assert duplicates is not None and block_id in duplicates, f"block {block_id} is not cached under its key"
            duplicates.remove(block_id)
            if not duplicates:
                del self._duplicate_block_ids[key]
