"""One serving replica: a SimPy process that loops over engine steps like vLLM's V1 scheduler.

Each step, in order:
1. Running requests, in admission order, get their next tokens (one for decode, a chunk of the prompt
   for prefill) while the token budget `max_num_batched_tokens` lasts. When the KV cache cannot grow
   a request, the most recently admitted running request is preempted and its blocks freed. Recompute
   mode sends it to the front of the waiting queue; swap mode copies its KV to CPU memory.
2. Swapped-out requests come back first, oldest first, while memory allows.
3. If nothing was preempted, waiting requests are admitted first come first served (or by priority,
   or longest prefix match first) while the KV cache, `max_num_seqs` and the token budget allow.
   The head of the queue blocks the rest when it does not fit, as in vLLM.
4. Time advances by the step time; a request whose known tokens all have KV samples one token.

Speed: when every running request is decoding and no waiting request can be admitted, nothing but
token growth happens until a request finishes, the cache runs short or a request arrives. The replica
then advances that whole span in one SimPy timeout, its step times summed with one vectorised call,
and an arrival interrupts the span at the end of the step in flight. `fast_forward=False` runs the same
logic one step at a time; both give the same results (tests/engine/test_directions.py).
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import simpy

from kvsim.engine.latency import BatchShape, LatencyModel
from kvsim.engine.state import RequestState, Status
from kvsim.kvcache.base import KVCacheManager, Sequence

if TYPE_CHECKING:
    from kvsim.metrics import ReplicaRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Scheduling limits and policies of one replica, named as vLLM names them."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    """`recompute` frees the victim's KV and recomputes it later; `swap` copies it to CPU memory."""
    scheduling_policy: str = "fcfs"
    """`fcfs`, `priority` (lower `Request.priority` first, then arrival), or `lpm` (longest prefix match
    first, SGLang's cache-aware order)."""
    watermark: float = 0.0
    """Fraction of KV capacity an admission must leave free, so running requests can grow."""
    swap_space_bytes: int = 4 * 1024**3
    """CPU memory per GPU for swapped-out KV (vLLM's `swap_space`, 4 GiB by default)."""
    pcie_bandwidth_bytes_per_s: float = 64e9
    kv_bytes_per_token: int = 1
    """KV bytes per token on one rank, to cost swapping."""
    fast_forward: bool = True


