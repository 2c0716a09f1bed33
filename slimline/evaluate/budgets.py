"""Budgets: the limits a compressed model must stay within, checked per target.

A budget whose figure is missing fails: a CI gate that passes because nothing was measured is worse
than none. A required target that could not run here fails too; an optional one is listed as skipped.
"""

from __future__ import annotations

from typing import Any

from slimline.recipe import Budgets, Limits, parse_accuracy_limit

# metrics where a larger value is worse, so a "drop" is an increase
LOWER_IS_BETTER = {"perplexity", "max_abs_error"}

# simple budgets: field -> (summary key, direction); "max": value <= limit passes
SIMPLE = {
    "max_fidelity_drop": ("fidelity_drop", "max"),
    "min_top10_overlap": ("top10_overlap", "min"),
    "min_speedup": ("speedup", "min"),
    "min_traffic_speedup": ("traffic_speedup", "min"),
    "max_size_mb": ("size_mb", "max"),
    "max_peak_rss_mb": ("peak_rss_mb", "max"),
    "max_gpu_memory_mb": ("peak_gpu_mb", "max"),
}


def _row(
    name: str, target: str, limit: Any, value: Any, direction: str, note: str = "", bound: float | None = None
) -> dict[str, Any]:
    """``limit`` is shown as written ('2%'); ``bound`` is the number compared, when they differ."""
    if value is None:
        return {
            "name": name,
            "target": target,
            "limit": limit,
            "value": None,
            "passed": False,
            "note": note or "not measured in this run",
        }
    bound = limit if bound is None else bound
    passed = value <= bound if direction == "max" else value >= bound
    return {"name": name, "target": target, "limit": limit, "value": value, "passed": bool(passed), "note": note}


def accuracy_drop(metric: str, base: float | None, new: float | None, relative: bool) -> float | None:
    if base is None or new is None:
        return None
    drop = (new - base) if metric in LOWER_IS_BETTER else (base - new)
    if relative:
        return drop / abs(base) if base else float("inf") if drop > 0 else 0.0
    return drop


def check_limits(limits: Limits, target: str, figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, (key, direction) in SIMPLE.items():
        limit = getattr(limits, name)
        if name == "max_gpu_memory_mb" and not target.endswith("cuda"):
            continue  # a GPU budget says nothing about a CPU target
        if limit is not None:
            rows.append(_row(name, target, limit, figures.get(key), direction))
    for metric, raw in limits.max_accuracy_drop.items():
        amount, relative = parse_accuracy_limit(raw)
        base = figures.get("baseline_accuracy", {}).get(metric)
        new = figures.get("accuracy", {}).get(metric)
        drop = accuracy_drop(metric, base, new, relative)
        note = "" if drop is not None else f"metric `{metric}` not measured (have: {', '.join(figures.get('accuracy', {}))})"
        rows.append(
            _row(f"max_accuracy_drop.{metric}", target, raw, None if drop is None else round(drop, 6), "max", note, amount)
        )
    p95 = limits.max_latency_ms_p95
    if p95 is not None:
        measured = {int(b): v for b, v in (figures.get("latency_ms_p95") or {}).items()}
        wanted = p95 if isinstance(p95, dict) else ({min(measured): p95} if measured else {1: p95})
        for batch, limit in wanted.items():
            rows.append(_row(f"max_latency_ms_p95.b{batch}", target, limit, measured.get(int(batch)), "max"))
    return rows


def check_budgets(
    budgets: Budgets, summary: dict[str, dict[str, Any]], skipped: list[dict[str, str]] = (), required: list[str] = ()
) -> list[dict[str, Any]]:
    """One row per (budget, target): name, target, limit, value, passed, note."""
    rows = []
    for target, figures in summary.items():
        rows += check_limits(budgets.for_target(target), target, figures)
    for s in skipped:
        if s["target"] in required:
            rows.append(
                {
                    "name": "target_available",
                    "target": s["target"],
                    "limit": "required",
                    "value": None,
                    "passed": False,
                    "note": s["reason"],
                }
            )
    return rows
