"""The GPU check script's CPU-side logic, and how CUDA targets behave on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from slimline import recipe as R
from slimline.builtin import builtin_recipes
from slimline.cli import main
from slimline.evaluate.targets import available

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"


def test_dry_run_plans_every_cuda_recipe_check_and_compare(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    plan = out.stdout
    for recipe in ("smollm2-fp16-cuda", "minilm-fused-cuda", "minilm-fp16-cuda", "minilm-torch-cuda", "smollm2-int4-cuda"):
        assert f"slimline.cli run {recipe} --out {tmp_path}/{recipe}" in plan
        assert f"slimline.cli check {tmp_path}/{recipe} --junit" in plan
        R.load(builtin_recipes()[recipe])  # every recipe the script runs is valid
    assert "slimline.cli compare" in plan and "benchmarks/sparse_gpu.py" in plan
    assert plan.index("benchmarks/gqa_probe.py") < plan.index("slimline.cli run")  # the probe goes first


def test_dry_run_evaluates_prebuilt_folders_instead_of_building_them(tmp_path):
    (tmp_path / "pre" / "smollm2-fp16-cuda").mkdir(parents=True)
    env = {**os.environ, "PREBUILT": str(tmp_path / "pre")}
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path / "o")], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert f"slimline.cli evaluate {tmp_path}/o/smollm2-fp16-cuda" in out.stdout
    assert "slimline.cli run smollm2-fp16-cuda" not in out.stdout
    assert "slimline.cli run smollm2-int4-cuda" in out.stdout  # not prebuilt: built here
    assert f"gqa_probe.py --out {tmp_path}/o/gqa_probe.json --artifact {tmp_path}/pre/smollm2-fp16-cuda" in out.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_a_gpu_the_script_says_so_and_exits_3(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3 and "no NVIDIA GPU" in out.stderr


def test_cuda_targets_report_why_they_are_unavailable():
    for target in ("ort-cuda", "torch-cuda"):
        ok, why = available(target)
        if not ok:
            assert why and ("CUDA" in why or "GPU" in why)


def test_required_cuda_target_fails_the_run_on_a_cpu_machine(tiny_bert_dir, tmp_path):
    if available("torch-cuda")[0]:
        pytest.skip("a CUDA device is present: the CPU fallback can't be observed here")
    data = yaml.safe_load(builtin_recipes()["minilm-torch-cuda"].read_text())
    data["model"]["source"] = str(tiny_bert_dir)
    data["evaluate"]["data"] = {"source": "builtin:shakespeare", "calibration_size": 8, "evaluation_size": 20}
    data["evaluate"]["speed"] = {"enabled": False}
    data["evaluate"]["memory"] = False
    data["evaluate"]["targets"] = ["torch-cpu", "torch-cuda"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1, result.output  # the run completes; the required target's budget fails
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["passed"] is False and report["summary"]["torch-cpu"]["mean_cosine"] > 0.999
    failed = [b for b in report["budgets"] if not b["passed"]]
    assert [(b["name"], b["target"]) for b in failed] == [("target_available", "torch-cuda")]


def test_torch_cuda_target_rebuilds_a_bitsandbytes_model_on_the_gpu(monkeypatch):
    """A bitsandbytes model refuses .to("cuda") (seen on an H200: minilm-bnb-int8's torch-cuda target
    crashed); the runner asks the artifact to build it again on the GPU, and leaves CPU targets alone."""
    from types import SimpleNamespace

    from slimline.evaluate import runner

    seen = []
    monkeypatch.setattr(runner, "torch_runner", lambda model, name, threads, target: seen.append((model, target)))

    class Quantized:
        is_quantized = True

    art = SimpleNamespace(model=Quantized(), load_on=lambda device: f"rebuilt on {device}")
    runner._compressed_runner("torch-cuda", art, Path("."), 1)
    runner._compressed_runner("torch-cpu", art, Path("."), 1)
    assert seen[0] == ("rebuilt on cuda", "torch-cuda") and isinstance(seen[1][0], Quantized)


def test_weights_from_source_rebuilds_an_artifact_from_its_source_model(tmp_path):
    """benchmarks/weights_from_source.py, how artifacts reach a lent GPU in 64 MiB calls: initializers
    that are the source model's tensors (cast, transposed, concatenated as a packed QKV) travel as a rule,
    the rest as bytes; the rebuilt file is checked byte for byte, and a different source is refused."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file

    spec = importlib.util.spec_from_file_location("wfs", SCRIPT.parent / "weights_from_source.py")
    wfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wfs)

    rng = np.random.default_rng(0)
    source = {n: rng.standard_normal(s).astype(np.float32) for n, s in [("q", (8, 16)), ("k", (4, 16)), ("norm", (16,))]}
    save_file(source, str(tmp_path / "model.safetensors"))
    inits = [
        numpy_helper.from_array(np.concatenate([source["q"].T, source["k"].T], axis=1).astype(np.float16), "qk"),
        numpy_helper.from_array(source["norm"], "norm"),
        numpy_helper.from_array(rng.integers(0, 255, (16, 8), dtype=np.uint8), "packed_int4"),
    ]
    graph = helper.make_graph([], "g", [], [helper.make_tensor_value_info("qk", TensorProto.FLOAT16, None)], inits)
    run = tmp_path / "run"
    run.mkdir()
    onnx.save(
        helper.make_model(graph), run / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    original = (run / "model.onnx.data").read_bytes()
    assert wfs.plan(run, tmp_path / "model.safetensors", tmp_path / "plan") == 0
    entries = {e["name"]: e for e in json.loads((tmp_path / "plan" / "plan.json").read_text())["entries"]}
    assert entries["qk"]["parts"] == [["q", True], ["k", True]] and entries["norm"]["parts"] == [["norm", False]]
    assert "raw" in entries["packed_int4"] and (tmp_path / "plan" / "raw.bin").stat().st_size == 16 * 8

    (run / "model.onnx.data").unlink()
    assert wfs.rebuild(run, tmp_path / "model.safetensors", tmp_path / "plan") == 0
    assert (run / "model.onnx.data").read_bytes() == original
    (run / "model.onnx.data").unlink()
    source["k"][0, 0] += 1.0  # another dequantization there: refused, nothing left behind
    save_file(source, str(tmp_path / "model.safetensors"))
    assert wfs.rebuild(run, tmp_path / "model.safetensors", tmp_path / "plan") == 1
    assert not list(run.glob("model.onnx.data*"))


def test_gpu_session_script_parses_and_names_its_steps():
    session = SCRIPT.parent / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(session)], capture_output=True).returncode == 0
    text = session.read_text()
    for step in ("setup)", "stash)", "fp16)", "int4)", "minilm)"):
        assert step in text
    assert 'weights_from_source.py" rebuild' in text  # artifacts are rebuilt and hash-checked there


