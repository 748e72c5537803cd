"""Workloads: what requests arrive, when, and with which prompts.

`parse_workload` validates the `workload:` section of a scenario, `build_workload` turns it into a
source that submits requests to the engine, and `kvsim.workload.analysis` inspects traces.
"""

from kvsim.workload.request import Request
from kvsim.workload.source import WorkloadSource, build_workload
from kvsim.workload.spec import (
    ClosedLoopWorkload,
    OpenLoopWorkload,
    TraceWorkload,
    WorkloadSpec,
    parse_workload,
)
from kvsim.workload.traces import TraceSource, open_trace, read_trace_records

__all__ = [
    "ClosedLoopWorkload",
    "OpenLoopWorkload",
    "Request",
    "TraceSource",
    "TraceWorkload",
    "WorkloadSource",
    "WorkloadSpec",
    "build_workload",
    "open_trace",
    "parse_workload",
    "read_trace_records",
]
