"""Where a model runs: the torch fp32 baseline and the artifact on each target.

A runner takes a batch of int64 feeds and returns the model's first output (token states or logits)
as a float32 numpy array, so that fidelity and speed code is the same for every target.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slimline.runtime import Feeds, ort_session


@dataclass
class Runner:
    name: str  # baseline | compressed
    target: str  # torch-cpu | ort-cpu
    run: Callable[[Feeds], np.ndarray]
    input_names: list[str]
    details: dict[str, Any] = field(default_factory=dict)


def available(target: str) -> tuple[bool, str]:
    """Whether a target can run here, and why not."""
    if target in ("ort-cpu", "torch-cpu"):
        return True, ""
    return False, f"target {target} is not supported yet"


def torch_runner(model: Any, name: str, threads: int) -> Runner:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    accepted = set(model.forward.__code__.co_varnames)

    def run(feeds: Feeds) -> np.ndarray:
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items() if k in accepted})
        return out[0].float().numpy()

    return Runner(
        name,
        "torch-cpu",
        run,
        [n for n in names if n in accepted],
        {
            "library": f"torch {torch.__version__}",
            "threads": torch.get_num_threads(),
            "dtype": str(next(model.parameters()).dtype),
        },
    )


def ort_runner(path: Path, name: str, threads: int) -> Runner:
    import onnxruntime as ort

    n = threads or os.cpu_count() or 1
    session = ort_session(path, n)
    inputs = [i.name for i in session.get_inputs()]
    output = session.get_outputs()[0].name

    def run(feeds: Feeds) -> np.ndarray:
        return session.run([output], {k: feeds[k] for k in inputs})[0]

    return Runner(
        name,
        "ort-cpu",
        run,
        inputs,
        {
            "library": f"onnxruntime {ort.__version__}",
            "provider": "CPUExecutionProvider",
            "threads": n,
        },
    )
