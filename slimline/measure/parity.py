"""Parity checks: run two implementations on the same inputs and measure how far they drift.

``compare`` takes two functions from feeds to named outputs (torch against ONNX Runtime, a fused graph
against the unfused one) over the cases of ``inputs.sample_feeds``: random token ids at several batch
sizes and lengths, with padding, and real texts, so that a graph that is only right on full-length
inputs, or on one batch size, is caught. ``decoder_parity`` does the same for a decoder's prefill and
greedy decode steps, each side with its own KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimline.runtime import Feeds


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


def decoder_parity(reference: Any, candidate: Any, prompts: list[np.ndarray], steps: int = 5) -> dict[str, Any]:
    """Prefill then ``steps`` greedy decode steps; each side keeps its own KV cache.

    ``reference`` and ``candidate`` are ``(tokens [1, n]) -> last logits`` callables with a ``reset``
    flag: ``fn(tokens, reset=True)`` starts a new sequence (the prompt), ``fn(tokens)`` appends.
    The reference's greedy token drives both.
    """
    worst, where, cases = 0.0, "", 0
    for ids in prompts:
        a = reference(ids, reset=True)
        b = candidate(ids, reset=True)
        for step in range(steps + 1):
            err = float(np.abs(a - b).max())
            cases += 1
            if err > worst or not where:
                worst, where = err, f"{'prefill' if step == 0 else f'decode step {step}'} ({ids.shape[1]}-token prompt)"
            if step == steps:
                break
            token = np.array([[int(a.argmax())]])
            a, b = reference(token), candidate(token)
    return {"parity.max_abs_error": worst, "parity.worst_case": where, "parity.cases": cases}
