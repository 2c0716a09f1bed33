"""Budgets: the limits a compressed model must stay within, and the one verdict every command gives.

The gate fails closed:
- a budget whose figure was not measured (or is not a finite number) fails;
- a required target that didn't run fails, whether it was skipped here or never asked for;
- a report in which no target was measured fails;
- budgets given on the command line only add or tighten: the recipe's budgets are always checked,
  and a command-line limit on the same figure is checked beside them, so the stricter one decides;
- a report without budgets is "no budgets", never "passed".

``run``, ``evaluate``, ``check``, ``inspect`` and ``compare`` all get their verdict from ``judge``,
so they can't disagree on the same report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slimline.evaluate.spec import Budgets, Limits, parse_accuracy_limit

# metrics where a larger value is worse, so a "drop" is an increase
LOWER_IS_BETTER = {"perplexity", "max_abs_error", "kl_divergence"}

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

PASSED, FAILED, NO_BUDGETS = "passed", "failed", "no budgets"


def finite(value: Any) -> float | None:
    """A finite measured figure, or None (unmeasured, or not a number a budget can be checked on)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _row(
    name: str, target: str, limit: Any, value: Any, direction: str, note: str = "", bound: float | None = None
) -> dict[str, Any]:
    """``limit`` is shown as written ('2%'); ``bound`` is the number compared, when they differ."""
    measured = finite(value)
    if measured is None:
        why = "not measured in this run" if value is None else f"not a finite number ({value!r})"
        return {"name": name, "target": target, "limit": limit, "value": None, "passed": False, "note": note or why}
    bound = finite(limit if bound is None else bound)
    passed = bound is not None and (measured <= bound if direction == "max" else measured >= bound)
    row = {"name": name, "target": target, "limit": limit, "value": value, "passed": bool(passed), "note": note}
    row["_bound"], row["_direction"] = bound, direction
    return row


def accuracy_drop(metric: str, base: float | None, new: float | None, relative: bool) -> float | None:
    base, new = finite(base), finite(new)
    if base is None or new is None:
        return None
    drop = (new - base) if metric in LOWER_IS_BETTER else (base - new)
    if relative:
        return drop / abs(base) if base else math.inf if drop > 0 else 0.0
    return drop


def check_limits(limits: Limits, target: str, figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, (key, direction) in SIMPLE.items():
        limit = getattr(limits, name)
        if name == "max_gpu_memory_mb" and not target.endswith("cuda"):
            continue  # a GPU budget says nothing about a CPU target
        if limit is not None:
            rows.append(_row(name, target, limit, figures.get(key), direction))
    accuracy = figures.get("accuracy") or {}
    for metric, raw in limits.max_accuracy_drop.items():
        amount, relative = parse_accuracy_limit(raw)
        drop = accuracy_drop(metric, (figures.get("baseline_accuracy") or {}).get(metric), accuracy.get(metric), relative)
        note = "" if drop is not None else f"metric `{metric}` not measured (have: {', '.join(accuracy) or 'none'})"
        value = None if drop is None else (round(drop, 6) if math.isfinite(drop) else drop)
        row = _row(f"max_accuracy_drop.{metric}", target, raw, value, "max", note, amount)
        row["_relative"] = relative
        rows.append(row)
    p95 = limits.max_latency_ms_p95
    if p95 is not None:
        measured = {}
        for b, v in (figures.get("latency_ms_p95") or {}).items():
            if str(b).isdigit():
                measured[int(b)] = v
        wanted = p95 if isinstance(p95, dict) else ({min(measured): p95} if measured else {1: p95})
        for batch, limit in wanted.items():
            rows.append(_row(f"max_latency_ms_p95.b{batch}", target, limit, measured.get(int(batch)), "max"))
    return rows


def check_budgets(
    budgets: Budgets,
    summary: dict[str, dict[str, Any]],
    skipped: list[dict[str, str]] = (),
    required: list[str] = (),
) -> list[dict[str, Any]]:
    """One row per (budget, measured target), one per required target that wasn't measured, and one
    if no target was measured at all."""
    rows = []
    for target, figures in summary.items():
        rows += check_limits(budgets.for_target(target), target, figures if isinstance(figures, dict) else {})
    reasons = {s.get("target"): s.get("reason", "") for s in skipped}
    for target, figures in summary.items():  # a GPU target's nodes that ONNX Runtime ran on the CPU instead
        nodes = figures.get("cpu_fallback_nodes") if isinstance(figures, dict) else None
        if nodes is not None and target in required:
            note = "placed on the CPU EP: " + ", ".join(nodes[:10]) + (f" and {len(nodes) - 10} more" if len(nodes) > 10 else "")
            rows.append(
                {"name": "cpu_fallback_nodes", "target": target, "limit": 0, "value": len(nodes), "passed": not nodes}
                | ({"note": note} if nodes else {})
            )
    for target in sorted(set(required)):
        if target not in summary:
            why = reasons.get(target) or "this run did not evaluate it (not in evaluate.targets)"
            rows.append(_unmeasured("target_available", target, "required", why))
    if not summary:
        why = "; ".join(f"{t}: {r}" for t, r in reasons.items()) or "the report holds no measured target"
        rows.append(_unmeasured("target_measured", "-", "at least one", f"no target was measured ({why})"))
    return rows


def _unmeasured(name: str, target: str, limit: str, note: str) -> dict[str, Any]:
    return {"name": name, "target": target, "limit": limit, "value": None, "passed": False, "note": note}


def _stricter(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """Of two rows on the same figure, the one with the stricter limit (None if not comparable)."""
    if a.get("_relative") != b.get("_relative") or a.get("_bound") is None or b.get("_bound") is None:
        return None
    if a.get("_direction") != b.get("_direction"):
        return None
    if a["_direction"] == "max":
        return a if a["_bound"] <= b["_bound"] else b
    return a if a["_bound"] >= b["_bound"] else b


def tighten(base: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's rows with the command line's added: a command-line row on a figure the recipe
    also limits replaces it only if it is stricter; otherwise both are kept."""
    rows = list(base)
    for row in extra:
        row = {**row, "note": (row.get("note") + "; " if row.get("note") else "") + "from --budget"}
        same = [i for i, r in enumerate(rows) if (r["name"], r["target"]) == (row["name"], row["target"])]
        if not same:
            rows.append(row)
            continue
        i = same[0]
        winner = _stricter(rows[i], row)
        if winner is row:
            rows[i] = row
        elif winner is None:
            rows.append(row)
    return rows


@dataclass
class Verdict:
    """The gate's answer for one report: its budget rows and one of passed / failed / no budgets."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if not self.rows:
            return NO_BUDGETS
        return PASSED if all(r["passed"] for r in self.rows) else FAILED

    @property
    def passed(self) -> bool:
        return self.state == PASSED

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if not r["passed"]]


def judge(
    budgets: Budgets,
    summary: dict[str, dict[str, Any]],
    skipped: list[dict[str, str]] = (),
    required: list[str] = (),
    extra: Budgets | None = None,
) -> Verdict:
    """The verdict on measured figures: the recipe's budgets, plus ``extra`` ones (command line) that
    can only add or tighten. A report with no budgets at all but no measured target still fails."""
    rows = check_budgets(budgets, summary, skipped, required)
    if extra is not None:
        extra_rows = [r for t, f in summary.items() for r in check_limits(extra.for_target(t), t, f or {})]
        rows = tighten(rows, extra_rows)
    for r in rows:
        for key in ("_bound", "_direction", "_relative"):
            r.pop(key, None)
    return Verdict(rows)
