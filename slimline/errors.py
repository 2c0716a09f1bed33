"""Every error slimline raises for a user's mistake, in one place.

A ``SlimlineError`` is printed by the CLI as one paragraph without a traceback (exit code 2): it must
say what failed, where (file, YAML path, layer name), why it matters and how to fix it.
"""

from __future__ import annotations


class SlimlineError(Exception):
    """A problem the user can fix; the message says how."""

    exit_code = 2


class RecipeError(SlimlineError):
    """The recipe file, a key or a value in it, or a --set override is wrong."""


class ModelError(SlimlineError):
    """The model source is missing, not a model, or of an unsupported kind."""


class DataError(SlimlineError):
    """Calibration or evaluation data is missing, empty or malformed."""


class StageError(SlimlineError):
    """A stage could not do its job on this model (a contract or tolerance failed)."""


class OutputError(SlimlineError):
    """The output folder can't be written (it holds a run, or is not writable)."""


class ResourceError(SlimlineError):
    """The machine can't hold what the run needs (disk, memory), or a write failed for lack of space."""
