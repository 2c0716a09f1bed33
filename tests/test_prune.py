"""Pruning on a tiny BERT: exact sparsity, valid N:M masks, structured pruning that shrinks shapes
and still exports and fuses, and the bad inputs each pruner refuses."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from slimline.compile.export import Export
from slimline.compile.fuse import Fuse
from slimline.errors import StageError
from slimline.measure.data import TextData
from slimline.models import load_model
from slimline.prune.recover import Recover
from slimline.prune.structured import Structured
from slimline.prune.unstructured import NM, Magnitude, Wanda, magnitude_mask, nm_mask
from slimline.stage import Context
from tests.models import WORDS


def texts(n: int) -> list[str]:
    g = torch.Generator().manual_seed(n)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=g).tolist()) + f" {k}" for k in range(n)]


@pytest.fixture()
def ctx(tmp_path, tiny_bert_dir):
    data = TextData("test", calibration=texts(200), evaluation=texts(20))
    return Context(workdir=tmp_path, load_data=lambda: data, reference=load_model(str(tiny_bert_dir)))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(0, 0.99))
def test_magnitude_mask_hits_the_requested_count_exactly(rows, cols, sparsity):
    scores = torch.rand(rows, cols)
    mask = magnitude_mask(scores, sparsity)
    assert int((~mask).sum()) == int(round(sparsity * rows * cols))
    if (~mask).any() and mask.any():  # every pruned score is <= every kept score
        assert scores[~mask].max() <= scores[mask].min()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 8), st.sampled_from([(1, 2), (2, 4), (1, 4), (2, 8)]))
def test_nm_masks_are_valid(rows, groups, nm):
    n, m = nm
    mask = nm_mask(torch.rand(rows, groups * m), n, m)
    assert (mask.reshape(rows, groups, m).sum(-1) == n).all()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_stage_sparsity_and_report(ctx, scope):
    ref = ctx.reference
    r = Magnitude(sparsity=0.5, scope=scope).run(ref, ctx)
    assert abs(r.report["sparsity.overall"] - 0.5) < 1e-3
    if scope == "layer":  # within one element per layer
        for name, mod in r.artifact.model.named_modules():
            if isinstance(mod, torch.nn.Linear) and f"sparsity.{name}" in r.report:
                assert abs(int((mod.weight == 0).sum()) - round(0.5 * mod.weight.numel())) <= 1
    assert r.report["params_nonzero"] < r.report["params"]
    assert r.report["pruned_weights_mb.zlib"] < r.report["pruned_weights_mb.dense"]
    assert "calibration.mean_cosine" in r.report and "layer_error.median" in r.report
    assert all(
        (p1 == p2).all() for p1, p2 in zip(ref.model.parameters(), load_model(str(ref.info.path)).model.parameters(), strict=True)
    )


def test_nm_stage_produces_2_4_everywhere(ctx):
    r = NM().run(ctx.reference, ctx)
    for name, mod in r.artifact.model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"sparsity.{name}" in r.report:
            w = mod.weight.reshape(mod.out_features, -1, 4)
            assert ((w != 0).sum(-1) <= 2).all(), name
    assert r.report["sparsity.overall"] == pytest.approx(0.5, abs=1e-3)


def test_wanda_beats_magnitude_and_reconstruction_beats_wanda(ctx):
    mag = Magnitude(sparsity=0.5).run(ctx.reference, ctx).report["layer_error.median"]
    wanda = Wanda(sparsity=0.5).run(ctx.reference, ctx).report["layer_error.median"]
    rec = Wanda(sparsity=0.5, reconstruct=True).run(ctx.reference, ctx).report["layer_error.median"]
    assert rec < wanda <= mag * 1.05  # measured on the tiny model: reconstruction roughly halves the error


def test_nm_not_divisible_names_the_layer(ctx):
    with pytest.raises(StageError, match=r"not divisible by m=3: .*in_features=32"):
        NM(n=1, m=3).run(ctx.reference, ctx)


def test_pattern_matching_nothing_warns_and_nothing_left_fails(ctx):
    Magnitude(sparsity=0.3, exclude=["no.such.layer*"]).run(ctx.reference, ctx)
    assert any("matches no Linear layer" in w for w in ctx.reporter.warnings)
    with pytest.raises(StageError, match="no Linear layer left"):
        Magnitude(sparsity=0.3, include=["nothing*"]).run(ctx.reference, ctx)


def test_sparsity_out_of_range_is_a_recipe_error():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Magnitude(sparsity=1.0)
    with pytest.raises(ValidationError):
        NM(n=4, m=4)


def test_structured_shrinks_shapes_and_still_exports_and_fuses(ctx):
    r = Structured(head_sparsity=0.5, ffn_sparsity=0.5).run(ctx.reference, ctx)
    model = r.artifact.model
    assert model.config.intermediate_size == 64 and r.report["heads_per_layer"] == 2
    assert model.encoder.layer[0].attention.self.query.weight.shape == (16, 32)  # 2 heads x 8
    assert r.report["params_after"] < r.report["params_before"]
    assert r.report["calibration.mean_cosine (in-sample)"] > 0.8  # measured 0.97 with the least-squares refit
    exp = Export().run(r.artifact, ctx)  # parity with torch is checked inside
    fused = Fuse(expect={"Attention": 2, "SkipLayerNormalization": 4}).run(exp.artifact, ctx)
    assert fused.report["contract"] == "met"
    import onnx

    inits = {t.name: list(t.dims) for t in onnx.load(str(fused.artifact.path)).graph.initializer}
    assert any(d == [32, 48] for d in inits.values())  # fused QKV weight: hidden x 3 * (2 heads * 8)


def test_structured_refit_helps(ctx):
    key = "held_out.mean_cosine"
    plain = Structured(ffn_sparsity=0.5, refit=False, samples=150).run(ctx.reference, ctx).report[key]
    refit = Structured(ffn_sparsity=0.5, samples=150).run(ctx.reference, ctx).report[key]
    assert refit > plain


def test_structured_refuses_to_remove_every_head_and_nothing(ctx):
    r = Structured(head_sparsity=0.99).run(ctx.reference, ctx)
    assert r.report["heads_per_layer"] == 1 and any("keeping 1" in w for w in ctx.reporter.warnings)
    with pytest.raises(ValidationError, match="nothing would be pruned"):  # at recipe load, before any compute
        Structured()
    Structured(ffn_sparsity=0.25, gqa_heads="whole_groups").run(ctx.reference, ctx)
    assert any("gqa_heads has no effect on `bert`" in w for w in ctx.reporter.warnings)


def test_structured_saved_model_reloads(ctx, tmp_path):
    from transformers import AutoModel

    r = Structured(head_sparsity=0.25, ffn_sparsity=0.25).run(ctx.reference, ctx)
    r.artifact.model.save_pretrained(tmp_path / "m")
    again = AutoModel.from_pretrained(tmp_path / "m")
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids)[0], r.artifact.model(input_ids=ids)[0], atol=1e-5)


def test_recover_improves_held_out_fidelity(ctx):
    pruned = Structured(ffn_sparsity=0.75, refit=False).run(ctx.reference, ctx).artifact
    r = Recover(steps=30, batch_size=16, lr=1e-3, held_out=32).run(pruned, ctx)
    assert r.report["held_out.mean_cosine.after"] > r.report["held_out.mean_cosine.before"]


def test_recover_with_fake_quant_learns_to_absorb_int8_rounding(ctx):
    """fake_quant: int8 trains through the ORT int8 simulation; its held-out cosine measured through that
    simulation must rise, and the model it returns is plain float (no wrapper left behind)."""
    from slimline.prune.common import clone

    loud = clone(ctx.reference)  # 10x weights: int8 rounding then costs the tiny model something to recover
    with torch.no_grad():
        for lin in (m for m in loud.model.modules() if isinstance(m, torch.nn.Linear)):
            lin.weight.mul_(10)
    own = Context(workdir=ctx.workdir, load_data=lambda: ctx.data, reference=loud)  # teacher = the same model
    r = Recover(steps=30, batch_size=16, lr=1e-4, held_out=32, fake_quant="int8").run(clone(loud), own)
    rep = r.report
    assert rep["fake_quant"].startswith(("int8 (per-channel 8-bit weights", "int8 (per-channel 7-bit weights"))
    assert rep["held_out.mean_cosine.before"] == 1.0  # unpruned: only the int8 rounding is left to learn
    # measured 0.99972 -> 0.99992: the simulated int8 error shrinks ~3x in 30 steps
    assert rep["held_out.mean_cosine.int8_simulated.after"] > rep["held_out.mean_cosine.int8_simulated.before"]
    assert all("forward" not in m.__dict__ for m in r.artifact.model.modules())


def test_recover_needs_enough_text(ctx):
    with pytest.raises(StageError, match="too few"):
        Recover(held_out=190, batch_size=32).run(ctx.reference, ctx)


def test_structured_sensitivity_allocation_spreads_the_same_total_and_still_fuses(ctx):
    """head_allocation: sensitivity removes round(head_sparsity * heads * layers) heads in all, more from the
    layers where they cost least; every layer keeps one; the uneven model exports and its Attention still fuses."""
    r = Structured(head_sparsity=0.5, head_allocation="sensitivity").run(ctx.reference, ctx)
    model, rep = r.artifact.model, r.report
    kept = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    assert sum(kept) == 4 and min(kept) >= 1  # 2 layers x 4 heads, half of them gone
    assert rep["head_allocation"] == "sensitivity" and all(f"head_cost.layer{i}" in rep for i in range(2))
    expected = kept[0] if kept[0] == kept[1] else f"{kept[0]},{kept[1]}"
    assert rep["heads_per_layer"] == expected
    exp = Export().run(r.artifact, ctx)
    assert Fuse(expect={"Attention": 2}).run(exp.artifact, ctx).report["contract"] == "met"


def test_structured_refit_to_the_original_corrects_upstream_error(ctx):
    """refit_target: original fits each layer to the original model's residual stream, so the error that
    earlier pruned layers carried in is corrected too; on held-back text it beats the per-layer refit."""
    from slimline.prune.common import clone

    loud = clone(ctx.reference)  # the random tiny BERT barely changes its input; 10x weights make every layer count
    with torch.no_grad():
        for m in loud.model.encoder.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(10)
    key, cut = "held_out.mean_cosine", {"head_sparsity": 0.5, "ffn_sparsity": 0.5, "samples": 150}
    layer = Structured(**cut, refit_target="layer").run(loud, ctx).report
    original = Structured(**cut).run(loud, ctx).report
    assert layer["refit_target"] == "layer" and original["refit_target"] == "original"
    assert original[key] > layer[key] + 0.002  # measured 0.9775 vs 0.9718
    with pytest.raises(ValidationError, match="needs refit"):
        Structured(ffn_sparsity=0.5, refit=False, refit_target="original")


def test_refit_to_the_original_keeps_a_layer_whose_inputs_carry_no_error(ctx):
    """The refit's ridge pulls toward the layer's current weights, not toward zero: a layer that already
    reproduces the original (nothing upstream was pruned) keeps its trained weights. (Pulled toward
    zero, every unpruned layer was refit to the calibration text; on MiniLM with 3% of FFN channels
    cut that cost 0.0012 of mean cosine on the held-out plays.)"""
    from slimline.measure.inputs import calibration_batches
    from slimline.prune.common import clone
    from slimline.prune.structured import _refit_to_original, bert_blocks

    ref = ctx.reference
    copy = clone(ref)
    block, original_block = bert_blocks(copy.model)[0], bert_blocks(ref.model)[0]
    before = block.output.dense.weight.detach().clone()
    with torch.no_grad():
        _refit_to_original(
            copy.model, block.output, ref.model, original_block.output, calibration_batches(copy.tokenizer, texts(40)), 0.01
        )
    assert torch.allclose(block.output.dense.weight, before, atol=1e-5)
