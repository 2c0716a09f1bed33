"""Parity checks: run two implementations on the same inputs and measure how far they drift.

Inputs are both random token ids (several batch sizes and lengths, with padding) and real texts, so
that a graph that is only right on full-length inputs, or only on one batch size, is caught.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimline.runtime import Feeds

# (batch, sequence length, padded tokens in the last row)
RANDOM_SHAPES = ((1, 7, 0), (2, 16, 5), (4, 33, 20))


@dataclass
class ParityResult:
    max_abs_error: float
    max_rel_error: float
    worst_output: str
    worst_case: str
    cases: int

    def report(self, prefix: str = "parity") -> dict[str, Any]:
        return {
            f"{prefix}.max_abs_error": self.max_abs_error,
            f"{prefix}.max_rel_error": self.max_rel_error,
            f"{prefix}.cases": self.cases,
        }


def sample_feeds(tokenizer: Any, input_names: list[str], texts: list[str], seed: int = 0) -> dict[str, Feeds]:
    """Named input batches: random ids with padding at several shapes, and real texts if given."""
    rng = np.random.default_rng(seed)
    vocab = max(int(getattr(tokenizer, "vocab_size", 1000)), 10)
    special = set(getattr(tokenizer, "all_special_ids", []))
    cases: dict[str, Feeds] = {}
    for batch, length, pad in RANDOM_SHAPES:
        ids = rng.integers(0, vocab, size=(batch, length), dtype=np.int64)
        ids = np.where(np.isin(ids, list(special)), 100 % vocab, ids)
        mask = np.ones_like(ids)
        if pad:
            mask[-1, length - pad :] = 0
            ids[-1, length - pad :] = tokenizer.pad_token_id or 0
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        cases[f"random b{batch} s{length} pad{pad}"] = {k: v for k, v in feeds.items() if k in input_names}
    if texts:
        enc = tokenizer(texts[:8], padding=True, truncation=True, max_length=128, return_tensors="np")
        cases[f"text b{len(texts[:8])} s{enc['input_ids'].shape[1]}"] = {
            k: v.astype(np.int64) for k, v in enc.items() if k in input_names
        }
    return cases


def compare(
    run_a: Callable[[Feeds], dict[str, np.ndarray]],
    run_b: Callable[[Feeds], dict[str, np.ndarray]],
    cases: dict[str, Feeds],
) -> ParityResult:
    """Max abs/rel error of b against a over all cases; outputs are matched by name.

    Padded positions are masked out of token-level outputs: what a model computes there is
    meaningless (and fused attention kernels legitimately differ on it).
    """
    worst = ParityResult(0.0, 0.0, "", "", len(cases))
    for case, feeds in cases.items():
        out_a, out_b = run_a(feeds), run_b(feeds)
        mask = feeds.get("attention_mask")
        for name, a in out_a.items():
            b = out_b[name]
            if a.shape != b.shape:
                return ParityResult(float("inf"), float("inf"), name, f"{case}: shape {a.shape} vs {b.shape}", len(cases))
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            if mask is not None and diff.ndim >= 2 and diff.shape[:2] == mask.shape:
                diff = diff * mask.reshape(mask.shape + (1,) * (diff.ndim - 2))
            err = float(diff.max()) if diff.size else 0.0
            rel = err / max(float(np.abs(a).max()), 1e-12)
            if not np.isfinite(err) or err > worst.max_abs_error:
                worst.max_abs_error, worst.worst_output, worst.worst_case = err, name, case
            worst.max_rel_error = max(worst.max_rel_error, rel)
    return worst
