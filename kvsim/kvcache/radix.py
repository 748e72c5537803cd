"""Radix-tree prefix cache with the semantics of SGLang's RadixAttention (Zheng et al., NeurIPS'24).

The tree maps token sequences to cached KV, one edge holding a run of tokens, as SGLang's
`RadixCache` (python/sglang/srt/mem_cache/radix_cache.py, 2025) does:

- Matching walks children by their first token (or first page of `page_size` tokens), and a
  match that ends inside an edge splits the node there. A hit is counted in tokens (whole pages),
  at most `prompt_len - 1`, because the last prompt token is computed to produce logits.
- A running sequence holds a lock reference on the last node of its cached prefix, which pins that
  node and every ancestor (`inc_lock_ref` / `dec_lock_ref`).
- A sequence's prompt is inserted into the tree as soon as it is allocated (SGLang inserts it after
  each prefill step, `cache_unfinished_req`), and all its tokens are inserted when it is freed
  (`cache_finished_req`). Tokens already in the tree are not stored twice: the duplicate slots go
  back to the free pool.
- A sequence with a cache salt only matches sequences with the same salt (SGLang's `extra_key`):
  each salt has its own subtree.
- Memory is the tree's tokens plus the running sequences' private tokens (decode tokens, and the
  partial last page). When an allocation needs room, unlocked leaves are evicted whole, least
  recently used first (or least frequently used first, then least recently), and a parent left
  without children becomes a candidate in turn.

NOTE: SGLang inserts a prompt after the prefill batch runs, so two identical prompts admitted in the
same step both miss. Here the insertion happens at allocation, as vLLM caches blocks, so the second
one hits. Access times come from a logical clock that ticks once per allocation or free, so ties
(nodes touched by one match) are broken by node creation order.
"""

from __future__ import annotations

import heapq
import weakref
from dataclasses import dataclass
from typing import Literal

import numpy as np

from kvsim.kvcache.base import MemoryBreakdown, PrefixCacheStats, Sequence, max_steps_that_fit

EvictionPolicy = Literal["lru", "lfu"]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class _RadixNode:
    """One edge of the tree, whose `key` contains its tokens, a whole number of pages."""

    __slots__ = ("node_id", "key", "parent", "children", "lock_ref", "last_access", "hit_count")

    def __init__(self, node_id: int, key: np.ndarray, parent: _RadixNode | None, last_access: int) -> None:
        self.node_id = node_id
        self.key = key
        self.parent = parent
        self.children: dict[int | bytes, _RadixNode] = {}
        self.lock_ref = 0
        self.last_access = last_access
        self.hit_count = 0


@dataclass
class _RadixSequence:
    """A running sequence: its locked tree prefix and its private (not yet inserted) pages."""

    last_node: _RadixNode
    num_tree_tokens: int
    """Tokens of the sequence that are in the tree, on the path to `last_node`."""
    num_tokens: int
    num_private_pages: int
    num_prefill_tokens: int
    """Tokens known at admission: the prompt, or prompt + generated tokens for a resumed sequence."""
    final_tokens: int
    private_filled_tokens: int = 0
    private_reserved_tokens: int = 0
    private_internal_tokens: int = 0


@dataclass(frozen=True)
class _Match:
    """End point of a key's walk down the tree: after `node`, `num_partial_tokens` into `partial_child`.

    `node` is None when the key's namespace has no tree yet.
    """

    node: _RadixNode | None
    num_node_tokens: int
    partial_child: _RadixNode | None
    num_partial_tokens: int
    path: tuple[_RadixNode, ...]

    @property
    def num_tokens(self) -> int:
        return self.num_node_tokens + self.num_partial_tokens


