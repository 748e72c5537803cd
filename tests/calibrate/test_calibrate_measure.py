"""Repetition counts and statistics of the kernel timer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from calibrate.measure import (  # noqa: E402
    CacheFlush,
    Timing,
    _parse_cache_size,
    last_level_cache_bytes,
    resolve_device,
    time_call,
    time_interleaved,
)
from kvsim.errors import UserError  # noqa: E402

CPU = torch.device("cpu")


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_stops_at_reps_when_spread_is_small():
    fn = Counter()
    timing = time_call(fn, CPU, warmup=2, reps=5, max_reps=20, target_relative_iqr=float("inf"))
    assert fn.calls == 2 + 5
    assert timing.num_reps == 5


def test_repeats_up_to_max_while_spread_is_wide():
    fn = Counter()
    timing = time_call(fn, CPU, warmup=0, reps=5, max_reps=12, target_relative_iqr=-1.0)
    assert fn.calls == 12
    assert timing.num_reps == 12


def test_time_budget_keeps_three_reps():
    fn = Counter()
    timing = time_call(fn, CPU, warmup=0, reps=10, max_total_s=0.0)
    assert timing.num_reps == 3


def test_interleaved_calls_each_path_per_round():
    first, second = Counter(), Counter()
    timings = time_interleaved({"first": first, "second": second}, CPU, warmup=1, reps=4)
    assert first.calls == second.calls == 5
    assert timings["first"].num_reps == 4


def test_relative_iqr():
    assert Timing(median_s=2.0, iqr_s=0.5, num_reps=5).relative_iqr == 0.25


def test_reps_must_be_positive():
    with pytest.raises(ValueError, match="reps must be at least 1"):
        time_call(Counter(), CPU, warmup=0, reps=0)


def test_device_names():
    assert resolve_device("cpu") == CPU
    assert resolve_device("AUTO").type in ("cpu", "cuda")
    with pytest.raises(UserError, match="unknown device 'tpu'; use auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_user_error():
    with pytest.raises(UserError, match="cuda requested, but torch sees no CUDA device"):
        resolve_device("cuda")


def test_flush_runs_before_every_repetition():
    fn, flush = Counter(), Counter()
    time_call(fn, CPU, warmup=2, reps=4, flush=flush)
    assert flush.calls == 4
    time_interleaved({"a": Counter(), "b": Counter()}, CPU, warmup=1, reps=3, flush=flush)
    assert flush.calls == 4 + 6


def test_cache_flush_covers_twice_the_cache():
    flush = CacheFlush(CPU)
    assert flush.buffer.numel() * 4 == 2 * last_level_cache_bytes(CPU)
    flush()
    assert not flush.buffer.any()


def test_cache_size_parsing():
    assert _parse_cache_size("32768K") == 32 << 20
    assert _parse_cache_size("2M") == 2 << 20
    assert _parse_cache_size("512") == 512
