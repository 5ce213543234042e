"""The output options shared by `audit` and `render`, and writing what they ask for.

`--format FMT[:FILE]` (repeatable), `-o/--output FILE` and one `--output-FMT FILE`
per registered formatter (adding a format adds its shortcut). The values are
collected in the click context rather than passed as parameters, so the
commands' signatures do not change when a format is added.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from ..report import formatter_names
from ..report.inputs import RunInput
from ..report.outputs import OutputSpec, check_outputs, output_plan, publish

F = TypeVar("F", bound=Callable[..., Any])
_KEY = "hallway_audit.outputs"


def _store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(_KEY, {})[param.name] = value
    return value


def output_options(f: F) -> F:
    """Add the output options to a command (read them back with `outputs_from(ctx)`)."""
    names = formatter_names()
    for name in reversed(names):
        f = click.option(
            f"--output-{name}", f"output_{name}", metavar="FILE", expose_value=False, callback=_store,
            help=f"Also write the {name} report to FILE (atomically).",
        )(f)
    f = click.option(
        "--output", "-o", "output", metavar="FILE", expose_value=False, callback=_store,
        help="Write the report of the --format without a FILE to FILE (atomically) instead of stdout.",
    )(f)
    f = click.option(
        "--format", "formats", multiple=True, metavar="FMT[:FILE]", expose_value=False, callback=_store,
        help=f"Report format ({', '.join(names)}), to FILE or stdout; repeat for several outputs, at most one "
             "on stdout. Machine formats keep stdout to the document alone. [default: table]",
    )(f)
    return f


def outputs_from(ctx: click.Context) -> list[OutputSpec]:
    """The outputs the command line asks for (a usage error, exit 2, when they conflict)."""
    values: Mapping[str, Any] = ctx.meta.get(_KEY, {})
    extra = [(name, values[f"output_{name}"]) for name in formatter_names() if values.get(f"output_{name}")]
    return output_plan(list(values.get("formats") or ()), values.get("output"), extra)


def prepare_outputs(ctx: click.Context, inputs: list[RunInput]) -> list[OutputSpec]:
    """Parse and check the outputs before any expensive work."""
    outputs = outputs_from(ctx)
    check_outputs(outputs, inputs)
    return outputs


def emit(doc: Mapping[str, Any], outputs: list[OutputSpec], *, max_rows: int) -> None:
    """Render every output, write the files (then stdout), and say on stderr what was written."""
    written = publish(doc, outputs, max_rows=max_rows)
    status = "passed" if doc["gate"]["passed"] else "failed"
    for out in written:
        click.echo(f"hallway-audit: wrote {out.path} (gate {status})", err=True)
