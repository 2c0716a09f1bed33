"""Accuracy of the compressed encoder against the fp32 original on real text.

The figures themselves (cosine, top-10 neighbour overlap, Spearman, accuracy and macro F1) are the
measurement floor's (``slimline.measure.metrics``); this module runs a target over the evaluation
texts the way a deployment batches them, and turns its outputs into the family's task vectors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimline.family import Family


def word_predictions(runner: Any, tokenizer: Any, words: list[list[str]], max_length: int, batch: int = 32) -> list[np.ndarray]:
    """Token classification: each text's predicted class per word, read at the word's first sub-token
    (words cut off by ``max_length`` get -1)."""
    out = []
    for start in range(0, len(words), batch):
        chunk = words[start : start + batch]
        enc = tokenizer(
            chunk, is_split_into_words=True, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in runner.input_names}
        classes = runner.run(feeds).argmax(-1)
        for j, row in enumerate(chunk):
            pred = np.full(len(row), -1)
            for position, word in enumerate(enc.word_ids(j)):
                if word is not None and pred[word] == -1:
                    pred[word] = classes[j, position]
            out.append(pred)
    return out


def encode(
    runner: Any, tokenizer: Any, texts: list[str], family: Family, pooling: str, max_length: int, step=None, batch: int = 32
) -> np.ndarray:
    """Task vectors for ``texts``, batched by length with dynamic padding (as deployments batch)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {k: v.astype(np.int64) for k, v in enc.items() if k in runner.input_names}
        output, mask = runner.run(feeds), feeds["attention_mask"]
        if family.vectors == "token-logits":  # each text's real tokens, padded with NaN rows below
            for j, i in enumerate(idx):
                out[i] = family.task_vectors(output[j : j + 1], mask[j : j + 1], pooling)
        else:
            vecs = family.task_vectors(output, mask, pooling)
            for j, i in enumerate(idx):
                out[i] = vecs[j]
        if step is not None:
            step.advance(len(idx))
    if family.vectors == "token-logits":  # [texts, longest, labels]; rows past a text's tokens are NaN
        longest = max(len(v) for v in out)
        return np.stack([np.pad(v, ((0, longest - len(v)), (0, 0)), constant_values=np.nan) for v in out])
    return np.stack(out)
