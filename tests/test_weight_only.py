"""Group-wise n-bit weights: round-trip bounds, GPTQ vs RTN, MatMulNBits packing, and the stage."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimline.errors import StageError
from slimline.quantize import nbits
from slimline.quantize.common import single_matmul
from slimline.quantize.weight_only import WeightOnly, replace_matmuls
from tests.test_compile import context
from tests.test_quantize import fused  # noqa: F401 - module fixture


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([4, 8]),
    st.sampled_from([16, 32, 64]),
    st.booleans(),
    st.integers(1, 130),
    st.integers(1, 6),
    st.floats(1e-3, 1e3),
)
def test_rtn_round_trip_error_is_at_most_half_a_scale(bits, block, symmetric, k, n, spread):
    w = np.random.default_rng(k * 7 + n).normal(0, spread, size=(k, n)).astype(np.float32)
    b = nbits.rtn(w, bits, block, symmetric)
    err = np.abs(w - b.dequantize())
    scale = np.repeat(b.scale, block, axis=1)[:, :k].T  # [K, N] like w
    assert np.all(err <= scale / 2 * (1 + 1e-4) + 1e-30)
    assert b.q.max() <= 2**bits - 1


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from([4, 8]), st.sampled_from([16, 32]), st.booleans(), st.integers(16, 96), st.integers(1, 5), st.floats(1.5, 30)
)
def test_clip_search_never_raises_a_blocks_squared_error(bits, block, symmetric, k, n, df):
    """Each block keeps the shrink factor with the least squared error, 1.0 (plain RTN) among them, so
    no block loses to plain RTN."""
    w = np.random.default_rng(k * 11 + n).standard_t(df, size=(k, n)).astype(np.float32)
    plain, clipped = nbits.rtn(w, bits, block, symmetric), nbits.rtn(w, bits, block, symmetric, clip=True)

    def block_sq(b):
        e = np.square(w - b.dequantize()).T  # [N, K]
        return nbits._pad(e, block).reshape(n, -1, block).sum(-1)

    # float32 rounding of the sums: relative, plus a floor at the layer's scale for blocks whose error is
    # already ~1e-7 (hypothesis found one 1.2e-4 over, by 3e-11, at 8 bits)
    before = block_sq(plain)
    assert np.all(block_sq(clipped) <= before * (1 + 1e-4) + 1e-6 * before.max() + 1e-12)
    assert clipped.q.max() <= 2**bits - 1


def test_clip_search_lowers_the_total_error():
    w = np.random.default_rng(3).normal(size=(512, 64)).astype(np.float32)
    plain, clipped = nbits.rtn(w, 4, 32), nbits.rtn(w, 4, 32, clip=True)
    assert np.square(w - clipped.dequantize()).sum() < 0.97 * np.square(w - plain.dequantize()).sum()  # measured 0.94


def correlated_inputs(k: int, rows: int = 2048, seed: int = 0) -> np.ndarray:
    """Activations with a few strong, correlated directions (the same for every seed), as hidden states have."""
    basis = np.random.default_rng(123).standard_normal((8, k))
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, 8)) @ basis * 3 + rng.standard_normal((rows, k)) * 0.3).astype(np.float32)


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    rng = np.random.default_rng(1)
    k, n = 128, 64
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = correlated_inputs(k)
    held_out = correlated_inputs(k, seed=9)
    g = nbits.gptq(w, x.astype(np.float64).T @ x, 4, 32, act_order=act_order)
    r = nbits.rtn(w, 4, 32)

    def err(b):
        return np.linalg.norm(held_out @ w - held_out @ b.dequantize()) / np.linalg.norm(held_out @ w)

    assert err(g) < 0.7 * err(r)  # measured ~0.3x


def test_gptq_past_the_float64_width_runs_in_float32_and_still_beats_rtn():
    """Past nbits.F64_MAX_K input features GPTQ factorizes in float32 (half the memory of a big down_proj's
    Hessians); it must still be GPTQ: well under RTN's error on correlated inputs."""
    k, n = nbits.F64_MAX_K + 64, 8
    w = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    x = correlated_inputs(k, rows=512)
    held_out = correlated_inputs(k, rows=256, seed=9)
    g = nbits.gptq(w, (x.T @ x).astype(np.float32), 4, 64)

    def err(b):
        return np.linalg.norm(held_out @ w - held_out @ b.dequantize()) / np.linalg.norm(held_out @ w)

    assert err(g) < 0.7 * err(nbits.rtn(w, 4, 64))


