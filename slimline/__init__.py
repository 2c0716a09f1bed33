"""slimline: model compression and compilation with measured, checked results.

The Python API is three verbs (``slimline.api``): ``slimline.run(recipe)``, ``slimline.evaluate(run_dir)``
and ``slimline.check(run_dir)``. They are imported on first use, so ``import slimline`` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "check", "evaluate", "run"]


def __getattr__(name: str) -> Any:
    if name in ("run", "evaluate", "check"):
        from slimline import api

        return getattr(api, name)
    raise AttributeError(f"module 'slimline' has no attribute {name!r}")
