"""One verdict per report, whoever asks: `run`, `evaluate`, `check`, `inspect` and `compare` agree for
every report state, and `check` never exits 0 when a budget is breached or unmeasured (a property
test fuzzes report.json against an independent oracle)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimline.cli import main
from tests.models import tiny_recipe


def invoke(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.output


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


STATES = {
    # name: (budgets, targets, what every command must say)
    "passed": ({"max_fidelity_drop": 0.5}, ["ort-cpu"], "PASSED"),
    "failed": ({"max_size_mb": 0.0001}, ["ort-cpu"], "FAILED"),
    "no-budgets": ({}, ["ort-cpu"], "NO BUDGETS"),
    # a global budget and a per-target block: `evaluate` once dropped the global one (the manifest
    # stores a full dump, and the overlay took the block's unset fields as set)
    "global-and-target-block": (
        {"max_fidelity_drop": 1e-12, "targets": {"ort-cpu": {"max_size_mb": 1000}}},
        ["ort-cpu"],
        "FAILED",
    ),
    # every target skipped: nothing was measured, so nothing passed
    "all-targets-skipped": ({"max_fidelity_drop": 0.5}, ["ort-cuda"], "FAILED"),
}
EXIT = {"PASSED": (0, 0), "FAILED": (1, 1), "NO BUDGETS": (0, 2)}  # (run / evaluate, check)


@pytest.mark.parametrize("state", list(STATES))
def test_every_command_agrees_on_the_verdict(state, tiny_bert_dir, tmp_path):
    budgets, targets, word = STATES[state]
    if state == "all-targets-skipped" and cuda_available():
        pytest.skip("CUDA is available here, so ort-cuda is not skipped")
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets=budgets, targets=targets)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    run_exit, check_exit = EXIT[word]

    code, out = invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "run")
    assert code == run_exit, out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is (word == "PASSED")
    assert {"PASSED": "passed", "FAILED": "failed", "NO BUDGETS": "no budgets"}[word] == report["verdict"]
    assert f"**{word}**" in (tmp_path / "run" / "report.md").read_text()

    code, out = invoke("check", tmp_path / "run")
    assert code == check_exit, out
    code, out = invoke("inspect", tmp_path / "run")
    assert code == 0 and f"report: {word}" in out, out
    code, out = invoke("compare", tmp_path / "run", "--out", tmp_path / "cmp")
    assert code == 0, out
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert all(r["verdict"] == word for r in rows)

    # the same artifact built without evaluation and evaluated afterwards gets the same verdict
    code, out = invoke("run", tmp_path / "r.yaml", "--out", tmp_path / "built", "--no-eval")
    assert code == 0, out
    code, out = invoke("evaluate", tmp_path / "built")
    assert code == run_exit, out
    again = json.loads((tmp_path / "built" / "report.json").read_text())
    assert again["verdict"] == report["verdict"]
    assert [(b["name"], b["target"], b["passed"]) for b in again["budgets"]] == [
        (b["name"], b["target"], b["passed"]) for b in report["budgets"]
    ]


@pytest.fixture(scope="module")
def passing_run(tiny_bert_dir, tmp_path_factory) -> Path:
    from slimline import recipe as R
    from slimline.pipeline import run_recipe

    out = tmp_path_factory.mktemp("verdicts") / "run"
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.5, "max_size_mb": 1000})
    run_recipe(R.from_dict(data), out)
    return out


def test_budget_overrides_only_add_or_tighten(passing_run):
    assert invoke("check", passing_run)[0] == 0
    # looser than the recipe's: the recipe's limit still decides
    code, out = invoke("check", passing_run, "--budget", "max_size_mb=1e9")
    assert code == 0 and "limit 1000" in out, out
    # a per-target budget of the recipe can't hide a stricter global one from the command line
    code, out = invoke("check", passing_run, "--budget", "max_size_mb=0.000001")
    assert code == 1 and "from --budget" in out, out
    code, out = invoke("check", passing_run, "--budget", "targets.ort-cpu.max_size_mb=0.000001")
    assert code == 1, out


def test_require_fails_for_a_target_that_never_ran(passing_run):
    code, out = invoke("check", passing_run, "--require", "ort-cuda")
    assert code == 1 and "FAIL target_available (ort-cuda)" in out and "did not evaluate it" in out, out


def test_a_stored_verdict_is_never_trusted(passing_run, tmp_path):
    """A report whose stored `passed` is true but whose figures break a budget fails everywhere."""
    run = tmp_path / "run"
    shutil.copytree(passing_run, run)
    report = json.loads((run / "report.json").read_text())
    report["summary"]["ort-cpu"]["size_mb"] = 5000.0
    (run / "report.json").write_text(json.dumps(report))
    assert invoke("check", run)[0] == 1
    code, out = invoke("inspect", run)
    assert "report: FAILED (recomputed; the stored verdict differs)" in out, out
    invoke("compare", run, "--out", tmp_path / "cmp")
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"][0]["verdict"] == "FAILED"


# -- the property: check never passes a breached or unmeasured budget ------------------------------------

SIMPLE = {  # budget -> (summary key, direction): written again here so the oracle doesn't share the gate's code
    "max_fidelity_drop": ("fidelity_drop", "max"),
    "min_top10_overlap": ("top10_overlap", "min"),
    "min_speedup": ("speedup", "min"),
    "min_traffic_speedup": ("traffic_speedup", "min"),
    "max_size_mb": ("size_mb", "max"),
    "max_peak_rss_mb": ("peak_rss_mb", "max"),
}
TARGETS = ["ort-cpu", "ort-cuda", "torch-cpu"]

figure = st.one_of(
    st.none(),
    st.floats(min_value=-10, max_value=1e4, allow_nan=False),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
)
limit = st.floats(min_value=1e-6, max_value=1e4, allow_nan=False, allow_infinity=False)
limits = st.dictionaries(st.sampled_from(sorted(SIMPLE)), limit, max_size=3)
figures = st.dictionaries(st.sampled_from(sorted(v for v, _ in SIMPLE.values())), figure, max_size=6)


def fuzz_report(**fields) -> dict:
    """A report with the gate's fields; ``fields`` replace them."""
    base = {"schema_version": 1, "recipe": "fuzz", "artifact": "run", "results": [], "budgets": [], "passed": True}
    base.update({"summary": {}, "skipped_targets": [], "required_targets": [], "budget_spec": {}})
    return {**base, **fields}


