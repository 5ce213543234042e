"""Ctrl-C and SIGTERM as exceptions, so a stopped audit cleans up and says one line.

Python turns SIGINT into KeyboardInterrupt but lets SIGTERM kill the process on
the spot: a report half-written to its temp file would stay behind. Here both
raise in the main thread -- SIGTERM as `Terminated`, a KeyboardInterrupt
subclass, so every `finally` and `except KeyboardInterrupt` that cleans up after
Ctrl-C (the atomic report writer's temp file) runs for it too.

Only the first signal raises. A second one (Ctrl-C pressed twice, SIGTERM after
SIGINT) arrives while the first is unwinding through that cleanup; raising again
there would abandon the cleanup and print a traceback, so it is ignored.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from types import FrameType

EXIT_SIGINT = 128 + signal.SIGINT  # 130, as a shell reports a process stopped by Ctrl-C
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM received: unwind like Ctrl-C, exit 143."""


_received: int | None = None


def _on_signal(signum: int, frame: FrameType | None) -> None:
    global _received
    if _received is not None:
        return
    _received = signum
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install() -> None:
    """Route SIGINT and SIGTERM through _on_signal (main thread only; elsewhere a no-op)."""
    global _received
    _received = None
    try:
        signal.signal(signal.SIGINT, _on_signal)
        signal.signal(signal.SIGTERM, _on_signal)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


def ignore_further() -> None:
    """From here on (reporting the interrupt, interpreter shutdown) a signal is not an exception."""
    global _received
    if _received is None:
        _received = signal.SIGINT


def ignore_at_exit() -> None:
    """Ignore SIGINT and SIGTERM at the OS level for the rest of the process: Python's
    finalization puts its own handlers back to the default action (die by the signal,
    exit -2), but leaves ignored signals ignored."""
    ignore_further()
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_code(exc: KeyboardInterrupt) -> int:
    return EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT


def message(exc: KeyboardInterrupt) -> str:
    return "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"


def report(exc: KeyboardInterrupt) -> int:
    """Print the one line for an interrupt and return its exit code."""
    ignore_further()
    try:
        sys.stderr.write(f"hallway-audit: error: {message(exc)}\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed or gone (the terminal was closed)
        pass
    return exit_code(exc)
