"""Running rules over measured subjects, summarizing outcomes and gating CI.

Semantics, chosen so that a report never claims more than was measured:
* a rule runs on every subject of its scope; a rule that does not depend on the
  setting (`Rule.per_setting` False) runs only on subjects with `setting=None`, and
  a per-setting rule only on subjects with a setting -- so a NaN-weights rule fires
  once per layer, not once per format;
* a subject lacking a value the rule uses (absent, None or NaN) gives `skipped`
  ("not measured: psi, r_star"), never `passed`: NaN compares false, so treating
  it as a value would silently pass every threshold;
* an evaluation failure (division by zero, math domain error, overflow, a NaN
  result, a type mismatch) also gives `skipped` with the reason, for that subject;
* a rule with no subject at all (a dynamic rule in a static-only run, a setting
  rule when no setting was planned) gives one `skipped` outcome whose subject has
  layer=None, setting=None and no metrics, so reports and JUnit still list it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ..errors import UsageError
from ..gc_pause import gc_paused
from .expr import ExprError
from .schema import SCOPES, SEVERITIES, Rule, RuleSet

Status = Literal["fired", "passed", "skipped"]
FailOn = Literal["error", "warning", "never"]
FAIL_ON: tuple[str, ...] = ("error", "warning", "never")

MetricValue = float | int | str | None


@dataclass(frozen=True)
class Subject:
    """What a rule is evaluated on: one layer or the model, for one setting or none.

    `setting=None` holds the setting-independent metrics (params, nonfinite, ...);
    a subject with a setting holds that setting's metrics plus its context values
    (`format`, `lr`, `bits`). None in `metrics` means not measured.
    """

    scope: str
    setting: str | None
    layer: str | None
    metrics: Mapping[str, MetricValue] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise ValueError(f"Subject scope must be one of {SCOPES}, got {self.scope!r}")
        object.__setattr__(self, "metrics", MappingProxyType(dict(self.metrics)))


@dataclass(frozen=True)
class Outcome:
    """A rule on a subject: the rendered message when fired, the reason when skipped."""

    rule: Rule
    subject: Subject
    status: Status
    message: str = ""

    @property
    def severity(self) -> str:
        return self.rule.severity


def _normalize(value: object) -> object:
    """Plain Python values (numpy/torch scalars unwrapped); NaN becomes None (not measured)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return None if math.isnan(f) else f
    item = getattr(value, "item", None)
    if callable(item):
        return _normalize(item())
    raise TypeError(f"unsupported metric value {value!r}")


_PLAIN = frozenset({int, str, bool, type(None)})  # values _normalize returns unchanged


def _evaluate_one(rule: Rule, subject: Subject, vars: Mapping[str, object]) -> Outcome:
    env: dict[str, object] = dict(vars)
    missing: list[str] = []
    metrics = subject.metrics
    for name in rule.required:
        value: object = metrics.get(name)
        kind = type(value)
        if isinstance(value, float) and kind is float:  # the common case, without _normalize's ABC checks
            if math.isnan(value):
                value = None
        elif kind not in _PLAIN:
            try:
                value = _normalize(value)
            except TypeError as exc:
                return Outcome(rule, subject, "skipped", f"cannot evaluate: {exc}")
        if value is None:
            missing.append(name)
        env[name] = value
    if missing:
        return Outcome(rule, subject, "skipped", f"not measured: {', '.join(missing)}")
    env["layer"] = subject.layer
    env["setting"] = subject.setting
    try:
        fired = rule.expr.test(env)
    except ExprError as exc:
        return Outcome(rule, subject, "skipped", f"cannot evaluate: {exc}")
    if not fired:
        return Outcome(rule, subject, "passed", "")
    env["rule"] = rule.id
    return Outcome(rule, subject, "fired", rule.template.render(env))


def evaluate(ruleset: RuleSet, subjects: Iterable[Subject]) -> list[Outcome]:
    """Outcomes rule by rule (file order), subject by subject (input order)."""
    # A rule applies to the subjects of its scope whose setting is given exactly when the
    # rule is per-setting. Grouping once lets each rule read its group instead of testing
    # every subject (rules x subjects on a checkpoint of 10^5 layers).
    groups: dict[tuple[str, bool], list[Subject]] = {}
    for s in subjects:
        groups.setdefault((s.scope, s.setting is not None), []).append(s)
    vars = dict(ruleset.vars)
    outcomes: list[Outcome] = []
    with gc_paused():  # 10^6 outcomes on a checkpoint of 10^5 layers, none in a cycle
        for rule in ruleset.rules:
            applicable = groups.get((rule.scope, rule.per_setting))
            if not applicable:
                where = "per setting " if rule.per_setting else ""
                empty = Subject(rule.scope, None, None, {})
                outcomes.append(Outcome(rule, empty, "skipped", f"no {rule.scope} subject {where}in this run"))
                continue
            outcomes.extend([_evaluate_one(rule, s, vars) for s in applicable])
    return outcomes


def summarize(outcomes: Iterable[Outcome]) -> dict[str, dict[str, int]]:
    """Rule id -> {'fired', 'passed', 'skipped'} counts, in first-seen order."""
    out: dict[str, dict[str, int]] = {}
    for o in outcomes:
        counts = out.setdefault(o.rule.id, {"fired": 0, "passed": 0, "skipped": 0})
        counts[o.status] += 1
    return out


def severity_rank(severity: str) -> int:
    """0 for error, 1 for warning, 2 for info: lower is more severe."""
    return SEVERITIES.index(severity)


def gate(outcomes: Iterable[Outcome], fail_on: str = "error") -> bool:
    """True when the run passes: no fired outcome at or above `fail_on` ('never' always passes).

    Skipped outcomes never fail the gate: a static-only run is not failed by the
    dynamic rules it could not evaluate.
    """
    if fail_on not in FAIL_ON:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON)}, got {fail_on!r}")
    if fail_on == "never":
        return True
    threshold = severity_rank(fail_on)
    return not any(o.status == "fired" and severity_rank(o.rule.severity) <= threshold for o in outcomes)
