"""The runner end to end on the tiny BERT: the run folder, its manifest and report, and what a
failed or interrupted run leaves behind (nothing)."""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from slimline import recipe as R
from slimline.compile.fuse import Fuse
from slimline.errors import ModelError, OutputError, StageError
from slimline.evaluate.report import validate_report
from slimline.pipeline import run_recipe
from tests.models import tiny_recipe


def leftovers(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def tiny_run(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    recipe = R.from_dict(tiny_recipe(tiny_bert_dir, memory=True, budgets={"max_fidelity_drop": 0.05}))
    report = run_recipe(recipe, out)
    return out, report


def test_run_folder_contents(tiny_run):
    out, _ = tiny_run
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "manifest.json", "report.json", "report.md", "config.json", "tokenizer.json"} <= names
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])  # plain ORT loads it
    assert {i.name for i in session.get_inputs()} >= {"input_ids", "attention_mask"}
    assert not leftovers(out.parent)


def test_manifest_records_recipe_versions_hashes_and_stages(tiny_run, tiny_bert_dir):
    out, _ = tiny_run
    m = json.loads((out / "manifest.json").read_text())
    assert R.from_dict(m["recipe"]) == R.from_dict(tiny_recipe(tiny_bert_dir, memory=True, budgets={"max_fidelity_drop": 0.05}))
    assert {"torch", "onnxruntime", "transformers", "onnx"} <= set(m["versions"])
    assert "model.safetensors" in m["inputs"]["files"]
    assert len(m["outputs"]["model.onnx"]) == 64
    kinds = [s["kind"] for s in m["stages"]]
    assert kinds == ["model.load", "compile.export", "compile.fuse", "quantize.dynamic_int8", "evaluate"]
    assert m["stages"][2]["report"]["fused.Attention"] == 2
    assert all(s["wall_s"] >= 0 for s in m["stages"])
    # the session settings the figures were measured with, for whoever serves the model elsewhere
    assert m["ort_session_config"] == {"session.set_denormal_as_zero": "1"}
    from slimline.runtime import ort_session

    options = ort_session(out / "model.onnx", 1).get_session_options()
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_report_schema_and_figures(tiny_run):
    out, report = tiny_run
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report and validate_report(report) == []
    rows = report["results"]
    assert {(r["variant"], r["target"], r["mode"], r["batch_size"]) for r in rows} == {
        ("baseline", "torch-cpu", "fixed", 1),
        ("baseline", "torch-cpu", "fixed", 4),
        ("baseline", "torch-cpu", "traffic", 8),
        ("compressed", "ort-cpu", "fixed", 1),
        ("compressed", "ort-cpu", "fixed", 4),
        ("compressed", "ort-cpu", "traffic", 8),
    }
    assert all(r["latency_ms_p99"] >= r["latency_ms_p95"] >= r["latency_ms_p50"] for r in rows)
    summary = report["summary"]["ort-cpu"]
    assert summary["traffic_speedup"] > 0 and set(summary["latency_ms_p95"]) == {"1", "4"}
    comp = [r for r in rows if r["variant"] == "compressed"]
    assert all(r["latency_ms_p50"] > 0 and r["throughput_per_s"] > 0 and r["peak_rss_mb"] > 10 for r in comp)
    assert comp[0]["accuracy"]["mean_cosine"] > 0.95
    assert report["budgets"][0]["name"] == "max_fidelity_drop" and report["passed"] is True
    md = (out / "report.md").read_text()
    assert "| compressed | ort-cpu | fixed | 4 |" in md and "PASSED" in md
    assert (out / "report.png").stat().st_size > 5000 and "data:image/png;base64," in (out / "report.html").read_text()


def test_existing_output_is_refused_without_force(tiny_run, tiny_bert_dir):
    out, _ = tiny_run
    before = (out / "manifest.json").read_text()
    with pytest.raises(OutputError, match="--force"):
        run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir)), out)
    assert (out / "manifest.json").read_text() == before


