"""The interface between a workload and the engine, and the factory that builds one from its spec."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import simpy

from kvsim.workload.request import Request
from kvsim.workload.spec import ClosedLoopWorkload, OpenLoopWorkload, TraceWorkload
from kvsim.workload.streams import RandomStreams
from kvsim.workload.synthetic import ClosedLoopSource, OpenLoopSource
from kvsim.workload.traces import TraceSource


@runtime_checkable
class WorkloadSource(Protocol):
    """A source of requests for one simulation.

    `start` registers SimPy processes that call `submit(request)` at each arrival. `submit` returns
    an event that the engine succeeds with the finished request. Open-loop and trace sources ignore
    it, while closed-loop users and multi-turn sessions wait for it before their next turn.
    """

    kind: str

    def start(self, env: simpy.Environment, submit: Callable[[Request], simpy.Event]) -> None:
        """Register the processes that submit requests. They end when the workload does."""
        ...

    def iter_requests(self) -> Iterator[Request]:
        """Yield the requests without an engine, in arrival order, for analysis.

        Closed-loop and session turns are timed as if every reply were instant.
        """
        ...

    def describe(self) -> dict[str, Any]:
        """Summary for reports: `kind`, `num_requests` (None when it depends on the run), mean lengths."""
        ...

    def expected_mean_request_tokens(self) -> float:
        """Mean prompt plus reply tokens per request."""
        ...


def build_workload(
    spec: ClosedLoopWorkload | OpenLoopWorkload | TraceWorkload, *, seed: int, base_dir: Path
) -> WorkloadSource:
    """Build the source for a `workload:` spec.

    `seed` drives every random draw (trace replays draw nothing). `base_dir` is the scenario file's
    folder, against which trace paths are resolved.
    """
    streams = RandomStreams(seed)
    if isinstance(spec, ClosedLoopWorkload):
        return ClosedLoopSource(spec, streams)
    if isinstance(spec, OpenLoopWorkload):
        return OpenLoopSource(spec, streams, base_dir=Path(base_dir))
    if isinstance(spec, TraceWorkload):
        return TraceSource(spec, base_dir=Path(base_dir))
    raise TypeError(f"unknown workload spec {type(spec).__name__}")
