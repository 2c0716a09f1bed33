"""`slimline check` (exit codes, budget lines, JUnit XML), `slimline compare`, and the HTML report
as a browser shows it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import xmlschema
from click.testing import CliRunner
from junitparser import Failure, JUnitXml, Skipped

from slimline import recipe as R
from slimline.api import check
from slimline.cli import main
from slimline.evaluate.gate import junit_xml
from slimline.pipeline import run_recipe
from tests.models import tiny_recipe

XSD = Path(__file__).parent / "data" / "junit.xsd"


@pytest.fixture(scope="module")
def run_dir(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "run"
    data = tiny_recipe(tiny_bert_dir, targets=["ort-cpu", "ort-cuda"], budgets={"max_fidelity_drop": 0.05, "min_speedup": 0.01})
    run_recipe(R.from_dict(data), out)
    return out


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output


def test_unavailable_cuda_target_is_skipped_with_a_reason(run_dir):
    report = json.loads((run_dir / "report.json").read_text())
    (skip,) = report["skipped_targets"]
    assert skip["target"] == "ort-cuda" and "CUDAExecutionProvider" in skip["reason"]
    assert report["passed"] is True  # optional targets don't fail the run
    assert "Skipped target ort-cuda" in (run_dir / "report.md").read_text()


def test_check_passes_and_prints_one_line_per_budget(run_dir):
    code, out = invoke("check", run_dir)
    assert code == 0, out
    assert "PASS max_fidelity_drop (ort-cpu)" in out and "PASS min_speedup (ort-cpu)" in out
    assert "SKIP target ort-cuda" in out and "2 passed, 0 failed" in out


def test_check_fails_on_tightened_budget_and_required_target(run_dir, tmp_path):
    junit = tmp_path / "budgets.xml"
    code, out = invoke(
        "check",
        run_dir,
        "--budget",
        "min_speedup=1000",
        "--budget",
        "max_accuracy_drop.mean_cosine=0%",
        "--require",
        "ort-cuda",
        "--junit",
        junit,
    )
    assert code == 1, out
    assert "FAIL min_speedup (ort-cpu)" in out and "FAIL target_available (ort-cuda)" in out
    xmlschema.XMLSchema(str(XSD)).validate(str(junit))  # the structure CI systems read
    parsed = JUnitXml.fromfile(str(junit))  # and a third-party reader agrees on the verdicts
    cases = {(suite.name, case.name): case for suite in parsed for case in suite}
    assert any(isinstance(r, Failure) for r in cases[("slimline.tiny.ort-cpu", "min_speedup")].result)
    assert not cases[("slimline.tiny.ort-cpu", "max_fidelity_drop")].result
    assert any(isinstance(r, Failure) for r in cases[("slimline.tiny.ort-cuda", "target_available")].result)


def test_junit_marks_optional_skipped_targets_skipped(run_dir):
    result = check(run_dir)
    report, rows = result.report, result.verdict.rows
    xml = junit_xml(report, rows)
    xmlschema.XMLSchema(str(XSD)).validate(xml)
    path = run_dir.parent / "j.xml"
    path.write_text(xml)
    cuda = [s for s in JUnitXml.fromfile(str(path)) if s.name.endswith("ort-cuda")][0]
    assert all(isinstance(r, Skipped) for case in cuda for r in case.result)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "min_sped=2"], "Did you mean `min_speedup`?"),
        (["--budget", "max_accuracy_drop.spearman=lots"], "percentage"),
    ],
)
def test_check_bad_input_exits_2(run_dir, args, message):
    code, out = invoke("check", run_dir, *args)
    assert code == 2 and message in " ".join(out.split()) and "Traceback" not in out


def test_check_on_a_folder_without_report(tmp_path):
    code, out = invoke("check", tmp_path)
    assert code == 2 and "no report.json" in out


def test_check_without_any_budget_is_bad_input(tiny_bert_dir, tmp_path):
    run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir, speed={"enabled": False})), tmp_path / "r")
    code, out = invoke("check", tmp_path / "r")
    assert code == 2 and "no budgets to check" in " ".join(out.split())


def test_compare_marks_frontier(run_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    report = json.loads((other / "report.json").read_text())
    report["summary"]["ort-cpu"]["speedup"] = 1e6  # dominates on speed at equal accuracy
    (other / "report.json").write_text(json.dumps(report))
    code, out = invoke("compare", run_dir, other, "--out", tmp_path / "cmp")
    assert code == 0, out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["frontier"] for r in rows] == [False, True]
    assert (tmp_path / "cmp" / "compare.png").exists() and "<table id='compare'>" in (
        tmp_path / "cmp" / "compare.html"
    ).read_text()


def test_html_report_renders_in_headless_chromium(run_dir, chromium):
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={run_dir.parent / 'chromium-profile'}",
    ]
    page = (run_dir / "report.html").resolve().as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    assert '<table id="results">' in dom and "compressed" in dom and 'id="budgets"' in dom
    # the plot's onload handler stamps the decoded width: the image really rendered
    assert 'data-rendered="' in dom and 'data-rendered="0"' not in dom
    shot = run_dir.parent / "report.png.screenshot.png"
    subprocess.run([chromium, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000
