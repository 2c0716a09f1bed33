"""Budgets: the limits a compressed model must stay within. A budget whose figure is missing fails:
a CI gate that passes because nothing was measured is worse than none."""

from __future__ import annotations

from typing import Any

# budget field -> (report summary key, direction): "max" means value <= limit passes
BUDGETS = {
    "max_fidelity_drop": ("fidelity_drop", "max"),
    "min_top10_overlap": ("top10_overlap", "min"),
    "min_speedup": ("speedup", "min"),
    "max_size_mb": ("size_mb", "max"),
    "max_peak_rss_mb": ("peak_rss_mb", "max"),
}


def check_budgets(budgets: dict[str, float | None], summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (budget, target): name, limit, value, passed. ``summary`` is per target."""
    rows = []
    for name, limit in budgets.items():
        if limit is None:
            continue
        key, direction = BUDGETS[name]
        for target, figures in summary.items():
            value = figures.get(key)
            if value is None:
                passed, note = False, f"`{key}` was not measured for {target}"
            else:
                passed = value <= limit if direction == "max" else value >= limit
                note = ""
            rows.append({"name": name, "target": target, "limit": limit, "value": value, "passed": passed, "note": note})
    return rows
