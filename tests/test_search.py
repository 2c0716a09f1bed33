"""slimline search: the space, the study folder, and real searches on Ray (local and a two-node cluster)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from slimline.errors import OutputError, RecipeError
from slimline.recipe import from_dict
from slimline.search.space import load_space
from slimline.search.study import prepare_folder, search
from tests.models import tiny_recipe

SLIMLINE = str(Path(sys.executable).parent / "slimline")


def tiny_space(model_dir: Path, trials: int = 2) -> dict:
    """Export, an optional SmoothQuant with a searched alpha, int8 with a searched per-channel flag;
    accuracy only (no timing), so trials pack one per CPU."""
    r = tiny_recipe(model_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.5})
    r["evaluate"]["data"]["evaluation_size"] = 24
    r["stages"] = [
        {"compile.export": {}},
        {"quantize.smoothquant": {"alpha": {"range": [0.3, 0.8]}, "optional": True}},
        {"quantize.dynamic_int8": {"per_channel": {"choice": [True, False]}}},
    ]
    r["search"] = {"trials": trials, "objectives": ["fidelity", "size"], "startup_trials": 2}
    return r


def test_space_names_parameters_and_builds_each_point(tiny_bert_dir):
    space = load_space(tiny_space(tiny_bert_dir))
    assert [p.name for p in space.params] == [
        "quantize.smoothquant.enabled",
        "quantize.smoothquant.alpha",
        "quantize.dynamic_int8.per_channel",
    ]
    assert [(o.metric, o.direction) for o in space.objectives] == [("mean_cosine", "maximize"), ("size_mb", "minimize")]
    on = space.materialize(
        {"quantize.smoothquant.enabled": True, "quantize.smoothquant.alpha": 0.42, "quantize.dynamic_int8.per_channel": False}
    )
    assert on["stages"][1] == {"quantize.smoothquant": {"alpha": 0.42}}  # `optional` is the search's, not the stage's
    assert on["stages"][2] == {"quantize.dynamic_int8": {"per_channel": False}}
    off = space.materialize(
        {"quantize.smoothquant.enabled": False, "quantize.smoothquant.alpha": 0.42, "quantize.dynamic_int8.per_channel": True}
    )
    assert [next(iter(s)) for s in off["stages"]] == ["compile.export", "quantize.dynamic_int8"]
    assert space.describe(
        {"quantize.smoothquant.enabled": False, "quantize.smoothquant.alpha": 0.42, "quantize.dynamic_int8.per_channel": True}
    ) == {
        "quantize.smoothquant.enabled": "off",
        "quantize.smoothquant.alpha": "-",  # sampled, but its stage is off
        "quantize.dynamic_int8.per_channel": "True",
    }
    from_dict(on)  # a valid recipe
    # integer ranges stay integers; a list choice is stored by index and given back whole
    raw = tiny_space(tiny_bert_dir)
    raw["stages"][2]["quantize.dynamic_int8"]["exclude"] = {"choice": [[], ["role:ffn.out@0"]]}
    raw["evaluate"]["data"]["calibration_size"] = {"range": [8, 16]}
    space = load_space(raw)
    exclude = next(p for p in space.params if p.name == "quantize.dynamic_int8.exclude")
    assert exclude.distribution().choices == (0, 1) and exclude.value(1) == ["role:ffn.out@0"]
    assert next(p for p in space.params if p.name == "evaluate.data.calibration_size").kind == "int"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            lambda r: r["stages"][2]["quantize.dynamic_int8"].update(per_chanel={"choice": [True, False]}),
            ["per_chanel", "per_channel"],
        ),
        (
            lambda r: r["stages"][1]["quantize.smoothquant"].update(alpha={"range": [0.3, 1.7]}),
            ["quantize.smoothquant.alpha = 1.7"],
        ),
        (lambda r: r["stages"][1]["quantize.smoothquant"].update(alpha={"range": [0.8, 0.3]}), ["low < high"]),
        (lambda r: r["stages"][2]["quantize.dynamic_int8"].update(per_channel={"choice": [True]}), ["at least two"]),
        (lambda r: r["search"].update(objectives=["speed", "accuracy"]), ["`accuracy` is not an objective"]),
        (lambda r: r["search"].update(trails=3), ["trails", "trials"]),
        (lambda r: r["search"].update(objectives=["speed"]), ["speed", "evaluate.speed.enabled"]),
        (
            lambda r: [
                r["stages"][1]["quantize.smoothquant"].update(alpha=0.5, optional=False),
                r["stages"][2]["quantize.dynamic_int8"].update(per_channel=True),
            ],
            ["no option to search"],
        ),
    ],
)
def test_space_errors_name_the_place_and_the_fix(tiny_bert_dir, change, words):
    raw = tiny_space(tiny_bert_dir)
    change(raw)
    with pytest.raises(RecipeError) as err:
        load_space(raw)
    for w in words:
        assert w in str(err.value)


def test_study_folder_is_ours_or_refused(tiny_bert_dir, tmp_path):
    space = load_space(tiny_space(tiny_bert_dir))
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a slimline search folder"):
        prepare_folder(foreign, space)
    assert (foreign / "mine.txt").read_text() == "keep me" and len(list(foreign.iterdir())) == 1
    out = tmp_path / "study"
    assert prepare_folder(out, space) is False and prepare_folder(out, space) is True  # new, then resumed
    raw = tiny_space(tiny_bert_dir)
    raw["stages"][1]["quantize.smoothquant"]["alpha"] = {"range": [0.2, 0.8]}
    with pytest.raises(RecipeError, match="different search space"):
        prepare_folder(out, load_space(raw))


def _kill_first_attempt(folder: Path, killed: list[int]) -> threading.Thread:
    """SIGKILL the worker that runs trial 0, once, a moment after it starts: Ray runs it again."""

    def watch() -> None:
        pid_file = folder / "trials" / "0000.pid"
        for _ in range(1200):
            if pid_file.is_file() and pid_file.read_text().strip():
                time.sleep(0.5)  # inside the trial: loading and exporting the model alone take longer
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_search_on_local_ray_survives_a_killed_worker_and_resumes(tiny_bert_dir, tmp_path):
    space = load_space(tiny_space(tiny_bert_dir, trials=2))
    out = tmp_path / "study"
    killed: list[int] = []
    watcher = _kill_first_attempt(out, killed)
    lines: list[str] = []
    first = search(space, out, parallel=2, log=lines.append)
    watcher.join(1)
    assert killed, "the watcher never saw trial 0 start"
    log0 = (out / "trials" / "0000.log").read_text()
    assert log0.count("trial on ") == 2, log0  # killed once, run again by Ray
    assert [r["state"] for r in first.trials] == ["complete", "complete"]
    assert all(r["passed"] for r in first.trials) and first.best is not None
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["name"] == "tiny-best" and from_dict(recipe)
    assert "# The searched choices:" in (out / "best.yaml").read_text()
    assert (out / "pareto.png").stat().st_size > 0 and "| 0" in (out / "pareto.md").read_text()
    kept = {r["number"]: r["values"] for r in first.trials}

    # a driver that died mid-trial leaves a RUNNING trial in the study: resuming queues it again
    from slimline.search.study import open_study

    study = open_study(space, out)
    stale = study.ask(space.distributions())
    resumed = search(space, out, trials=4, parallel=2, log=lines.append)
    rows = {r["number"]: r for r in resumed.trials}
    assert {n: rows[n]["values"] for n in kept} == kept  # no finished trial lost or rerun
    assert rows[stale.number]["state"] == "fail" and "interrupted" in rows[stale.number]["error"]
    rerun = [r for r in resumed.trials if r["rerun_of"] == stale.number]
    assert len(rerun) == 1 and rerun[0]["state"] == "complete" and rerun[0]["params"] == stale.params
    assert sum(r["state"] in ("complete", "fail") for r in resumed.trials) == 4
    assert any("queued again" in line for line in lines)
    results = json.loads((out / "results.json").read_text())
    assert results["best"] is not None and len(results["trials"]) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_search_on_a_two_node_cluster_with_a_killed_worker_and_an_interrupted_driver(tiny_bert_dir, tmp_path):
    """`ray start --head` plus a second `ray start --address` node on this machine; a worker killed mid-trial;
    the driver interrupted (SIGINT) after its first result; the same command resumes and loses nothing."""
    ray = str(Path(sys.executable).parent / "ray")
    port = _free_port()
    # Ray 2.60 clusters authenticate with a token: every node and the driver share this one
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **token, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    node = ["--num-cpus", "1", "--resources", json.dumps({"slimline_node": 1}), "--disable-usage-stats"]
    subprocess.run(
        [ray, "start", "--head", "--port", str(port), "--include-dashboard", "false", *node],
        check=True,
        env=env,
        capture_output=True,
    )
    try:
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", *node], check=True, env=env, capture_output=True)
        space_file = tmp_path / "space.yaml"
        space_file.write_text(yaml.safe_dump(tiny_space(tiny_bert_dir, trials=4)))
        out = tmp_path / "study"
        cmd = [SLIMLINE, "search", str(space_file), "--out", str(out), "--address", f"127.0.0.1:{port}"]
        killed: list[int] = []
        watcher = _kill_first_attempt(out, killed)
        driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seen: list[str] = []
        for line in driver.stdout:
            seen.append(line)
            if " done in " in line:  # one result is in: stop the driver while the other node's trial runs
                driver.send_signal(signal.SIGINT)
                break
        rest, _ = driver.communicate(timeout=120)
        text = "".join(seen) + rest
        assert driver.returncode == 130, text
        assert "2 at a time" in text and "resume" in text
        watcher.join(1)
        assert killed
        before = json.loads((out / "results.json").read_text())
        finished = {r["number"]: r["values"] for r in before["trials"] if r["state"] == "complete"}
        assert finished
        again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert again.returncode == 0, again.stdout + again.stderr
        after = json.loads((out / "results.json").read_text())
        rows = {r["number"]: r for r in after["trials"]}
        assert {n: rows[n]["values"] for n in finished} == finished
        assert sum(r["state"] in ("complete", "fail") for r in after["trials"]) >= 4
        assert any(r["rerun_of"] is not None and r["state"] == "complete" for r in after["trials"])
        assert after["best"] is not None and "connected to the Ray cluster" in again.stdout
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(tmp_path / "study", ignore_errors=True)


def test_sweep_runs_recipes_by_models_and_writes_one_report_and_junit(tiny_bert_dir, tmp_path):
    import xml.etree.ElementTree as ET

    from slimline.search.sweep import plan, sweep

    ok = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.5})
    ok["stages"] = [{"compile.export": {}}, {"quantize.dynamic_int8": {}}]
    ok["evaluate"]["data"]["evaluation_size"] = 24
    strict = {**ok, "name": "strict", "evaluate": {**ok["evaluate"], "budgets": {"max_size_mb": 0.000001}}}
    files = []
    for r in (ok, strict):
        f = tmp_path / f"{r['name']}.yaml"
        f.write_text(yaml.safe_dump(r))
        files.append(str(f))
    with pytest.raises(RecipeError, match="recipe file not found"):
        plan([*files, str(tmp_path / "missing.yaml")], [], [], [])  # checked before anything runs
    cells = plan(files, [str(tiny_bert_dir)], [], [])
    assert [c.name for c in cells] == [f"tiny__{tiny_bert_dir.name}__ort-cpu", f"strict__{tiny_bert_dir.name}__ort-cpu"]
    result = sweep(cells, tmp_path / "sweep", parallel=2, log=lambda m: None)
    assert [c["state"] for c in result["cells"]] == ["passed", "failed"]
    assert result["cells"][1]["failed_budgets"][0].startswith("max_size_mb")
    junit = ET.parse(tmp_path / "sweep" / "junit.xml").getroot()
    assert junit.get("failures") == "1" and junit.get("errors") == "0"
    failed = [c.get("name") for c in junit.iter("testcase") if c.find("failure") is not None]
    assert failed == ["max_size_mb"]
    assert "| strict__" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert (tmp_path / "sweep" / "runs" / cells[0].name / "model.onnx").is_file()
    with pytest.raises(OutputError, match="not empty"):
        sweep(cells, tmp_path / "sweep", log=lambda m: None)


def test_sensitivity_measures_each_layer_in_each_format_alone(tiny_bert_dir, tmp_path):
    from slimline.search.sensitivity import sensitivity

    recipe = tiny_recipe(tiny_bert_dir, speed={"enabled": False})
    out = tmp_path / "sens"
    result = sensitivity(recipe, out, texts=16, log=lambda m: None)
    rows = result["rows"]
    nodes = {r["node"] for r in rows}
    assert len(nodes) == 8  # 2 layers: a fused Attention and 3 MatMuls each
    roles = {r["role"] for r in rows}
    assert {"attention.fused@0", "attention.out@1", "ffn.in@0", "ffn.out@1"} <= roles
    by = {(r["node"], r["format"]): r for r in rows}
    for node in nodes:
        assert (node, "int8") in by and by[(node, "int8")]["output_error"] > 0
        if (node, "int4-32") in by:  # a MatMul: fp16 rounding is far smaller than int4's
            assert by[(node, "fp16")]["output_error"] < by[(node, "int4-32")]["output_error"] / 10
            assert by[(node, "int8-static")]["output_error"] > 0  # QDQ on that node alone, ranges calibrated
        else:
            assert by[(node, "int8")]["op"] == "Attention" and (node, "int8-static") not in by
    worst = result["ranked"][0]
    assert max(r["cosine_drop"] for r in rows if r["node"] == worst) == max(r["cosine_drop"] for r in rows)
    assert {f.name for f in out.iterdir()} == {"sensitivity.md", "sensitivity.json", "sensitivity.png", "sensitivity.html"}
    assert "ffn.out@0" in (out / "sensitivity.md").read_text()
    with pytest.raises(OutputError, match="exists"):
        sensitivity(recipe, out, log=lambda m: None)
    with pytest.raises(RecipeError, match="unknown format int3"):
        sensitivity(recipe, tmp_path / "other", formats=("int3",), log=lambda m: None)


def test_knapsack_keeps_the_most_bytes_within_the_budget():
    import itertools
    import random

    from slimline.search.mixed import knapsack

    rng = random.Random(0)
    for _ in range(30):
        items = [(f"l{i}", rng.choice([0.0, rng.uniform(0, 0.004)]), rng.randint(1, 100)) for i in range(8)]
        budget = rng.uniform(0, 0.01)
        chosen = knapsack(items, budget)
        assert sum(d for n, d, _ in items if n in chosen) <= budget + 1e-5
        best = max(
            sum(b for _, _, b in subset)
            for r in range(len(items) + 1)
            for subset in itertools.combinations(items, r)
            if sum(d for _, d, _ in subset) <= budget - 1e-5
        )
        assert sum(b for n, _, b in items if n in chosen) >= best  # as good as brute force


def test_choose_formats_is_the_least_cost_within_the_bytes():
    """The multiple-choice knapsack against brute force: least summed cost, bytes within the bound."""
    import itertools
    import random

    from slimline.search.mixed import choose_formats

    rng = random.Random(1)
    for _ in range(30):
        options = {
            f"l{i}": {f: (rng.uniform(0, 1) / (j + 1), rng.randint(1, 40) * 1024 * (j + 1)) for j, f in enumerate("abc")}
            for i in range(5)
        }
        budget = rng.randint(5, 300) * 1024
        chosen = choose_formats(options, budget)
        fits = [
            combo
            for combo in itertools.product("abc", repeat=5)
            if sum(options[f"l{i}"][f][1] for i, f in enumerate(combo)) <= budget
        ]
        if not fits:
            assert chosen is None
            continue
        best = min(sum(options[f"l{i}"][f][0] for i, f in enumerate(combo)) for combo in fits)
        assert sum(options[n][f][1] for n, f in chosen.items()) <= budget
        assert sum(options[n][f][0] for n, f in chosen.items()) == pytest.approx(best)


def test_mixed_chooses_builds_and_measures(tiny_bert_dir, tmp_path):
    from slimline.search.mixed import mixed
    from slimline.search.sensitivity import sensitivity

    recipe = tiny_recipe(tiny_bert_dir, speed={"enabled": False}, budgets={"max_fidelity_drop": 0.01})
    sensitivity(recipe, tmp_path / "sens", formats=("int8",), texts=16, log=lambda m: None)
    result = mixed(recipe, tmp_path / "sens", tmp_path / "mixed", log=lambda m: None)
    first = result["attempts"][0]
    assert first["measured_drop"] <= 0.01 and result["chosen"]
    chosen = yaml.safe_load((tmp_path / "mixed" / "mixed.yaml").read_text())
    stage = next(s["quantize.dynamic_int8"] for s in chosen["stages"] if "quantize.dynamic_int8" in s)
    assert stage["fallback"] == "none" and from_dict(chosen)
    assert "measured" in (tmp_path / "mixed" / "mixed.yaml").read_text()
    with pytest.raises(RecipeError, match="measured for recipe"):
        mixed({**recipe, "name": "other"}, tmp_path / "sens", tmp_path / "m2", log=lambda m: None)
    # a static int8 recipe reads the int8-static figures, which this sensitivity run didn't measure
    static = {**recipe, "stages": [*recipe["stages"][:2], {"quantize.static_int8": {}}]}
    with pytest.raises(RecipeError, match="no int8-static measurements"):
        mixed(static, tmp_path / "sens", tmp_path / "m3", log=lambda m: None)
    sensitivity(static, tmp_path / "sens-static", formats=("int8-static",), texts=16, log=lambda m: None)
    result = mixed(static, tmp_path / "sens-static", tmp_path / "m4", log=lambda m: None)
    assert result["attempts"][0]["measured_drop"] <= 0.01
    chosen = yaml.safe_load((tmp_path / "m4" / "mixed.yaml").read_text())
    assert next(s["quantize.static_int8"] for s in chosen["stages"] if "quantize.static_int8" in s)["fallback"] == "none"


def tiny_llm_recipe(model_dir: Path) -> dict:
    return {
        "name": "tiny-llm",
        "model": {"source": str(model_dir), "task": "text-generation"},
        "stages": [
            {"compile.export": {}},
            {"compile.fuse": {}},
            {"quantize.weight_only": {"block_size": 16, "algorithm": "gptq", "min_cosine": 0, "calibration_texts": 16}},
        ],
        "evaluate": {
            "data": {"source": "builtin:shakespeare", "calibration_size": 48, "evaluation_size": 60},
            "memory": False,
            "speed": {"enabled": False},
            "generation": {"perplexity_tokens": 256, "context": 64, "stride": 32},
        },
    }


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from tests.models import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_decoder_sensitivity_scores_the_recipes_own_quantizer_per_layer(tiny_llama_dir, tmp_path):
    """A decoder's layers in the weight-only formats, each alone: KL and perplexity change from one float session
    with that layer's weight fed in; finer formats cost more bytes and move the logits less."""
    from slimline.search.sensitivity import sensitivity

    recipe = tiny_llm_recipe(tiny_llama_dir)
    out = tmp_path / "sens"
    result = sensitivity(recipe, out, formats=("int4-16", "int4-32", "int8-16"), texts=48, log=lambda m: None)
    assert result["metric"] == "kl" and result["float_perplexity"] > 1
    rows = result["rows"]
    by = {(r["node"], r["format"]): r for r in rows}
    nodes = {r["node"] for r in rows}
    roles = {r["role"] for r in rows}
    # 2 layers x (merged Q/K/V, o_proj, merged gate/up, down_proj) + the tied LM head
    assert len(nodes) == 9 and {"attention.qkv@0", "ffn.in@1", "ffn.out@0", "lm_head"} <= roles
    for node in nodes:
        four, eight = by[(node, "int4-16")], by[(node, "int8-16")]
        assert four["kl"] > 0 and four["weight_bytes"] < eight["weight_bytes"]
        assert eight["output_error"] < four["output_error"] / 4
        assert by[(node, "int4-32")]["weight_bytes"] < four["weight_bytes"]
    assert sum(by[(n, "int8-16")]["kl"] for n in nodes) < sum(by[(n, "int4-16")]["kl"] for n in nodes) / 4
    md = (out / "sensitivity.md").read_text()
    assert "KL divergence" in md and "lm_head" in md
    with pytest.raises(RecipeError, match="not a weight-only format"):
        sensitivity(recipe, tmp_path / "other", formats=("fp16",), log=lambda m: None)