def oracle(spec: dict, summary: dict, required: list[str]) -> str:
    """pass / fail / none / invalid, from the budgets and figures alone."""
    blocks = [spec, *spec.get("targets", {}).values()]
    if any(b.get("min_top10_overlap", 0) > 1 for b in blocks):
        return "invalid"  # an overlap is at most 1: the spec is damaged
    if not summary or any(t not in summary for t in required):
        return "fail"
    checked = 0
    for target, figs in summary.items():
        merged = {k: v for k, v in spec.items() if k != "targets"}
        merged.update({k: v for k, v in spec.get("targets", {}).get(target, {}).items() if v is not None})
        for name, bound in merged.items():
            key, direction = SIMPLE[name]
            value = figs.get(key)
            checked += 1
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return "fail"
            if (direction == "max" and value > bound) or (direction == "min" and value < bound):
                return "fail"
    return "pass" if checked else "none"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    spec=st.fixed_dictionaries({}, optional={"targets": st.dictionaries(st.sampled_from(TARGETS), limits, max_size=2)}).flatmap(
        lambda extra: limits.map(lambda g: {**g, **extra})
    ),
    summary=st.dictionaries(st.sampled_from(TARGETS), figures, max_size=3),
    required=st.lists(st.sampled_from(TARGETS), max_size=2, unique=True),
    stored_passed=st.booleans(),
)
def test_check_never_exits_0_when_a_budget_is_breached_or_unmeasured(spec, summary, required, stored_passed, tmp_path):
    # whatever the stored `passed` says, the gate recomputes
    report = fuzz_report(passed=stored_passed, summary=summary, required_targets=required, budget_spec=spec)
    (tmp_path / "report.json").write_text(json.dumps(report))
    code, out = invoke("check", tmp_path)
    expected = oracle(spec, summary, required)
    assert code == {"pass": 0, "fail": 1, "none": 2, "invalid": 2}[expected], (expected, out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.lists(
        st.sampled_from(["summary", "ort-cpu", "budget_spec", "speedup", "size_mb", "targets", "budgets", "passed", "0"]),
        min_size=1,
        max_size=4,
    ),
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-5, 5),
        st.floats(allow_nan=True),
        st.text(max_size=5),
        st.lists(st.integers(), max_size=2),
        st.just({}),
    ),
)
def test_a_mutated_report_never_passes_unless_its_figures_do(path, value, tmp_path):
    """Random damage to a passing report: check either refuses it (2), fails it (1), or passes it only
    if the damaged report's own budgets and figures pass."""
    report = fuzz_report(
        summary={"ort-cpu": {"speedup": 2.0, "size_mb": 10.0}}, budget_spec={"min_speedup": 1.5, "max_size_mb": 20.0}
    )
    node = report
    for key in path[:-1]:
        child = node.get(key) if isinstance(node, dict) else None
        if not isinstance(child, dict):
            child = {}
            if isinstance(node, dict):
                node[key] = child
        node = child
    if isinstance(node, dict):
        node[path[-1]] = value
    (tmp_path / "report.json").write_text(json.dumps(report))
    code, out = invoke("check", tmp_path)
    assert code in (0, 1, 2), out
    if code == 0:
        spec, summary = report["budget_spec"], report["summary"]
        assert isinstance(spec, dict) and isinstance(summary, dict)
        known = {k: v for k, v in spec.items() if k in SIMPLE or k == "targets"}
        assert known == spec, out  # anything else in the spec would have been refused
        assert oracle(spec, summary, report["required_targets"]) == "pass", out
