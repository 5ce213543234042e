"""`hallway-audit CHECKPOINT`: parse options, call the library, render, exit."""

from __future__ import annotations

import os
import shutil
import sys

import click

from ..audit import DEFAULT_FORMATS, DEFAULT_LR, FAIL_ON, audit
from ..report import RenderOptions, formatter_names, get_formatter, write_atomic
from .app import cli
from .progress import progress_reporter


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _wants_color(stream) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


@cli.command("audit")
@click.argument("checkpoint", metavar="CHECKPOINT")
@click.option("--rules", "rules", multiple=True, metavar="FILE",
              help="Rule file: a bundled name (default.yaml) or a path. Repeat to combine. [default: default.yaml]")
@click.option("--no-rules", is_flag=True, help="Measure only; evaluate no rules (the gate then always passes).")
@click.option("--precision", "precision", multiple=True, metavar="FORMATS",
              help=f"Planned weight formats, comma-separated (see `hallway-audit formats`). [default: {','.join(DEFAULT_FORMATS)}]")
@click.option("--lr", type=float, default=DEFAULT_LR, show_default=True,
              help="Planned learning rate: an Adam-like step moves each weight by about lr.")
@click.option("--spectral", is_flag=True, help="Also compute stable and effective rank of each weight matrix (slower).")
@click.option("--format", "output_format", type=click.Choice(formatter_names()), default="table", show_default=True,
              help="Report format; machine formats keep stdout to the document alone.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=False), metavar="FILE",
              help="Write the report to FILE (atomically) instead of stdout.")
@click.option("--fail-on", type=click.Choice(FAIL_ON), default="error", show_default=True,
              help="Lowest severity that fails the gate (exit 1).")
@click.option("--max-rows", type=click.IntRange(min=0), default=40, show_default=True,
              help="Layers and findings shown by table/markdown; 0 shows all.")
@click.option("--device", default="cpu", show_default=True, help="Device for the static pass: cpu, cuda, cuda:1.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def audit_command(checkpoint, rules, no_rules, precision, lr, spectral, output_format, output, fail_on, max_rows, device, quiet):
    """Audit CHECKPOINT (.safetensors, sharded index or directory, Hugging Face
    directory, .onnx, .pt/.bin) against the planned formats and rule files."""
    formats = _split_list(precision) or list(DEFAULT_FORMATS)
    rule_files = [] if no_rules else (list(rules) or ["default.yaml"])
    with progress_reporter(enabled=not quiet and sys.stderr.isatty()) as progress:
        result = audit(
            checkpoint,
            rules=rule_files,
            formats=formats,
            lr=lr,
            spectral=spectral,
            fail_on=fail_on,
            device=device,
            progress=progress,
        )
    formatter = get_formatter(output_format)
    to_terminal = output is None and not formatter.machine
    options = RenderOptions(
        color=to_terminal and _wants_color(sys.stdout),
        width=shutil.get_terminal_size((120, 40)).columns if to_terminal else 120,
        max_rows=max_rows,
    )
    text = formatter.render(result, options)
    if output is None:
        click.echo(text, nl=False)
    else:
        write_atomic(output, text)
        status = "passed" if result.gate.passed else "failed"
        click.echo(f"hallway-audit: wrote {output} (gate {status})", err=True)
    return result.gate.exit_code