class Replica:
    """A serving engine instance (one TP group) with its own KV-cache manager."""

    def __init__(self, env: simpy.Environment, replica_id: int, kv: KVCacheManager, latency: LatencyModel,
                 config: SchedulerConfig, recorder: ReplicaRecorder):
        self.env = env
        self.replica_id = replica_id
        self.kv = kv
        self.latency = latency
        self.config = config
        self.recorder = recorder
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.swapped: deque[RequestState] = deque()
        self.swap_used_bytes = 0
        self._admit_counter = 0
        self._wakeup: simpy.Event | None = None
        self._in_span = False
        self._head_blocked = False
        self._memory_blocked = False
        self.capacity_blocked = False
        """Whether requests wait for KV memory or a sequence slot now. The recorder averages the batch over
        such times to measure how many requests the replica keeps running at capacity."""
        self.process = env.process(self._loop())

    # ------------------------------------------------------------------ queue interface

    @property
    def num_outstanding(self) -> int:
        """Requests routed here and not finished: waiting, running and swapped."""
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def add_request(self, state: RequestState) -> None:
        state.replica_id = self.replica_id
        request = state.request
        if request.prompt_tokens >= self.config.max_model_len or request.prompt_tokens > self.kv.capacity_tokens:
            # vLLM rejects a prompt that leaves no room to generate or that could never fit the cache.
            state.status = Status.REJECTED
            state.finish_s = self.env.now
            self.recorder.on_reject(state)
            state.done.succeed(state)
            return
        queue_was_blocked = bool(self.waiting) and self._head_blocked
        self._enqueue(state)
        self.recorder.on_queue_change(self.env.now, +1)
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()
        elif self._in_span and not (queue_was_blocked and self.config.scheduling_policy == "fcfs"):
            # Under FCFS a request behind a blocked head cannot be admitted either, so the span goes on.
            self.process.interrupt("arrival")

    def _enqueue(self, state: RequestState) -> None:
        state.status = Status.WAITING
        if self.config.scheduling_policy == "priority":
            key = (state.request.priority, state.request.arrival_time_s)
            index = len(self.waiting)
            for i, other in enumerate(self.waiting):
                if (other.request.priority, other.request.arrival_time_s) > key:
                    index = i
                    break
            self.waiting.insert(index, state)
        else:
            self.waiting.append(state)

    # ------------------------------------------------------------------ main loop

    def _loop(self):
        while True:
            if not self.running and not self.waiting and not self.swapped:
                self.recorder.on_idle(self.env.now, self)
                self._wakeup = self.env.event()
                yield self._wakeup
                self._wakeup = None
                continue

            span = self._plan_span() if self.config.fast_forward else 0
            if span >= 2:
                yield from self._run_span(span)
            else:
                yield from self._run_step()

    # ------------------------------------------------------------------ one scheduler step

    def _run_step(self):
        scheduled, swap_bytes, preempted = self._schedule()
        if not scheduled:
            if not self.running and not self.swapped and self.waiting:
                # Nothing runs and the head still cannot be admitted: it never will be.
                state = self.waiting.popleft()
                log.warning("request %s can never be admitted on replica %d; rejected",
                            state.request_id, self.replica_id)
                state.status = Status.REJECTED
                state.finish_s = self.env.now
                self.recorder.on_queue_change(self.env.now, -1)
                self.recorder.on_reject(state)
                state.done.succeed(state)
                return
            # Only swapped requests remain and none fits yet: this cannot resolve by waiting.
            if not self.running:
                raise RuntimeError(f"replica {self.replica_id}: swapped requests cannot be resumed")
            raise RuntimeError(f"replica {self.replica_id}: a step scheduled nothing with "
                               f"{len(self.running)} running requests")

        num_new = np.fromiter((n for _, n in scheduled), dtype=np.int64, count=len(scheduled))
        context = np.fromiter((s.num_computed_tokens + n for s, n in scheduled), dtype=np.int64,
                              count=len(scheduled))
        step_s = self.latency.step_time_s(BatchShape(num_new, context))
        step_s += swap_bytes / self.config.pcie_bandwidth_bytes_per_s
        start = self.env.now
        self.recorder.on_step_start(start, self, preempted)
        yield self.env.timeout(step_s)

        prefill_tokens = 0
        finished = []
        for state, n in scheduled:
            num_tokens = state.num_prompt_tokens + state.num_output_tokens
            computed = state.num_computed_tokens + n
            if not (n == 1 and state.num_output_tokens and computed == num_tokens):
                prefill_tokens += n
            state.num_computed_tokens = computed
            if computed == num_tokens:
                self._sample(state, finished)
        self.recorder.on_step_end(self.env.now, prefill_tokens, self)
        self._finish(finished)

    def _sample(self, state: RequestState, finished: list[RequestState]) -> None:
        now = self.env.now
        state.num_output_tokens += 1
        if state.num_output_tokens == 1:
            state.first_token_s = now
        else:
            # The gap since the previous token includes any preemption, recompute or swap stall.
            self.recorder.on_token_gap(now - state.last_token_s)
        state.last_token_s = now
        if state.num_output_tokens >= state.output_tokens:
            finished.append(state)

    def _finish(self, finished: list[RequestState]) -> None:
        if not finished:
            return
        done = set(map(id, finished))
        self.running = [s for s in self.running if id(s) not in done]
        for state in finished:
            self.kv.free(state.seq)
            state.status = Status.FINISHED
            state.finish_s = self.env.now
            self.recorder.on_finish(state)
            state.done.succeed(state)

    def _schedule(self) -> tuple[list[tuple[RequestState, int]], float, int]:
        """Choose this step's work; returns (request, new tokens) pairs, swap bytes and preemptions."""
        config = self.config
        budget = config.max_num_batched_tokens
        scheduled: dict[int, tuple[RequestState, int]] = {}
        preempted = 0
        swap_bytes = 0.0

        # Running requests first, in admission order.
        allocate = self.kv.allocate
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            state = running[i]
            n = state.num_prompt_tokens + state.num_output_tokens - state.num_computed_tokens
            if n > budget:
                n = budget
            if allocate(state.seq, n):
                # The common case, kept free of the preemption bookkeeping below.
                scheduled[id(state)] = (state, n)
                budget -= n
                i += 1
                continue
            victim = None
            while not allocate(state.seq, n):
                victim = self._pick_victim()
                earlier = scheduled.pop(id(victim), None)
                if earlier is not None:
                    # Under the priority policy the victim may already hold tokens of this step.
                    budget += earlier[1]
                    i -= 1
                swap_bytes += self._preempt(victim)
                preempted += 1
                if victim is state:
                    break
            if victim is state:
                # vLLM V1 stops scheduling running requests once the one in hand preempted itself.
                break
            scheduled[id(state)] = (state, n)
            budget -= n
            i += 1

        # Swapped requests come back before new ones are admitted.
        while self.swapped and not preempted and budget > 0 and len(self.running) < config.max_num_seqs:
            state = self.swapped[0]
            tokens = state.num_computed_tokens
            n = min(state.pending_tokens, budget)
            if not self.kv.allocate(state.seq, tokens + n):
                break
            self.swapped.popleft()
            self.recorder.on_queue_change(self.env.now, -1)
            self.recorder.on_resume(self.env.now)
            self.swap_used_bytes -= state.swapped_tokens * config.kv_bytes_per_token
            swap_bytes += state.swapped_tokens * config.kv_bytes_per_token
            state.swapped_tokens = 0
            state.status = Status.RUNNING
            self.running.append(state)
            scheduled[id(state)] = (state, n)
            budget -= n

        # New and recompute-preempted requests.
        self._head_blocked = False
        self._memory_blocked = False
        if not preempted and not self.swapped:
            if config.scheduling_policy == "lpm" and len(self.waiting) > 1:
                self._order_by_prefix_match()
            while self.waiting and budget > 0 and len(self.running) < config.max_num_seqs:
                state = self.waiting[0]
                hit = self.kv.lookup(state.seq)
                n = state.num_tokens - hit
                if not config.enable_chunked_prefill and n > budget:
                    self._head_blocked = True
                    break
                n = min(n, budget)
                if not self._admissible(state, n, hit) or not self.kv.allocate(state.seq, n, hit):
                    self._head_blocked = True
                    self._memory_blocked = True
                    break
                self.waiting.popleft()
                self._admit(state, hit)
                scheduled[id(state)] = (state, n)
                budget -= n
        # The replica is at capacity when requests wait for KV memory or a sequence slot, not merely for
        # the token budget of this step.
        self.capacity_blocked = bool(preempted or self.swapped or self._memory_blocked or (
            self.waiting and len(self.running) >= config.max_num_seqs))
        return list(scheduled.values()), swap_bytes, preempted

    def _admissible(self, state: RequestState, num_new_tokens: int, hit: int) -> bool:
        if not self.kv.can_allocate(state.seq, num_new_tokens, hit):
            return False
        if self.config.watermark <= 0:
            return True
        needed = num_new_tokens + self.config.watermark * self.kv.capacity_tokens
        return self.kv.num_free_tokens >= needed

    def _admit(self, state: RequestState, hit: int) -> None:
        now = self.env.now
        state.status = Status.RUNNING
        state.num_computed_tokens = hit
        self._admit_counter += 1
        state.admit_order = self._admit_counter
        if state.first_scheduled_s is None:
            state.first_scheduled_s = now
            state.cached_tokens_first = hit
        self.recorder.on_admit(state, hit, now, getattr(self.kv, "block_size", 1))
        self.running.append(state)

    def _pick_victim(self) -> RequestState:
        if self.config.scheduling_policy == "priority":
            return max(self.running, key=lambda s: (s.request.priority, s.request.arrival_time_s))
        return self.running[-1]

    def _preempt(self, victim: RequestState) -> float:
        """Take `victim` off the GPU; returns the bytes copied to CPU memory (swap mode)."""
        config = self.config
        self.running.remove(victim)
        victim.num_preemptions += 1
        self.recorder.on_preempt(victim, self.env.now)
        swap_needed = victim.num_computed_tokens * config.kv_bytes_per_token
        # NOTE: swapping is vLLM V0's preemption mode (V1 only recomputes). When the CPU swap space is full,
        # kvsim recomputes the victim instead, where V0 stopped with an error.
        if (config.preemption_mode == "swap" and victim.num_computed_tokens
                and self.swap_used_bytes + swap_needed <= config.swap_space_bytes):
            self.kv.free(victim.seq)
            victim.seq = _fresh_sequence(victim.seq, victim.num_computed_tokens)
            victim.status = Status.SWAPPED
            victim.swapped_tokens = victim.num_computed_tokens
            self.swap_used_bytes += swap_needed
            self.swapped.append(victim)
            return float(swap_needed)
        self.kv.free(victim.seq)
        # Recompute: every known token (prompt and output so far) becomes the prompt of a new prefill.
        victim.seq = _fresh_sequence(victim.seq, victim.num_tokens)
        victim.num_computed_tokens = 0
        if config.scheduling_policy == "priority":
            # A priority queue keeps its order: the victim waits behind requests of higher priority.
            self._enqueue(victim)
        else:
            victim.status = Status.WAITING
            self.waiting.appendleft(victim)
        return 0.0

    def _order_by_prefix_match(self) -> None:
        # Longest cached prefix first (SGLang's `lpm`); ties keep arrival order.
        ranked = sorted(enumerate(self.waiting), key=lambda item: (-self.kv.lookup(item[1].seq), item[0]))
        self.waiting = deque(state for _, state in ranked)

    # ------------------------------------------------------------------ fast-forward over decode spans

    def _plan_span(self) -> int:
        """Decode steps that can run back to back with nothing but token growth; < 2 means step normally."""
        running = self.running
        if not running or self.swapped or len(running) > self.config.max_num_batched_tokens:
            return 0
        limit = None
        for state in running:
            # A span samples one token per step. A request that has not sampled its first token yet (its last
            # prompt token was left by chunked prefill) needs a step of its own, which records its TTFT.
            if (state.num_prompt_tokens + state.num_output_tokens - state.num_computed_tokens != 1
                    or not state.num_output_tokens):
                return 0
            remaining = state.output_tokens - state.num_output_tokens
            if limit is None or remaining < limit:
                limit = remaining
        # NOTE: the head's admissibility is judged at the span's start. Blocks that fill during the span
        # become cacheable and could raise the head's prefix hit before the span ends. The step-by-step
        # mode would then admit it a few steps earlier.
        if self.waiting and self._waiting_head_admissible():
            return 0
        if limit < 2:
            return 0
        steps = self.kv.max_decode_steps([s.seq for s in running], limit)
        if steps >= 2:
            self.capacity_blocked = bool(self.waiting)
        return steps

    def _waiting_head_admissible(self) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if self.config.scheduling_policy == "lpm":
            return True
        state = self.waiting[0]
        hit = self.kv.lookup(state.seq)
        budget = self.config.max_num_batched_tokens - len(self.running)
        n = state.num_tokens - hit
        if not self.config.enable_chunked_prefill and n > budget:
            return False
        return self._admissible(state, min(n, budget), hit)

    def _run_span(self, num_steps: int):
        running = self.running
        batch = len(running)
        context0 = sum(s.num_computed_tokens for s in running) + batch
        contexts = context0 + batch * np.arange(num_steps, dtype=np.int64)
        step_times = np.asarray(self.latency.decode_step_times_s(batch, contexts), dtype=float)
        ends = np.cumsum(step_times)
        start = self.env.now
        self.recorder.on_step_start(start, self, 0)

        self._in_span = True
        done_steps = num_steps
        target = start + ends[-1]
        while True:
            try:
                yield self.env.timeout(target - self.env.now)
                break
            except simpy.Interrupt:
                if done_steps == num_steps:
                    # Finish the step in flight, then stop the span at its end.
                    completed = int(np.searchsorted(ends, self.env.now - start, side="right"))
                    done_steps = min(completed + 1, num_steps)
                    target = start + ends[done_steps - 1]
        self._in_span = False

        finished = []
        first_token_s = start + ends[0]
        last_token_s = self.env.now
        first_gaps = np.empty(batch)
        for index, state in enumerate(running):
            ok = self.kv.allocate(state.seq, done_steps)
            assert ok, f"replica {self.replica_id}: span of {done_steps} steps exceeded the planned KV growth"
            state.num_computed_tokens += done_steps
            state.num_output_tokens += done_steps
            # The span's first token follows each sequence's own previous token; later ones follow the span.
            first_gaps[index] = first_token_s - state.last_token_s
            state.last_token_s = last_token_s
            if state.num_output_tokens >= state.output_tokens:
                finished.append(state)
        self.recorder.on_token_gaps(first_gaps)
        self.recorder.on_token_gaps(step_times[1:done_steps], weight=batch)
        self.recorder.on_span_end(self.env.now, step_times[:done_steps], batch, self)
        self._finish(finished)


def _fresh_sequence(seq: Sequence, num_tokens: int) -> Sequence:
    """Build a sequence whose prompt is the first `num_tokens` of `seq`, for re-admission after preemption."""
    final = seq.final_num_tokens
    all_ids = seq.token_ids(final)
    return Sequence(
        seq_id=seq.seq_id,
        prompt_token_ids=all_ids[:num_tokens],
        final_num_tokens=final,
        cache_salt=seq.cache_salt,
        output_token_ids=all_ids[num_tokens:],
    )
