"""Trace statistics and prefix-cache hit rates by capacity, for `kvsim trace inspect` and `kvsim trace hit-rate`.

Both work on block hashes. A prompt is cut into blocks of `block_size` tokens, and block i's hash
covers the cache salt and every token up to the end of block i (a chained hash, as vLLM's prefix
caching computes it). Two blocks have equal hashes only when their whole prefixes are equal, so a
cached hash is a valid prefix hit.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvsim.errors import UserError
from kvsim.workload.request import Request
from kvsim.workload.traces import TracePromptBuilder, TraceReadStats, open_trace

POLICIES = ("lru", "lfu")


def prompt_block_hashes(
    prompt_token_ids: np.ndarray,
    block_size: int,
    *,
    cache_salt: str | None = None,
    full_blocks_only: bool = False,
) -> list[bytes]:
    """Return the chained hash of each block of a prompt, the last partial block included unless
    `full_blocks_only`."""
    token_ids = np.ascontiguousarray(prompt_token_ids, dtype=np.int64)
    num_tokens = token_ids.shape[0]
    num_blocks = num_tokens // block_size if full_blocks_only else -(-num_tokens // block_size)
    parent = hashlib.blake2b((cache_salt or "").encode(), digest_size=16).digest()
    hashes = []
    for block_index in range(num_blocks):
        hasher = hashlib.blake2b(parent, digest_size=16)
        hasher.update(token_ids[block_index * block_size : (block_index + 1) * block_size].data)
        parent = hasher.digest()
        hashes.append(parent)
    return hashes


def _num_leading_hits(blocks: Iterable[bytes], cached: Any) -> int:
    num_hit = 0
    for block in blocks:
        if block not in cached:
            break
        num_hit += 1
    return num_hit


# ---------------------------------------------------------------------------------------------------
# Replay caches. `access` returns the number of leading cached blocks and then caches the request.
# ---------------------------------------------------------------------------------------------------


class _UnboundedCache:
    def __init__(self) -> None:
        self._blocks: set[bytes] = set()
        self.num_evicted_blocks = 0

    def access(self, blocks: list[bytes]) -> int:
        num_hit = _num_leading_hits(blocks, self._blocks)
        self._blocks.update(blocks)
        return num_hit


class _LruCache:
    """Least recently used first. Within a request, the tail block counts as the least recent, so a
    request's blocks are evicted tail first, as vLLM frees them, and the shared head survives longest."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()
        self.num_evicted_blocks = 0

    def _touch(self, blocks: list[bytes]) -> None:
        for block in reversed(blocks):
            if block in self._blocks:
                self._blocks.move_to_end(block)

    def access(self, blocks: list[bytes]) -> int:
        num_hit = _num_leading_hits(blocks, self._blocks)
        # Make the request's cached blocks the most recent first, so they are not evicted to make
        # room for its own new blocks.
        self._touch(blocks)
        in_request = set(blocks)
        for block in blocks[num_hit:]:
            if block in self._blocks:
                continue
            if len(self._blocks) >= self._capacity_blocks:
                victim = next(iter(self._blocks), None)
                if victim is None or victim in in_request:
                    break
                del self._blocks[victim]
                self.num_evicted_blocks += 1
            self._blocks[block] = None
        self._touch(blocks)
        return num_hit


