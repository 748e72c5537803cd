"""Timing of one kernel call: warm-up, repetitions, median and interquartile range.

On CUDA each repetition is bracketed by CUDA events, which time the GPU work without the host's
launch jitter. On the CPU each repetition is timed with `time.perf_counter`; torch's CPU ops run
synchronously, so the call has finished when it returns.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Timing:
    """Repeated timings of one call, in seconds."""

    median_s: float
    iqr_s: float
    """Interquartile range: 75th minus 25th percentile."""
    num_reps: int

    @property
    def relative_iqr(self) -> float:
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0


def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the device's last-level cache: the GPU's L2, or the CPU's highest cache level (Linux sysfs).

    Falls back to 32 MiB where the size cannot be read.
    """
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    largest = (0, 0)
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/level") as handle:
                level = int(handle.read())
            with open(f"{index}/size") as handle:
                size = _parse_cache_size(handle.read().strip())
        except (OSError, ValueError):
            continue
        largest = max(largest, (level, size))
    return largest[1] or 32 << 20


def _parse_cache_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


class CacheFlush:
    """Overwrites a buffer twice the size of the last-level cache, to run before each timed repetition.

    A serving engine runs every layer's attention over that layer's own KV cache and every GEMM
    over that layer's weights, so each kernel starts with cold caches. Timing the same call over
    and over would instead serve a small cache or weight matrix from the CPU's L3 (or the GPU's L2)
    and make small shapes look faster per byte than they are in a forward pass. Triton's
    `do_bench` (python/triton/testing.py) likewise clears the GPU's L2 before every run.
    """

    def __init__(self, device: torch.device) -> None:
        self.buffer = torch.empty(2 * last_level_cache_bytes(device) // 4, dtype=torch.float32, device=device)

    def __call__(self) -> None:
        self.buffer.zero_()


def resolve_device(device: str) -> torch.device:
    """Map `auto` to cuda when a GPU is visible, else cpu; check that an explicit cuda is available."""
    from kvsim.errors import UserError

    name = device.lower().strip()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("device: cuda requested, but torch sees no CUDA device; use --device cpu or auto")
        return torch.device("cuda")
    raise UserError(f"device: unknown device {device!r}; use auto, cpu or cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int,
              max_reps: int | None = None, target_relative_iqr: float = 0.1,
              max_total_s: float | None = None, flush: Callable[[], object] | None = None) -> Timing:
    """Time `fn()` at least `reps` times after `warmup` untimed calls.

    While the interquartile range stays above `target_relative_iqr` of the median, up to
    `max_reps` repetitions are taken: on a CPU shared with other processes a few slow outliers
    then cannot move the median. `max_total_s` stops the repetitions early (keeping at least 3)
    when one call is slow, so a sweep over large shapes stays within its time budget. `flush`
    runs, untimed, before every repetition (see `CacheFlush`).
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    max_reps = max(reps, max_reps or reps)
    for _ in range(warmup):
        fn()
    synchronize(device)

    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < max_reps:
        samples.append(_time_once(fn, device, flush))
        if len(samples) >= 3 and max_total_s is not None and time.perf_counter() - started > max_total_s:
            break
        if len(samples) >= reps and _summarise(samples).relative_iqr <= target_relative_iqr:
            break
    return _summarise(samples)


def _summarise(samples: list[float]) -> Timing:
    q25, q50, q75 = np.percentile(np.asarray(samples), [25, 50, 75])
    return Timing(median_s=float(q50), iqr_s=float(q75 - q25), num_reps=len(samples))


def _time_once(fn: Callable[[], object], device: torch.device, flush: Callable[[], object] | None = None) -> float:
    if flush is not None:
        flush()
        synchronize(device)
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int,
                     reps: int, flush: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time several calls in turn, one repetition of each per round.

    Interleaving makes their ratio robust to load that comes and goes on a shared machine, because
    every call then runs under the same mix of quiet and busy moments.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device, flush))
    return {name: _summarise(values) for name, values in samples.items()}
