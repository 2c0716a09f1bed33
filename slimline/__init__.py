"""slimline: model compression and compilation with measured, checked results.

The Python API is ``slimline.api``: ``api.run(recipe)``, ``api.evaluate(run_dir)`` and
``api.check(run_dir)``, the three verbs the CLI is written on. ``import slimline`` itself stays light
(no torch, ONNX or ONNX Runtime).
"""

__version__ = "0.1.0"
