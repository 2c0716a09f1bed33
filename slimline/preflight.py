"""Checks that run after the model is loaded and before any stage computes.

A run that can't finish should say so in its first seconds, not after an hour of compute: input
lengths the model can't take, data rows that can't be read, labels the model doesn't have, and
disk or memory that can't hold what the run will write or allocate. The estimates are lower bounds
(they count the model copies and activations a run certainly makes), so a refusal is never a guess;
passing them does not promise the run fits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from slimline.errors import DataError, RecipeError, ResourceError
from slimline.family import family_of

MB = 1 << 20


def positions(config: Any) -> int | None:
    """The longest input the model's position embeddings allow (None if it has no limit we know)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_lengths(recipe: Any, config: Any, evaluate: bool) -> None:
    limit = positions(config)
    if limit is None or not evaluate:
        return
    wanted = family_of(recipe.model.task).evaluation_lengths(recipe.evaluate, timed=recipe.evaluate.speed.enabled)
    for where, value in wanted:
        if value > limit:
            raise RecipeError(
                f"{where} is {value} tokens, but the model takes at most {limit} (its position embeddings). "
                f"Set it to {limit} or less."
            )


def check_labels(recipe: Any, config: Any, data: Any) -> None:
    """Labelled data for a classifier: every label must be one the model has; names become ids.
    Token classification has a list of labels per text (one per word)."""
    if not data.labels or recipe.model.task not in ("text-classification", "token-classification"):
        return
    if recipe.model.task == "token-classification":
        if not data.words:
            raise DataError(
                f"{data.source}: token-classification labels need each row's words as a list and one label per word "
                '(JSONL rows like {"tokens": ["EU", "rejects"], "ner_tags": ["B-ORG", "O"]}), not one label per text.'
            )
        flat = [lab for row in data.labels for lab in row]
        ids = _label_ids(flat, config, data.source)
        out, at = [], 0
        for row in data.labels:
            out.append(ids[at : at + len(row)])
            at += len(row)
        data.labels = out
        return
    data.labels = _label_ids(data.labels, config, data.source)


def _label_ids(labels: list[Any], config: Any, source: str) -> list[int]:
    """Label names or ids as the model's class ids; an unknown one is a DataError naming it."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = getattr(config, "num_labels", None) or len(id2label)
    by_name = {v.lower(): k for k, v in id2label.items()}
    ids = []
    for label in labels:
        if isinstance(label, str):
            key = label.strip().lower()
            if key in by_name:
                label = by_name[key]
            elif key.lstrip("-").isdigit():
                label = int(key)
            else:
                names = ", ".join(list(id2label.values())[:10])
                raise DataError(
                    f"{source}: label `{label[:60]}` is not one of the model's labels ({names}). "
                    "Use the label names of the model's config (id2label) or their ids."
                )
        if not 0 <= int(label) < n:
            raise DataError(f"{source}: label {label} is out of range: the model has {n} labels (0..{n - 1}).")
        ids.append(int(label))
    return ids


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def check_disk(recipe: Any, reference: Any, out_dir: Path, scratch: Path, build: bool) -> dict[str, int]:
    """The run writes the model once per file-producing stage in scratch and once in the run folder."""
    params = sum(p.numel() for p in reference.model.parameters())
    fp32 = params * 4
    writers = sum(1 for s in recipe.stages if s.kind.startswith(("compile.", "quantize."))) if build else 0
    need = {"scratch": fp32 * writers, "out": (fp32 if build else 0) + 8 * MB}
    places = {"scratch": scratch, "out": out_dir}
    if _device(scratch) == _device(out_dir):
        need = {"out": need["scratch"] + need["out"]}
    for key, bytes_needed in need.items():
        free = shutil.disk_usage(places[key]).free
        if free < bytes_needed:
            where = places[key] if key == "scratch" else out_dir.parent
            raise ResourceError(
                f"not enough disk space: this run writes about {bytes_needed / MB:,.0f} MB in {where} "
                f"({writers} model copies of {fp32 / MB:,.0f} MB and the run folder), and {free / MB:,.0f} MB are free. "
                "Free some space, point --out (or TMPDIR for scratch) at another disk, or use fewer stages."
            )
    return need


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def activation_bytes(recipe: Any, config: Any) -> tuple[int, str]:
    """A lower bound on the largest activation the evaluation allocates, and what drives it."""
    ev = recipe.evaluate
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    if family_of(recipe.model.task).is_decoder:
        vocab = getattr(config, "vocab_size", 0) or 0
        g = ev.generation
        logits = g.context * vocab * (4 + 8)  # float32 logits and their float64 log-softmax
        return logits, f"evaluate.generation.context {g.context} x vocabulary {vocab}"
    batch, seq = 1, ev.data.max_length
    if ev.speed.enabled:
        batch = max(ev.speed.batch_sizes)
        seq = max(seq, ev.speed.seq_len)
        if ev.speed.traffic:
            batch = max(batch, ev.speed.traffic_batch_size)
    per_layer = batch * seq * (inter + 3 * hidden) * 4 + batch * heads * seq * seq * 4
    return per_layer, f"evaluate.speed.batch_sizes up to {batch} at {seq} tokens"


def check_memory(recipe: Any, reference: Any, evaluate: bool) -> None:
    free = available_memory()
    if free is None or not evaluate:
        return
    need, why = activation_bytes(recipe, reference.config)
    if need > free:
        raise ResourceError(
            f"not enough memory: {why} needs at least {need / MB:,.0f} MB for one layer's activations, and this machine "
            f"has {free / MB:,.0f} MB available. Lower the batch sizes or lengths."
        )


def check_threads(recipe: Any, reporter: Any) -> None:
    threads, cores = recipe.evaluate.threads, os.cpu_count() or 1
    if threads > cores:
        reporter.warn(f"evaluate.threads is {threads} but this machine has {cores} cores; timings will be oversubscribed.")


def preflight(recipe: Any, ctx: Any, out_dir: Path, scratch: Path, *, evaluate: bool = True, build: bool = True) -> None:
    """Every check that can fail a run before its compute starts. Loads the data now, so a bad row
    fails here."""
    reference = ctx.reference
    check_lengths(recipe, reference.config, evaluate)
    check_threads(recipe, ctx.reporter)
    for stage in recipe.stages:  # option checks against the config, until a stage changes the config
        stage.check_model(reference)
        if stage.reshapes:
            break
    if evaluate or recipe.stages:
        check_labels(recipe, reference.config, ctx.data)
    check_disk(recipe, reference, out_dir, scratch, build)
    check_memory(recipe, reference, evaluate)
