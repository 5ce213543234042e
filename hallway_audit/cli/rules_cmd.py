"""`hallway-audit rules validate|list`: check and show rule files."""

from __future__ import annotations

import click
from rich import box
from rich.console import Console
from rich.table import Table

from ..errors import ExitCode
from ..rules import bundled_rule_files, load_rules, validate_rule_files
from .app import cli


@cli.group("rules")
def rules_group() -> None:
    """Validate and list rule files."""


@rules_group.command("validate")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
def validate_command(files: tuple[str, ...]) -> int:
    """Check rule files; print every problem as file:line: rule id: what. Exit 4 if any."""
    problems = validate_rule_files(list(files))
    for problem in problems:
        click.echo(problem, err=True)
    if problems:
        click.echo(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {len(files)} file(s)", err=True)
        return int(ExitCode.RULES)
    click.echo(f"{len(files)} rule file{'s' if len(files) != 1 else ''} valid")
    return 0


@rules_group.command("list")
@click.argument("files", nargs=-1, metavar="[FILE...]")
def list_command(files: tuple[str, ...]) -> int:
    """Show the rules of FILEs (default: every bundled rule file)."""
    console = Console(highlight=False)
    names = list(files) or bundled_rule_files()
    for name in names:
        ruleset = load_rules([name])
        table = Table(title=name, title_justify="left", box=box.SIMPLE_HEAD)
        for col in ("id", "scope", "phase", "severity", "verdict", "when"):
            table.add_column(col, overflow="fold")
        for r in ruleset.rules:
            table.add_row(r.id, r.scope, r.phase, r.severity, r.verdict, r.when)
        console.print(table)
    return 0
