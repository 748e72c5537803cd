"""Speed and memory of the simulator: simulated requests per wall-second and peak RSS.

Each case runs in a fresh Python process so that its peak RSS is its own. Run from the repository root:

    python benchmarks/bench_simulator.py              # every case
    python benchmarks/bench_simulator.py azure-10k    # one case

The cases:
- flagship-3: scenarios/shared-prompt-1000-users.yaml, base model only, contiguous + paged + paged+prefix.
- azure-10k: 10,000 requests of Llama-2-70B at TP2 on an A100-80GB, prompt and reply lengths of the
  Azure 2023 code trace in order, Poisson arrivals at 1 request/s, the paged strategy.
- trace-1k / trace-10k / trace-100k: a generic CSV trace replay (Azure lengths, Poisson arrival times
  at 2 requests/s) of Llama-3.1-8B on one H100, paged; the trace file is generated in a temporary folder.
"""

from __future__ import annotations

import csv
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from kvsim.scenario import Scenario, load_scenario, validate_scenario
from kvsim.simulation import simulate
import yaml

path, changes = sys.argv[1], json.loads(sys.argv[2])
scenario = load_scenario(path)
if changes:
    scenario = scenario.with_changes(changes)
start = time.perf_counter()
result = simulate(scenario)
wall = time.perf_counter() - start
runs = {r.run.key: {"requests_completed": r.summary["requests_completed"],
                    "requests_rejected": r.summary["requests_rejected"],
                    "num_steps": r.summary["num_steps"], "wall_time_s": r.wall_time_s,
                    "simulated_time_s": r.summary["simulated_time_s"]} for r in result.runs}
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"wall_time_s": wall, "peak_rss_mib": peak_kib / 1024, "runs": runs}))
"""


def _azure_lengths() -> list[tuple[int, int]]:
    with open(ROOT / "scenarios" / "traces" / "azure_llm_2023_code.csv") as handle:
        return [(int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in csv.DictReader(handle)]


def _write_generic_trace(path: Path, num_requests: int, rate_per_s: float) -> None:
    import numpy as np

    lengths = _azure_lengths()
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_per_s, num_requests))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for i in range(num_requests):
            prompt, output = lengths[i % len(lengths)]
            writer.writerow([f"{arrivals[i]:.6f}", prompt, max(output, 1)])


def _trace_scenario(folder: Path, num_requests: int) -> Path:
    trace = folder / f"trace-{num_requests}.csv"
    _write_generic_trace(trace, num_requests, rate_per_s=2.0)
    scenario = folder / f"trace-{num_requests}.yaml"
    scenario.write_text(f"""
name: trace-{num_requests}
model: Llama-3.1-8B
gpu: H100-SXM
engine: {{max_model_len: 8192}}
strategies: [paged]
workload: {{kind: trace, path: {trace.name}, format: generic}}
simulation: {{timeline_interval_s: 10.0}}
""")
    return scenario


def _azure_10k_scenario(folder: Path) -> Path:
    scenario = folder / "azure-10k.yaml"
    azure = ROOT / "scenarios" / "traces" / "azure_llm_2023_code.csv"
    scenario.write_text(f"""
name: azure-10k
model: Llama-2-70B
gpu: A100-80GB
engine: {{tp: 2, max_model_len: 4096}}
strategies: [paged]
workload:
  kind: open_loop
  num_requests: 10000
  arrival: {{process: poisson, rate_per_s: 1.0}}
  lengths_from_trace: {{path: {azure}, format: azure}}
simulation: {{timeline_interval_s: 10.0}}
""")
    return scenario


def cases(folder: Path) -> dict[str, tuple[Path, dict]]:
    flagship = ROOT / "scenarios" / "shared-prompt-1000-users.yaml"
    return {
        "flagship-3": (flagship, {"strategies": ["contiguous", "paged", "paged+prefix"], "model.variants": []}),
        "azure-10k": (_azure_10k_scenario(folder), {}),
        "trace-1k": (_trace_scenario(folder, 1_000), {}),
        "trace-10k": (_trace_scenario(folder, 10_000), {}),
        "trace-100k": (_trace_scenario(folder, 100_000), {}),
    }


def run_case(path: Path, changes: dict) -> dict:
    output = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(changes)], check=True,
                            capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(selected: list[str]) -> None:
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}")
    print("| case | requests | wall time (s) | requests per wall-second | peak RSS (MiB) | steps |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, changes) in cases(Path(tmp)).items():
            if selected and name not in selected:
                continue
            result = run_case(path, changes)
            requests = sum(r["requests_completed"] + r["requests_rejected"] for r in result["runs"].values())
            steps = sum(r["num_steps"] for r in result["runs"].values())
            print(f"| {name} | {requests:,} | {result['wall_time_s']:.2f} | "
                  f"{requests / result['wall_time_s']:,.0f} | {result['peak_rss_mib']:.0f} | {steps:,} |",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
