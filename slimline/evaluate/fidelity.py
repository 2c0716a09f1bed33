"""Accuracy of the compressed model against the fp32 original on real text.

- ``mean_cosine`` / ``min_cosine``: of sentence embeddings (or logits, for classification).
- ``top10_overlap``: for each query, the fraction of its 10 nearest neighbours (by the fp32
  embeddings) that the compressed embeddings also rank in their top 10 -- what retrieval users feel.
- ``spearman``: of cosine similarity against gold scores, for labelled sentence pairs.
- ``label_agreement`` / ``accuracy``: for text-classification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimline.models.heads import cosine, task_vectors

TOP_K = 10
QUERIES = 200


def encode(
    runner: Any, tokenizer: Any, texts: list[str], task: str, pooling: str, max_length: int, step=None, batch: int = 32
) -> np.ndarray:
    """Task vectors for ``texts``, batched by length with dynamic padding (as deployments batch)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in runner.input_names}
        vecs = task_vectors(runner.run(feeds), feeds["attention_mask"], task, pooling)
        for j, i in enumerate(idx):
            out[i] = vecs[j]
        if step is not None:
            step.advance(len(idx))
    return np.stack(out)


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


def spearman(a: np.ndarray, b: np.ndarray) -> float:
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


def fidelity(ref: np.ndarray, new: np.ndarray, task: str) -> dict[str, float]:
    """Metrics of ``new`` against the reference vectors ``ref`` (both (N, C))."""
    cos = cosine(ref, new)
    metrics = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
    if task == "feature-extraction":
        metrics[f"top{TOP_K}_overlap"] = top_k_overlap(ref, new)
    else:
        metrics["label_agreement"] = float(np.mean(ref.argmax(-1) == new.argmax(-1)))
    metrics["max_abs_error"] = float(np.abs(ref - new).max())
    return metrics


def pair_spearman(vec_a: np.ndarray, vec_b: np.ndarray, gold: list[float]) -> float:
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
