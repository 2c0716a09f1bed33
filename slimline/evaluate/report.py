"""report.json (a stable, versioned schema), report.md, report.png (Pareto plot) and report.html
(self-contained: styles inline, plot embedded, opens offline)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from slimline.evaluate.budgets import FAILED, NO_BUDGETS, PASSED, Verdict, judge

REPORT_SCHEMA = 1
HEAD = [
    "variant",
    "target",
    "mode",
    "batch",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "seq/s",
    "speedup",
    "peak RSS MB",
    "GPU MB",
    "size MB",
]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metric_names(report: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for row in report["results"]:
        names += [m for m in row["accuracy"] if m not in names]
    return names


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    metrics = metric_names(report)
    out = []
    for r in report["results"]:
        cells = [
            r["variant"],
            r["target"],
            r.get("mode", "fixed"),
            _fmt(r["batch_size"]),
            _fmt(r["latency_ms_p50"]),
            _fmt(r["latency_ms_p95"]),
            _fmt(r.get("latency_ms_p99")),
            _fmt(r["throughput_per_s"], 1),
            _fmt(r.get("speedup")),
            _fmt(r["peak_rss_mb"], 0),
            _fmt(r.get("peak_gpu_mb"), 0),
            _fmt(r["size_mb"], 1),
        ]
        out.append(cells + [_fmt(r["accuracy"].get(m), 4) for m in metrics])
    return out


def budget_line(b: dict[str, Any]) -> str:
    verdict = "PASS" if b["passed"] else "FAIL"
    note = f" ({b['note']})" if b.get("note") else ""
    return f"{verdict} {b['name']} ({b['target']}): value {_fmt(b['value'], 4)}, limit {_fmt(b['limit'], 4)}{note}"


VERDICT_WORD = {PASSED: "PASSED", FAILED: "FAILED", NO_BUDGETS: "NO BUDGETS"}


def verdict(report: dict[str, Any]) -> str:
    """The report's verdict as one word. ``NO BUDGETS`` is never a pass: nothing was checked."""
    return VERDICT_WORD[report.get("verdict") or Verdict(report.get("budgets") or []).state]


# what could break a table row or turn a name into a link, code, emphasis or HTML; GFM takes
# intra-word underscores literally, so names like loadavg_1m stay readable in a terminal
_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*[]<>|"})


def md(value: Any) -> str:
    """Text for a markdown table cell or line: markdown's special characters escaped, one line."""
    return " ".join(str(value).split()).translate(_MD_SPECIAL)


