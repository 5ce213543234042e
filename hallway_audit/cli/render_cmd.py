"""`hallway-audit render REPORT.json`: a saved JSON report in any format.

The formatters read the JSON document, so the re-rendered report is the one the
audit printed. The exit code is the gate's stored in the report (0 passed,
1 failed), so a CI step can gate on a report produced elsewhere; a file that is
not a hallway-audit report is a usage error (exit 2).
"""

from __future__ import annotations

import click

from ..errors import UsageError
from ..report.document import load_report
from ..report.inputs import RunInput
from .app import cli
from .outputs import emit, output_options, prepare_outputs


@cli.command("render")
@click.argument("report", metavar="REPORT.json")
@output_options
@click.option("--max-rows", type=click.IntRange(min=0), default=40, show_default=True,
              help="Layers and findings shown by table/markdown; 0 shows all.")
@click.pass_context
def render_command(ctx: click.Context, report: str, max_rows: int) -> int:
    """Re-render a saved JSON report (--format json output) as table, markdown,
    junit or json; exit with the gate's code stored in it."""
    outputs = prepare_outputs(ctx, [RunInput(report, "the report being rendered")])
    doc = load_report(report)
    try:
        emit(doc, outputs, max_rows=max_rows)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # load_report checks what the formatters read; this catches what a foreign document still hides.
        raise UsageError(f"{report}: malformed hallway-audit report: {type(exc).__name__}: {exc}") from None
    return int(doc["gate"]["exit_code"])