class _LfuCache:
    """Least frequently used first (uses = requests that used the block), ties broken by least recent."""

    def __init__(self, capacity_blocks: int) -> None:
        self._capacity_blocks = capacity_blocks
        self._entries: dict[bytes, tuple[int, int]] = {}
        self._heap: list[tuple[int, int, bytes]] = []
        self._clock = 0
        self.num_evicted_blocks = 0

    def _pop_victim(self, in_request: set[bytes]) -> bytes | None:
        while self._heap:
            uses, stamp, block = heapq.heappop(self._heap)
            if self._entries.get(block) != (uses, stamp):
                continue  # a stale heap entry: the block was used again or evicted since
            if block in in_request:
                continue  # re-pushed with a fresh stamp once the request is cached
            return block
        return None

    def access(self, blocks: list[bytes]) -> int:
        num_hit = _num_leading_hits(blocks, self._entries)
        in_request = set(blocks)
        for block in blocks[num_hit:]:
            if block in self._entries:
                continue
            if len(self._entries) >= self._capacity_blocks:
                victim = self._pop_victim(in_request)
                if victim is None:
                    break
                del self._entries[victim]
                self.num_evicted_blocks += 1
            self._entries[block] = (0, 0)

        # Count one use per request. Stamping the tail first makes the head the most recent among equals.
        for block in reversed(blocks):
            entry = self._entries.get(block)
            if entry is None:
                continue
            self._clock += 1
            self._entries[block] = (entry[0] + 1, self._clock)
            heapq.heappush(self._heap, (entry[0] + 1, self._clock, block))

        if len(self._heap) > 2 * len(self._entries) + 1024:
            self._heap = [(uses, stamp, block) for block, (uses, stamp) in self._entries.items()]
            heapq.heapify(self._heap)
        return num_hit


def _make_cache(capacity_blocks: int | None, policy: str) -> _UnboundedCache | _LruCache | _LfuCache:
    if capacity_blocks is None:
        return _UnboundedCache()
    if policy == "lru":
        return _LruCache(capacity_blocks)
    return _LfuCache(capacity_blocks)


def hit_rate_by_capacity(
    requests: Iterable[Request],
    capacities_blocks: Sequence[int | None],
    policies: Sequence[str] = POLICIES,
    block_size: int = 512,
    *,
    full_blocks_only: bool = False,
) -> list[dict[str, Any]]:
    """Replay the requests, in order, through a prefix cache of each capacity and eviction policy.

    Each request first looks up its prompt's blocks: its hit is the longest run of consecutive
    cached blocks from the start of the prompt. Then all of its blocks are cached, evicting others
    by the policy (`lru` or `lfu`). Blocks of the request being cached are never evicted for it.
    When all cached blocks are its own, its remaining blocks are not cached. A capacity of None
    means unbounded (no eviction, and the policy plays no part).

    Definitions, over all requests:
    - `prefix_hit_rate_blocks` = hit blocks / prompt blocks. A prompt has ceil(tokens / block_size)
      blocks, and its last, partial block can only hit an identical partial block. The first
      request's blocks are all misses.
    - `prefix_hit_rate_tokens` = hit tokens / prompt tokens, each hit block counting its own tokens.

    With `full_blocks_only`, the partial last block is neither looked up nor cached, as in vLLM,
    which caches only full blocks. Only prompts are cached: replies are not, so a later turn misses
    on the previous turn's reply.

    NOTE: this is a sequential replay without concurrency. A real engine also holds the blocks of
    running requests, which cannot be evicted, so at the same capacity it hits somewhat less.
    """
    if block_size < 1:
        raise UserError(f"block_size must be >= 1 (got {block_size})")
    for capacity in capacities_blocks:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
            raise UserError(f"capacity {capacity!r} is invalid: give a non-negative number of blocks, or None for unbounded")
    for policy in policies:
        if policy not in POLICIES:
            raise UserError(f"unknown eviction policy {policy!r}; use one of {', '.join(POLICIES)}")

    replays = [
        (capacity, policy, _make_cache(capacity, policy)) for capacity in capacities_blocks for policy in policies
    ]
    hit_blocks = [0] * len(replays)
    hit_tokens = [0] * len(replays)
    num_requests = num_prompt_blocks = num_prompt_tokens = 0

    for request in requests:
        blocks = prompt_block_hashes(
            request.prompt_token_ids, block_size, cache_salt=request.cache_salt, full_blocks_only=full_blocks_only
        )
        num_requests += 1
        num_prompt_blocks += len(blocks)
        num_prompt_tokens += request.prompt_tokens
        for index, (_, _, cache) in enumerate(replays):
            num_hit = cache.access(blocks)
            hit_blocks[index] += num_hit
            hit_tokens[index] += min(num_hit * block_size, request.prompt_tokens)

    rows = []
    for index, (capacity, policy, cache) in enumerate(replays):
        rows.append(
            {
                "policy": policy,
                "capacity_blocks": capacity,
                "block_size": block_size,
                "requests": num_requests,
                "prompt_blocks": num_prompt_blocks,
                "hit_blocks": hit_blocks[index],
                "prefix_hit_rate_blocks": hit_blocks[index] / num_prompt_blocks if num_prompt_blocks else 0.0,
                "prompt_tokens": num_prompt_tokens,
                "hit_tokens": hit_tokens[index],
                "prefix_hit_rate_tokens": hit_tokens[index] / num_prompt_tokens if num_prompt_tokens else 0.0,
                "evicted_blocks": cache.num_evicted_blocks,
            }
        )
    return rows