def test_hqq_lowers_mean_abs_error_on_heavy_tailed_weights():
    w = np.random.default_rng(2).standard_t(3, size=(256, 32)).astype(np.float32)
    assert np.abs(w - nbits.hqq(w, 4, 64).dequantize()).mean() < np.abs(w - nbits.rtn(w, 4, 64).dequantize()).mean()


@pytest.mark.parametrize(
    "make",
    [
        lambda w: nbits.rtn(w, 4, 32),
        lambda w: nbits.rtn(w, 4, 32, symmetric=True),
        lambda w: nbits.rtn(w, 8, 16),
        lambda w: nbits.rtn(w, 8, 64, symmetric=True),
        lambda w: nbits.hqq(w, 4, 32),  # float zero points
        lambda w: nbits.rtn(w, 4, 64),  # K=96 -> 2 blocks, last one padded; odd zero-point packing
    ],
)
def test_matmulnbits_computes_x_times_dequantized_weight(make, tmp_path):
    """ORT's kernel reads our packing exactly: its output equals X @ dequantize() (accuracy_level 0)."""
    import onnx

    from slimline.runtime import ort_session

    m = single_matmul(96, 40)
    w = np.asarray(onnx.numpy_helper.to_array(m.graph.initializer[0]))
    b = make(w)
    onnx.save_model(replace_matmuls(m, {"mm": b}, accuracy_level=0), str(tmp_path / "q.onnx"))
    x = np.random.default_rng(3).standard_normal((5, 96)).astype(np.float32)
    y = ort_session(tmp_path / "q.onnx", 1).run(None, {"X": x})[0]
    np.testing.assert_allclose(y, x @ b.dequantize(), atol=1e-4)


def test_stage_quantizes_every_matmul_and_reports_layer_error(fused, tmp_path):  # noqa: F811
    r = WeightOnly(block_size=32).run(fused, context(tmp_path)).report
    assert r["quantized.MatMulNBits"] == 6 and r["float.Attention"] == 2
    assert 0 < r["layer_error.max"] < 0.2 and len(r["layer_errors"]) == 6
    assert r["calibration.mean_cosine"] > 0.95


def test_gptq_stage_has_lower_layer_error_than_rtn(fused, tmp_path):  # noqa: F811
    rtn = WeightOnly(block_size=32).run(fused, context(tmp_path / "r")).report
    gptq = WeightOnly(block_size=32, algorithm="gptq").run(fused, context(tmp_path / "g")).report
    assert gptq["layer_error.median"] < rtn["layer_error.median"]


def test_fallback_auto_keeps_the_layers_above_the_threshold(fused, tmp_path):  # noqa: F811
    plain = WeightOnly(block_size=32).run(fused, context(tmp_path / "p")).report["layer_errors"]
    second, first = sorted(plain.values())[-2:]
    threshold = (first + second) / 2  # exactly one layer lies above it
    worst = max(plain, key=plain.get)
    r = WeightOnly(block_size=32, fallback="auto", max_layer_error=threshold).run(fused, context(tmp_path / "f")).report
    assert r["fallback_kept"] == 1 and f"fallback.{worst}" in r
    assert r["quantized.MatMulNBits"] == 5 and r["float.MatMul"] == 1


def test_fallback_measure_speed_reports_a_kernel_ratio(fused, tmp_path):  # noqa: F811
    """At the tiny model's 32-wide shapes the int4 kernel may lose to the float MatMul: either way it is said."""
    stage = WeightOnly(block_size=32, fallback="auto", max_layer_error=10, measure_speed=True, speed_rows=64)
    try:
        r = stage.run(fused, context(tmp_path)).report
    except StageError as e:
        assert "fallback kept every layer in float (6 layers)" in str(e)
        return
    reasons = [why for key, why in r.items() if key.startswith("fallback.")]
    assert len(reasons) == r["fallback_kept"] and all("not faster" in why for why in reasons)


