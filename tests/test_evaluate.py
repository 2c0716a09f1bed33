"""Metrics, budgets, reports and data loading, without running a model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from slimline.errors import DataError
from slimline.evaluate.budgets import check_budgets
from slimline.evaluate.report import to_markdown, validate_report
from slimline.evaluate.spec import Budgets
from slimline.measure import data as D
from slimline.measure.metrics import fidelity, pool, spearman, top_k_overlap


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3) -> r = 0.9487
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(12, 60), st.integers(2, 16))
def test_top_k_overlap_identity_and_bounds(n, dim):
    rng = np.random.default_rng(n * dim)
    x = rng.normal(size=(n, dim))
    assert top_k_overlap(x, x) == 1.0
    assert 0.0 <= top_k_overlap(x, rng.normal(size=(n, dim))) <= 1.0


def test_fidelity_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(50, 8))
    m = fidelity(ref, ref + 1e-3 * rng.normal(size=ref.shape), "embeddings")
    assert m["mean_cosine"] > 0.999 and m["top10_overlap"] > 0.9
    c = fidelity(ref, -ref, "logits")
    assert c["mean_cosine"] == pytest.approx(-1) and "label_agreement" in c


def test_pool_mean_ignores_padding_and_normalizes():
    hidden = np.array([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    out = pool(hidden, np.array([[1, 1, 0]]), "mean")
    assert np.allclose(out, [[1.0, 0.0]])
    assert np.allclose(pool(hidden, np.array([[1, 1, 1]]), "cls"), [[1.0, 0.0]])


SUMMARY = {
    "ort-cpu": {
        "fidelity_drop": 0.008,
        "top10_overlap": 0.85,
        "speedup": 1.8,
        "size_mb": 24.0,
        "peak_rss_mb": None,
        "latency_ms_p95": {"1": 9.0, "32": 170.0},
        "accuracy": {"mean_cosine": 0.992, "spearman": 0.80, "max_abs_error": 0.3},
        "baseline_accuracy": {"mean_cosine": 1.0, "spearman": 0.82, "max_abs_error": 0.0},
    }
}


def budgets(**kw) -> Budgets:
    return Budgets.model_validate(kw)


def by_name(rows):
    return {r["name"]: r for r in rows}


def test_budgets_pass_fail_and_missing():
    rows = by_name(check_budgets(budgets(max_fidelity_drop=0.01, min_speedup=2.0, max_peak_rss_mb=100), SUMMARY))
    assert rows["max_fidelity_drop"]["passed"] is True
    assert rows["min_speedup"]["passed"] is False and rows["min_speedup"]["value"] == 1.8
    assert rows["max_peak_rss_mb"]["passed"] is False and "not measured" in rows["max_peak_rss_mb"]["note"]
    assert "max_size_mb" not in rows  # unset budgets are not checked


def test_accuracy_drop_absolute_relative_and_missing_metric():
    rows = by_name(check_budgets(budgets(max_accuracy_drop={"spearman": "2%", "mean_cosine": 0.005, "f1_macro": 0.01}), SUMMARY))
    sp = rows["max_accuracy_drop.spearman"]  # (0.82 - 0.80) / 0.82 = 2.44% > 2%
    assert sp["passed"] is False and sp["value"] == pytest.approx(0.02439, abs=1e-5)
    assert rows["max_accuracy_drop.mean_cosine"]["passed"] is False  # 0.008 > 0.005
    assert rows["max_accuracy_drop.f1_macro"]["passed"] is False and "not measured" in rows["max_accuracy_drop.f1_macro"]["note"]
    ok = by_name(check_budgets(budgets(max_accuracy_drop={"spearman": "3%", "max_abs_error": 0.5}), SUMMARY))
    assert ok["max_accuracy_drop.spearman"]["passed"] and ok["max_accuracy_drop.max_abs_error"]["value"] == pytest.approx(0.3)


def test_bad_accuracy_limit_is_a_recipe_error():
    with pytest.raises(ValidationError, match="percentage"):
        budgets(max_accuracy_drop={"spearman": "two percent"})


def test_latency_budget_number_and_per_batch():
    rows = by_name(check_budgets(budgets(max_latency_ms_p95=10), SUMMARY))
    assert rows["max_latency_ms_p95.b1"]["passed"] is True  # a number checks the smallest batch
    rows = by_name(check_budgets(budgets(max_latency_ms_p95={32: 150, 8: 50}), SUMMARY))
    assert rows["max_latency_ms_p95.b32"]["passed"] is False and rows["max_latency_ms_p95.b8"]["note"]


def test_per_target_override_and_required_targets():
    b = budgets(min_speedup=1.5, targets={"ort-cpu": {"min_speedup": 2.5}})
    assert by_name(check_budgets(b, SUMMARY))["min_speedup"]["limit"] == 2.5
    skipped = [{"target": "ort-cuda", "reason": "no GPU"}]
    assert check_budgets(b, SUMMARY, skipped, required=[]) == check_budgets(b, SUMMARY)
    rows = by_name(check_budgets(b, SUMMARY, skipped, required=["ort-cuda"]))
    assert rows["target_available"]["passed"] is False and rows["target_available"]["note"] == "no GPU"


def report_with(passed: bool) -> dict:
    row = {
        "variant": "compressed",
        "target": "ort-cpu",
        "batch_size": 32,
        "seq_len": 128,
        "latency_ms_p50": 10.0,
        "latency_ms_p95": 12.0,
        "throughput_per_s": 3200.0,
        "speedup": 2.0,
        "peak_rss_mb": 90.0,
        "size_mb": 24.0,
        "accuracy": {"mean_cosine": 0.99},
    }
    budgets = check_budgets(Budgets(min_speedup=1.5 if passed else 3.0), {"ort-cpu": {"speedup": 2.0}})
    return {
        "schema_version": 1,
        "recipe": "r",
        "artifact": "a",
        "model": "m",
        "task": "feature-extraction",
        "data": {},
        "targets": {},
        "measurement": {"threads": 2},
        "results": [row],
        "budgets": budgets,
        "passed": all(b["passed"] for b in budgets),
    }


def test_report_schema_and_markdown_never_say_passed_when_failed():
    ok, bad = report_with(True), report_with(False)
    assert validate_report(ok) == [] and validate_report({"results": [{}]}) != []
    assert "**PASSED**" in to_markdown(ok)
    md = to_markdown(bad)
    assert "**FAILED**" in md and "PASSED" not in md and "**FAIL**" in md


def test_shakespeare_split_is_deterministic_and_disjoint():
    a = D.load_shakespeare(100, 300, seed=0)
    b = D.load_shakespeare(100, 300, seed=0)
    assert a.calibration == b.calibration and a.evaluation == b.evaluation
    assert len(a.calibration) == 100 and len(a.evaluation) == 300
    assert not set(a.calibration) & set(a.evaluation)
    assert all(len(t.split()) >= 4 and "**" not in t for t in a.evaluation)


def test_play_lines_strip_markup(tmp_path):
    play = tmp_path / "p.md"
    play.write_text("# Title\n\n## ACT I\n\n_Enter HAMLET_\n\n**HAMLET**  \nTo be, or not to be, that is the question:  \n")
    assert D.play_lines(play) == ["To be, or not to be, that is the question:"]


def test_csv_pairs_and_jsonl(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("a,b,score\n" + "".join(f"line {i} text,other {i},{i % 5}\n" for i in range(40)))
    d = D.load_file(csv, text_column="a", pair_column="b", score_column="score")
    assert len(d.pairs) == 40 and d.pair_scores[3] == 3.0 and d.calibration and d.evaluation
    jl = tmp_path / "x.jsonl"
    jl.write_text('{"text": "one two three four"}\n{"text": "five six seven eight"}\n')
    assert len(D.load_file(jl).evaluation) >= 1


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        D.load_file(tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        D.load_file(empty)
    csv = tmp_path / "c.csv"
    csv.write_text("sentence\nhello there friend\n")
    with pytest.raises(DataError, match="no column 'text'"):
        D.load_file(csv)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="b.jsonl:2"):
        D.load_file(bad)


def test_hf_dataset_source_needs_datasets_or_a_folder(tmp_path):
    from slimline.evaluate.spec import DataSpec

    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="needs the `datasets` package"):
            D.load_data(DataSpec(source=f"hf:{tmp_path}"))
    else:
        with pytest.raises(DataError, match="does not exist"):
            D.load_data(DataSpec(source=f"hf:{tmp_path / 'none'}"))


def test_cpu_busy_counts_other_processes_not_our_own_threads():
    """Our own threads still spinning after a pass (torch's OpenMP pool) made an idle machine read 10%
    busy; they are subtracted now, while another process's work still counts."""
    import os
    import subprocess
    import sys
    import threading
    import time

    from slimline.measure.timer import cpu_busy

    stop = time.monotonic() + 1.5

    def spin():
        while time.monotonic() < stop:
            pass

    thread = threading.Thread(target=spin)
    thread.start()
    own = cpu_busy(1.0)
    thread.join()
    other = subprocess.Popen([sys.executable, "-c", "import time\nt = time.monotonic() + 1.5\nwhile time.monotonic() < t: pass"])
    time.sleep(0.2)
    theirs = cpu_busy(1.0)
    other.wait()
    if own is None or theirs is None:
        pytest.skip("no /proc/stat here")
    assert theirs - own > 0.5 / (os.cpu_count() or 1)
