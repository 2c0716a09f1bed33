"""report.json (a stable, versioned schema) and report.md (the same table for people)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_SCHEMA = 1
REQUIRED_ROW_KEYS = (
    "variant",
    "target",
    "batch_size",
    "seq_len",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_per_s",
    "peak_rss_mb",
    "size_mb",
    "accuracy",
)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(report: dict[str, Any]) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [f"# slimline report: {report['recipe']}", "", f"**{verdict}**: model `{report['model']}` ({report['task']})", ""]
    metric_names: list[str] = []
    for row in report["results"]:
        metric_names += [m for m in row["accuracy"] if m not in metric_names]
    head = ["variant", "target", "batch", "p50 ms", "p95 ms", "seq/s", "speedup", "peak RSS MB", "size MB", *metric_names]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [
            r["variant"],
            r["target"],
            _fmt(r["batch_size"]),
            _fmt(r["latency_ms_p50"]),
            _fmt(r["latency_ms_p95"]),
            _fmt(r["throughput_per_s"], 1),
            _fmt(r.get("speedup")),
            _fmt(r["peak_rss_mb"], 0),
            _fmt(r["size_mb"], 1),
        ]
        cells += [_fmt(r["accuracy"].get(m), 4) for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    if report["budgets"]:
        lines += ["", "## Budgets", "", "| budget | target | limit | value | result |", "|---|---|---|---|---|"]
        for b in report["budgets"]:
            result = "pass" if b["passed"] else f"**FAIL** {b.get('note', '')}".strip()
            lines.append(f"| {b['name']} | {b['target']} | {_fmt(b['limit'], 4)} | {_fmt(b['value'], 4)} | {result} |")
    else:
        lines += ["", "No budgets set: this report passes by definition. Add `evaluate.budgets` to gate on it."]
    for s in report.get("skipped_targets", []):
        lines.append(f"\nSkipped target {s['target']}: {s['reason']}")
    m = report["measurement"]
    lines += ["", "## How this was measured", ""]
    lines += [f"- {k}: {v}" for k, v in m.items()]
    lines += [f"- data: {report['data']}"]
    for target, details in report["targets"].items():
        lines.append(f"- {target}: " + ", ".join(f"{k} {v}" for k, v in details.items()))
    return "\n".join(lines) + "\n"


def write_reports(report: dict[str, Any], folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(to_markdown(report))


def validate_report(report: dict[str, Any]) -> list[str]:
    """Problems with a report's schema (empty if it is valid)."""
    problems = [
        f"missing `{k}`" for k in ("schema_version", "recipe", "artifact", "results", "budgets", "passed") if k not in report
    ]
    for i, row in enumerate(report.get("results", [])):
        problems += [f"results[{i}] missing `{k}`" for k in REQUIRED_ROW_KEYS if k not in row]
    for i, b in enumerate(report.get("budgets", [])):
        problems += [f"budgets[{i}] missing `{k}`" for k in ("name", "limit", "value", "passed") if k not in b]
    return problems