def to_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# slimline report: {md(report['recipe'])}",
        "",
        f"**{verdict(report)}**: model {md(report['model'])} ({md(report['task'])})",
        "",
    ]
    head = HEAD + metric_names(report)
    lines += ["| " + " | ".join(md(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(md(c) for c in cells) + " |" for cells in table_rows(report)]
    if report["budgets"]:
        lines += ["", "## Budgets", "", "| budget | target | limit | value | result |", "|---|---|---|---|---|"]
        for b in report["budgets"]:
            result = "pass" if b["passed"] else f"**FAIL** {md(b.get('note', ''))}".strip()
            cells = (md(b["name"]), md(b["target"]), md(_fmt(b["limit"], 4)), md(_fmt(b["value"], 4)))
            lines.append("| " + " | ".join(cells) + f" | {result} |")
    else:
        lines += ["", "No budgets were set, so nothing was checked. Add `evaluate.budgets` to gate on this report."]
    for s in report.get("skipped_targets", []):
        lines.append(f"\nSkipped target {md(s['target'])}: {md(s['reason'])}")
    lines += ["", "## How this was measured", ""]
    lines += [f"- {md(k)}: {md(v)}" for k, v in report["measurement"].items()]
    lines += [f"- data: {md(report['data'])}"]
    if "host" in report:
        lines.append("- host: " + md(", ".join(f"{k} {v}" for k, v in report["host"].items())))
    for target, details in report["targets"].items():
        lines.append(f"- {md(target)}: " + md(", ".join(f"{k} {v}" for k, v in details.items())))
    return "\n".join(lines) + "\n"


def pareto_points(report: dict[str, Any]) -> list:
    """One point per variant and target: throughput at its largest fixed batch vs mean cosine."""
    from slimline.evaluate.plots import Point

    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in report["results"]:
        if r.get("mode", "fixed") != "fixed" or not r["throughput_per_s"] or r["accuracy"].get("mean_cosine") is None:
            continue
        key = (r["variant"], r["target"])
        if key not in best or r["batch_size"] > best[key]["batch_size"]:
            best[key] = r
    return [
        Point(f"{v} {t}", r["throughput_per_s"], r["accuracy"]["mean_cosine"], r.get("peak_rss_mb")) for (v, t), r in best.items()
    ]


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
.scroll{overflow-x:auto}table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:nth-child(-n+3){text-align:left}.pass{color:#17692a}.fail{color:#b00020;font-weight:bold}
.verdict{font-size:20px;padding:6px 12px;display:inline-block;border-radius:4px}
.verdict.pass{background:#e3f5e6}.verdict.fail{background:#fde7ea}code{background:#f5f5f5;padding:1px 3px}"""


def to_html(report: dict[str, Any], plot_png: Path | None) -> str:
    e = html.escape
    v = verdict(report)
    head = HEAD + metric_names(report)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>slimline: {e(report['recipe'])}</title><style>{CSS}</style></head><body>",
        f"<h1>slimline report: {e(report['recipe'])}</h1>",
        f"<p><span class='verdict {'pass' if v == 'PASSED' else 'fail'}' id='verdict'>{v}</span> model <code>{e(report['model'])}</code> ({e(report['task'])})</p>",
        "<div class='scroll'><table id='results'><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
    ]
    parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>" for cells in table_rows(report)]
    parts.append("</table></div>")
    if report["budgets"]:
        parts.append(
            "<h2>Budgets</h2><table id='budgets'><tr><th>budget</th><th>target</th><th>limit</th><th>value</th><th>result</th></tr>"
        )
        for b in report["budgets"]:
            cls, res = ("pass", "pass") if b["passed"] else ("fail", f"FAIL {b.get('note', '')}")
            parts.append(
                f"<tr><td>{e(b['name'])}</td><td>{e(b['target'])}</td><td>{e(_fmt(b['limit'], 4))}</td>"
                f"<td>{e(_fmt(b['value'], 4))}</td><td class='{cls}'>{e(res)}</td></tr>"
            )
        parts.append("</table>")
    else:
        parts.append("<p>No budgets were set, so nothing was checked.</p>")
    if plot_png is not None and plot_png.exists():
        data = base64.b64encode(plot_png.read_bytes()).decode()
        # onload marks the image as decoded, so a headless browser check can tell it rendered
        parts.append(
            f"<h2>Accuracy vs throughput</h2><img id='pareto' alt='Pareto plot' src='data:image/png;base64,{data}' "
            "onload=\"this.setAttribute('data-rendered', this.naturalWidth)\">"
        )
    for s in report.get("skipped_targets", []):
        parts.append(f"<p>Skipped target <code>{e(s['target'])}</code>: {e(s['reason'])}</p>")
    parts.append("<h2>How this was measured</h2><ul>")
    parts += [f"<li><b>{e(str(k))}</b>: {e(str(val))}</li>" for k, val in report["measurement"].items()]
    for target, details in report["targets"].items():
        parts.append(f"<li><b>{e(target)}</b>: " + e(", ".join(f"{k} {val}" for k, val in details.items())) + "</li>")
    parts.append("</ul></body></html>")
    return "\n".join(parts)


def write_reports(report: dict[str, Any], folder: Path) -> None:
    from slimline.evaluate.plots import plot_pareto

    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(to_markdown(report))
    points = pareto_points(report)
    png = plot_pareto(points, folder / "report.png", f"{report['recipe']}: {report['model']}") if points else None
    (folder / "report.html").write_text(to_html(report, png))


def report_header(recipe: Any, name: str | None, folder: Path, source: str, task: str, data: Any, threads: int) -> dict[str, Any]:
    """The fields every run report starts with."""
    from slimline.env import host_info

    return {
        "schema_version": REPORT_SCHEMA,
        "recipe": recipe.name,
        "artifact": name or folder.name,
        "model": source,
        "task": task,
        "data": data.describe(),
        "host": host_info(threads),
    }


def finish_report(report: dict[str, Any], spec: Any, folder: Path) -> dict[str, Any]:
    """Judge a run's figures against its budgets (``budgets.judge``, the same verdict ``check``
    recomputes later), write report.{json,md,png,html}, return the report."""
    report["budget_spec"] = spec.budgets.model_dump(mode="json", exclude_defaults=True)
    report["required_targets"] = list(spec.required_targets)
    result = judge(spec.budgets, report["summary"], report.get("skipped_targets", []), spec.required_targets)
    report["budgets"] = result.rows
    report["verdict"] = result.state
    report["passed"] = result.passed
    write_reports(report, folder)
    return report


# -- reading a report back ---------------------------------------------------------------------------


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


Figure = float | None


class _Summary(_Open):
    accuracy: dict[str, Figure] = {}
    baseline_accuracy: dict[str, Figure] = {}
    fidelity_drop: Figure = None
    top10_overlap: Figure = None
    speedup: Figure = None
    traffic_speedup: Figure = None
    size_mb: Figure = None
    peak_rss_mb: Figure = None
    peak_gpu_mb: Figure = None
    latency_ms_p95: dict[str, Figure] = {}


class _Skipped(_Open):
    target: str
    reason: str = ""


class _BudgetRow(_Open):
    name: str
    target: str
    limit: Any
    value: Any
    passed: bool


class _ResultRow(_Open):
    variant: str
    target: str
    accuracy: dict[str, Any]


class ReportFile(_Open):
    """What the gate, inspect and compare read from report.json; anything else a report holds is kept."""

    schema_version: Literal[1]
    recipe: str
    artifact: str
    results: list[_ResultRow]
    budgets: list[_BudgetRow]
    passed: bool
    summary: dict[str, _Summary] = {}
    skipped_targets: list[_Skipped] = []
    required_targets: list[str] = []
    budget_spec: dict[str, Any] = {}


def validate_report(report: Any) -> list[str]:
    """Problems with a report's schema (empty if it is valid), at most a few, each short."""
    if not isinstance(report, dict):
        return [f"not a JSON object but {type(report).__name__}"]
    try:
        ReportFile.model_validate(report)
    except ValidationError as err:
        problems = []
        for e in err.errors()[:5]:
            where = ".".join(str(p) for p in e["loc"]) or "the report"
            problems.append(f"{where}: {e['msg']}"[:200])
        return problems
    return []
