"""Running a loaded torch model: feed it a tokenized batch, and watch its modules with forward hooks.

Shared by the stages that run the torch model (pruning, distillation, bitsandbytes)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def forward(model: Any, batch: dict) -> Any:
    accepted = set(inspect.signature(model.forward).parameters)
    return model(**{k: v for k, v in batch.items() if k in accepted})


@contextmanager
def hooks(modules: dict[str, Any], fn: Callable[[str, Any, Any, Any], None]) -> Iterator[None]:
    """Forward hooks calling ``fn(name, module, inputs, output)``; removed on exit."""
    handles = [m.register_forward_hook(lambda mod, inp, out, n=n: fn(n, mod, inp, out)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
