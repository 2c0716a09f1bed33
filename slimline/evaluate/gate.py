"""``slimline check``: re-check a finished run's budgets (the recipe's, tightened or extended on the
command line) and say pass or fail in the forms CI reads: one line per budget, an exit code, and
JUnit XML with one test case per budget."""

from __future__ import annotations

import json
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slimline.errors import RecipeError, SlimlineError
from slimline.evaluate.budgets import check_budgets
from slimline.evaluate.report import validate_report
from slimline.recipe import Budgets, apply_override, explain_error


def load_report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not path.exists():
        raise SlimlineError(f"{run_dir}: no report.json. Give a run folder written by `slimline run` (with evaluation).")
    try:
        report = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SlimlineError(f"{path}: not valid JSON ({err}). The run folder is damaged; run the recipe again.") from None
    problems = validate_report(report) if isinstance(report, dict) else ["not a JSON object"]
    if problems:
        raise SlimlineError(f"{path}: not a slimline report ({'; '.join(problems[:3])}).")
    return report


def merged_budgets(report: dict[str, Any], overrides: list[str]) -> Budgets:
    """The run's budget spec with ``--budget key=value`` overrides applied (same syntax as ``--set``)."""
    raw: dict[str, Any] = json.loads(json.dumps(report.get("budget_spec", {})))
    for text in overrides:
        apply_override(raw, text)
    try:
        return Budgets.model_validate(raw)
    except ValidationError as err:
        raise RecipeError("--budget: " + " ".join(explain_error(e, Budgets, "budgets") for e in err.errors())) from None


def run_check(run_dir: Path, overrides: list[str] = (), require: list[str] = ()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The report and its budget rows, recomputed from the stored figures."""
    report = load_report(run_dir)
    budgets = merged_budgets(report, list(overrides))
    required = sorted(set(report.get("required_targets", [])) | set(require))
    rows = check_budgets(budgets, report.get("summary", {}), report.get("skipped_targets", []), required)
    if not rows:
        raise SlimlineError(
            f"{run_dir}: no budgets to check. Set evaluate.budgets in the recipe or pass --budget, "
            "e.g. --budget min_speedup=1.5 --budget max_fidelity_drop=0.01."
        )
    return report, rows


def junit_xml(report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """JUnit XML: a <testsuite> per target, a <testcase> per budget, optional targets skipped."""
    suites = ET.Element("testsuites", name=f"slimline {report['recipe']}")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    required = set(report.get("required_targets", []))
    targets = sorted({r["target"] for r in rows} | {s["target"] for s in report.get("skipped_targets", [])})
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for target in targets:
        mine = [r for r in rows if r["target"] == target]
        skipped = [
            s
            for s in report.get("skipped_targets", [])
            if s["target"] == target and target not in required and not any(r["name"] == "target_available" for r in mine)
        ]
        fails = sum(not r["passed"] for r in mine)
        suite = ET.SubElement(
            suites,
            "testsuite",
            name=f"slimline.{report['recipe']}.{target}",
            tests=str(len(mine) + len(skipped)),
            failures=str(fails),
            errors="0",
            skipped=str(len(skipped)),
            time="0",
            timestamp=stamp,
            hostname=socket.gethostname(),
        )
        for r in mine:
            case = ET.SubElement(suite, "testcase", classname=f"slimline.{report['recipe']}.{target}", name=r["name"], time="0")
            text = f"value {r['value']} vs limit {r['limit']}" + (f": {r['note']}" if r.get("note") else "")
            if not r["passed"]:
                ET.SubElement(case, "failure", message=text, type="BudgetExceeded").text = text
            else:
                ET.SubElement(case, "system-out").text = text
        for s in skipped:
            case = ET.SubElement(
                suite, "testcase", classname=f"slimline.{report['recipe']}.{target}", name="target_available", time="0"
            )
            ET.SubElement(case, "skipped", message=s["reason"])
        totals["tests"] += len(mine) + len(skipped)
        totals["failures"] += fails
        totals["skipped"] += len(skipped)
    for k, v in totals.items():
        suites.set(k, str(v))
    suites.set("errors", "0")
    suites.set("time", "0")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
