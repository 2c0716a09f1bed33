"""The Python API: the three verbs the CLI is written on, and a light `import slimline`."""

from __future__ import annotations

import subprocess
import sys

from slimline import api
from slimline import recipe as R
from tests.models import tiny_recipe


def test_import_slimline_pulls_in_no_torch_or_onnx():
    code = "import sys, slimline; slimline.__version__; print(sorted(m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules))"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "[]"


def test_run_evaluate_check(tiny_bert_dir, tmp_path):
    data = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.5})
    built = api.run(R.from_dict(data), tmp_path / "run", evaluate=False)
    assert built.report is None and built.verdict is None and (built.folder / "model.onnx").exists()
    measured = api.evaluate(built.folder)
    assert measured.passed and measured.verdict.state == "passed"
    gate = api.check(built.folder, budgets=["max_size_mb=0.000001"])
    assert not gate.passed and [r["name"] for r in gate.verdict.failed] == ["max_size_mb"]
    again = api.run(data, tmp_path / "run", overrides=["evaluate.budgets.max_fidelity_drop=0.4"], force=True)
    assert again.passed and again.report["budget_spec"]["max_fidelity_drop"] == 0.4
