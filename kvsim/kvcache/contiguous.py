"""Contiguous KV cache: each sequence reserves one range of token slots for its whole lifetime.

Serving systems before PagedAttention kept the KV cache this way: HF `generate`, FasterTransformer,
and Orca as the vLLM paper (Kwon et al., SOSP'23) models it. A request gets one contiguous chunk,
sized for its maximum length, when it is admitted. The slots form a real address space here.
Admission takes a free hole (first fit or best fit), freeing leaves a hole that merges with free
neighbours, and a request that fits in the total free memory but in no single hole is rejected.
External fragmentation therefore comes out of the simulated allocation history.

Reservation policies, as the vLLM paper names Orca's variants:

- `max`: `max_model_len` slots (Orca Max, HF generate, FasterTransformer).
- `pow2`: the next power of two >= the sequence's final length, at most `max_model_len` (Orca Pow2).
- `oracle`: exactly the final length (Orca Oracle, an upper bound no real system reaches).

Pow2 and Oracle read `Sequence.final_num_tokens`, which a real system does not know, because the
paper defines them that way. There is no prefix sharing: `lookup` always returns 0.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from kvsim.kvcache.base import MemoryBreakdown, PrefixCacheStats, Sequence

ReservationPolicy = Literal["max", "pow2", "oracle"]
FitPolicy = Literal["first", "best"]


@dataclass
class _Reservation:
    """One sequence's range [start, start + size_tokens) and its contents."""

    start: int
    size_tokens: int
    num_tokens: int
    final_tokens: int
    reserved_tokens: int = 0
    internal_fragmentation_tokens: int = 0


