"""The command line: parse options, call the library, render, exit with a meaningful code."""

from __future__ import annotations

import os
import sys

import click

from ..errors import ExitCode, HallwayError
from .app import cli

__all__ = ["cli", "main"]


def _fail(message: str, code: int) -> int:
    click.echo(f"hallway-audit: error: {message}", err=True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every failure is one line on stderr and a distinct exit code."""
    debug = bool(os.environ.get("HALLWAY_AUDIT_DEBUG"))
    try:
        code = cli.main(args=argv, prog_name="hallway-audit", standalone_mode=False)
    except click.exceptions.Abort:
        return _fail("aborted", 130)
    except click.exceptions.ClickException as exc:  # usage errors: bad flags, missing args
        exc.show()
        return int(ExitCode.USAGE)
    except HallwayError as exc:
        if debug:
            raise
        return _fail(exc.message, int(exc.exit_code))
    except MemoryError:
        return _fail("out of memory (host): audit on a machine with more RAM or pass --device cuda", int(ExitCode.RESOURCES))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return _fail("out of memory (device): use a smaller batch or --device cpu", int(ExitCode.RESOURCES))
        if debug:
            raise
        return _fail(
            f"internal error: {type(exc).__name__}: {exc} (set HALLWAY_AUDIT_DEBUG=1 for the traceback; please report it)",
            int(ExitCode.INTERNAL),
        )
    return int(code or 0)


def run() -> None:
    sys.exit(main())
