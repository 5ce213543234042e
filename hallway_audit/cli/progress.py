"""Progress on stderr for long checkpoints; silent when stderr is not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn


@contextmanager
def progress_reporter(enabled: bool) -> Iterator:
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]auditing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[tensor]}", style="dim"),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("audit", total=None, tensor="")

    def report(done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, tensor=name[-40:])

    with bar:
        yield report