class RadixKVCacheManager:
    """SGLang-style radix-tree KV cache (see the module docstring)."""

    def __init__(self, *, name: str, capacity_pages: int, page_size: int = 1,
                 eviction: EvictionPolicy = "lru") -> None:
        if eviction not in ("lru", "lfu"):
            raise ValueError(f"unknown eviction policy {eviction!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.name = name
        self.block_size = page_size
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.capacity_tokens = capacity_pages * page_size
        self.eviction = eviction
        self.stats = PrefixCacheStats()
        self._seqs: dict[int, _RadixSequence] = {}
        self._lookups: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()
        self._reset_tree()

    # ------------------------------------------------------------------ admission

    def lookup(self, seq: Sequence, *, num_lookup_tokens: int | None = None) -> int:
        """Return how many of `seq`'s first `num_lookup_tokens` (default: its prompt) are in the tree, in whole pages.

        At most `num_lookup_tokens - 1`. No side effects on the tree (SGLang's match also refreshes
        access times and splits nodes; here that happens at allocation). The counters in `stats`
        are updated when the sequence is first allocated.
        """
        if num_lookup_tokens is None:
            num_lookup_tokens = seq.num_prompt_tokens
        self._lookups[seq] = num_lookup_tokens
        return self._match(seq.cache_salt, self._lookup_key(seq, num_lookup_tokens)).num_tokens

    def reservation_tokens(self, seq: Sequence) -> int:
        """Return the slots that admitting `seq` with its whole prompt takes (whole pages, no prefix hit)."""
        return _cdiv(seq.num_prompt_tokens, self.page_size) * self.page_size

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Check, without side effects, whether `allocate` with the same arguments would succeed."""
        state = self._seqs.get(seq.seq_id)
        if state is None:
            match = self._cached_prefix(seq, num_cached_tokens)
            num_pages = _cdiv(num_cached_tokens + num_new_tokens, self.page_size) - num_cached_tokens // self.page_size
            # Locking the hit pins its unlocked nodes, so they stop counting as evictable.
            pinned_pages = sum(len(node.key) for node in match.path if node.lock_ref == 0)
            if match.partial_child is not None and match.partial_child.lock_ref == 0:
                pinned_pages += match.num_partial_tokens
            pinned_pages //= self.page_size
            return num_pages <= self._available_pages + self._evictable_pages - pinned_pages
        if num_cached_tokens:
            raise ValueError(f"sequence {seq.seq_id} is already allocated; num_cached_tokens must be 0 "
                             f"after its first allocation, got {num_cached_tokens}")
        return self._pages_to_grow(state, num_new_tokens) <= self._available_pages + self._evictable_pages

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens, evicting if needed, all or nothing."""
        if num_new_tokens < 0 or num_cached_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got num_new_tokens={num_new_tokens}, "
                             f"num_cached_tokens={num_cached_tokens}")
        state = self._seqs.get(seq.seq_id)
        num_tokens = num_cached_tokens + num_new_tokens + (0 if state is None else state.num_tokens)
        if num_tokens > seq.final_num_tokens:
            raise ValueError(f"sequence {seq.seq_id} would hold {num_tokens} tokens, more than its final length "
                             f"{seq.final_num_tokens}")
        if not self.can_allocate(seq, num_new_tokens, num_cached_tokens):
            return False
        self._clock += 1
        if state is None:
            self._allocate_first(seq, num_new_tokens, num_cached_tokens)
            return True

        num_pages = self._pages_to_grow(state, num_new_tokens)
        self._make_room(num_pages)
        in_prefill = state.num_tokens < state.num_prefill_tokens
        self._set_private(state, state.num_tokens + num_new_tokens, state.num_private_pages + num_pages)
        if in_prefill:
            self._insert_prefill(seq, state)
        return True

    def free(self, seq: Sequence) -> None:
        """Insert `seq`'s tokens (whole pages) into the tree, free its other slots and drop its lock."""
        state = self._seqs.pop(seq.seq_id, None)
        if state is None:
            return
        self._clock += 1
        aligned_tokens = state.num_tokens // self.page_size * self.page_size
        if aligned_tokens > state.num_tree_tokens:
            self._move_into_tree(seq, state, aligned_tokens)
        self._set_private(state, state.num_tree_tokens, 0)
        self._dec_lock_ref(state.last_node)

    # ------------------------------------------------------------------ queries

    def num_tokens(self, seq: Sequence) -> int:
        state = self._seqs.get(seq.seq_id)
        return 0 if state is None else state.num_tokens

    @property
    def num_free_tokens(self) -> int:
        """Slots an admission may use: free ones plus those of unlocked tree nodes (evictable)."""
        return (self._available_pages + self._evictable_pages) * self.page_size

    @property
    def tree_tokens(self) -> int:
        return self._tree_pages * self.page_size

    @property
    def evictable_tokens(self) -> int:
        return self._evictable_pages * self.page_size

    def max_decode_steps(self, seqs: list[Sequence], limit: int) -> int:
        """Return the largest k <= limit such that every seq in `seqs` can grow by k tokens, evicting if needed."""
        if limit <= 0 or not seqs:
            return max(limit, 0)
        num_tokens = np.fromiter((self._state(seq).num_tokens for seq in seqs), dtype=np.int64, count=len(seqs))
        room_pages = self._available_pages + self._evictable_pages
        page_size = self.page_size
        pages_held = -(-num_tokens // page_size)

        def pages_needed(k: int) -> int:
            return int((-(-(num_tokens + k) // page_size) - pages_held).sum())

        return max_steps_that_fit(limit, pages_needed, room_pages)

    def breakdown(self, next_request_tokens: int | None = None) -> MemoryBreakdown:
        """Return the memory split now, in O(1).

        A radix cache has no external fragmentation, so `next_request_tokens` is unused.
        """
        locked_pages = self._tree_pages - self._evictable_pages
        return MemoryBreakdown(
            capacity_tokens=self.capacity_tokens,
            token_state_tokens=locked_pages * self.page_size + self._private_filled_tokens,
            reserved_tokens=self._private_reserved_tokens,
            internal_fragmentation_tokens=self._private_internal_tokens,
            cached_free_tokens=self._evictable_pages * self.page_size,
        )

    def reset_prefix_cache(self) -> bool:
        """Empty the tree, zero `stats` and return True, or return False while any sequence is running."""
        if self._seqs:
            return False
        self._reset_tree()
        self.stats.reset()
        return True

    def check_invariants(self) -> None:
        """Recount the tree and the sequences and compare with the running sums, in O(tree) for tests."""
        tree_pages = evictable_pages = 0
        queued = set(self._heap)
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            pages = len(node.key) // self.page_size
            assert len(node.key) == pages * self.page_size, f"node {node.node_id} is not whole pages"
            assert pages > 0, f"node {node.node_id} is empty"
            tree_pages += pages
            if node.lock_ref == 0:
                evictable_pages += pages
                for child in node.children.values():
                    assert child.lock_ref == 0, f"locked node {child.node_id} under unlocked {node.node_id}"
            is_evictable_leaf = not node.children and node.lock_ref == 0
            assert (node.node_id in self._evictable_leaves) == is_evictable_leaf, f"leaf set wrong at {node.node_id}"
            if is_evictable_leaf:
                assert (self._priority(node), node.node_id) in queued, f"leaf {node.node_id} is not queued"
            stack.extend(node.children.values())
        assert tree_pages == self._tree_pages, (tree_pages, self._tree_pages)
        assert evictable_pages == self._evictable_pages, (evictable_pages, self._evictable_pages)
        assert sum(s.num_private_pages for s in self._seqs.values()) == self._private_pages
        assert self._available_pages >= 0, f"{self._available_pages} free pages"

    # ------------------------------------------------------------------ tree walks

    def _child_key(self, tokens: np.ndarray, start: int) -> int | bytes:
        if self.page_size == 1:
            return int(tokens[start])
        return tokens[start:start + self.page_size].tobytes()

    def _common_prefix_tokens(self, a: np.ndarray, b: np.ndarray) -> int:
        """Length of the common prefix of `a` and `b`, rounded down to whole pages."""
        length = min(a.shape[0], b.shape[0])
        mismatches = np.flatnonzero(a[:length] != b[:length])
        common = int(mismatches[0]) if mismatches.shape[0] else length
        return common // self.page_size * self.page_size

    def _namespace_root(self, cache_salt: str | None) -> _RadixNode:
        root = self._roots.get(cache_salt)
        if root is None:
            root = _RadixNode(self._next_node_id(), np.empty(0, dtype=np.int64), None, self._clock)
            # A root is never evicted, as in SGLang, where it holds a permanent lock reference.
            root.lock_ref = 1
            self._roots[cache_salt] = root
        return root

    def _match(self, cache_salt: str | None, key: np.ndarray) -> _Match:
        """Walk `key` (whole pages) down the salt's subtree without changing the tree."""
        node = self._roots.get(cache_salt)
        if node is None:
            return _Match(None, 0, None, 0, ())
        position = 0
        path: list[_RadixNode] = []
        while key.shape[0] - position >= self.page_size:
            child = node.children.get(self._child_key(key, position))
            if child is None:
                break
            common = self._common_prefix_tokens(child.key, key[position:])
            if common < child.key.shape[0]:
                return _Match(node, position, child if common else None, common, tuple(path))
            position += common
            node = child
            path.append(child)
        return _Match(node, position, None, 0, tuple(path))

    def _lookup_key(self, seq: Sequence, num_lookup_tokens: int) -> np.ndarray:
        max_hit_tokens = max(num_lookup_tokens - 1, 0) // self.page_size * self.page_size
        return seq.token_ids(max_hit_tokens)

    def _cached_prefix(self, seq: Sequence, num_cached_tokens: int) -> _Match:
        """Return the match of `seq`'s first `num_cached_tokens`, raising ValueError if they are not all in the tree."""
        if num_cached_tokens % self.page_size:
            raise ValueError(f"num_cached_tokens={num_cached_tokens} for sequence {seq.seq_id} is not a "
                             f"multiple of page_size={self.page_size}; pass the value lookup() returned")
        num_lookup_tokens = self._lookups.get(seq, seq.num_prompt_tokens)
        if num_cached_tokens > max(num_lookup_tokens - 1, 0):
            raise ValueError(f"num_cached_tokens={num_cached_tokens} for sequence {seq.seq_id} is more than "
                             f"its {num_lookup_tokens} looked-up tokens minus the one that is always computed")
        match = self._match(seq.cache_salt, seq.token_ids(num_cached_tokens))
        if match.num_tokens < num_cached_tokens:
            raise ValueError(f"num_cached_tokens={num_cached_tokens} for sequence {seq.seq_id} exceeds the "
                             f"{match.num_tokens} tokens now cached; call lookup() again")
        return match

    def _split(self, child: _RadixNode, num_tokens: int) -> _RadixNode:
        """Split `child` after its first `num_tokens` tokens and return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = _RadixNode(self._next_node_id(), child.key[:num_tokens], parent, child.last_access)
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        parent.children[self._child_key(upper.key, 0)] = upper
        child.key = child.key[num_tokens:]
        child.parent = upper
        upper.children[self._child_key(child.key, 0)] = child
        return upper

    def _descend(self, cache_salt: str | None, key: np.ndarray) -> _RadixNode:
        """Walk `key`, which must be in the tree, and return the node where it ends.

        Refreshes access times and hit counts on the way, and splits the last node if the key ends
        inside it.
        """
        if key.shape[0] == 0:
            return self._namespace_root(cache_salt)
        match = self._match(cache_salt, key)
        assert match.num_tokens == key.shape[0], "the key to descend is not in the tree"
        node = match.node
        if match.partial_child is not None:
            node = self._split(match.partial_child, match.num_partial_tokens)
            match = _Match(node, key.shape[0], None, 0, match.path + (node,))
        for visited in match.path:
            visited.last_access = self._clock
            visited.hit_count += 1
            self._refresh_leaf(visited)
        return node

    def _insert(self, cache_salt: str | None, key: np.ndarray) -> tuple[int, _RadixNode]:
        """Insert `key` (whole pages) and return how many of its tokens were already there, and its last node.

        New tokens enter the tree unlocked, that is evictable.
        """
        node = self._namespace_root(cache_salt)
        position = 0
        while position < key.shape[0]:
            child = node.children.get(self._child_key(key, position))
            if child is None:
                break
            child.last_access = self._clock
            self._refresh_leaf(child)
            common = self._common_prefix_tokens(child.key, key[position:])
            if common < child.key.shape[0]:
                child = self._split(child, common)
                self._refresh_leaf(child)
            position += common
            node = child
        num_existing_tokens = position
        if position < key.shape[0]:
            leaf = _RadixNode(self._next_node_id(), key[position:].copy(), node, self._clock)
            node.children[self._child_key(leaf.key, 0)] = leaf
            pages = leaf.key.shape[0] // self.page_size
            self._tree_pages += pages
            self._evictable_pages += pages
            self._refresh_leaf(node)
            self._refresh_leaf(leaf)
            node = leaf
        return num_existing_tokens, node

    # ------------------------------------------------------------------ locks and eviction

    def _inc_lock_ref(self, node: _RadixNode) -> None:
        while node.parent is not None:
            if node.lock_ref == 0:
                self._evictable_pages -= len(node.key) // self.page_size
                self._evictable_leaves.pop(node.node_id, None)
            node.lock_ref += 1
            node = node.parent

    def _dec_lock_ref(self, node: _RadixNode) -> None:
        while node.parent is not None:
            assert node.lock_ref > 0, f"lock_ref of node {node.node_id} would drop below 0"
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable_pages += len(node.key) // self.page_size
                self._refresh_leaf(node)
            node = node.parent

    def _priority(self, node: _RadixNode) -> tuple[int, ...]:
        # NOTE: SGLang's LFU strategy also orders by (hit_count, last_access_time), but its plain
        # RadixCache (radix_cache.py, 2025) never increments hit_count, so there LFU falls back to
        # LRU order. Here hit_count counts admissions whose cached prefix passes through the node.
        if self.eviction == "lfu":
            return (node.hit_count, node.last_access, node.node_id)
        return (node.last_access, node.node_id)

    def _refresh_leaf(self, node: _RadixNode) -> None:
        """Track whether `node` is an evictable leaf, queueing it under its current priority if so."""
        if node.parent is None:
            return
        if node.children or node.lock_ref > 0:
            self._evictable_leaves.pop(node.node_id, None)
            return
        self._evictable_leaves[node.node_id] = node
        heapq.heappush(self._heap, (self._priority(node), node.node_id))
        # The heap keeps outdated entries, which pops skip. Rebuild it when they dominate.
        if len(self._heap) > 4 * len(self._evictable_leaves) + 64:
            self._heap = [(self._priority(leaf), leaf.node_id) for leaf in self._evictable_leaves.values()]
            heapq.heapify(self._heap)

    def _make_room(self, num_pages: int) -> None:
        """Evict unlocked leaves until `num_pages` pages are free (callers have checked that they can be)."""
        shortfall = num_pages - self._available_pages
        num_evicted_pages = 0
        while num_evicted_pages < shortfall:
            assert self._heap, f"no evictable leaf left with {shortfall - num_evicted_pages} pages still needed"
            priority, node_id = heapq.heappop(self._heap)
            node = self._evictable_leaves.get(node_id)
            if node is None or self._priority(node) != priority:
                continue
            del self._evictable_leaves[node_id]
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            pages = len(node.key) // self.page_size
            self._tree_pages -= pages
            self._evictable_pages -= pages
            num_evicted_pages += pages
            self._refresh_leaf(parent)
        self.stats.evictions += num_evicted_pages * self.page_size

    # ------------------------------------------------------------------ sequences

    @property
    def _available_pages(self) -> int:
        return self.capacity_pages - self._tree_pages - self._private_pages

    def _state(self, seq: Sequence) -> _RadixSequence:
        state = self._seqs.get(seq.seq_id)
        if state is None:
            raise ValueError(f"sequence {seq.seq_id} has no memory allocated; allocate it first")
        return state

    def _pages_to_grow(self, state: _RadixSequence, num_new_tokens: int) -> int:
        return _cdiv(state.num_tokens + num_new_tokens, self.page_size) - _cdiv(state.num_tokens, self.page_size)

    def _allocate_first(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int) -> None:
        last_node = self._descend(seq.cache_salt, seq.token_ids(num_cached_tokens))
        self._inc_lock_ref(last_node)
        num_pages = _cdiv(num_cached_tokens + num_new_tokens, self.page_size) - num_cached_tokens // self.page_size
        self._make_room(num_pages)

        num_lookup_tokens = self._lookups.pop(seq, seq.num_prompt_tokens)
        state = _RadixSequence(last_node, num_cached_tokens, num_cached_tokens, 0, num_lookup_tokens,
                               seq.final_num_tokens)
        self._seqs[seq.seq_id] = state
        self._set_private(state, num_cached_tokens + num_new_tokens, num_pages)
        self._record_lookup(num_lookup_tokens, num_cached_tokens)
        self._insert_prefill(seq, state)

    def _insert_prefill(self, seq: Sequence, state: _RadixSequence) -> None:
        """Insert the prefill tokens allocated so far (whole pages), as SGLang's cache_unfinished_req."""
        prefill_tokens = min(state.num_tokens, state.num_prefill_tokens)
        aligned_tokens = prefill_tokens // self.page_size * self.page_size
        if aligned_tokens > state.num_tree_tokens:
            self._move_into_tree(seq, state, aligned_tokens)

    def _move_into_tree(self, seq: Sequence, state: _RadixSequence, aligned_tokens: int) -> None:
        """Insert `seq`'s first `aligned_tokens` and move its lock to the new last node.

        The sequence's private pages for those tokens now belong to the tree, or, where another
        sequence inserted the same tokens first, are freed as duplicates.
        """
        _, last_node = self._insert(seq.cache_salt, seq.token_ids(aligned_tokens))
        self._inc_lock_ref(last_node)
        self._dec_lock_ref(state.last_node)
        moved_pages = (aligned_tokens - state.num_tree_tokens) // self.page_size
        state.last_node = last_node
        state.num_tree_tokens = aligned_tokens
        self._set_private(state, state.num_tokens, state.num_private_pages - moved_pages)

    def _set_private(self, state: _RadixSequence, num_tokens: int, num_private_pages: int) -> None:
        """Update a sequence's token and private-page counts, and the breakdown sums they feed."""
        self._private_pages += num_private_pages - state.num_private_pages
        self._private_filled_tokens -= state.private_filled_tokens
        self._private_reserved_tokens -= state.private_reserved_tokens
        self._private_internal_tokens -= state.private_internal_tokens

        state.num_tokens = num_tokens
        state.num_private_pages = num_private_pages
        # Unfilled slots of the private pages are reserved up to the final length, and internal
        # fragmentation past it.
        filled = num_tokens - state.num_tree_tokens if num_private_pages else 0
        unfilled = num_private_pages * self.page_size - filled
        reserved = min(unfilled, max(state.final_tokens - num_tokens, 0))
        state.private_filled_tokens = filled
        state.private_reserved_tokens = reserved
        state.private_internal_tokens = unfilled - reserved

        self._private_filled_tokens += filled
        self._private_reserved_tokens += reserved
        self._private_internal_tokens += unfilled - reserved

    def _record_lookup(self, num_lookup_tokens: int, num_cached_tokens: int) -> None:
        self.stats.lookups += 1
        self.stats.queried_tokens += num_lookup_tokens
        self.stats.hit_tokens += num_cached_tokens
        self.stats.queried_blocks += num_lookup_tokens // self.page_size
        self.stats.hit_blocks += num_cached_tokens // self.page_size

    def _next_node_id(self) -> int:
        self._node_count += 1
        return self._node_count

    def _reset_tree(self) -> None:
        self._clock = 0
        self._node_count = 0
        self._roots: dict[str | None, _RadixNode] = {}
        self._tree_pages = 0
        self._evictable_pages = 0
        self._private_pages = 0
        self._private_filled_tokens = 0
        self._private_reserved_tokens = 0
        self._private_internal_tokens = 0
        self._evictable_leaves: dict[int, _RadixNode] = {}
        self._heap: list[tuple[tuple[int, ...], int]] = []
