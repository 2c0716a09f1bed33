"""Model inputs: every batch slimline feeds a model is built here.

- speed: ``fixed_batch`` (real texts padded to one length) and ``traffic_batches`` (arrival order,
  padded per batch as a server pads);
- parity: ``sample_feeds`` (random ids at several shapes, with padding, plus real texts) and
  ``parity_prompts`` (decoder prompts);
- calibration: ``calibration_feeds`` (ONNX graphs; a decoder graph gets positions and an empty KV
  cache) and ``calibration_batches`` (torch models);
- decoders: ``token_stream`` (the texts as one token stream), ``kv_shape`` and ``empty_past``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slimline.errors import DataError, StageError
from slimline.runtime import Feeds

MIN_TEXTS = 8
# (batch, sequence length, padded tokens in the last row)
RANDOM_SHAPES = ((1, 7, 0), (2, 16, 5), (4, 33, 20))
PAST_PREFIX = "past_key_values."
LOGITS_TO_KEEP = "logits_to_keep"  # a decoder graph's optional input: compute the LM head for the last N positions only


# -- speed ---------------------------------------------------------------------------------------------


def fixed_batch(tokenizer: Any, texts: list[str], batch: int, seq_len: int) -> Feeds:
    """``batch`` real texts padded (or truncated) to exactly ``seq_len`` tokens."""
    chosen = [texts[i % len(texts)] for i in range(batch)]
    enc = tokenizer(chosen, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in enc.items()}


def traffic_batches(tokenizer: Any, texts: list[str], batch: int, max_length: int) -> list[Feeds]:
    """The texts in arrival order, in batches padded only to their longest member (as a server batches)."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        out.append({k: v.astype(np.int64) for k, v in enc.items()})
    return out


# -- parity --------------------------------------------------------------------------------------------


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


def parity_prompts(tokenizer: Any, texts: list[str]) -> list[np.ndarray]:
    """Up to two real prompts (at most 64 tokens each) for a decoder's prefill + decode parity."""
    prompts = [t for t in texts[:2] if t.strip()] or ["the king is dead, long live the king"]
    return [np.asarray(tokenizer(p, return_tensors="np")["input_ids"][:, :64], dtype=np.int64) for p in prompts]


# -- decoders ------------------------------------------------------------------------------------------


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a decoder config."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv, head_dim


def empty_past(config: Any, batch: int) -> dict[str, np.ndarray]:
    """An empty KV cache (length 0) for every layer: the feeds of a prefill."""
    layers, kv, hd = kv_shape(config)
    zero = np.zeros((batch, kv, 0, hd), np.float32)
    return {f"{PAST_PREFIX}{i}.{k}": zero for i in range(layers) for k in ("key", "value")}


def token_stream(tokenizer: Any, texts: list[str], limit: int) -> np.ndarray:
    """The texts as one stream of ``limit`` tokens (lines joined by newlines)."""
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        ids += (
            tokenizer("\n".join(texts[i : i + 256]), add_special_tokens=False)["input_ids"]
            + tokenizer("\n", add_special_tokens=False)["input_ids"]
        )
        if len(ids) >= limit:
            break
    return np.asarray(ids[:limit], dtype=np.int64)


# -- calibration ---------------------------------------------------------------------------------------


def check_texts(texts: list[str], stage: str, needed: int = MIN_TEXTS) -> list[str]:
    """Refuse calibration data that is empty or too short to estimate anything."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if len(texts) < needed:
        raise DataError(
            f"{stage}: needs at least {needed} non-empty calibration texts, got {len(texts)}. "
            "Point evaluate.data at more text, or raise evaluate.data.calibration_size."
        )
    return texts


def calibration_feeds(
    tokenizer: Any,
    texts: list[str],
    inputs: list[str],
    batch: int = 16,
    max_length: int = 128,
    fixed: bool = False,
    config: Any = None,
) -> list[Feeds]:
    """Tokenized batches of ``texts`` holding only the graph's ``inputs`` (int64).

    ``fixed`` pads every batch to ``max_length`` (ONNX Runtime's histogram calibrators stack batches).
    A decoder graph (``past_key_values.*`` inputs; pass its ``config``) gets position ids and an empty
    KV cache: calibration runs as a prefill.
    """
    decoder = any(i.startswith(PAST_PREFIX) for i in inputs)
    if decoder and not fixed:
        return packed_feeds(tokenizer, texts, batch, max_length, config)
    if decoder and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    feeds = []
    side = getattr(tokenizer, "padding_side", None)
    for i in range(0, len(texts), batch):
        padding = "max_length" if fixed else True
        try:
            if decoder:  # GroupQueryAttention reads each row's length off the mask: padding must be on the right
                tokenizer.padding_side = "right"
            enc = tokenizer(texts[i : i + batch], padding=padding, truncation=True, max_length=max_length, return_tensors="np")
        finally:
            if decoder:
                tokenizer.padding_side = side
        feed = {k: v.astype(np.int64) for k, v in enc.items() if k in inputs}
        if decoder:
            n, length = feed["input_ids"].shape
            feed["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (n, length)).copy()
            feed.update(empty_past(config, n))
        feeds.append(feed)
    return feeds


def packed_feeds(tokenizer: Any, texts: list[str], batch: int, length: int, config: Any) -> list[Feeds]:
    """Decoder calibration as a language model sees text: the lines joined into one token stream and cut
    into full ``length``-token sequences (no padding), each run as a prefill with an empty KV cache."""
    ids = token_stream(tokenizer, texts, 10**9)
    rows = max(len(ids) // length, 1)
    ids = np.resize(ids, rows * length).reshape(rows, length)  # a short text repeats rather than pads
    feeds = []
    for i in range(0, rows, batch):
        chunk = ids[i : i + batch]
        n = len(chunk)
        feeds.append(
            {
                "input_ids": chunk,
                "attention_mask": np.ones_like(chunk),
                "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (n, length)).copy(),
                **empty_past(config, n),
            }
        )
    return feeds


def calibration_batches(tokenizer: Any, texts: list[str], batch: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenized torch batches of ``texts`` (for stages that run the torch model)."""
    if not texts:
        raise StageError("This stage needs calibration text, and the recipe's evaluate.data gave none.")
    if tokenizer.pad_token is None:  # decoders ship without one; padded positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out
