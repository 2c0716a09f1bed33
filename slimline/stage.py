"""The one abstraction: a typed, frozen config that is its own stage.

A stage's options are its pydantic fields (``extra="forbid"``, so a misspelled recipe key fails);
runtime state lives in the ``Context``, never on the config. ``run`` returns the new artifact and a
flat report of what happened, which goes into the manifest as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from slimline.artifact import TorchModel
    from slimline.measure.data import TextData


class Reporter:
    """Where progress and warnings go. The CLI shows them with rich; tests keep this silent one."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        """A long loop; call ``advance()`` on the object yielded once per step."""

        class _Step:
            def advance(self, n: int = 1) -> None:
                pass

        yield _Step()


@dataclass
class Context:
    """What a stage may use besides its input: scratch space, data, the reference model, output."""

    workdir: Path  # scratch folder, deleted after the run
    reporter: Reporter = field(default_factory=Reporter)
    threads: int = 0  # 0: all cores
    load_data: Any = None  # () -> TextData, loaded once on first use
    reference: TorchModel | None = None  # the unmodified source model
    _data: TextData | None = None
    _stage_warnings: list[str] = field(default_factory=list)

    @property
    def data(self) -> TextData:
        if self._data is None:
            if self.load_data is None:
                from slimline.errors import DataError

                raise DataError("This stage needs calibration data, but the run has none configured.")
            self._data = self.load_data()
        return self._data

    def warn(self, message: str) -> None:
        """A warning that also lands in the stage's report: nothing degrades silently."""
        self._stage_warnings.append(message)
        self.reporter.warn(message)

    def begin_stage(self) -> list[str]:
        """Start collecting warnings for the next stage; the returned list fills as it warns."""
        self._stage_warnings = []
        return self._stage_warnings

    def stage_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class StageResult:
    artifact: Any
    report: dict[str, Any]


class Stage(BaseModel):
    """Base of every stage. Subclasses set ``kind``, ``consumes``, ``produces`` and ``run``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: ClassVar[str]
    consumes: ClassVar[tuple[type, ...]]
    produces: ClassVar[type | None] = None  # None: same type as the input
    reshapes: ClassVar[bool] = False  # changes the model's config (heads, widths): later checks can't use the source's

    def run(self, artifact: Any, ctx: Context) -> StageResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_model(self, reference: TorchModel) -> None:
        """Checks of the options against the loaded model's config that need no compute (head counts,
        widths, the architecture). The runner calls it before any stage runs; it raises StageError.
        Checks that need only the options belong in a pydantic validator, which runs at recipe load."""

    def output_type(self, input_type: type) -> type:
        return self.produces or input_type
