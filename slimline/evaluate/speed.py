"""Encoder latency and throughput, measured side by side with the baseline.

Built on the measurement floor's one interleaved timer (``slimline.measure.timer``): fixed batches
time every runner with ``interleave``; real traffic interleaves the runners batch by batch in ABBA
order, so host-device copies and dynamic padding count as they would in serving.
"""

from __future__ import annotations

import time
from typing import Any

from slimline.measure.timer import abba, interleave
from slimline.runtime import Feeds


def time_runners(runners: list[Any], feeds: Feeds, warmup: int, repeats: int, step=None) -> dict[str, list[float]]:
    """Seconds per run for each runner on ``feeds``, ``repeats`` rounds in ABBA order (IO bound once)."""
    timers = {r.name: r.make_timer({k: feeds[k] for k in r.input_names if k in feeds}) for r in runners}
    return interleave({name: timer for name, timer in timers.items()}, repeats, warmup, step, timed_by_call=True)


def time_traffic(runners: list[Any], batches: list[Feeds], passes: int, step=None) -> dict[str, dict[str, Any]]:
    """Per runner: seconds of each batch and of each whole pass; batches interleaved ABBA across runners.

    Uses ``runner.run`` (numpy in, numpy out), so host-device copies count, as they would in serving.
    """
    by_name = {r.name: r for r in runners}
    per_batch: dict[str, list[float]] = {r.name: [] for r in runners}
    per_pass: dict[str, list[float]] = {r.name: [] for r in runners}
    for runner in runners:  # warm-up on the largest batch shape
        runner.run({k: batches[-1][k] for k in runner.input_names if k in batches[-1]})
    for p in range(passes):
        totals = {r.name: 0.0 for r in runners}
        for i, feeds in enumerate(batches):
            for name in abba(list(by_name), i + p):
                runner = by_name[name]
                f = {k: feeds[k] for k in runner.input_names if k in feeds}
                t0 = time.perf_counter()
                runner.run(f)
                dt = time.perf_counter() - t0
                per_batch[name].append(dt)
                totals[name] += dt
                if step is not None:
                    step.advance()
        for name, total in totals.items():
            per_pass[name].append(total)
    return {r.name: {"batch_s": per_batch[r.name], "pass_s": per_pass[r.name]} for r in runners}
