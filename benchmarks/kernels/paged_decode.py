"""Compare every decode attention path, paged and contiguous, at one shape and several context lengths.

    python benchmarks/kernels/paged_decode.py --device cpu --threads 2 --contexts 1024 4096

The paths are timed in turn, one repetition of each per round, so that load from other processes
affects them alike. The table gives medians in ms and the best paged time over the best contiguous
one. Every path is first checked against a float64 reference, as in the calibration pass.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from calibrate.measure import CacheFlush, resolve_device
from calibrate.paths import decode_paths
from calibrate.plan import make_plan
from calibrate.sweeps import (
    Context,
    compare_paged_contiguous,
    measure_device_limits,
    run_reference_checks,
    tune_scratch,
)
from kvsim.models import ModelSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--reps", type=int, default=15, help="rounds of interleaved repetitions")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    plan = dataclasses.replace(make_plan(device.type, quick=True), comparison_batch=args.batch,
                               comparison_contexts=tuple(args.contexts), reps=args.reps, max_reps=2 * args.reps)
    shape = ModelSpec(name="benchmark", num_layers=1, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                      head_dim=args.head_dim, hidden_size=args.heads * args.head_dim, intermediate_size=1,
                      vocab_size=1)

    ctx = Context(device=device, plan=plan, progress=lambda message: print(f"... {message}", flush=True),
                  flush=CacheFlush(device))
    ctx.limits = measure_device_limits(ctx)
    paths = decode_paths(device)
    _, failures = run_reference_checks(ctx, paths)
    for path, error in failures.items():
        print(f"left out {path}: {error}")
    paths = [path for path in paths if path not in failures]
    tune_scratch(ctx, shape, paths)
    comparisons = compare_paged_contiguous(ctx, shape, paths)

    print(f"\n{device.type}, {plan.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}; batch "
          f"{args.batch}, {args.heads} query / {args.kv_heads} KV heads of {args.head_dim}, block size "
          f"{plan.block_size}; chunk buffers {ctx.scratch_bytes}")
    print(f"{'path':22}" + "".join(f"{c.context_tokens:>12}" for c in comparisons))
    for path in paths:
        print(f"{path:22}" + "".join(f"{c.times_s[path] * 1e3:12.2f}" for c in comparisons))
    print(f"{'paged / contiguous':22}" + "".join(f"{c.latency_ratio:12.2f}" for c in comparisons))


if __name__ == "__main__":
    main()