class FreeSpace:
    """The holes of a linear address space of `capacity` slots, with merging of adjacent holes.

    Holes are kept sorted by start (for first fit) and by (size, start) (for best fit and for
    summing the holes smaller than a size). Operations cost O(number of holes), which is at most
    one more than the number of live ranges.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_free_slots = capacity
        self._size_by_start: dict[int, int] = {}
        self._start_by_end: dict[int, int] = {}
        self._starts: list[int] = []
        self._by_size: list[tuple[int, int]] = []
        if capacity > 0:
            self._add_hole(0, capacity)

    def holes(self) -> list[tuple[int, int]]:
        """Return every hole as (start, size), by address."""
        return [(start, self._size_by_start[start]) for start in self._starts]

    @property
    def largest_hole(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def find(self, size: int, fit: FitPolicy) -> int | None:
        """Return the start of the hole the policy picks for `size` slots, or None if none is large enough."""
        if size > self.largest_hole:
            return None
        if fit == "best":
            index = bisect.bisect_left(self._by_size, (size, -1))
            return self._by_size[index][1]
        for start in self._starts:
            if self._size_by_start[start] >= size:
                return start
        raise AssertionError("largest_hole promised a hole that first fit did not find")

    def take(self, start: int, size: int) -> None:
        """Mark [start, start + size) used. The range must begin at the start of a hole."""
        hole_size = self._size_by_start.get(start)
        if hole_size is None or hole_size < size:
            raise ValueError(f"no free hole of {size} slots starts at {start}")
        self._remove_hole(start)
        if hole_size > size:
            self._add_hole(start + size, hole_size - size)
        self.num_free_slots -= size

    def release(self, start: int, size: int) -> None:
        """Mark [start, start + size) free, merging it with the holes on either side."""
        end = start + size
        if end in self._size_by_start:
            following_size = self._size_by_start[end]
            self._remove_hole(end)
            end += following_size
        previous_start = self._start_by_end.get(start)
        if previous_start is not None:
            self._remove_hole(previous_start)
            start = previous_start
        self._add_hole(start, end - start)
        self.num_free_slots += size

    def slots_in_holes_smaller_than(self, size: int) -> int:
        """Count the free slots in holes of fewer than `size` slots, unusable for a request that needs `size`."""
        index = bisect.bisect_left(self._by_size, (size, -1))
        return sum(hole_size for hole_size, _ in self._by_size[:index])

    def _add_hole(self, start: int, size: int) -> None:
        self._size_by_start[start] = size
        self._start_by_end[start + size] = start
        bisect.insort(self._starts, start)
        bisect.insort(self._by_size, (size, start))

    def _remove_hole(self, start: int) -> None:
        size = self._size_by_start.pop(start)
        del self._start_by_end[start + size]
        del self._starts[bisect.bisect_left(self._starts, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (size, start))]


class ContiguousKVCacheManager:
    """Per-sequence contiguous reservations in a slot address space (see the module docstring)."""

    block_size = 1

    def __init__(self, *, name: str, capacity_tokens: int, max_model_len: int,
                 reservation: ReservationPolicy = "max", fit: FitPolicy = "first") -> None:
        if reservation not in ("max", "pow2", "oracle"):
            raise ValueError(f"unknown reservation policy {reservation!r}")
        if fit not in ("first", "best"):
            raise ValueError(f"unknown fit policy {fit!r}")
        self.name = name
        self.capacity_tokens = capacity_tokens
        self.max_model_len = max_model_len
        self.reservation = reservation
        self.fit = fit
        self.stats = PrefixCacheStats()
        self.free_space = FreeSpace(capacity_tokens)
        self._seqs: dict[int, _Reservation] = {}
        self._token_state_tokens = 0
        self._reserved_tokens = 0
        self._internal_fragmentation_tokens = 0

    # ------------------------------------------------------------------ admission

    def lookup(self, seq: Sequence, *, num_lookup_tokens: int | None = None) -> int:
        """Return 0: contiguous reservations share nothing."""
        return 0

    def reservation_tokens(self, seq: Sequence) -> int:
        """Return the slots the reservation policy gives `seq` on admission, in one contiguous range."""
        if self.reservation == "max":
            return self.max_model_len
        final_tokens = min(seq.final_num_tokens, self.max_model_len)
        if self.reservation == "oracle":
            return final_tokens
        return min(1 << max(final_tokens - 1, 0).bit_length(), self.max_model_len)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Whether `allocate` with the same arguments would succeed; no side effects."""
        if num_cached_tokens:
            raise ValueError(f"contiguous reservations share no prefix; num_cached_tokens must be 0, "
                             f"got {num_cached_tokens} for sequence {seq.seq_id}")
        reservation = self._seqs.get(seq.seq_id)
        if reservation is None:
            size = self.reservation_tokens(seq)
            return num_new_tokens <= size and self.free_space.find(size, self.fit) is not None
        return reservation.num_tokens + num_new_tokens <= reservation.size_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Reserve `seq`'s range on its first call, and fill it on later calls, all or nothing.

        Returns False when no hole is large enough, or when `seq` would outgrow its reservation
        (a contiguous range cannot grow in place once its neighbours are taken).
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        reservation = self._seqs.get(seq.seq_id)
        num_tokens = num_new_tokens + (0 if reservation is None else reservation.num_tokens)
        if num_tokens > seq.final_num_tokens:
            raise ValueError(f"sequence {seq.seq_id} would hold {num_tokens} tokens, more than its final length "
                             f"{seq.final_num_tokens}")
        if not self.can_allocate(seq, num_new_tokens, num_cached_tokens):
            return False
        if reservation is None:
            size = self.reservation_tokens(seq)
            start = self.free_space.find(size, self.fit)
            assert start is not None
            self.free_space.take(start, size)
            reservation = _Reservation(start, size, 0, seq.final_num_tokens)
            self._seqs[seq.seq_id] = reservation
            self._record_lookup(seq)
        self._account(reservation, num_new_tokens)
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s whole range."""
        reservation = self._seqs.pop(seq.seq_id, None)
        if reservation is None:
            return
        self._token_state_tokens -= reservation.num_tokens
        self._reserved_tokens -= reservation.reserved_tokens
        self._internal_fragmentation_tokens -= reservation.internal_fragmentation_tokens
        self.free_space.release(reservation.start, reservation.size_tokens)

    # ------------------------------------------------------------------ queries

    def num_tokens(self, seq: Sequence) -> int:
        reservation = self._seqs.get(seq.seq_id)
        return 0 if reservation is None else reservation.num_tokens

    def reserved_range(self, seq: Sequence) -> tuple[int, int] | None:
        """Return `seq`'s range as (start, size), or None if it has none."""
        reservation = self._seqs.get(seq.seq_id)
        return None if reservation is None else (reservation.start, reservation.size_tokens)

    @property
    def num_free_tokens(self) -> int:
        """Free slots in all holes together. An admission also needs one hole large enough."""
        return self.free_space.num_free_slots

    @property
    def largest_free_range_tokens(self) -> int:
        return self.free_space.largest_hole

    def max_decode_steps(self, seqs: list[Sequence], limit: int) -> int:
        """Return `limit`, or less where a sequence would outgrow its reservation (growth is pre-reserved)."""
        steps = max(limit, 0)
        for seq in seqs:
            reservation = self._seqs.get(seq.seq_id)
            if reservation is None:
                raise ValueError(f"sequence {seq.seq_id} has no reservation; allocate it first")
            steps = min(steps, reservation.size_tokens - reservation.num_tokens)
        return steps

    def breakdown(self, next_request_tokens: int | None = None) -> MemoryBreakdown:
        """Return the memory split now.

        External fragmentation counts the free slots in holes smaller than `next_request_tokens`
        (pass `reservation_tokens` of the next waiting request). With None there is no waiting
        request to measure holes against, and it is 0.
        """
        external_fragmentation_tokens = 0
        if next_request_tokens is not None:
            external_fragmentation_tokens = self.free_space.slots_in_holes_smaller_than(next_request_tokens)
        return MemoryBreakdown(
            capacity_tokens=self.capacity_tokens,
            token_state_tokens=self._token_state_tokens,
            reserved_tokens=self._reserved_tokens,
            internal_fragmentation_tokens=self._internal_fragmentation_tokens,
            external_fragmentation_tokens=external_fragmentation_tokens,
        )

    def reset_prefix_cache(self) -> bool:
        """Zero `stats` and return True (nothing is cached), or return False while any reservation exists."""
        if self._seqs:
            return False
        self.stats.reset()
        return True

    # ------------------------------------------------------------------ internals

    def _account(self, reservation: _Reservation, num_new_tokens: int) -> None:
        """Add `num_new_tokens` to a reservation and update the breakdown sums."""
        self._reserved_tokens -= reservation.reserved_tokens
        self._internal_fragmentation_tokens -= reservation.internal_fragmentation_tokens
        reservation.num_tokens += num_new_tokens
        self._token_state_tokens += num_new_tokens
        # Slots up to the final length will be filled (reserved), and slots past it never will be.
        fill_target = min(reservation.size_tokens, max(reservation.final_tokens, reservation.num_tokens))
        reservation.reserved_tokens = fill_target - reservation.num_tokens
        reservation.internal_fragmentation_tokens = reservation.size_tokens - fill_target
        self._reserved_tokens += reservation.reserved_tokens
        self._internal_fragmentation_tokens += reservation.internal_fragmentation_tokens

    def _record_lookup(self, seq: Sequence) -> None:
        self.stats.lookups += 1
        self.stats.queried_tokens += seq.num_prompt_tokens
        self.stats.queried_blocks += seq.num_prompt_tokens