def test_force_replaces_a_run_but_not_a_folder_slimline_did_not_write(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    recipe = R.from_dict(tiny_recipe(tiny_bert_dir, speed={"enabled": False}))
    run_recipe(recipe, out)
    first = json.loads((out / "manifest.json").read_text())["started"]
    run_recipe(recipe, out, force=True)
    assert (out / "model.onnx").exists() and json.loads((out / "manifest.json").read_text())["started"] >= first
    assert not leftovers(tmp_path)
    (out / "notes.txt").write_text("mine")  # a user's file inside the run folder: --force must not delete it
    with pytest.raises(OutputError, match="did not write.*notes.txt"):
        run_recipe(recipe, out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "stale.txt").write_text("old")
    with pytest.raises(OutputError, match="no slimline manifest"):
        run_recipe(recipe, other, force=True)
    assert (other / "stale.txt").read_text() == "old"


@pytest.mark.parametrize("error", [KeyboardInterrupt, StageError])
def test_failed_or_interrupted_run_leaves_nothing(tiny_bert_dir, tmp_path, monkeypatch, error):
    def boom(self, artifact, ctx):
        raise error("stop")

    monkeypatch.setattr(Fuse, "run", boom)
    out = tmp_path / "run"
    with pytest.raises(error):
        run_recipe(R.from_dict(tiny_recipe(tiny_bert_dir)), out)
    assert not out.exists() and not leftovers(tmp_path)


def test_missing_model_fails_cleanly(tmp_path):
    data = tiny_recipe(tmp_path / "no-such-model")
    with pytest.raises(ModelError, match="no such file or folder"):
        run_recipe(R.from_dict(data), tmp_path / "run")
    assert not (tmp_path / "run").exists() and not leftovers(tmp_path)


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="no config.json"):
        run_recipe(R.from_dict(tiny_recipe(tmp_path / "m")), tmp_path / "run")


def test_corrupt_model(tiny_bert_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_bert_dir, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="model.source"):
        run_recipe(R.from_dict(tiny_recipe(bad)), tmp_path / "run")
    assert not leftovers(tmp_path)


def test_budget_without_measurement_fails(tiny_bert_dir, tmp_path):
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"min_speedup": 1.0})
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    assert report["passed"] is False
    assert "not measured" in report["budgets"][0]["note"]


def test_text_classification_model(tiny_classifier_dir, tmp_path):
    data = tiny_recipe(tiny_classifier_dir, speed={"enabled": False})
    data["model"]["task"] = "text-classification"
    data["stages"] = [{"compile.export": {}}, {"quantize.dynamic_int8": {}}]
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    acc = report["results"][-1]["accuracy"]
    assert acc["label_agreement"] > 0.9 and "max_abs_error" in acc


