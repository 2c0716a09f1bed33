"""The rich display: a line per stage, a bar for long loops, warnings in yellow as they happen.

On a terminal, long loops show live bars. Without one (a CI log), rich shows no live display, so
each task prints a plain line when it starts, one at least every 30 s while it advances, and one
when it ends. Messages are printed as plain text: a model path like ``tiny[ft-v2]`` is not markup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from slimline.stage import Reporter

HEARTBEAT_S = 30.0


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
            disable=not self.live,
        )
        self._open: list[tuple[str, float]] = []  # tasks in progress: (description, start)
        self._last_line = time.monotonic()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> RichReporter:
        self.progress.start()
        if not self.live:  # a plain log: a line at least every HEARTBEAT_S, even inside one long step
            self._beat = threading.Thread(target=self._heartbeat, name="slimline-heartbeat", daemon=True)
            self._beat.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=2)
        self.progress.stop()

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            now = time.monotonic()
            if now - self._last_line >= HEARTBEAT_S and self._open:
                description, started = self._open[-1]
                self._line(Text(f"... {description}: still running, {now - started:.0f}s", style="dim"))

    def _line(self, text: Text) -> None:
        self._last_line = time.monotonic()
        self.progress.console.print(text, highlight=False, soft_wrap=True)

    def info(self, message: str) -> None:
        self._line(Text(message, style="dim"))

    def warn(self, message: str) -> None:
        super().warn(message)
        self._line(Text("warning: ", style="yellow") + Text(message))

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Any]:
        task_id = self.progress.add_task(escape(description), total=total)
        started = last = time.monotonic()
        done = 0
        if not self.live:
            self._line(Text(f"{description} ..." + (f" (0/{total})" if total else "")))
        reporter = self
        self._open.append((description, started))

        class _Step:
            def advance(_self, n: int = 1) -> None:
                nonlocal done, last
                done += n
                reporter.progress.advance(task_id, n)
                now = time.monotonic()
                if not reporter.live and now - last >= HEARTBEAT_S:
                    last = now
                    of = f"{done}/{total}" if total else f"{done} steps"
                    reporter._line(Text(f"{description}: {of}, {now - started:.0f}s"))

        try:
            yield _Step()
        finally:
            if (description, started) in self._open:
                self._open.remove((description, started))
            if total is None:
                self.progress.update(task_id, total=1, completed=1)
            else:
                self.progress.update(task_id, completed=total)
            if not self.live:
                self._line(Text(f"{description}: done in {time.monotonic() - started:.1f}s", style="dim"))
