"""``slimline sweep``: models x recipes x targets as Ray tasks, for CI matrices.

Every cell is a whole ``slimline run`` (the recipe, on that model, measured on that target) in
``OUT/runs/<recipe>__<model>__<target>``. All cells are validated before any runs. The results are
one aggregated ``sweep.md``/``sweep.json`` and one JUnit file (a ``<testsuite>`` per cell, a
``<testcase>`` per budget, a cell that could not run as an ``<error>``). Timing cells reserve a whole
node, as search trials do.
"""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimline.api import load_recipe
from slimline.errors import OutputError, RecipeError
from slimline.evaluate.gate import judge_report, junit_xml, write_junit
from slimline.search.study import NODE, Log, StopRequests, capacity, run_trial, start_ray
from slimline.yamlconf import short

MARKER = "sweep.json"


@dataclass
class Cell:
    name: str
    recipe: dict[str, Any]
    target: str


def slug(text: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9._-]+", "-", text.rstrip("/").split("/")[-1].removeprefix("pip:").removeprefix("hf:"))[:60] or "model"
    )


def plan(recipes: list[str], models: list[str], targets: list[str], overrides: list[str]) -> list[Cell]:
    """Every cell's recipe, validated now: a wrong name or option fails before anything runs."""
    if not recipes:
        raise RecipeError("sweep: give at least one --recipe (a file or a built-in name).")
    cells: list[Cell] = []
    for r in recipes:
        for m in models or [None]:
            _, recipe = load_recipe(r, overrides, model=m)
            chosen = targets or [str(t) for t in recipe.evaluate.targets]
            for t in chosen:
                _, cell = load_recipe(r, [*overrides, f"evaluate.targets=[{t}]"], model=m)
                name = f"{cell.name}__{slug(m) if m else slug(cell.model.source)}__{t}"
                cells.append(Cell(name, cell.model_dump(mode="json"), t))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise RecipeError(f"sweep: two cells are both named {next(n for n in names if names.count(n) > 1)}; list each once.")
    return cells


def sweep(cells: list[Cell], out: Path, *, address: str | None = None, parallel: int | None = None, log: Log = print) -> dict:
    import ray

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(
            f"--out {out}: exists and is not empty; slimline writes a sweep only into a new folder. Choose another."
        )
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = start_ray(address, log)
    results: dict[str, dict[str, Any]] = {}
    pending: dict[Any, tuple[Cell, float]] = {}
    stop = StopRequests()
    try:
        timing = any(c.recipe["evaluate"]["speed"]["enabled"] for c in cells)
        room = capacity(timing, parallel)
        options: dict[str, Any] = {"num_cpus": 1, "max_retries": 1, "retry_exceptions": False}
        if timing:
            options["resources"] = {NODE: 1}
        task = ray.remote(run_trial).options(**options)
        log(f"sweep: {len(cells)} cells, {room} at a time")
        queue = list(cells)
        last = time.monotonic()
        while queue or pending:
            stop.check()
            while queue and len(pending) < room:
                cell = queue.pop(0)
                pending[task.remote(cell.recipe, str((out / "runs" / cell.name).resolve()), cell.target)] = (
                    cell,
                    time.monotonic(),
                )
                log(f"sweep: {cell.name} started")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1)
            if not ready:
                if time.monotonic() - last >= 25:
                    log(f"sweep: {len(results)}/{len(cells)} done; running {', '.join(c.name for c, _ in pending.values())}")
                    last = time.monotonic()
                continue
            for ref in ready:
                cell, t0 = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    result = {"error": f"{type(err).__name__}: {short((str(err).splitlines() or [''])[0], 300)}"}
                result["seconds"] = round(time.monotonic() - t0, 1)
                results[cell.name] = result
                state = (
                    "error: " + short(result["error"], 200) if "error" in result else ("passed" if result["passed"] else "failed")
                )
                log(f"sweep: {cell.name} {state} ({result['seconds']:.0f}s)")
                last = time.monotonic()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        write(cells, results, out, log)  # what finished, the rest marked not run
        raise
    finally:
        stop.restore()
        if started:
            ray.shutdown()
    return write(cells, results, out, log)


def write(cells: list[Cell], results: dict[str, dict], out: Path, log: Log) -> dict:
    rows = []
    suites = ET.Element("testsuites", name="slimline sweep")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for cell in cells:
        r = results.get(cell.name, {"error": "not run (the sweep was interrupted)"})
        s = r.get("summary") or {}
        row = {
            "cell": cell.name,
            "recipe": cell.recipe["name"],
            "model": cell.recipe["model"]["source"],
            "target": cell.target,
            "state": "error" if "error" in r else ("passed" if r["passed"] else "failed"),
            "speedup": s.get("speedup"),
            "mean_cosine": s.get("mean_cosine"),
            "perplexity_increase": s.get("perplexity_increase"),
            "size_mb": s.get("size_mb"),
            "failed_budgets": [
                f"{b['name']}: {b.get('value')} (limit {b.get('limit')})" for b in r.get("budgets", []) if not b.get("passed")
            ],
            "error": r.get("error"),
            "seconds": r.get("seconds"),
        }
        rows.append(row)
        if "error" in r:
            suite = ET.SubElement(suites, "testsuite", name=f"slimline.sweep.{cell.name}", tests="1", failures="0", errors="1")
            case = ET.SubElement(suite, "testcase", classname=f"slimline.sweep.{cell.name}", name="run", time="0")
            ET.SubElement(case, "error", message=short(r["error"], 500), type="RunError").text = r["error"]
            totals["tests"] += 1
            totals["errors"] += 1
            continue
        report = r["report"]
        cell_xml = ET.fromstring(junit_xml(report, judge_report(report).rows))
        for suite in cell_xml:
            suite.set("name", f"slimline.sweep.{cell.name}")
            for case in suite:
                case.set("classname", f"slimline.sweep.{cell.name}")
            suites.append(suite)
            for k in ("tests", "failures", "skipped"):
                totals[k] += int(suite.get(k, "0"))
    for k, v in totals.items():
        suites.set(k, str(v))
    ET.indent(suites)
    write_junit(out / "junit.xml", '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n")
    (out / MARKER).write_text(json.dumps({"cells": rows, "totals": totals}, indent=2))

    def fmt(v: Any, digits: int = 4) -> str:
        return "-" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))

    lines = [
        "# slimline sweep",
        "",
        "| cell | state | speedup | mean cosine | perplexity increase | size MB | failed budgets / error | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        why = "; ".join(row["failed_budgets"]) or short(row["error"] or "", 160)
        lines.append(
            f"| {row['cell']} | {row['state']} | {fmt(row['speedup'])} | {fmt(row['mean_cosine'])} | {fmt(row['perplexity_increase'])} | "
            f"{fmt(row['size_mb'])} | {why.replace('|', '/') or '-'} | {fmt(row['seconds'])} |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    log(
        f"sweep: {sum(r['state'] == 'passed' for r in rows)} passed, {sum(r['state'] == 'failed' for r in rows)} failed, {sum(r['state'] == 'error' for r in rows)} errors -> {out / 'sweep.md'}, {out / 'junit.xml'}"
    )
    return {"cells": rows, "totals": totals}
