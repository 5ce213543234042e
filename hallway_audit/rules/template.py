"""Message templates: `str.format` syntax restricted to plain names and a format spec.

`str.format` itself is not safe on untrusted templates (`{x.__class__}`, `{x[0]}`,
huge widths), so templates are parsed with `string.Formatter().parse` at load time,
every field is checked to be a bare name with an ordinary spec, and rendering
formats each value individually. Rendering never raises: a value that does not
fit its spec (say a count given a `%` spec) is shown with `str()`.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from .expr import Type

MAX_TEMPLATE_CHARS = 2000
MAX_WIDTH = 100  # also the cap on precision: a spec cannot ask for a megabyte of padding

_SPEC = re.compile(
    r"(?:(?P<fill>.)?(?P<align>[<>=^]))?(?P<sign>[-+ ])?z?#?0?(?P<width>\d+)?[,_]?"
    r"(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?",
    re.DOTALL,
)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SAMPLES: dict[Type, tuple[object, ...]] = {
    "num": (0.5, 1),
    "str": ("x",),
    "bool": (True,),
    "any": (0.5, 1, "x"),
    "list": ([],),
}


@dataclass(frozen=True)
class Field:
    name: str
    spec: str


@dataclass(frozen=True)
class Template:
    """Literal text and fields, alternating; `names` are the field names in order."""

    source: str
    parts: tuple[str | Field, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.name for p in self.parts if isinstance(p, Field)))

    def render(self, values: Mapping[str, object]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = values.get(part.name)
            if value is None:
                out.append("n/a")
                continue
            try:
                out.append(format(value, part.spec))
            except (ValueError, TypeError):
                out.append(str(value))
        return "".join(out)


def parse_template(source: str) -> tuple[Template, list[str]]:
    """The template plus every problem with its syntax (names are checked by the caller)."""
    problems: list[str] = []
    if len(source) > MAX_TEMPLATE_CHARS:
        return Template(source, (source,)), [f"message longer than {MAX_TEMPLATE_CHARS} characters"]
    parts: list[str | Field] = []
    try:
        parsed = list(string.Formatter().parse(source))
    except ValueError as exc:
        return Template(source, (source,)), [f"message template: {exc} (write '{{{{' and '}}}}' for literal braces)"]
    for literal, name, given_spec, conversion in parsed:
        if literal:
            parts.append(literal)
        if name is None:
            continue
        spec = given_spec or ""
        if not _IDENT.fullmatch(name):
            if name == "" or name.isdigit():
                problems.append(f"message field {{{name}}} must name a value, e.g. {{layer}}")
            else:
                problems.append(f"message field {{{name}}}: only plain names are allowed (no '.', '[' or expressions)")
            continue
        if conversion is not None:
            problems.append(f"message field {{{name}!{conversion}}}: conversions ('!r', '!s', '!a') are not allowed")
        if "{" in spec or "}" in spec:
            problems.append(f"message field {{{name}:{spec}}}: nested fields in a format spec are not allowed")
            continue
        m = _SPEC.fullmatch(spec)
        if m is None:
            problems.append(f"message field {{{name}:{spec}}}: invalid format spec {spec!r}")
            continue
        for part_name in ("width", "precision"):
            n = m.group(part_name)
            if n is not None and int(n) > MAX_WIDTH:
                problems.append(f"message field {{{name}:{spec}}}: {part_name} {n} exceeds {MAX_WIDTH}")
        parts.append(Field(name, spec))
    return Template(source, tuple(parts)), problems


def check_specs(template: Template, types: Mapping[str, Type]) -> list[str]:
    """Specs that cannot format the field's type at all, e.g. `{layer:.1%}`."""
    problems = []
    for part in template.parts:
        if not isinstance(part, Field) or not part.spec:
            continue
        samples = _SAMPLES[types.get(part.name, "any")]
        ok = False
        for sample in samples:
            try:
                format(sample, part.spec)
                ok = True
                break
            except (ValueError, TypeError):
                pass
        if not ok:
            problems.append(f"message field {{{part.name}:{part.spec}}}: the spec does not fit a {types.get(part.name, 'value')}")
    return problems
