"""Turning raw model outputs into what a task compares: sentence embeddings or class logits."""

from __future__ import annotations

import numpy as np


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str = "mean") -> np.ndarray:
    """Sentence embeddings, L2-normalized. hidden (B, T, C), mask (B, T) -> (B, C)."""
    if mode == "cls":
        emb = hidden[:, 0]
    else:
        m = mask[..., None].astype(np.float32)  # (B, T, 1)
        emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def task_vectors(output: np.ndarray, mask: np.ndarray, task: str, pooling: str = "mean") -> np.ndarray:
    """What fidelity is measured on: pooled embeddings (feature-extraction) or logits (classification)."""
    if task == "feature-extraction":
        return pool(output, mask, pooling)
    return output.astype(np.float32)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, C) arrays."""
    na = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na, 1e-12)


def cosine_summary(cos: np.ndarray, prefix: str = "calibration") -> dict[str, float]:
    """The report's view of per-text cosines: their mean and minimum."""
    if cos.size == 0:
        return {}
    return {f"{prefix}.mean_cosine": round(float(cos.mean()), 5), f"{prefix}.min_cosine": round(float(cos.min()), 5)}
