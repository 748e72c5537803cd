"""A cluster of replicas behind a router, fed by a workload through `submit`."""

from __future__ import annotations

from collections.abc import Callable

import simpy

from kvsim.engine.latency import LatencyModel
from kvsim.engine.replica import Replica, SchedulerConfig
from kvsim.engine.router import Router
from kvsim.engine.state import RequestState
from kvsim.kvcache.base import KVCacheManager, Sequence
from kvsim.metrics import RunRecorder
from kvsim.workload.request import Request


class Cluster:
    """Replicas of one engine configuration; `submit` routes a request and returns its completion event."""

    def __init__(self, env: simpy.Environment, *, num_replicas: int, make_kv: Callable[[], KVCacheManager],
                 latency: LatencyModel, config: SchedulerConfig, recorder: RunRecorder,
                 router: str = "round_robin", router_load_guard: int = 8):
        self.env = env
        self.config = config
        self.recorder = recorder
        self.replicas = [
            Replica(env, i, make_kv(), latency, config, recorder.replica(i)) for i in range(num_replicas)
        ]
        self.router = Router(router, self.replicas, load_guard=router_load_guard)
        self.last_finish_s = 0.0
        self.first_arrival_s: float | None = None
        self._next_seq_id = 0

    def submit(self, request: Request) -> simpy.Event:
        """Route `request` to a replica; the returned event fires with its `RequestState` when it ends."""
        if self.first_arrival_s is None:
            self.first_arrival_s = self.env.now
        output_tokens = min(request.output_tokens, max(self.config.max_model_len - request.prompt_tokens, 1))
        if output_tokens != request.output_tokens:
            # NOTE: vLLM stops a sequence at max_model_len; the reply is cut to fit, as there.
            request.output_tokens = output_tokens
        # NOTE: parallel sampling (n > 1) runs as n sequences with the same prompt, as vLLM V1 does: they
        # share full prompt blocks through the prefix cache only, each holding its own partial last block.
        states = []
        for sample in range(request.n):
            seq = Sequence(
                seq_id=self._next_seq_id,
                prompt_token_ids=request.prompt_token_ids,
                final_num_tokens=request.prompt_tokens + request.output_tokens,
                cache_salt=request.cache_salt,
                output_token_ids=request.output_token_ids if sample == 0 else None,
                output_key=request.request_id if sample == 0 else (request.request_id, sample),
            )
            self._next_seq_id += 1
            done = self.env.event()
            done.callbacks.append(self._on_done)
            states.append(RequestState(request=request, seq=seq, done=done))
        replica = self.router.choose(states[0])
        for state in states:
            replica.add_request(state)
        if len(states) == 1:
            return states[0].done
        all_done = self.env.event()
        self.env.all_of([state.done for state in states]).callbacks.append(
            lambda _: all_done.succeed(states[0]))
        return all_done

    def _on_done(self, event: simpy.Event) -> None:
        self.last_finish_s = max(self.last_finish_s, self.env.now)
