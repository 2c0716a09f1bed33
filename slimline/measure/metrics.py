"""How much an output changed: every comparison slimline reports is computed here.

- ``cosine`` / ``cosine_summary``: row-wise cosine of embeddings or logits, and the report's view.
- ``relative_error`` / ``to_db`` / ``sqnr_db``: a layer's output error, and the same in dB.
- ``top_k_overlap``: for each query, the share of its k nearest neighbours (by the reference
  vectors) that the new vectors also rank in their top k: what retrieval users feel.
- ``spearman`` / ``pair_spearman``: rank correlation, for labelled sentence pairs.
- ``classification``: accuracy and macro F1 against gold labels.
- ``fidelity``: the evaluator's set of figures for one model against its reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_K = 10
QUERIES = 200


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str = "mean") -> np.ndarray:
    """Sentence embeddings, L2-normalized. hidden (B, T, C), mask (B, T) -> (B, C)."""
    if mode == "cls":
        emb = hidden[:, 0]
    else:
        m = mask[..., None].astype(np.float32)  # (B, T, 1)
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, C) arrays."""
    na = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na, 1e-12)


def cosine_summary(cos: np.ndarray, prefix: str = "calibration") -> dict[str, float]:
    """The report's view of per-text cosines: their mean and minimum."""
    if cos.size == 0:
        return {}
    return {f"{prefix}.mean_cosine": round(float(cos.mean()), 5), f"{prefix}.min_cosine": round(float(cos.min()), 5)}


def relative_error(reference: np.ndarray, approx: np.ndarray) -> float:
    """``||ref - approx||_F / ||ref||_F`` (0 for an all-zero reference)."""
    denom = float(np.linalg.norm(reference))
    return float(np.linalg.norm(reference - approx)) / denom if denom > 0 else 0.0


def to_db(rel: float) -> float:
    """A relative error as SQNR in dB (``-20 log10(rel)``; infinite for no error)."""
    return float("inf") if rel <= 0 else -20.0 * float(np.log10(rel))


def sqnr_db(ref: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (higher is better; int8 weights are typically 35-45)."""
    noise = float(np.sum((ref.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def top_k_overlap(ref: np.ndarray, new: np.ndarray, k: int = TOP_K, queries: int = QUERIES) -> float:
    """Mean fraction of each query's reference top-k neighbours kept by ``new`` (self excluded)."""
    q = min(queries, len(ref))
    k = min(k, len(ref) - 1)
    if k < 1:
        return 1.0
    sim_ref, sim_new = ref[:q] @ ref.T, new[:q] @ new.T
    for s in (sim_ref, sim_new):
        s[np.arange(q), np.arange(q)] = -np.inf
    top_ref = np.argpartition(-sim_ref, k, axis=1)[:, :k]
    top_new = np.argpartition(-sim_new, k, axis=1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_new, strict=True)]))


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average the ranks of ties
            tie = x == v
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def pair_spearman(vec_a: np.ndarray, vec_b: np.ndarray, gold: list[float]) -> float:
    """Spearman of the pairs' cosine similarities against their gold scores."""
    return spearman(cosine(vec_a, vec_b), np.asarray(gold))


def classification(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Accuracy and macro F1 against gold labels."""
    f1s = []
    for label in np.unique(np.concatenate([pred, gold])):
        tp = float(np.sum((pred == label) & (gold == label)))
        fp = float(np.sum((pred == label) & (gold != label)))
        fn = float(np.sum((pred != label) & (gold == label)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    return {"accuracy": float(np.mean(pred == gold)), "f1_macro": float(np.mean(f1s))}


def fidelity(ref: np.ndarray, new: np.ndarray, vectors: str) -> dict[str, float]:
    """Figures of ``new`` against the reference ``ref`` (both (N, C)). ``vectors`` is what they are:
    ``embeddings`` (adds top-10 neighbour overlap), ``logits`` (adds label agreement) or ``token-logits``
    (``[texts, tokens, labels]`` with NaN rows past each text's tokens: compared token by token)."""
    if vectors == "token-logits":
        real = ~np.isnan(ref[..., 0])
        ref, new = ref[real], new[real]
    cos = cosine(ref, new)
    metrics = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if vectors == "embeddings":
        metrics[f"top{TOP_K}_overlap"] = top_k_overlap(ref, new)
    else:
        metrics["label_agreement"] = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
    metrics["max_abs_error"] = float(np.abs(ref - new).max())
    return metrics
