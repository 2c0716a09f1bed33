"""``slimline check``: re-check a finished run's budgets (the recipe's, tightened or extended on the
command line) and say pass or fail in the forms CI reads: one line per budget, an exit code, and
JUnit XML with one test case per budget."""

from __future__ import annotations

import json
import os
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from slimline.errors import RecipeError, SlimlineError
from slimline.evaluate.budgets import Verdict, judge
from slimline.evaluate.report import ReportFile, validate_report
from slimline.evaluate.spec import Budgets, TargetName
from slimline.yamlconf import apply_override, did_you_mean, explain_error, parse_override


def load_report(run_dir: Path) -> dict[str, Any]:
    """A run's report.json, checked against the schema the gate reads: a damaged or foreign file is a
    clear error (exit 2), never a crash and never a verdict."""
    path = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise SlimlineError(f"{run_dir}: no report.json. Give a run folder written by `slimline run` (with evaluation).")
    try:
        if path.stat().st_size > 50_000_000:
            raise SlimlineError(f"{path}: {path.stat().st_size:,} bytes is too large for a slimline report; the file is not one.")
        report = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        why = str(err)[:120] if not isinstance(err, RecursionError) else "nested too deeply"
        raise SlimlineError(f"{path}: not valid JSON ({why}). The run folder is damaged; run the recipe again.") from None
    problems = validate_report(report)
    if problems:
        raise SlimlineError(f"{path}: not a slimline report ({'; '.join(problems[:3])}). Run the recipe again to rebuild it.")
    return report


def extra_budgets(overrides: list[str]) -> Budgets | None:
    """``--budget key=value`` options as budgets of their own (same paths as ``evaluate.budgets``).
    They can only add or tighten: they are checked beside the recipe's, never instead of them."""
    if not overrides:
        return None
    raw: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        if value is None or value == "" or value == {}:
            raise RecipeError(
                f"--budget {text[:80]}: a command-line budget can only add or tighten a limit, not remove one. "
                "To loosen the recipe's budgets, change the recipe and run `slimline evaluate` again."
            )
        apply_override(raw, text)
    try:
        return Budgets.model_validate(raw)
    except ValidationError as err:
        raise RecipeError("--budget: " + " ".join(explain_error(e, Budgets, "budgets") for e in err.errors())) from None


def check_targets(names: list[str]) -> list[str]:
    known = list(get_args(TargetName))
    for name in names:
        if name not in known:
            hint = did_you_mean(name, known)
            raise RecipeError(f"--require {name[:80]}: not a target.{hint} Targets: {', '.join(known)}.")
    return names


def judge_report(report: dict[str, Any], overrides: list[str] = (), require: list[str] = ()) -> Verdict:
    """Recompute a stored report's verdict from its budget spec and measured figures (the same
    ``judge`` the run used), with command-line budgets and required targets added."""
    try:
        spec = Budgets.model_validate(report.get("budget_spec") or {})
    except ValidationError as err:
        first = err.errors()[0]
        raise SlimlineError(
            f"report.json: its budget_spec is damaged ({'.'.join(map(str, first['loc']))}: {first['msg'][:120]}). "
            "Run the recipe again to rebuild the report."
        ) from None
    parsed = ReportFile.model_validate(report)
    summary = {t: s.model_dump() for t, s in parsed.summary.items()}
    skipped = [s.model_dump() for s in parsed.skipped_targets]
    required = sorted(set(parsed.required_targets) | set(check_targets(list(require))))
    return judge(spec, summary, skipped, required, extra_budgets(list(overrides)))


def write_junit(path: Path, text: str) -> None:
    """Write JUnit XML atomically; an existing file is replaced only if slimline wrote it."""
    if path.exists():
        if path.is_dir() or '<testsuites name="slimline' not in path.read_text(errors="replace")[:4096]:
            raise SlimlineError(
                f"--junit {path}: the file exists and is not a JUnit file slimline wrote; slimline won't overwrite it. "
                "Choose another path."
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