def test_block_size_not_dividing_k_warns_with_the_layer(fused, tmp_path):  # noqa: F811
    ctx = context(tmp_path)
    WeightOnly(block_size=64, bits=8).run(fused, ctx)  # K=32 for most layers of the tiny model
    assert any("not a multiple of block_size 64" in w and "MatMul" in w for w in ctx.reporter.warnings)


def test_refuses_quantized_input_and_empty_selection(fused, tmp_path):  # noqa: F811
    once = WeightOnly().run(fused, context(tmp_path / "a")).artifact
    with pytest.raises(StageError, match="already quantized"):
        WeightOnly().run(once, context(tmp_path / "b"))
    with pytest.raises(StageError, match="no MatMul"):
        WeightOnly(exclude=["*"]).run(fused, context(tmp_path / "c"))


def test_too_little_calibration_text_is_a_clear_error(fused, tmp_path):  # noqa: F811
    from slimline.errors import DataError
    from slimline.measure.data import TextData
    from slimline.stage import Context

    data = TextData("few", calibration=["one line", ""], evaluation=["x"])
    ctx = Context(workdir=tmp_path, threads=1, load_data=lambda: data)
    with pytest.raises(DataError, match="at least 8 non-empty calibration texts, got 1"):
        WeightOnly(algorithm="gptq").run(fused, ctx)


def test_fallback_bits_promotes_the_worst_layer_to_8_bit_instead_of_float(fused, tmp_path):  # noqa: F811
    plain = WeightOnly(block_size=32).run(fused, context(tmp_path / "p")).report["layer_errors"]
    second, first = sorted(plain.values())[-2:]
    worst = max(plain, key=plain.get)
    stage = WeightOnly(block_size=32, fallback="auto", max_layer_error=(first + second) / 2, fallback_bits=8)
    r = stage.run(fused, context(tmp_path / "m")).report
    assert r["fallback_8bit"] == 1 and r["fallback_kept"] == 0 and "8-bit instead" in r[f"fallback.{worst}"]
    assert r["quantized.MatMulNBits"] == 6 and "float.MatMul" not in r
    assert r["layer_errors"][worst] < plain[worst] / 4  # 8 bits: ~16x less rounding error than 4


def test_layers_gives_chosen_layers_their_own_format_by_role(fused, tmp_path):  # noqa: F811
    import onnx

    plain = WeightOnly(block_size=32).run(fused, context(tmp_path / "p")).report["layer_errors"]
    stage = WeightOnly(
        block_size=32, layers={"role:ffn.out": {"bits": 8, "block_size": 64}, "role:ffn.in@1": {"bits": 4, "block_size": 16}}
    )
    result = stage.run(fused, context(tmp_path / "l"))
    r = result.report
    chosen = {k.removeprefix("layers."): v for k, v in r.items() if k.startswith("layers.")}
    assert len(chosen) == 3  # ffn.out in both layers, ffn.in of layer 1
    assert sum("8-bit in blocks of 64" in v for v in chosen.values()) == 2
    assert sum("4-bit in blocks of 16" in v for v in chosen.values()) == 1
    for name, why in chosen.items():
        assert r["layer_errors"][name] < plain[name]  # more bits or smaller blocks: less error than 4-bit/32
        if "8-bit" in why:
            assert r["layer_errors"][name] < plain[name] / 4
    graph = onnx.load(str(result.artifact.path), load_external_data=False).graph
    widths = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    assert sorted((w["bits"], w["block_size"]) for n, w in widths.items() if n in chosen) == [(4, 16), (8, 64), (8, 64)]
    assert sum(1 for n, w in widths.items() if n not in chosen and (w["bits"], w["block_size"]) == (4, 32)) == 3
    # the recipe's own choice is not second-guessed by the fallback
    strict = WeightOnly(
        block_size=32,
        fallback="auto",
        max_layer_error=1e-9,
        fallback_bits=8,
        layers={"role:ffn.in@1": {"bits": 4, "block_size": 16}},
    )
    s = strict.run(fused, context(tmp_path / "s")).report
    assert any("4-bit in blocks of 16" in v for k, v in s.items() if k.startswith("layers."))
    with pytest.raises(ValueError, match="ffn.middle"):
        WeightOnly(layers={"role:ffn.middle": {"bits": 8}})