def test_labelled_data_scores_each_held_out_text_against_its_own_label(tiny_classifier_dir, tmp_path):
    """A labelled file's calibration rows (~20%, by hash) leave the evaluation with their labels: the
    accuracy is computed on the held-out texts, each against its own label."""
    from slimline.measure.data import _is_calibration, load_file
    from tests.models import WORDS

    texts = [f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]} king" for i in range(80)]
    (tmp_path / "labelled.csv").write_text("text,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(texts)))
    data = load_file(tmp_path / "labelled.csv", label_column="label", n_evaluation=50)
    assert any(_is_calibration(t) for t in texts)  # the split takes some rows out
    assert len(data.evaluation) == len(data.labels) == 50
    assert all(data.labels[k] == texts.index(t) % 3 for k, t in enumerate(data.evaluation))
    recipe = tiny_recipe(tiny_classifier_dir, speed={"enabled": False})
    recipe["model"]["task"] = "text-classification"
    recipe["stages"] = [{"compile.export": {}}]
    recipe["evaluate"]["data"] = {"source": str(tmp_path / "labelled.csv"), "label_column": "label"}
    accuracy = run_recipe(R.from_dict(recipe), tmp_path / "run")["results"][-1]["accuracy"]
    assert 0 <= accuracy["accuracy"] <= 1 and 0 <= accuracy["f1_macro"] <= 1


def test_token_classification_model_is_compared_token_by_token(tmp_path):
    import onnx

    from tests.models import tiny_bert

    folder = tiny_bert(tmp_path / "tiny-ner", task="token-classification")
    data = tiny_recipe(folder, speed={"enabled": False}, budgets={"max_accuracy_drop": {"label_agreement": 0.1}})
    data["model"]["task"] = "token-classification"
    data["stages"] = [{"compile.export": {}}, {"compile.fuse": {"expect": "auto"}}, {"quantize.dynamic_int8": {}}]
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    graph = onnx.load(str(tmp_path / "run" / "model.onnx"), load_external_data=False).graph
    assert [o.name for o in graph.output] == ["logits"] and len(graph.output[0].type.tensor_type.shape.dim) == 3
    acc = report["results"][-1]["accuracy"]
    assert acc["label_agreement"] > 0.9 and 0.9 < acc["mean_cosine"] <= 1.0
    assert report["verdict"] == "passed"


def test_token_classification_scores_each_word_against_its_gold_label(tmp_path):
    import json

    from tests.models import WORDS, tiny_bert

    folder = tiny_bert(tmp_path / "tiny-ner", task="token-classification")  # labels LABEL_0..LABEL_2
    rows = []
    for i in range(60):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 4)]
        rows.append({"tokens": words, "tags": [f"LABEL_{(i + k) % 3}" for k in range(len(words))]})
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_recipe(folder, speed={"enabled": False})
    data["model"]["task"] = "token-classification"
    data["stages"] = [{"compile.export": {}}, {"quantize.dynamic_int8": {}}]
    data["evaluate"]["data"] = {"source": str(tmp_path / "ner.jsonl"), "text_column": "tokens", "label_column": "tags"}
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    base, new = report["results"][0]["accuracy"], report["results"][-1]["accuracy"]
    assert 0 <= new["accuracy"] <= 1 and 0 <= new["f1_macro"] <= 1 and new["scored_words"] > 100
    assert base["scored_words"] == new["scored_words"]

    rows[3]["tags"] = rows[3]["tags"][:-1]  # one label short: named with its line
    (tmp_path / "ner.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(Exception, match="ner.jsonl:4: `tags` must list one label per word"):
        run_recipe(R.from_dict(data), tmp_path / "run2")

    (tmp_path / "flat.csv").write_text("text,tag\n" + "".join(f"{WORDS[i]} {WORDS[i + 1]},LABEL_0\n" for i in range(20)))
    data["evaluate"]["data"] = {"source": str(tmp_path / "flat.csv"), "label_column": "tag"}
    with pytest.raises(Exception, match="need each row's words as a list and one label per word"):
        run_recipe(R.from_dict(data), tmp_path / "run3")


def test_torch_only_recipe_saves_hf_folder(tiny_bert_dir, tmp_path):
    data = tiny_recipe(tiny_bert_dir, targets=["torch-cpu"], speed={"enabled": False})
    data["stages"] = []
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert report["summary"]["torch-cpu"]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_sentence_pairs_add_spearman_for_baseline_and_artifact(tiny_bert_dir, tmp_path):
    from tests.models import WORDS

    rows = ["a,b,score"] + [f"{WORDS[i]} {WORDS[i + 1]} night,{WORDS[i + 2]} {WORDS[i]} love,{i % 5}" for i in range(60)]
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    data["evaluate"]["data"] = {
        "source": str(tmp_path / "pairs.csv"),
        "text_column": "a",
        "pair_column": "b",
        "score_column": "score",
    }
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    acc = {r["variant"]: r["accuracy"] for r in report["results"]}
    assert -1 <= acc["baseline"]["spearman"] <= 1 and -1 <= acc["compressed"]["spearman"] <= 1
    assert abs(acc["baseline"]["spearman"] - acc["compressed"]["spearman"]) < 0.2  # int8 barely moves the ranking
