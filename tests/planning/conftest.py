"""Tiny scenarios for the planning and sweep tests: Llama-3.1-8B on an L40S with a small KV cache."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvsim.scenario import Scenario, validate_scenario

# 150 requests: with fewer, the p99 of a probe is nearly its slowest request, and SLO met turns
# noisy near the limit. With these settings SLO met is monotone in the rate on a 0.25 requests/s grid.
TINY_OPEN_LOOP: dict[str, Any] = {
    "name": "tiny-plan",
    "seed": 3,
    "model": "Llama-3.1-8B",
    "gpu": "L40S",
    "engine": {"max_model_len": 4096, "max_num_seqs": 64, "kv_capacity_tokens": 30000},
    "strategies": ["paged", "contiguous"],
    "workload": {
        "kind": "open_loop",
        "num_requests": 150,
        "arrival": {"process": "poisson", "rate_per_s": 2.0},
        "prompt": [{"name": "system", "tokens": 200, "shared": True},
                   {"name": "user", "tokens": {"dist": "uniform", "min": 20, "max": 300}}],
        "output_tokens": {"dist": "uniform", "min": 10, "max": 200},
    },
    "slo": {"ttft_s": 1.0, "tpot_s": 0.05},
}

TINY_CLOSED_LOOP: dict[str, Any] = {
    **TINY_OPEN_LOOP,
    "name": "tiny-plan-users",
    "strategies": ["paged"],
    "workload": {
        "kind": "closed_loop",
        "users": 4,
        "turns_per_user": 3,
        "think_time_s": {"dist": "exponential", "mean": 2.0},
        "prompt": [{"name": "user", "tokens": {"dist": "uniform", "min": 100, "max": 600}}],
        "output_tokens": {"dist": "uniform", "min": 20, "max": 200},
    },
    "slo": {"ttft_s": 0.3},
}


def with_dotted(data: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `data` with dotted-path settings replaced."""
    data = copy.deepcopy(data)
    for dotted, value in changes.items():
        target = data
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    return data


@pytest.fixture
def make_scenario() -> Callable[..., Scenario]:
    def make(changes: dict[str, Any] | None = None, *, base: dict[str, Any] = TINY_OPEN_LOOP) -> Scenario:
        return Scenario(validate_scenario(with_dotted(base, changes or {}), source="test"))

    return make


@pytest.fixture
def write_sweep(tmp_path: Path) -> Callable[..., Path]:
    """Write the tiny scenario and a sweep file over it into tmp_path; return the sweep file's path."""

    def write(grid: dict[str, list[Any]] | None = None, *, scenario_changes: dict[str, Any] | None = None,
              **fields: Any) -> Path:
        scenario = with_dotted(TINY_OPEN_LOOP, {"strategies": ["paged"], "workload.num_requests": 40,
                                                **(scenario_changes or {})})
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
        sweep = {"name": "tiny-sweep", "base": "base.yaml",
                 "grid": grid if grid is not None else {"engine.block_size": [16, 32]}, **fields}
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(sweep, sort_keys=False))
        return path

    return write
