"""Routers: which replica of a cluster serves an arriving request."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from kvsim.engine.replica import Replica
from kvsim.engine.state import RequestState
from kvsim.errors import UserError

ROUTERS = ("round_robin", "least_outstanding", "prefix_aware")


class Router:
    """Chooses a replica per request.

    - `round_robin`: replicas in turn.
    - `least_outstanding`: the replica with the fewest waiting, running and swapped requests.
    - `prefix_aware`: among replicas whose outstanding count is within `load_guard` of the least
      loaded, the one whose cache contains the longest prefix of the prompt (ties: fewer outstanding,
      then lower index). The guard keeps a hot prefix from piling every request on one replica, as
      cache-aware routers such as SGLang's do with their balance threshold.
    """

    def __init__(self, policy: str, replicas: SequenceOf[Replica], *, load_guard: int = 8):
        if policy not in ROUTERS:
            raise UserError(f"engine.router: unknown router {policy!r}; use one of {', '.join(ROUTERS)}")
        self.policy = policy
        self.replicas = list(replicas)
        self.load_guard = load_guard
        self._next = 0

    def choose(self, state: RequestState) -> Replica:
        replicas = self.replicas
        if len(replicas) == 1:
            return replicas[0]
        if self.policy == "round_robin":
            replica = replicas[self._next % len(replicas)]
            self._next += 1
            return replica
        loads = [r.num_outstanding for r in replicas]
        if self.policy == "least_outstanding":
            return replicas[min(range(len(replicas)), key=lambda i: (loads[i], i))]
        floor = min(loads)
        candidates = [i for i in range(len(replicas)) if loads[i] <= floor + self.load_guard]
        best = min(candidates, key=lambda i: (-replicas[i].kv.lookup(state.seq), loads[i], i))
        return replicas[best]
