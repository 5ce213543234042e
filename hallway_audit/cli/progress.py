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


@contextmanager
def burst_reporter(enabled: bool) -> Iterator:
    """One bar per setting: its burst steps, then its p_t states."""
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]{task.fields[setting]}"),
        TextColumn("{task.fields[phase]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, int] = {}

    def report(setting: str, phase: str, done: int, total: int) -> None:
        if setting not in tasks:
            tasks[setting] = bar.add_task(setting, total=total, setting=setting, phase=phase)
        bar.update(tasks[setting], completed=done, total=total, phase=phase)

    with bar:
        yield report
