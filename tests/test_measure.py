"""The measurement floor: the one timer's order, and the int8 simulation being one formula for numpy and torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from slimline.measure.quantsim import int8_symmetric, uint8_roundtrip
from slimline.measure.timer import abba, interleave


def test_interleave_runs_abba_rounds_after_warmup():
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in "abc"}
    times = interleave(calls, repeats=3, warmup=1)
    assert order == ["a", "b", "c"] + ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert abba("ab", 0) == ["a", "b"] and abba("ab", 1) == ["b", "a"]


def test_interleave_takes_the_calls_own_times():
    times = interleave({"gpu": lambda: 0.25}, repeats=2, timed_by_call=True)
    assert times == {"gpu": [0.25, 0.25]}


@settings(max_examples=50, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 9)), elements=st.floats(-50, 50, width=32)))
def test_uint8_roundtrip_is_one_formula_for_numpy_and_torch(x):
    a = uint8_roundtrip(x)
    b = uint8_roundtrip(torch.from_numpy(x.copy())).numpy()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(x).max())))
    step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
    assert np.all(np.abs(a - x) <= step / 2 + 1e-5 * max(1.0, float(np.abs(x).max())))  # round to nearest


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("reduce_range", [True, False])
def test_int8_symmetric_agrees_across_array_types_and_keeps_its_range(per_channel, reduce_range):
    w = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    a = int8_symmetric(w, per_channel, reduce_range)
    t = torch.from_numpy(w.copy()).requires_grad_()
    b = int8_symmetric(t, per_channel, reduce_range, straight_through=True)
    np.testing.assert_allclose(a, b.detach().numpy(), atol=1e-6)
    b.sum().backward()
    np.testing.assert_array_equal(t.grad.numpy(), np.ones_like(w))  # straight through
    qmax = 64 if reduce_range else 127
    scale = (np.abs(w).max(1, keepdims=True) if per_channel else np.abs(w).max()) / qmax
    levels = np.round(a / scale)
    assert np.abs(levels).max() <= qmax and np.allclose(levels * scale, a, atol=1e-6)


def test_token_logits_are_compared_on_real_tokens_only():
    from slimline.measure import metrics

    ref = np.array([[[1.0, 0.0], [0.0, 1.0], [np.nan, np.nan]], [[1.0, 0.0], [np.nan, np.nan], [np.nan, np.nan]]])
    new = ref.copy()
    new[0, 1] = [1.0, 0.2]  # one of three real tokens changes its label
    new[1, 2] = [5.0, -5.0]  # padding: ignored, whatever it holds
    got = metrics.fidelity(ref, new, "token-logits")
    assert got["label_agreement"] == pytest.approx(2 / 3) and np.isfinite(got["mean_cosine"])
