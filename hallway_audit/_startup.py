"""Ctrl-C or SIGTERM while the command line is still importing torch: one line, no traceback.

`python -m hallway_audit` and the `hallway-audit` script import this package (and
with it torch, transformers: seconds) before any of the CLI's own code runs, so
an interrupt in that window would end in a Python traceback. The package's
__init__ imports this module first thing; when -- and only when -- this
process is the command line, it routes SIGINT/SIGTERM through the CLI's handlers
and makes an interrupt that escapes to the top level print one line and exit
130 (SIGINT) or 143 (SIGTERM). A program that merely imports hallway_audit is
left alone. Only the standard library is imported here.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType


def _is_cli() -> bool:
    """Is this process `python -m hallway_audit ...` or the `hallway-audit` script?"""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0).removesuffix(".exe") == "hallway-audit":
        return True
    orig = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(orig[:-1]):
        if arg == "-m":
            return orig[i + 1] == "hallway_audit"
    return False


def _excepthook(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        from .interrupt import report

        code = report(exc)  # type: ignore[arg-type]
        os._exit(code)  # nothing of the audit has started: no cleanup to run
    _previous_hook(kind, exc, tb)


_previous_hook = sys.excepthook


def guard_cli_startup() -> None:
    global _previous_hook
    if not _is_cli():
        return
    from . import interrupt

    interrupt.install()
    if sys.excepthook is not _excepthook:
        _previous_hook = sys.excepthook
        sys.excepthook = _excepthook


guard_cli_startup()
