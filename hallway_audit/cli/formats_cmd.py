"""`hallway-audit formats`: the lattice of each number format."""

from __future__ import annotations

import json

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ..lattice import get_format, list_formats
from .app import cli


@cli.command("formats")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
def formats_command(as_json: bool) -> int:
    """List number formats: bits, max finite, smallest subnormal, ulp at 1.0.

    For scaled formats the figures are in units of the scale (the element format).
    """
    rows = [get_format(name).describe() for name in list_formats()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return 0
    table = Table(box=box.SIMPLE_HEAD)
    for col in ("name", "bits", "scale", "block", "max finite", "min subnormal", "ulp at 1.0"):
        table.add_column(col, justify="left" if col in ("name", "scale") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            r["name"],
            str(r["bits"]),
            str(r.get("scale") or "none"),
            str(r.get("block") or "-"),
            f"{r['max_finite']:.5g}",
            f"{r['smallest_subnormal']:.5g}",
            f"{r['ulp_at_1']:.5g}",
        )
    table.caption = "scaled formats: figures in units of the scale; `--json` adds descriptions"
    Console(highlight=False, width=max(100, Console().width)).print(table)
    return 0
