"""The one interleaved timer.

This machine's speed drifts by ~1.5x within an hour, so absolute times from different moments can't
be compared. Every variant is timed in the same process, interleaved run by run in ABBA order (the
order reverses every round, so a drift hits all variants alike), and only medians and their ratios
are reported as results. Every stage, evaluator and benchmark that times something uses ``interleave``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def abba(names: Sequence[str], round_: int) -> list[str]:
    """The order of one round: forward on even rounds, reversed on odd ones (A B, B A, A B, ...)."""
    return list(names) if round_ % 2 == 0 else list(names)[::-1]


def interleave(
    calls: dict[str, Callable[[], Any]], repeats: int, warmup: int = 0, step: Any = None, timed_by_call: bool = False
) -> dict[str, list[float]]:
    """Seconds per call for each named zero-argument call, ``repeats`` rounds in ABBA order, after
    ``warmup`` untimed calls each. ``step.advance()`` is called after every timed call (progress).

    With ``timed_by_call`` each call returns its own seconds (a CUDA-event timer, which measures the
    device's work and not the host's wait); otherwise the wall time around the call is taken."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for round_ in range(repeats):
        for name in abba(names, round_):
            start = time.perf_counter()
            result = calls[name]()
            times[name].append(float(result) if timed_by_call else time.perf_counter() - start)
            if step is not None:
                step.advance()
    return times


def median(seconds: Sequence[float]) -> float:
    return float(statistics.median(seconds))


def summarize(seconds: Sequence[float], batch: int) -> dict[str, float]:
    """Latency percentiles (ms) and throughput (items per second at the median) of timed runs."""
    ms = np.asarray(seconds) * 1000
    p50 = float(np.percentile(ms, 50))
    return {
        "latency_ms_p50": round(p50, 3),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "throughput_per_s": round(batch / (p50 / 1000), 2) if p50 > 0 else 0.0,
    }


def cpu_busy(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy with *other* work, sampled while this process sleeps (Linux only).

    The load average would count our own fidelity pass that just ran; this does not. Nor does it
    count this process's own threads that are still spinning after that pass (torch's OpenMP pool,
    ORT's workers): their CPU time is subtracted. Without that, an idle machine read 10% busy.
    """
    import os

    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def sample() -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        own = os.times()
        return idle, sum(fields), (own.user + own.system) * tick

    try:
        idle0, total0, own0 = sample()
        time.sleep(interval)
        idle1, total1, own1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    busy = (total - (idle1 - idle0)) - (own1 - own0)
    return round(min(max(busy / total, 0.0), 1.0), 3) if total > 0 else None
