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
    for col in ("name", "bits", "scale", "block", "max finite", "min subnormal", "ulp at 1.0", "description"):
        table.add_column(col, justify="right" if col in ("bits", "block", "max finite", "min subnormal", "ulp at 1.0") else "left")
    for r in rows:
        table.add_row(
            r["name"],
            str(r["bits"]),
            str(r.get("scale") or "none"),
            str(r.get("block") or "-"),
            f"{r['max_finite']:.6g}",
            f"{r['smallest_subnormal']:.6g}",
            f"{r['ulp_at_1']:.6g}",
            str(r.get("description", "")),
        )
    Console(highlight=False).print(table)
    return 0
