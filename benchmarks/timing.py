"""Wall time and peak memory of a callable: the one measurement every benchmark script uses."""

from __future__ import annotations

import logging
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

log = logging.getLogger(__name__)


class Timing(NamedTuple):
    median_ms: float
    peak_mem_mb: float
    last: Any  # what the last timed call returned
    times_ms: tuple[float, ...] = ()  # every timed call, in order

    def fields(self, prefix: str = "") -> dict:
        """The spread of the timed calls as JSON fields (see :func:`spread`)."""
        return spread(self.times_ms, prefix)


def spread(times_ms, prefix: str = "") -> dict:
    """``{median_ms, min_ms, max_ms, repeats, threads}`` of a list of wall times (ms): the fields
    every benchmark line carries, so a figure comes with how far its runs scattered; ``threads`` is
    the intra-op thread count the runs had (CPU timings depend on it). ``prefix`` names a part of
    a run (e.g. ``sampling_``); the thread count is not prefixed."""
    times_ms = list(times_ms)
    if not times_ms:
        raise ValueError("spread: no timed runs (repeats must be at least 1)")
    return {
        f"{prefix}median_ms": round(statistics.median(times_ms), 2),
        f"{prefix}min_ms": round(min(times_ms), 2),
        f"{prefix}max_ms": round(max(times_ms), 2),
        f"{prefix}repeats": len(times_ms),
        "threads": torch.get_num_threads(),
    }


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when given: on a machine shared with other jobs, fixed threads
    keep CPU timings comparable (contention makes them several times slower)."""
    if threads:
        torch.set_num_threads(threads)


def current_rss_mb() -> float:
    """The process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> bool:
    """Set the process's peak RSS (VmHWM) back to its current RSS (Linux ≥ 4.0: ``clear_refs`` 5);
    False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """The process's peak RSS since it started or since :func:`reset_peak_rss`."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> Timing:
    """Median (and spread, ``Timing.fields``) of the wall times of ``repeats`` calls of ``fn()``
    after ``warmup`` untimed ones.

    Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during the timed calls (weights
    included); on the CPU how far the process's RSS rose above its level before them at its peak,
    i.e. the activations' high-water mark (the peak is reset first, so building the model does
    not count).
    """
    if repeats < 1:
        raise ValueError(f"measure: repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = current_rss_mb()
    if device.type == "cpu" and not reset_peak_rss():
        log.warning("cannot reset the peak RSS here; CPU peak memory may include earlier allocations")
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = max(0.0, peak_rss_mb() - rss_before)
    return Timing(statistics.median(times), peak, result, tuple(times))
