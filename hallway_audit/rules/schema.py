"""What a rule is: the vocabulary (scopes, severities, keys, names) and the Rule/RuleSet types.

Kept apart from the YAML loader so that code building rules by hand (tests, a plan
file, a future Python API) gets the same derived fields -- `names`, `per_setting`,
`phase` -- that decide where and when a rule is evaluated.
"""

from __future__ import annotations

import difflib
import keyword
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ..errors import RuleFileError
from ..metrics import METRICS
from .expr import FUNCTIONS, Expr, ExprSyntaxError, Type, parse_expr
from .template import Template, parse_template
from .verdicts import VERDICTS

Scope = Literal["layer", "model", "setting"]
Severity = Literal["error", "warning", "info"]
Phase = Literal["static", "dynamic"]

SCOPES: tuple[str, ...] = ("layer", "model", "setting")
# Highest first: gate() and reports rank findings by this order.
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")

TOP_LEVEL_KEYS: tuple[str, ...] = ("extends", "vars", "disable", "rules")
REQUIRED_RULE_KEYS: tuple[str, ...] = ("id", "scope", "when", "severity", "verdict", "message")
OPTIONAL_RULE_KEYS: tuple[str, ...] = ("metadata",)
RULE_KEYS: tuple[str, ...] = REQUIRED_RULE_KEYS + OPTIONAL_RULE_KEYS

# Names a subject provides besides metrics. `layer`/`setting` come from the Subject
# itself; `format` must be given in Subject.metrics like lr and bits.
CONTEXT_NAMES: dict[str, dict[str, Type]] = {
    "layer": {"layer": "str", "setting": "str", "format": "str"},
    "model": {"setting": "str", "format": "str"},
    "setting": {"setting": "str", "format": "str"},
}
ALL_CONTEXT_NAMES: frozenset[str] = frozenset(n for names in CONTEXT_NAMES.values() for n in names)
# Context names whose value depends on the setting (lr and bits are metrics with per_setting=True).
PER_SETTING_CONTEXT: frozenset[str] = frozenset({"setting", "format"})
# Extra names only message templates may use.
TEMPLATE_ONLY_NAMES: dict[str, Type] = {"rule": "str"}
RESERVED_NAMES: frozenset[str] = frozenset(METRICS) | ALL_CONTEXT_NAMES | frozenset(FUNCTIONS) | frozenset(TEMPLATE_ONLY_NAMES)

RULE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
VAR_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")


def value_type(value: object) -> Type:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "num"
    if isinstance(value, str):
        return "str"
    return "any"


def name_types(scope: str | None, vars: Mapping[str, object], *, template: bool = False) -> dict[str, Type]:
    """Every name an expression (or template) at `scope` may use, with its static type.

    scope=None: the names of any scope (to still catch typos in a rule whose scope is bad).
    """
    types: dict[str, Type] = {name: value_type(v) for name, v in vars.items()}
    for s, context in CONTEXT_NAMES.items():
        if scope is None or s == scope:
            types.update(context)
    types.update({n: "num" for n, m in METRICS.items() if scope is None or scope in m.scopes})
    if template:
        types.update(TEMPLATE_ONLY_NAMES)
    return types


def suggest(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_names(names: Iterable[str], scope: str | None, vars: Mapping[str, object], *, template: bool = False) -> list[str]:
    """One problem per name not defined at `scope`, with a did-you-mean."""
    allowed = name_types(scope, vars, template=template)
    problems = []
    for name in names:
        if name in allowed:
            continue
        if name in METRICS:
            scopes = "/".join(METRICS[name].scopes)
            problems.append(f"metric {name!r} is not available at scope {scope!r} (it has scope {scopes})")
        elif name in ALL_CONTEXT_NAMES or name in TEMPLATE_ONLY_NAMES:
            problems.append(f"{name!r} is not defined at scope {scope!r}")
        else:
            problems.append(f"unknown metric or var {name!r}{suggest(name, allowed)}")
    return problems


def var_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not VAR_NAME.fullmatch(name) or keyword.iskeyword(name):
        return f"var name {name!r} must be an identifier (letters, digits, '_')"
    if name in METRICS:
        return f"var {name!r} shadows the metric {name!r}; rename it (e.g. {name}_threshold)"
    if name in RESERVED_NAMES:
        return f"var {name!r} shadows a built-in name; rename it"
    return None


@dataclass(frozen=True)
class Rule:
    """One rule. `names`, `per_setting` and `phase` are derived from `when` + `message`.

    `names`: metric names used (a subject lacking any of them is skipped for this rule).
    `per_setting`: True if the rule depends on the setting -- a metric with
    per_setting=True, `format`, `setting`, `lr`, `bits` -- or has scope 'setting';
    otherwise it is evaluated once per layer/model, not once per setting.
    `phase`: 'static' if every metric used is static, else 'dynamic'.
    """

    id: str
    scope: Scope
    when: str
    severity: Severity
    verdict: str
    message: str
    metadata: Mapping[str, object] = field(default_factory=dict, hash=False)
    source: str = "<unknown>"
    names: frozenset[str] = field(init=False)
    per_setting: bool = field(init=False)
    phase: Phase = field(init=False)
    expr: Expr = field(init=False, repr=False, compare=False)
    template: Template = field(init=False, repr=False, compare=False)
    # metric and context names a subject must provide, in first-use order
    required: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        if self.scope not in SCOPES:
            problems.append(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.severity not in SEVERITIES:
            problems.append(f"severity must be one of {', '.join(SEVERITIES)}, got {self.severity!r}")
        if self.verdict not in VERDICTS:
            problems.append(f"unknown verdict {self.verdict!r}{suggest(str(self.verdict), VERDICTS)}")
        expr: Expr | None = None
        try:
            expr = parse_expr(self.when)
        except ExprSyntaxError as exc:
            problems += [f"when: {p}" for p in exc.problems]
        template, tproblems = parse_template(self.message) if isinstance(self.message, str) else (None, ["message must be a string"])
        problems += tproblems
        if problems or expr is None or template is None:
            raise RuleFileError([f"{self.source}: rule {self.id}: {p}" for p in problems])
        used = tuple(dict.fromkeys(expr.names + template.names))
        context = CONTEXT_NAMES[self.scope]
        required = tuple(n for n in used if n in METRICS or (n in context and n not in ("layer", "setting")))
        names = frozenset(n for n in used if n in METRICS)
        per_setting = (
            self.scope == "setting"
            or any(METRICS[n].per_setting for n in names)
            or any(n in PER_SETTING_CONTEXT for n in used)
        )
        phase: Phase = "dynamic" if any(METRICS[n].phase == "dynamic" for n in names) else "static"
        setattr_ = object.__setattr__
        setattr_(self, "metadata", MappingProxyType(dict(self.metadata)))
        setattr_(self, "names", names)
        setattr_(self, "per_setting", per_setting)
        setattr_(self, "phase", phase)
        setattr_(self, "expr", expr)
        setattr_(self, "template", template)
        setattr_(self, "required", required)


@dataclass(frozen=True)
class RuleSet:
    """Rules after extends/override, the merged vars and the files read (extended first)."""

    rules: tuple[Rule, ...]
    vars: Mapping[str, object] = field(default_factory=dict, hash=False)
    files: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "vars", MappingProxyType(dict(self.vars)))
        object.__setattr__(self, "files", tuple(self.files))

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.id == rule_id), None)
