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


def fixed_batch(tokenizer: Any, texts: list[str], batch: int, seq_len: int) -> Feeds:
    """``batch`` real texts padded (or truncated) to exactly ``seq_len`` tokens."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def abba_medians(calls: list[Any], repeats: int) -> list[float]:
    """Median seconds of each zero-argument call, ``repeats`` times each, interleaved in ABBA order."""
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    for rep in range(repeats):
        for i in order if rep % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def time_interleaved(runners: list[Any], feeds: Feeds, warmup: int, repeats: int, step=None) -> dict[str, list[float]]:
    """Seconds per run for each runner, ``repeats`` times, interleaved in ABBA order."""
    timers = {r.name: r.make_timer({k: feeds[k] for k in r.input_names if k in feeds}) for r in runners}
    for runner in runners:
        for _ in range(warmup):
            timers[runner.name]()
    times: dict[str, list[float]] = {r.name: [] for r in runners}
    for rep in range(repeats):
        for runner in runners if rep % 2 == 0 else runners[::-1]:
            times[runner.name].append(timers[runner.name]())
            if step is not None:
                step.advance()
    return times


def traffic_batches(tokenizer: Any, texts: list[str], batch: int, max_length: int) -> list[Feeds]:
    """The texts in arrival order, in batches padded only to their longest member (as a server batches)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out.append({k: v.astype(np.int64) for k, v in enc.items()})
    return out


def time_traffic(runners: list[Any], batches: list[Feeds], passes: int, step=None) -> dict[str, dict[str, Any]]:
    """Per runner: seconds of each batch and of each whole pass; batches interleaved ABBA across runners.

    Uses ``runner.run`` (numpy in, numpy out), so host-device copies count, as they would in serving.
    """
    per_batch: dict[str, list[float]] = {r.name: [] for r in runners}
    per_pass: dict[str, list[float]] = {r.name: [] for r in runners}
    for runner in runners:  # warm-up on the largest batch shape
        runner.run({k: batches[-1][k] for k in runner.input_names if k in batches[-1]})
    for p in range(passes):
        totals = {r.name: 0.0 for r in runners}
        for i, feeds in enumerate(batches):
            for runner in runners if (i + p) % 2 == 0 else runners[::-1]:
                f = {k: feeds[k] for k in runner.input_names if k in feeds}
                t0 = time.perf_counter()
                runner.run(f)
                dt = time.perf_counter() - t0
                per_batch[runner.name].append(dt)
                totals[runner.name] += dt
                if step is not None:
                    step.advance()
        for name, total in totals.items():
            per_pass[name].append(total)
    return {r.name: {"batch_s": per_batch[r.name], "pass_s": per_pass[r.name]} for r in runners}


def summarize(seconds: list[float], batch: int) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    p50 = float(np.percentile(ms, 50))
    return {
        "latency_ms_p50": round(p50, 3),
        "latency_ms_p95": round(float(np.percentile(ms, 95)), 3),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "throughput_per_s": round(batch / (p50 / 1000), 2) if p50 > 0 else 0.0,
    }