def _length_summary(lengths: np.ndarray) -> dict[str, float]:
    return {
        "min": float(lengths.min()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p90": float(np.percentile(lengths, 90)),
        "p99": float(np.percentile(lengths, 99)),
        "max": float(lengths.max()),
    }


def inspect_trace(path: Path | str, trace_format: str = "auto", *, block_size: int = 512) -> dict[str, Any]:
    """Return statistics of a trace: request count, time span, rate, length percentiles, sessions,
    and total versus unique prompt blocks.

    `unbounded_prefix_hit_rate_blocks` is 1 - unique / total blocks, which is the block hit rate of
    an unbounded prefix cache, because a chained block hash repeats only when its whole prefix does.
    The file is streamed, and only one prompt's token ids exist at a time.
    """
    if block_size < 1:
        raise UserError(f"block_size must be >= 1 (got {block_size})")
    source = open_trace(path, trace_format)
    stats = TraceReadStats()
    builder = TracePromptBuilder()
    prompt_lengths: list[int] = []
    output_lengths: list[int] = []
    sessions: dict[str, int] = {}
    unique_blocks: set[bytes] = set()
    total_blocks = 0
    last_arrival_s = 0.0

    for record, arrival_s in source.iter_records(stats):
        request = builder.build(record, request_id=record.row_index, arrival_time_s=arrival_s)
        blocks = prompt_block_hashes(request.prompt_token_ids, block_size)
        total_blocks += len(blocks)
        unique_blocks.update(blocks)
        prompt_lengths.append(record.prompt_tokens)
        output_lengths.append(record.output_tokens)
        if record.session_id is not None:
            sessions[record.session_id] = sessions.get(record.session_id, 0) + 1
        last_arrival_s = arrival_s

    if not prompt_lengths:
        raise UserError(f"{source.path}: the trace has no usable requests (skipped rows: {stats.skipped_rows})")
    num_requests = len(prompt_lengths)
    prompts = np.asarray(prompt_lengths, dtype=np.int64)
    outputs = np.asarray(output_lengths, dtype=np.int64)
    return {
        "path": str(source.path),
        "format": source.format,
        "rows": stats.rows,
        "requests": num_requests,
        "skipped_rows": dict(stats.skipped_rows),
        "duration_s": last_arrival_s,
        "rate_per_s": num_requests / last_arrival_s if last_arrival_s > 0 else None,
        "prompt_tokens": _length_summary(prompts),
        "output_tokens": _length_summary(outputs),
        "total_prompt_tokens": int(prompts.sum()),
        "total_output_tokens": int(outputs.sum()),
        "sessions": len(sessions),
        "requests_in_sessions": sum(sessions.values()),
        "block_size": block_size,
        "total_blocks": total_blocks,
        "unique_blocks": len(unique_blocks),
        "unbounded_prefix_hit_rate_blocks": 1.0 - len(unique_blocks) / total_blocks,
    }