def test_decoder_sensitivity_counts_the_bytes_of_the_recipes_kernel(tiny_llama_dir, tmp_path):
    """With kernel: slimline, an int4-32 layer is MatMulQ4's: 20 bytes per 32 weights, 16-column groups."""
    from slimline import ops
    from slimline.search.sensitivity import sensitivity

    if ops.library() is None:
        pytest.skip(f"slimline's custom ops are not built here: {ops.why_unavailable()}")
    recipe = tiny_llm_recipe(tiny_llama_dir)
    recipe["stages"][2]["quantize.weight_only"].update(kernel="slimline", block_size=32)
    rows = sensitivity(recipe, tmp_path / "s", formats=("int4-32",), texts=16, log=lambda m: None)["rows"]
    head = next(r for r in rows if r["role"] == "lm_head")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    k, n = config.hidden_size, config.vocab_size
    assert head["weight_bytes"] == -(-n // 16) * (k // 32) * (256 + 2 * 16 * 2)


def test_decoder_mixed_trades_bytes_between_layers_and_measures(tiny_llama_dir, tmp_path):
    """Decoder mixed precision: formats chosen within the recipe's own layer bytes, written as `layers`, built and
    measured; the run's report names each layer's chosen format."""
    from slimline.search.mixed import mixed
    from slimline.search.sensitivity import sensitivity

    recipe = tiny_llm_recipe(tiny_llama_dir)
    sensitivity(recipe, tmp_path / "sens", formats=("int4-16", "int4-32", "int8-16"), texts=48, log=lambda m: None)
    result = mixed(recipe, tmp_path / "sens", tmp_path / "mixed", log=lambda m: None)
    est = result["estimate"]
    assert est["chosen_weight_mb"] <= est["recipe_weight_mb"] and est["chosen_kl"] <= est["recipe_kl"]
    assert result["changed"] and set(result["formats"]) <= {"int4-16", "int4-32", "int8-16"}
    chosen = yaml.safe_load((tmp_path / "mixed" / "mixed.yaml").read_text())
    layers = chosen["stages"][2]["quantize.weight_only"]["layers"]
    assert layers == {k: {"bits": int(f[3]), "block_size": int(f.split("-")[1])} for k, f in result["changed"].items()}
    report = json.loads((tmp_path / "mixed" / "round-1" / "report.json").read_text())
    assert report["summary"]["ort-cpu"]["accuracy"]["perplexity"] == result["measured"]["perplexity"]
    manifest = json.loads((tmp_path / "mixed" / "round-1" / "manifest.json").read_text())
    stage_report = next(s["report"] for s in manifest["stages"] if s["kind"] == "quantize.weight_only")
    named = {k: v for k, v in stage_report.items() if k.startswith("layers.")}
    assert len(named) == len(layers) and all(v.endswith("(the recipe's choice)") for v in named.values())
    # a tighter bound than the recipe's own bytes moves layers to the coarser format
    tight = mixed(recipe, tmp_path / "sens", tmp_path / "tight", max_weight_mb=est["recipe_weight_mb"] * 0.85, log=lambda m: None)
    assert tight["estimate"]["chosen_weight_mb"] <= est["recipe_weight_mb"] * 0.85
    assert tight["formats"].get("int4-32", 0) > result["formats"].get("int4-32", 0)
