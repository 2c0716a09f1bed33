"""Latency and throughput, measured side by side.

This machine's speed drifts by ~1.5x within an hour, so absolute times from different moments can't
be compared. Every variant is timed in the same process, interleaved run by run (ABBA order, so a
drift hits both alike), and only medians and their ratios are reported as results.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from slimline.runtime import Feeds


def cpu_busy(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy with *other* work, sampled while this process sleeps (Linux only).

    The load average would count our own fidelity pass that just ran; this does not.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return idle, sum(fields)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return round(1 - (idle1 - idle0) / total, 3) if total > 0 else None


def fixed_batch(tokenizer: Any, texts: list[str], batch: int, seq_len: int) -> Feeds:
    """``batch`` real texts padded (or truncated) to exactly ``seq_len`` tokens."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def time_interleaved(runners: list[Any], feeds: Feeds, warmup: int, repeats: int, step=None) -> dict[str, list[float]]:
    """Seconds per run for each runner, ``repeats`` times, interleaved in ABBA order."""
    for runner in runners:
        for _ in range(warmup):
            runner.run({k: feeds[k] for k in runner.input_names if k in feeds})
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(repeats):
        order = runners if rep % 2 == 0 else runners[::-1]
        for runner in order:
            f = {k: feeds[k] for k in runner.input_names if k in feeds}
            t0 = time.perf_counter()
            runner.run(f)
            times[runner.name].append(time.perf_counter() - t0)
            if step is not None:
                step.advance()
    return times


def summarize(seconds: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    p50 = float(np.percentile(ms, 50))
    return {
        "latency_ms_p50": round(p50, 3),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "throughput_per_s": round(batch / (p50 / 1000), 2) if p50 > 0 else 0.0,
    }
