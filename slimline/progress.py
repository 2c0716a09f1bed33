"""The rich display: a line per stage, a bar for long loops, warnings in yellow as they happen."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from slimline.stage import Reporter


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def info(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/dim]")

    def warn(self, message: str) -> None:
        super().warn(message)
        self.progress.console.print(f"[yellow]warning:[/yellow] {message}")

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        task_id = self.progress.add_task(description, total=total)

        class _Step:
            def advance(_self, n: int = 1) -> None:
                self.progress.advance(task_id, n)

        try:
            yield _Step()
        finally:
            if total is None:
                self.progress.update(task_id, total=1, completed=1)
            else:
                self.progress.update(task_id, completed=total)
