#!/usr/bin/env bash
# Check the calibration pass on a CUDA machine, offline, in under 8 minutes.
#
#   bash calibrate/device_check.sh [OUTPUT_DIR]
#
# Runs from the repository root with the Python already installed there, and downloads nothing.
# 1. The full calibration pass on cuda. Its reference checks compare every kernel path, the Triton
#    paged kernel included, with a float64 reference before timing it.
# 2. The calibrate tests, which on CUDA also run the Triton kernel's own checks.
# 3. A summary of paged against contiguous decode and of the fit errors.
# Outputs go to OUTPUT_DIR, else $OUT, else ./device-check.
#
# Environment: MODEL (preset name, default Llama-3.1-8B), PYTHON (default python3),
# PASS_TIMEOUT_S (default 300), TEST_TIMEOUT_S (default 75). With the 90 s quick pass that follows a
# failed full one, the worst case stays under 8 minutes.

set -uo pipefail

out_dir="${1:-${OUT:-device-check}}"
model="${MODEL:-Llama-3.1-8B}"
python="${PYTHON:-python3}"
pass_timeout_s="${PASS_TIMEOUT_S:-300}"
test_timeout_s="${TEST_TIMEOUT_S:-75}"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
profile="$out_dir/cuda-${model}.json"
status=0

# 1. What this machine has. Stop early when torch cannot see a GPU: nothing below would mean anything.
{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "nvidia-smi not found"
    "$python" - <<'EOF'
import importlib.util, sys
import torch
print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
triton = importlib.util.find_spec("triton")
print("triton", __import__("triton").__version__ if triton else "not installed")
for name in ("numpy", "pydantic", "rich", "pytest"):
    print(name, "found" if importlib.util.find_spec(name) else "MISSING")
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
} >"$out_dir/env.txt" 2>&1
env_status=$?
cat "$out_dir/env.txt"
if [ "$env_status" -ne 0 ]; then
    echo "device check: torch sees no CUDA device (or failed to import); see $out_dir/env.txt" >&2
    exit 2
fi

# 2. The full pass on cuda: reference checks, paged vs contiguous, sweeps and fit.
echo "== calibration pass ($model, cuda, limit ${pass_timeout_s}s)"
timeout "$pass_timeout_s" "$python" -m calibrate.run --model "$model" --device cuda --out "$profile" \
    >"$out_dir/calibrate.log" 2>&1
pass_status=$?
tail -n 40 "$out_dir/calibrate.log"
if [ "$pass_status" -ne 0 ]; then
    echo "device check: the full pass failed or timed out (exit $pass_status); trying --quick" >&2
    status=1
    profile="$out_dir/cuda-${model}-quick.json"
    timeout 90 "$python" -m calibrate.run --model "$model" --device cuda --quick --out "$profile" \
        >>"$out_dir/calibrate.log" 2>&1 || echo "device check: the quick pass failed too" >&2
fi

# 3. The calibrate tests; on CUDA they include the Triton kernel against the float64 reference.
if "$python" -c "import pytest" 2>/dev/null; then
    echo "== calibrate tests (limit ${test_timeout_s}s)"
    timeout "$test_timeout_s" "$python" -m pytest tests/calibrate -q -p no:cacheprovider \
        >"$out_dir/pytest.log" 2>&1 || status=1
    tail -n 15 "$out_dir/pytest.log"
else
    echo "pytest is not installed; the pass's own reference checks stand in for the tests" >"$out_dir/pytest.log"
fi

# 4. Paged against contiguous, and every reference check, from the profile.
if [ -f "$profile" ]; then
    "$python" - "$profile" >"$out_dir/summary.txt" 2>&1 <<'EOF' || status=1
import sys
from kvsim.profile import load_profile

profile = load_profile(sys.argv[1])
print(f"{profile.device}, {profile.dtype}, torch {profile.torch_version}, pass {profile.duration_s:.0f} s")
for name, path in profile.kernel_paths.items():
    state = "ok" if path.available else f"LEFT OUT: {path.error}"
    print(f"  {name:22} gathers_first={path.gathers_first!s:5} {state}")
failed = [c for c in profile.reference_checks if not c.passed]
print(f"reference checks: {len(profile.reference_checks) - len(failed)}/{len(profile.reference_checks)} passed")
for check in failed:
    print(f"  FAILED {check.path}: {check.case}: {check.max_abs_error:.3g} > {check.tolerance:.3g}")
for c in profile.paged_vs_contiguous:
    times = ", ".join(f"{name} {t * 1e3:.3f} ms ({c.bandwidth_fractions[name]:.0%} of copy)"
                      for name, t in c.times_s.items())
    print(f"context {c.context_tokens}: paged/contiguous {c.latency_ratio:.2f} "
          f"({c.best_paged_path} / {c.best_contiguous_path}); {times}")
print(f"fit: median {profile.fit.median_abs_pct_error:.1%}, p90 {profile.fit.p90_abs_pct_error:.1%}")
for op, error in profile.fit.per_op.items():
    print(f"  {op}: median {error.median_abs_pct_error:.1%}, p90 {error.p90_abs_pct_error:.1%}")
sys.exit(1 if failed else 0)
EOF
    cat "$out_dir/summary.txt"
else
    echo "device check: no profile was written" >&2
    status=1
fi
exit "$status"
