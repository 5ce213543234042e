"""The command line: parse options, call the library, render, exit with a meaningful code."""

from __future__ import annotations

import os
import sys

from .. import interrupt

try:
    import click

    from ..errors import ExitCode, HallwayError
    from ..limits import is_out_of_memory, out_of_memory_message
    from .app import cli
except KeyboardInterrupt as _exc:  # Ctrl-C while click/torch import: one line, exit 130
    raise SystemExit(interrupt.report(_exc)) from None

__all__ = ["cli", "main"]


def _fail(message: str, code: int) -> int:
    click.echo(f"hallway-audit: error: {message}", err=True)
    return code


def _usage_error(exc: click.exceptions.ClickException) -> int:
    """Bad flags in one line, like every other error (click's own form takes three)."""
    hint = ""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        hint = f" (see '{ctx.command_path} --help')"
    return _fail(" ".join(exc.format_message().split()) + hint, int(ExitCode.USAGE))


def _invoke(argv: list[str] | None) -> int:
    """Run the click app without click's own handling of Ctrl-C (it prints a blank line
    and hides whether it was SIGINT or SIGTERM) or of exit codes."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with cli.make_context("hallway-audit", args) as ctx:
            return int(cli.invoke(ctx) or 0)
    except click.exceptions.Exit as exc:  # --help, --version
        return int(exc.exit_code)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure is one line on stderr and a distinct exit code.

    Out of memory is exit 6 wherever it is raised (MemoryError, torch's
    OutOfMemoryError, torch's CPU allocator's RuntimeError); Ctrl-C exit 130 and
    SIGTERM exit 143 (when run() installed the handlers), after the cleanup of
    whatever was being written.
    """
    debug = bool(os.environ.get("HALLWAY_AUDIT_DEBUG"))
    try:
        return _invoke(argv)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM as interrupt.Terminated
        return interrupt.report(exc)
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except BrokenPipeError:  # `hallway-audit ... | head`: the reader left; nothing to say, as a shell pipe would
        _silence_stdout()
        return 128 + 13  # SIGPIPE's shell code
    except click.exceptions.ClickException as exc:  # usage errors: bad flags, missing args
        return _usage_error(exc)
    except HallwayError as exc:
        if debug:
            raise
        return _fail(exc.message, int(exc.exit_code))
    except Exception as exc:
        if is_out_of_memory(exc):
            if debug:
                raise
            return _fail(out_of_memory_message(exc), int(ExitCode.RESOURCES))
        if debug:
            raise
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (set HALLWAY_AUDIT_DEBUG=1 for the traceback; please report it)",
            int(ExitCode.INTERNAL),
        )


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def run() -> None:
    """The `hallway-audit` console script and `python -m hallway_audit`: the process is
    ours, so SIGINT and SIGTERM become exceptions (interrupt.install) and, once the
    exit code is decided, are ignored through interpreter shutdown."""
    try:
        interrupt.install()
        code = main()
    except KeyboardInterrupt as exc:  # between installing the handlers and main's own try
        code = interrupt.report(exc)
    interrupt.ignore_at_exit()
    sys.exit(code)
