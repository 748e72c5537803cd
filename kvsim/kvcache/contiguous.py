"""Contiguous KV cache: each sequence reserves one range of token slots for its whole lifetime.

Serving systems before PagedAttention kept the KV cache this way: HF `generate`, FasterTransformer,
and Orca as the vLLM paper (Kwon et al., SOSP'23) models it. A request gets one contiguous chunk,
sized for its maximum length, when it is admitted. The slots form a real address space here, so
external fragmentation comes out of the simulated allocation history.

Reservation policies, as the vLLM paper's §6.1 defines its three Orca baselines:

- `max`: `max_model_len` slots (Orca Max, HF generate, FasterTransformer).
- `pow2`: the prompt plus the next power of two >= the output length, at most `max_model_len`
  (Orca Pow2: "if the true output length is 25, it reserves 32 positions for outputs").
- `oracle`: exactly the final length (Orca Oracle, an upper bound no real system reaches).

Pow2 and Oracle read `Sequence.final_num_tokens`, which a real system does not know, because the
paper defines them that way. There is no prefix sharing: `lookup` always returns 0.

Fit policies place a reservation in the address space:

- `first` and `best`: an exact-size range in the lowest-addressed or the smallest free hole that is
  large enough. Freeing leaves a hole that merges with free neighbours.
- `buddy`: a binary buddy allocator, which the vLLM paper's §6.1 assumes for its Orca baselines. A
  reservation takes a whole power-of-two block at an address aligned to its size, and freeing merges
  a block with its free buddy. The block's slots past the reservation (its slack) hold nothing.

Any fit rejects a request that fits in the total free memory but in no single hole or block.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Literal

from kvsim.kvcache.base import MemoryBreakdown, PrefixCacheStats, Sequence

ReservationPolicy = Literal["max", "pow2", "oracle"]
FitPolicy = Literal["first", "best", "buddy"]


def next_power_of_two(num_tokens: int) -> int:
    """Return the smallest power of two >= `num_tokens`, or 0 for 0."""
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    return 0 if num_tokens == 0 else 1 << (num_tokens - 1).bit_length()


@dataclass
class _Reservation:
    """One sequence's range [start, start + size_tokens) inside its block, and its contents.

    The block [start, start + block_tokens) is what the allocator handed out. It equals the range
    for first and best fit, and is the next power of two for buddy allocation.
    """

    start: int
    size_tokens: int
    block_tokens: int
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


class BuddySpace:
    """The free blocks of a binary buddy allocator over `capacity` slots.

    Every block has a power-of-two size and starts at a multiple of it. A capacity that is not a
    power of two is split into top-level blocks by its binary digits, largest first (100 slots are
    64 + 32 + 4), and blocks never merge across top-level blocks. So a request whose block is larger
    than the largest top-level block never fits, and the engine rejects it once nothing else runs.
    Free blocks are kept by start and sorted by (size, start), so that the smallest block that fits,
    and among equal ones the lowest address, is found by bisection.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.num_free_slots = capacity
        self._size_by_start: dict[int, int] = {}
        self._by_size: list[tuple[int, int]] = []
        self.top_level_blocks: list[tuple[int, int]] = []
        """The top-level blocks as (start, size), by address."""
        start = 0
        for bit in reversed(range(capacity.bit_length())):
            if capacity >> bit & 1:
                self.top_level_blocks.append((start, 1 << bit))
                self._add_block(start, 1 << bit)
                start += 1 << bit
        self._top_level_starts = [top_start for top_start, _ in self.top_level_blocks]

    def holes(self) -> list[tuple[int, int]]:
        """Return every free block as (start, size), by address."""
        return sorted(self._size_by_start.items())

    @property
    def largest_hole(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def find(self, block_tokens: int) -> int | None:
        """Return the start of the smallest free block of >= `block_tokens` slots, lowest address first.

        Returns None when no free block is large enough. `block_tokens` must be a power of two.
        """
        self._check_block_size(block_tokens)
        index = bisect.bisect_left(self._by_size, (block_tokens, -1))
        return self._by_size[index][1] if index < len(self._by_size) else None

    def take(self, start: int, block_tokens: int) -> None:
        """Allocate the block [start, start + block_tokens), halving the free block at `start` down to it.

        Each halving keeps the lower half and frees the upper one, the lower half's buddy.
        """
        self._check_block_size(block_tokens)
        size = self._size_by_start.get(start)
        if size is None or size < block_tokens:
            raise ValueError(f"no free block of at least {block_tokens} slots starts at {start}")
        self._remove_block(start)
        while size > block_tokens:
            size //= 2
            self._add_block(start + size, size)
        self.num_free_slots -= block_tokens

    def release(self, start: int, block_tokens: int) -> None:
        """Free the block [start, start + block_tokens), merging it with its free buddy as long as there is one."""
        self._check_block_size(block_tokens)
        top_level_size = self._top_level_size(start)
        if start % block_tokens or block_tokens > top_level_size:
            raise ValueError(f"[{start}, {start + block_tokens}) is not a block of this allocator")
        self.num_free_slots += block_tokens
        size = block_tokens
        while size < top_level_size:
            buddy = start ^ size
            if self._size_by_start.get(buddy) != size:
                break
            self._remove_block(buddy)
            start = min(start, buddy)
            size *= 2
        self._add_block(start, size)

    def slots_in_holes_smaller_than(self, size: int) -> int:
        """Count the slots in free blocks of fewer than `size` slots, unusable for a request that needs `size`.

        A block is a power of two, so a block of >= `size` slots is also >= the block the request rounds to.
        """
        index = bisect.bisect_left(self._by_size, (size, -1))
        return sum(block_size for block_size, _ in self._by_size[:index])

    def _top_level_size(self, start: int) -> int:
        index = bisect.bisect_right(self._top_level_starts, start) - 1
        if index < 0 or start >= self.capacity:
            raise ValueError(f"slot {start} is outside the {self.capacity}-slot address space")
        return self.top_level_blocks[index][1]

    @staticmethod
    def _check_block_size(block_tokens: int) -> None:
        if block_tokens < 1 or block_tokens & (block_tokens - 1):
            raise ValueError(f"a buddy block has a power-of-two size >= 1, got {block_tokens}")

    def _add_block(self, start: int, size: int) -> None:
        self._size_by_start[start] = size
        bisect.insort(self._by_size, (size, start))

    def _remove_block(self, start: int) -> None:
        size = self._size_by_start.pop(start)
        del self._by_size[bisect.bisect_left(self._by_size, (size, start))]


class ContiguousKVCacheManager:
    """Per-sequence contiguous reservations in a slot address space (see the module docstring)."""

    block_size = 1

    def __init__(self, *, name: str, capacity_tokens: int, max_model_len: int,
                 reservation: ReservationPolicy = "max", fit: FitPolicy = "first") -> None:
        if reservation not in ("max", "pow2", "oracle"):
            raise ValueError(f"unknown reservation policy {reservation!r}")
        if fit not in ("first", "best", "buddy"):
            raise ValueError(f"unknown fit policy {fit!r}")
        self.name = name
        self.capacity_tokens = capacity_tokens
        self.max_model_len = max_model_len
        self.reservation = reservation
        self.fit = fit
        self.stats = PrefixCacheStats()
        self.free_space: FreeSpace | BuddySpace = BuddySpace(capacity_tokens) if fit == "buddy" \
            else FreeSpace(capacity_tokens)
        self._seqs: dict[int, _Reservation] = {}
        self._token_state_tokens = 0
        self._reserved_tokens = 0
        self._internal_fragmentation_tokens = 0
        self._block_slack_tokens = 0

    # ------------------------------------------------------------------ admission

    def lookup(self, seq: Sequence, *, num_lookup_tokens: int | None = None) -> int:
        """Return 0: contiguous reservations share nothing."""
        return 0

    def reservation_tokens(self, seq: Sequence) -> int:
        """Return the slots the reservation policy gives `seq` on admission, in one contiguous range.

        Under buddy allocation the range begins a block of `block_tokens(reservation)` slots.
        """
        if self.reservation == "max":
            return self.max_model_len
        if self.reservation == "oracle":
            return min(seq.final_num_tokens, self.max_model_len)
        num_output_tokens = max(seq.final_num_tokens - seq.num_prompt_tokens, 0)
        return min(seq.num_prompt_tokens + next_power_of_two(num_output_tokens), self.max_model_len)

    def block_tokens(self, reservation_tokens: int) -> int:
        """Return the block size allocated for a reservation: rounded up to a power of two by buddy allocation.

        First and best fit allocate exactly `reservation_tokens` slots.
        """
        return next_power_of_two(reservation_tokens) if self.fit == "buddy" else reservation_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Check, without side effects, whether `allocate` with the same arguments would succeed."""
        if num_cached_tokens:
            raise ValueError(f"contiguous reservations share no prefix; num_cached_tokens must be 0, "
                             f"got {num_cached_tokens} for sequence {seq.seq_id}")
        reservation = self._seqs.get(seq.seq_id)
        if reservation is None:
            size = self.reservation_tokens(seq)
            return num_new_tokens <= size and self._find_block(self.block_tokens(size)) is not None
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
            block_tokens = self.block_tokens(size)
            start = self._find_block(block_tokens)
            assert start is not None, f"can_allocate promised a block of {block_tokens} slots for sequence {seq.seq_id}"
            self.free_space.take(start, block_tokens)
            reservation = _Reservation(start, size, block_tokens, 0, seq.final_num_tokens)
            self._seqs[seq.seq_id] = reservation
            self._block_slack_tokens += block_tokens - size
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
        self._block_slack_tokens -= reservation.block_tokens - reservation.size_tokens
        self.free_space.release(reservation.start, reservation.block_tokens)

    # ------------------------------------------------------------------ queries

    def num_tokens(self, seq: Sequence) -> int:
        reservation = self._seqs.get(seq.seq_id)
        return 0 if reservation is None else reservation.num_tokens

    def reserved_range(self, seq: Sequence) -> tuple[int, int] | None:
        """Return `seq`'s reserved range as (start, size), or None if it has none."""
        reservation = self._seqs.get(seq.seq_id)
        return None if reservation is None else (reservation.start, reservation.size_tokens)

    def block_range(self, seq: Sequence) -> tuple[int, int] | None:
        """Return the block allocated for `seq` as (start, size), or None. Only buddy blocks exceed `reserved_range`."""
        reservation = self._seqs.get(seq.seq_id)
        return None if reservation is None else (reservation.start, reservation.block_tokens)

    @property
    def num_free_tokens(self) -> int:
        """Free slots in all holes together. An admission also needs one hole large enough."""
        return self.free_space.num_free_slots

    @property
    def block_slack_tokens(self) -> int:
        """Allocated slots past the ends of the reservations, which buddy allocation adds; 0 for first and best fit."""
        return self._block_slack_tokens

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
        request to measure holes against, and those count 0. Under buddy allocation it also counts
        `block_slack_tokens`.
        """
        # NOTE: a buddy block's slack is allocated, so it is not free, but it is neither token state
        # nor reserved for the sequence, which never grows past its reservation. It counts as
        # external fragmentation, as the vLLM paper's Fig. 2 groups it under "external fragmentation
        # & other" (its Oracle baseline shows 0% internal fragmentation). So for buddy,
        # `num_free_tokens` is free + external fragmentation − `block_slack_tokens`.
        external_fragmentation_tokens = self._block_slack_tokens
        if next_request_tokens is not None:
            external_fragmentation_tokens += self.free_space.slots_in_holes_smaller_than(next_request_tokens)
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

    def _find_block(self, block_tokens: int) -> int | None:
        if isinstance(self.free_space, BuddySpace):
            return self.free_space.find(block_tokens)
        return self.free_space.find(block_tokens, self.fit)

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
