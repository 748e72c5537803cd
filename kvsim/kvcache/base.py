"""The contract every KV-cache strategy implements, and the memory breakdown it reports.

One manager serves one replica. Its capacity comes from bytes (GPU memory left after weights and
activations, divided by the model's KV bytes per token on one rank), never from a free-floating count.

The engine drives a manager the way vLLM's scheduler drives its KV-cache manager:

    hit = manager.lookup(seq)                          # side-effect free
    if manager.can_allocate(seq, num_new, hit):        # side-effect free
        manager.allocate(seq, num_new, hit)            # all or nothing; returns False if it cannot
    ...
    manager.allocate(seq, 1)                           # each decode step grows the sequence
    manager.free(seq)                                  # finished or preempted
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from kvsim.workload.tokens import output_token_ids


@dataclass(eq=False)
class Sequence:
    """The view of one running sequence a KV-cache manager needs.

    `final_num_tokens` (prompt + reply) is known to the simulator in advance: the oracle and pow2
    reservation policies use it, and the breakdown uses it to tell reserved slots (which the sequence
    will fill) from internal fragmentation (which it never will). Managers must not use it to decide
    what a real engine could not know, except where a policy is defined by it.
    """

    seq_id: int
    prompt_token_ids: np.ndarray
    final_num_tokens: int
    cache_salt: str | None = None
    output_token_ids: np.ndarray | None = None
    output_key: int | None = None
    """Identity that derives the reply's token ids when `output_token_ids` is None (the request id)."""
    _all_ids: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt_token_ids.shape[0])

    def token_ids(self, upto: int) -> np.ndarray:
        """Return the first `upto` token ids of the sequence: the prompt, then the reply."""
        if upto <= self.num_prompt_tokens:
            return self.prompt_token_ids[:upto]
        if self._all_ids is None or self._all_ids.shape[0] < upto:
            num_output = self.final_num_tokens - self.num_prompt_tokens
            if self.output_token_ids is not None:
                outputs = self.output_token_ids[:num_output]
            else:
                key = self.output_key if self.output_key is not None else self.seq_id
                outputs = output_token_ids(key, num_output)
            self._all_ids = np.concatenate([self.prompt_token_ids, outputs])
        return self._all_ids[:upto]


@dataclass(frozen=True)
class MemoryBreakdown:
    """A manager's KV memory split at one instant, in token slots. The fields sum to capacity.

    - token_state_tokens: slots holding KV of a running sequence (a shared block counts once).
    - reserved_tokens: allocated to a running sequence, empty now, filled before it finishes.
    - internal_fragmentation_tokens: allocated to a running sequence and never to be filled.
    - external_fragmentation_tokens: free, but in holes too small for the next waiting request, and,
      under buddy allocation, slots of a block past its reservation's end.
    - cached_free_tokens: unreferenced slots kept for prefix reuse, evictable on demand.
    - free_tokens: everything else.
    """

    capacity_tokens: int
    token_state_tokens: int = 0
    reserved_tokens: int = 0
    internal_fragmentation_tokens: int = 0
    external_fragmentation_tokens: int = 0
    cached_free_tokens: int = 0

    @property
    def free_tokens(self) -> int:
        return (self.capacity_tokens - self.token_state_tokens - self.reserved_tokens
                - self.internal_fragmentation_tokens - self.external_fragmentation_tokens
                - self.cached_free_tokens)

    @property
    def used_tokens(self) -> int:
        return self.capacity_tokens - self.free_tokens - self.cached_free_tokens - self.external_fragmentation_tokens

    def fractions(self) -> dict[str, float]:
        """Return each share as a fraction of capacity, under the names summary.json uses."""
        cap = max(self.capacity_tokens, 1)
        return {
            "token_state_fraction": self.token_state_tokens / cap,
            "reserved_fraction": self.reserved_tokens / cap,
            "internal_fragmentation_fraction": self.internal_fragmentation_tokens / cap,
            "external_fragmentation_fraction": self.external_fragmentation_tokens / cap,
            "cached_free_fraction": self.cached_free_tokens / cap,
            "free_fraction": self.free_tokens / cap,
        }


def max_steps_that_fit(limit: int, units_needed, units_free: int) -> int:
    """Return the largest k <= limit with `units_needed(k) <= units_free`, for `units_needed` growing with k.

    Decode growth needs blocks (or pages) in steps, so the count is found by bisection, not in closed form.
    """
    if units_needed(limit) <= units_free:
        return limit
    low, high = 0, limit  # low fits, high does not
    while high - low > 1:
        mid = (low + high) // 2
        if units_needed(mid) <= units_free:
            low = mid
        else:
            high = mid
    return low


BREAKDOWN_FIELDS = (
    "token_state_fraction",
    "reserved_fraction",
    "internal_fragmentation_fraction",
    "external_fragmentation_fraction",
    "cached_free_fraction",
    "free_fraction",
)


@dataclass
class PrefixCacheStats:
    """Counters of prefix-cache lookups since the manager was created or reset."""

    lookups: int = 0
    """Sequences looked up at admission."""
    queried_tokens: int = 0
    """Prompt tokens of those lookups."""
    hit_tokens: int = 0
    """Prompt tokens served from the cache."""
    queried_blocks: int = 0
    hit_blocks: int = 0
    evictions: int = 0
    """Cached blocks (or radix-tree tokens, for the radix strategy) evicted to make room."""

    def reset(self) -> None:
        """Zero every counter in place, so holders of this object see the reset."""
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


@runtime_checkable
class KVCacheManager(Protocol):
    """The interface the engine drives a KV-cache strategy through."""

    name: str
    capacity_tokens: int
    stats: PrefixCacheStats
    block_size: int
    """Tokens per allocation unit: the paged block size, the radix page size, 1 for contiguous."""

    @property
    def num_free_tokens(self) -> int:
        """Slots an admission may use now: free slots plus cached ones, which are evicted on demand."""

    def reservation_tokens(self, seq: Sequence) -> int:
        """Slots that admitting `seq` reserves at once (for contiguous, its whole range).

        Pass the next waiting request's value as `next_request_tokens` to `breakdown`.
        """

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content and zero `stats`, returning True.

        Returns False and changes nothing while any sequence has memory allocated.
        """

    def lookup(self, seq: Sequence) -> int:
        """Prompt tokens of a not-yet-admitted `seq` already in the cache; never more than prompt − 1."""

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Check, without side effects, whether `allocate` with the same arguments would succeed."""

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Give `seq` slots for `num_new_tokens` more tokens, all or nothing.

        On a sequence's first call, `num_cached_tokens` (from `lookup`) are taken from the cache first.
        Returns False and changes nothing when memory is short.
        """

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s slots; cacheable content stays cached until evicted."""

    def num_tokens(self, seq: Sequence) -> int:
        """Return the token slots allocated to `seq`, cached prefix included (0 if none)."""

    def max_decode_steps(self, seqs: list[Sequence], limit: int) -> int:
        """Return the largest k ≤ limit such that every seq in `seqs` can grow by k tokens without eviction failing."""

    def breakdown(self, next_request_tokens: int | None = None) -> MemoryBreakdown:
        """Return the memory split now; `next_request_tokens` sizes the hole that counts as usable."""
