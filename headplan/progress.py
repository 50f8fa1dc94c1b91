"""Progress and reporting hooks. Library code reports through a Reporter; only the CLI prints."""

from __future__ import annotations

import contextlib
import sys
import time


class Reporter:
    """Silent reporter (the library default)."""

    def log(self, msg: str) -> None:
        pass

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        yield lambda n=1: None


class RichReporter(Reporter):
    """Rich progress bars with ETA on stderr."""

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True, emoji=False)

    def log(self, msg: str) -> None:
        self.console.print(f"[dim]{msg}[/dim]", soft_wrap=True)  # one message, one line

    @contextlib.contextmanager
    def task(self, description: str, total: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=self.console,
                      disable=not sys.stderr.isatty() and False) as prog:
            tid = prog.add_task(description, total=total)
            t0 = time.perf_counter()
            yield lambda n=1: prog.advance(tid, n)
        self.log(f"{description}: {total} done in {time.perf_counter() - t0:.1f} s")