def test_trim_cuda_kernels_zeroes_other_architectures_only():
    """benchmarks/trim_cuda_kernels.py on a synthetic fat binary: two containers, SASS for sm_80 and
    sm_90 plus PTX; keeping 90 zeroes sm_80's SASS and nothing else, and leaves the size unchanged."""
    import struct

    spec = importlib.util.spec_from_file_location("trim", SCRIPT.parent / "trim_cuda_kernels.py")
    trim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trim)

    def entry(kind: int, arch: int, payload: bytes) -> bytes:
        header = struct.pack("<HHIQ", kind, 0, 32, len(payload)) + bytes(12) + struct.pack("<I", arch)
        return header + payload

    def container(*items: bytes) -> bytes:
        body = b"".join(items)
        return struct.pack("<IHHQ", trim.MAGIC, 1, 16, len(body)) + body

    blob = bytearray(bytes(8))  # padding before the first container is skipped
    blob += container(entry(trim.SASS, 80, b"\x11" * 40), entry(trim.PTX, 80, b"\x22" * 24))
    blob += container(entry(trim.SASS, 90, b"\x33" * 16))
    found = [(kind, arch, size) for _, size, kind, arch in trim.entries(blob, 0, len(blob))]
    assert found == [(trim.SASS, 80, 40), (trim.PTX, 80, 24), (trim.SASS, 90, 16)]
    before = len(blob)
    assert trim.trim(blob, 0, len(blob), {90}) == 40
    assert len(blob) == before and b"\x11" not in blob and b"\x22" * 24 in blob and b"\x33" * 16 in blob
