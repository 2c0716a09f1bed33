"""``slimline compare``: several runs side by side, with the Pareto frontier marked.

Runs are measured at different moments, and this machine's speed drifts, so runs are compared on
their *speedup* (a ratio measured inside each run against its own interleaved baseline), never on
absolute throughput from different runs.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
from pathlib import Path
from typing import Any

from slimline.errors import OutputError
from slimline.evaluate.budgets import finite
from slimline.evaluate.gate import judge_report, load_report
from slimline.evaluate.plots import Point, mark_frontier, plot_pareto
from slimline.evaluate.report import CSS, VERDICT_WORD, _fmt, md
from slimline.runfolder import make_hidden_dir

FILES = ("compare.md", "compare.json", "compare.png", "compare.html")

COLUMNS = [
    "run",
    "recipe",
    "target",
    "speedup",
    "traffic speedup",
    "p95 ms (smallest batch)",
    "mean cosine",
    "top-10",
    "peak RSS MB",
    "size MB",
    "verdict",
    "frontier",
]


def compare_rows(run_dirs: list[Path]) -> list[dict[str, Any]]:
    rows = []
    for run in run_dirs:
        report = load_report(run)
        word = VERDICT_WORD[judge_report(report).state]
        for target, s in report.get("summary", {}).items():
            p95 = {int(b): v for b, v in (s.get("latency_ms_p95") or {}).items() if str(b).isdigit()}
            rows.append(
                {
                    "run": run.name,
                    "recipe": report["recipe"],
                    "target": target,
                    "speedup": finite(s.get("speedup")),
                    "traffic_speedup": finite(s.get("traffic_speedup")),
                    "p95_ms": finite(p95[min(p95)]) if p95 else None,
                    "mean_cosine": finite(s.get("mean_cosine")),
                    "top10_overlap": finite(s.get("top10_overlap")),
                    "peak_rss_mb": finite(s.get("peak_rss_mb")),
                    "size_mb": finite(s.get("size_mb")),
                    "verdict": word,
                }
            )
    points = [
        Point(f"{r['run']} {r['target']}", r["speedup"], r["mean_cosine"], r["peak_rss_mb"])
        for r in rows
        if r["speedup"] is not None and r["mean_cosine"] is not None
    ]
    mark_frontier(points)
    on_front = {p.label for p in points if p.frontier}
    for r in rows:
        r["frontier"] = f"{r['run']} {r['target']}" in on_front
    return rows


def _cells(r: dict[str, Any]) -> list[str]:
    return [
        r["run"],
        r["recipe"],
        r["target"],
        _fmt(r["speedup"]),
        _fmt(r["traffic_speedup"]),
        _fmt(r["p95_ms"]),
        _fmt(r["mean_cosine"], 4),
        _fmt(r["top10_overlap"], 3),
        _fmt(r["peak_rss_mb"], 0),
        _fmt(r["size_mb"], 1),
        r["verdict"],
        "yes" if r["frontier"] else "",
    ]


def check_compare_out(out: Path) -> None:
    """``--out`` must be new, empty, or a folder holding only an earlier comparison's files."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: is a file, not a folder. Choose another --out.")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in FILES)
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise OutputError(
                f"--out {out}: the folder holds other files ({shown}); slimline compare writes only into a new or "
                "empty folder, or one holding an earlier comparison. Choose another --out."
            )


def write_comparison(run_dirs: list[Path], out: Path) -> list[dict[str, Any]]:
    """Write compare.{md,json,png,html} into ``out``: built in a hidden sibling folder, then moved in."""
    check_compare_out(out)
    rows = compare_rows(run_dirs)
    out.mkdir(parents=True, exist_ok=True)
    staging = make_hidden_dir(out.resolve().parent, f".{out.name}.partial-")  # owned: swept if compare is killed
    try:
        _write_files(rows, run_dirs, staging)
        for name in FILES:
            if (staging / name).exists():
                os.replace(staging / name, out / name)
            elif (out / name).exists():
                (out / name).unlink()  # an earlier comparison's plot that this one doesn't have
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rows


def _write_files(rows: list[dict[str, Any]], run_dirs: list[Path], out: Path) -> None:
    (out / "compare.json").write_text(json.dumps({"runs": [str(r) for r in run_dirs], "rows": rows}, indent=2))
    note = (
        "Speedups are each run's own ratio to torch fp32 measured interleaved in that run; frontier: best speedup x mean cosine."
    )
    md_lines = ["# slimline compare", "", note, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md_lines += ["| " + " | ".join(md(c) for c in _cells(r)) + " |" for r in rows]
    (out / "compare.md").write_text("\n".join(md_lines) + "\n")
    points = [
        Point(f"{r['run']} {r['target']}", r["speedup"], r["mean_cosine"], r["peak_rss_mb"])
        for r in rows
        if r["speedup"] is not None and r["mean_cosine"] is not None
    ]
    png = None
    if points:
        png = plot_pareto(
            points, out / "compare.png", "slimline compare", x_label="speedup vs torch fp32 (measured within each run)"
        )
    e = html.escape
    body = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>slimline compare</title><style>{CSS}</style></head><body>",
        "<h1>slimline compare</h1>",
        f"<p>{e(note)}</p>",
        "<div class='scroll'><table id='compare'><tr>",
        "".join(f"<th>{e(c)}</th>" for c in COLUMNS),
        "</tr>",
    ]
    body += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>" for r in rows]
    body.append("</table></div>")
    if png is not None:
        body.append(
            f"<img id='pareto' alt='Pareto plot' src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'>"
        )
    body.append("</body></html>")
    (out / "compare.html").write_text("\n".join(body))
